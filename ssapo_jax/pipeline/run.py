"""SSAPO rounds end to end (paper §4, Algorithm 1): the loop, its resume point and the exports.

Round 0 trains π_0 from the SFT model on the labelled seed with DPO (reference: SFT). Round
t ≥ 1, with π_{t−1}: `phases.generate`, `phases.annotate`, `phases.follower`, then
`leader.train_round` trains π_t (reference π_{t−1}, or SFT with ``rounds.train_reference=sft``)
and `phases.evaluate` writes greedy outputs; π_t is exported in Hugging Face format.

The train state is checkpointed (orbax) every ``checkpoint.save_every_steps`` steps and at each
round's end, and every phase output is cached in ``round_<t>/``, so a run killed anywhere resumes
to the same parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from typing import Any

import jax

from ssapo_jax import compilation
from ssapo_jax import sharding as shd
from ssapo_jax import train as tr
from ssapo_jax.checkpoint import Checkpointer, checkpoint_dir
from ssapo_jax.config import dump_yaml
from ssapo_jax.errors import CheckpointError
from ssapo_jax.experiment import ExperimentConfig
from ssapo_jax.metrics import MetricsLogger
from ssapo_jax.models import Llama, save_hf
from ssapo_jax.models.tokenizer import load_tokenizer
from ssapo_jax.pipeline import hosts, leader, phases, rundir
from ssapo_jax.pipeline.runtime import Runtime, load_model, prepare_data, scorer_for
from ssapo_jax.runrecord import message

ROUND_DONE = "round_done"


def resume_point(ckpt: Checkpointer) -> tuple[int, int | None, int]:
  """``(round, checkpoint step to restore or None, global step)`` of the newest readable
  checkpoint's metadata (an unreadable one is skipped with a warning)."""
  for step in reversed(ckpt.all_steps()):
    try:
      meta = ckpt.restore_metadata(step)
    except Exception as e:  # orbax raises many types for unreadable files
      warnings.warn(f"checkpoint {step} metadata unreadable ({type(e).__name__}: {e}); "
                    "trying an older one")
      continue
    if meta["phase"] == ROUND_DONE:
      return meta["round"] + 1, None, meta["global_step"]
    return meta["round"], step, meta["global_step"]
  return 0, None, 0


def _restore_train_state(rt: Runtime, t: int, init: Llama, step: int):
  """The train-phase state of round t at checkpoint ``step`` (with fallback to older ones)."""
  # Newest checkpoint that verifies (warns when it falls back), into an abstract target.
  restored = rt.ckpt.restore(leader.new_train_state(rt, t, init, 1, abstract=True))
  meta = restored.metadata
  if meta["phase"] == ROUND_DONE and meta["round"] == t - 1:
    message(f"resuming from checkpoint step {restored.step} (round {t - 1} done; round {t} "
            "starts)")
    return None, None, meta["global_step"]  # fell back to the start of round t
  if meta["phase"] != "train" or meta["round"] != t:
    raise CheckpointError(f"checkpoint {restored.step} in {rt.ckpt.directory} is {meta}, expected "
                          f"round {t}; delete the newer broken checkpoints or start with "
                          "--no-resume")
  message(f"resuming from checkpoint step {restored.step} (round {t}, phase train, step "
          f"{meta['round_step']} of the round)")
  return restored.state, meta, meta["global_step"]


class _NoCheckpoints:
  """Stands in for `Checkpointer` when the processes do not share the output directory."""

  directory = None

  def all_steps(self) -> list[int]:
    return []

  def save(self, *args, **kwargs) -> bool:
    return False

  def wait(self) -> None:
    pass

  def close(self) -> None:
    pass


def _export_policy(rt: Runtime, t: int, policy: Llama) -> None:
  """Saves π_t in Hugging Face format to ``round_<t>/policy`` (atomically; process 0 writes).

  Every process calls `save_hf`: parameters that span processes are gathered to the hosts one
  tensor at a time, a collective all of them take part in.
  """
  final = os.path.join(rt.round_dir(t), "policy")
  tmp = final + ".tmp"
  if hosts.is_leader():
    shutil.rmtree(tmp, ignore_errors=True)
  save_hf(policy, tmp, tokenizer=rt.tokenizer)
  if hosts.is_leader():
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _copy_final_policy(config: ExperimentConfig, workdir: str) -> None:
  """``final_policy/``: a copy of the last round's exported policy (process 0)."""
  last = os.path.join(workdir, f"round_{config.rounds.num_rounds}", "policy")
  if jax.process_index() == 0 and os.path.isdir(last):
    final = os.path.join(workdir, "final_policy")
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(last, final)
    rundir.push(config.output_dir, workdir, "final_policy")


