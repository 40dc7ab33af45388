"""SSAPO end to end: set-up, the resume point and the loop over rounds (`run`).

Each round is `round.run_round`. The train state is checkpointed (orbax) every
``checkpoint.save_every_steps`` steps and at each round's end, and every phase output is cached
in ``round_<t>/``, so a run killed anywhere resumes to the same parameters.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import warnings
from typing import Any

import jax

from ssapo_jax.checkpoint import Checkpointer, NoCheckpoints, open_checkpointer
from ssapo_jax.config import dump_yaml, to_dict
from ssapo_jax.experiment import ExperimentConfig
from ssapo_jax.metrics import MetricsLogger, metric_sinks
from ssapo_jax.pipeline import hosts
from ssapo_jax.pipeline.round import ROUND_DONE, ResumePoint, run_round
from ssapo_jax.pipeline.runtime import Runtime
from ssapo_jax.rundir import RunDir
from ssapo_jax.runrecord import message


def resume_point(ckpt: Checkpointer | NoCheckpoints) -> ResumePoint:
  """The `ResumePoint` of the newest readable checkpoint's metadata (an unreadable one is
  skipped with a warning); the start of round 0 without one."""
  for step in reversed(ckpt.all_steps()):
    try:
      meta = ckpt.restore_metadata(step)
    except Exception as e:  # orbax raises many types for unreadable files
      warnings.warn(f"checkpoint {step} metadata unreadable ({type(e).__name__}: {e}); "
                    "trying an older one")
      continue
    if meta["phase"] == ROUND_DONE:
      return ResumePoint(meta["round"] + 1, None, meta["global_step"])
    return ResumePoint(meta["round"], step, meta["global_step"])
  return ResumePoint()


def copy_final_policy(rundir: RunDir, num_rounds: int) -> None:
  """``final_policy/``: a copy of the last round's exported policy (process 0)."""
  last = rundir.path(f"round_{num_rounds}", "policy")
  if jax.process_index() == 0 and os.path.isdir(last):
    shutil.rmtree(rundir.path("final_policy"), ignore_errors=True)
    shutil.copytree(last, rundir.path("final_policy"))
    rundir.push("final_policy")


def _finish_complete_run(config: ExperimentConfig, rundir: RunDir) -> dict:
  """A resumed run whose last round is done: repair ``final_policy/`` if the copy was cut."""
  if not os.path.isdir(rundir.path("final_policy")):
    copy_final_policy(rundir, config.rounds.num_rounds)
  message("run already complete, nothing to do")
  return {}


def run(config: ExperimentConfig, *, resume: bool = True,
        config_change: dict[str, Any] | None = None) -> dict[int, dict[str, Any]]:
  """Runs (or resumes) every round of ``config``; returns the per-round summaries.

  Writes under ``config.output_dir``: ``split_manifest.json``, ``metrics.jsonl`` and
  ``tensorboard/``, ``checkpoints/``, ``round_<t>/`` (``generations.npz``, ``pairs/``,
  ``train_set/``, ``follower.json``, ``eval_generations.json``, ``summary.json``, ``policy/``)
  and ``final_policy/`` (Hugging Face format). A remote (``gs://``) output directory gets
  checkpoints and metrics directly; the phase outputs are written to a local mirror on every
  host and copied up by process 0 after each phase (and down again when a run resumes).

  A resumed run whose last round is done returns at once with ``run already complete, nothing
  to do`` and records nothing. ``config_change`` (``config_version``, ``config_file``,
  ``changed``) is logged to ``metrics.jsonl`` at the step it takes effect.
  """
  # Every process must run the same resolved config and code (only its process id differs).
  hosts.check_same_run(dump_yaml(dataclasses.replace(
      config, mesh=dataclasses.replace(config.mesh, process_id=None, local_device_ids=None))))
  rundir = RunDir.open(config.output_dir)
  ckpt = open_checkpointer(config.output_dir, config=config.checkpoint,
                           shared=rundir.remote or hosts.shared_directory(rundir.workdir))
  start = resume_point(ckpt) if resume else ResumePoint()
  if start.round > config.rounds.num_rounds:
    ckpt.close()
    return _finish_complete_run(config, rundir)
  if resume:
    rundir.pull()
  clock = time.perf_counter()
  sinks = metric_sinks(config.output_dir, config.metrics, local_dir=rundir.workdir,
                       run_config=to_dict(config))
  logger = MetricsLogger(config.output_dir, resume_step=start.global_step if resume else -1,
                         sinks=sinks)
  if config_change:
    logger.log(start.global_step, {}, **config_change)
  if start.checkpoint_step is None and start.global_step > 0:
    message(f"resuming after round {start.round - 1} (checkpoint step {start.global_step}); "
            f"round {start.round} starts")
  summaries, global_step = {}, start.global_step
  with Runtime.build(config, rundir, ckpt=ckpt, logger=logger) as rt:
    for t in range(start.round, config.rounds.num_rounds + 1):
      resume_here = start if t == start.round else ResumePoint(t, None, global_step)
      summaries[t], global_step = run_round(rt, t, resume_here)
    copy_final_policy(rundir, config.rounds.num_rounds)
  if hosts.is_process0():
    out = config.output_dir
    message(f"run complete: rounds {start.round}..{config.rounds.num_rounds} in "
            f"{time.perf_counter() - clock:.0f} s, global step {global_step}; final policy: "
            f"{out}/final_policy; eval generations: {out}/round_<t>/eval_generations.json; "
            f"metrics: {out}/metrics.jsonl and {out}/tensorboard; log: {out}/run.log")
  return summaries
