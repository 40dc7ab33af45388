"""One SSAPO round as a unit (paper §4, Algorithm 1): `run_round`.

Round 0 trains π_0 from the SFT model on the labelled seed with DPO (reference: SFT). Round
t ≥ 1, with π_{t−1}: `phases.generate`, `phases.annotate`, `phases.train_set` (reference and
judge log-probs, the follower's atoms), then `leader.train_round` trains π_t (reference π_{t−1},
or SFT with ``rounds.train_reference=sft``); π_t is exported in Hugging Face format and
`phases.evaluate` writes its greedy outputs. The round ends with a checkpoint of its own step.

What stays on the devices between rounds is what `residency.models_held` names for the next
round (the SFT model, π_t, and π_{t−1} when it is the next judge): the train state, with its
optimizer moments, lives only inside `run_round`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

from ssapo_jax import lora, rundir
from ssapo_jax import train as tr
from ssapo_jax.errors import CheckpointError
from ssapo_jax.models import CausalLM, save_hf
from ssapo_jax.pipeline import hosts, leader, phases
from ssapo_jax.pipeline.residency import models_held
from ssapo_jax.pipeline.runtime import Runtime
from ssapo_jax.runrecord import message

ROUND_DONE = "round_done"


@dataclasses.dataclass(frozen=True)
class ResumePoint:
  """Where a run picks up: the first round to run, the checkpoint step to restore inside it
  (None: start that round afresh) and the global step reached."""

  round: int = 0
  checkpoint_step: int | None = None
  global_step: int = 0


def _restore_train_state(rt: Runtime, t: int, init: CausalLM):
  """The train-phase state of round t from the newest checkpoint that verifies (older ones
  when it does not): ``(state or None, metadata or None, global step)``."""
  target = tr.checkpoint_state(leader.new_train_state(rt, t, init, 1, abstract=True))
  restored = rt.ckpt.restore(target)
  meta = restored.metadata
  if meta["phase"] == ROUND_DONE and meta["round"] == t - 1:
    message(f"resuming from checkpoint step {restored.step} (round {t - 1} done; round {t} starts)")
    return None, None, meta["global_step"]  # fell back to the start of round t
  if meta["phase"] != "train" or meta["round"] != t:
    raise CheckpointError(
      f"checkpoint {restored.step} in {rt.ckpt.directory} is {meta}, expected "
      f"round {t}; delete the newer broken checkpoints or start with "
      "--no-resume"
    )
  message(
    f"resuming from checkpoint step {restored.step} (round {t}, phase train, step "
    f"{meta['round_step']} of the round)"
  )
  return restored.state, meta, meta["global_step"]


def export_policy(rt: Runtime, t: int, policy: CausalLM) -> None:
  """Saves π_t in Hugging Face format to ``round_<t>/policy`` (atomically; process 0 writes).

  Every process calls `save_hf`: parameters that span processes are gathered to the hosts one
  tensor at a time, a collective all of them take part in.
  """
  final = os.path.join(rt.round_dir(t), "policy")
  tmp = final + ".tmp"
  if hosts.is_process0():
    shutil.rmtree(tmp, ignore_errors=True)
  save_hf(policy, tmp, tokenizer=rt.tokenizer)
  if hosts.is_process0():
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def export_adapters(rt: Runtime, t: int, state) -> None:
  """With LoRA, round t's adapters in PEFT format to ``round_<t>/adapter`` (process 0): applied
  to the round's base, ``round_<t-1>/policy`` (``model.path`` for round 0), they give π_t."""
  if state.lora is None or not hosts.is_process0():
    return
  base = leader.base_source(rt, t)
  lora.save_peft(
    state.model_config,
    state.base,
    state.params,
    state.lora,
    os.path.join(rt.round_dir(t), "adapter"),
    base_model=base,
  )


@phases.round_phase
def _summary(rt: Runtime, t: int, global_step: int, num_pairs: int) -> dict[str, Any]:
  """``round_<t>/summary.json`` (written by process 0, returned on every process)."""
  summary = {"round": t, "global_step": global_step, "num_pairs": num_pairs}
  follower = os.path.join(rt.round_dir(t), "follower.json")
  if hosts.is_process0() and os.path.exists(follower):
    with open(follower) as f:
      summary["follower"] = json.load(f)
  summary = hosts.broadcast_json(summary)
  if hosts.is_process0():
    rundir.atomic_json(os.path.join(rt.round_dir(t), "summary.json"), summary)
  return summary


@phases.round_phase
def _train_and_export(rt: Runtime, t: int, policy: CausalLM, resume: ResumePoint):
  """Trains π_t from ``policy`` (resuming inside the round when ``resume`` says so), keeps it in
  ``rt.policies`` and exports it; returns ``(train state, global step, pairs)``."""
  state = meta = None
  global_step = resume.global_step
  if resume.checkpoint_step is not None:
    state, meta, restored_step = _restore_train_state(rt, t, policy)
    if restored_step < global_step:  # the newest checkpoint failed; steps after it rerun
      rt.logger.rewind(restored_step)
    global_step = restored_step
  if t > 0:
    gen = phases.generate(rt, t, policy, step=global_step)
    phases.annotate(rt, t, policy, gen, step=global_step)
  reference = policy if t > 0 and rt.config.rounds.train_reference == "previous" else rt.sft
  dataset, judge_logps = phases.train_set(rt, t, policy, reference, step=global_step)
  clock = hosts.PhaseClock()
  state, global_step = leader.train_round(
    rt,
    t,
    policy,
    dataset,
    judge_logps,
    resume_state=state,
    resume_meta=meta,
    global_step=global_step,
  )
  clock.report(
    rt.logger,
    global_step,
    "train",
    t,
    chips=rt.mesh.devices.size,
    pairs=rt.config.train_for_round(t).epochs * len(dataset),
  )
  rt.policies[t] = tr.merge_params(state)
  export_policy(rt, t, rt.policies[t])
  export_adapters(rt, t, state)
  return state, global_step, len(dataset)


def run_round(rt: Runtime, t: int, resume: ResumePoint = ResumePoint()) -> tuple[dict, int]:
  """Runs round t (resuming inside it per ``resume``); returns ``(summary, global step)``.

  Every phase is cached in ``round_<t>/`` and copied up to a remote output directory when it
  ends; the round's last act is a checkpoint at a step of its own (phase ``round_done``).
  """
  policy = rt.policy(t - 1)
  state, global_step, num_pairs = _train_and_export(rt, t, policy, resume)
  phases.evaluate(rt, t, rt.policies[t], step=global_step)
  summary = _summary(rt, t, global_step, num_pairs)
  keep = models_held(rt.config.rounds, t + 1)  # what the next round reads (and the plan counts)
  for s in [s for s in rt.policies if s not in keep]:
    rt.policies.pop(s)
  global_step += 1  # the round-end checkpoint gets a step of its own
  rt.save_checkpoint(
    global_step, state, {"round": t, "phase": ROUND_DONE, "global_step": global_step}
  )
  rt.ckpt.wait()
  return summary, global_step