def run(config: ExperimentConfig, *, resume: bool = True,
        config_change: dict[str, Any] | None = None) -> dict[int, dict[str, Any]]:
  """Runs (or resumes) every round of ``config``; returns the per-round summaries.

  Writes under ``config.output_dir``: ``split_manifest.json``, ``metrics.jsonl`` and
  ``tensorboard/``, ``checkpoints/``, ``round_<t>/`` (``generations.npz``, ``pairs/``,
  ``train_set/``, ``follower.json``, ``eval_generations.json``, ``summary.json``, ``policy/``)
  and ``final_policy/`` (Hugging Face format). A remote (``gs://``) output directory gets
  checkpoints and metrics directly; the phase outputs are written to a local mirror on every
  host and copied up by process 0 after each phase (and down again when a run resumes).

  It says what it does with `runrecord.message` (the resume point, one summary line per phase,
  where the outputs are); a resumed run whose last round is done returns at once with
  ``run already complete, nothing to do``. ``config_change`` (``config_version``,
  ``config_file``, ``changed``) is logged to ``metrics.jsonl`` at the step it takes effect.
  """
  # Every process must run the same resolved config and code (only its process id differs).
  hosts.check_same_run(dump_yaml(dataclasses.replace(
      config, mesh=dataclasses.replace(config.mesh, process_id=None, local_device_ids=None))))
  workdir = rundir.local_workdir(config.output_dir)
  os.makedirs(workdir, exist_ok=True)
  compilation.enable_cache(config.compilation, workdir)  # before the first compile
  if rundir.is_remote(config.output_dir) or hosts.shared_directory(workdir):
    ckpt = Checkpointer(checkpoint_dir(config.output_dir), config=config.checkpoint)
  else:
    warnings.warn(f"{config.output_dir} is a separate directory on each host: no checkpoints "
                  "(orbax needs one directory all processes see); a relaunch resumes from the "
                  "finished phases on process 0")
    ckpt = _NoCheckpoints()
  first_round, resume_step, global_step = resume_point(ckpt) if resume else (0, None, 0)
  if first_round > config.rounds.num_rounds:
    ckpt.close()
    if not os.path.isdir(os.path.join(workdir, "final_policy")):  # killed just before the copy
      _copy_final_policy(config, workdir)
    if config_change:
      with MetricsLogger(config.output_dir, resume_step=global_step) as logger:
        logger.log(global_step, {}, **config_change)
    message("run already complete, nothing to do")
    return {}
  if resume and rundir.is_remote(config.output_dir):
    rundir.pull(config.output_dir, workdir)
  start = time.perf_counter()
  mesh = shd.make_mesh(config.mesh)
  tokenizer = load_tokenizer(config.model.resolved_tokenizer_path)
  sft = load_model(config.model.path, config, mesh)
  data = prepare_data(config, workdir, sft=sft, tokenizer=tokenizer, mesh=mesh)
  rundir.push(config.output_dir, workdir, "split_manifest.json")
  logger = MetricsLogger(config.output_dir, resume_step=global_step if resume else -1)
  if config_change:
    logger.log(global_step, {}, **config_change)
  if resume_step is None and global_step > 0:
    message(f"resuming after round {first_round - 1} (checkpoint step {global_step}); round "
            f"{first_round} starts")
  rt = Runtime(config=config, mesh=mesh, tokenizer=tokenizer, sft=sft, data=data, ckpt=ckpt,
               logger=logger, workdir=workdir,
               scorer=scorer_for(config, mesh, tokenizer.pad_token_id))
  summaries = {}
  try:
    for t in range(first_round, config.rounds.num_rounds + 1):
      rel = f"round_{t}"
      os.makedirs(rt.round_dir(t), exist_ok=True)
      policy = rt.policy(t - 1)
      resume_state = resume_meta = None
      if t == first_round and resume_step is not None:
        resume_state, resume_meta, restored_step = _restore_train_state(rt, t, policy,
                                                                        resume_step)
        if restored_step < global_step:  # the newest checkpoint failed; steps after it rerun
          logger.rewind(restored_step)
        global_step = restored_step
      if t > 0:
        gen = phases.generate(rt, t, policy, step=global_step)
        rundir.push(config.output_dir, workdir, rel)
        phases.annotate(rt, t, policy, gen, step=global_step)
        rundir.push(config.output_dir, workdir, rel)
      reference = (policy if t > 0 and config.rounds.train_reference == "previous" else sft)
      dataset, judge_logps = phases.follower(rt, t, policy, reference, step=global_step)
      rundir.push(config.output_dir, workdir, rel)
      clock = hosts.PhaseClock()
      state, global_step = leader.train_round(rt, t, policy, dataset, judge_logps,
                                              resume_state=resume_state, resume_meta=resume_meta,
                                              global_step=global_step)
      epochs = config.train_for_round(t).epochs
      clock.report(logger, global_step, "train", t, chips=mesh.devices.size,
                   pairs=epochs * len(dataset))
      rt.policies[t] = tr.merge_params(state)
      rt.policies.pop(t - 2, None)  # keep π_{t-1} and π_t: all that later rounds read
      _export_policy(rt, t, rt.policies[t])
      phases.evaluate(rt, t, rt.policies[t], step=global_step)
      summary = {"round": t, "global_step": global_step, "num_pairs": len(dataset)}
      follower = os.path.join(rt.round_dir(t), "follower.json")
      if hosts.is_leader() and os.path.exists(follower):
        with open(follower) as f:
          summary["follower"] = json.load(f)
      summary = hosts.broadcast_json(summary)
      if hosts.is_leader():
        rundir.atomic_json(os.path.join(rt.round_dir(t), "summary.json"), summary)
      rundir.push(config.output_dir, workdir, rel)
      summaries[t] = summary
      global_step += 1  # the round-end checkpoint gets a step of its own
      ckpt.save(global_step, state, {"round": t, "phase": ROUND_DONE, "global_step": global_step},
                force=True)
      ckpt.wait()
    _copy_final_policy(config, workdir)
  finally:
    ckpt.close()
    logger.close()
  out = config.output_dir
  if hosts.is_leader():
    message(f"run complete: rounds {first_round}..{config.rounds.num_rounds} in "
            f"{time.perf_counter() - start:.0f} s, global step {global_step}; final policy: "
            f"{out}/final_policy; eval generations: {out}/round_<t>/eval_generations.json; "
            f"metrics: {out}/metrics.jsonl and {out}/tensorboard; log: {out}/run.log")
  return summaries
