"""The leader's side of a round: training π_t on the round's set (the Stackelberg policy).

`train_round` builds the round's train state and loader and runs `step_loop`: the pure sharded
step (`ssapo_jax.train`) over the batches, with one hook per concern around each step:

* `FollowerRefresh` (``rounds.follower_refresh_steps``): re-solves the follower on the current
  policy's margins every so many steps (paper eq. 7–8) and swaps the batches' atoms; each
  refresh's atoms are saved under ``follower_refresh/`` so a resumed run uses the atoms in force
  at its checkpoint;
* `MetricsHook`: tokens per second, the finite-progress guard, ``metrics.jsonl`` and the
  progress bar every ``rounds.log_every_steps`` steps;
* `CheckpointHook`: a checkpoint every ``checkpoint.save_every_steps`` steps with the loader
  cursor, never of a restored state before a finite step;
* `ProfileHook` (``train.profile_steps``): a jax.profiler trace of a window of global steps in
  ``output_dir/profile/``.

Process 0 reads and writes the refresh files and broadcasts what it finds (`hosts`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Protocol, Sequence

import jax
import numpy as np

from ssapo_jax import rundir
from ssapo_jax import sharding as shd
from ssapo_jax import train as tr
from ssapo_jax.data import LoaderCursor, PreferenceLoader, with_pair_columns
from ssapo_jax.errors import NonFiniteError
from ssapo_jax.experiment import stream_seed
from ssapo_jax.models import CausalLM
from ssapo_jax.pipeline import hosts
from ssapo_jax.pipeline.phases import solve_follower_on_process0
from ssapo_jax.pipeline.runtime import Runtime
from ssapo_jax.runrecord import message, progress

# ----------------------------------------------------------------------------- the step loop


class RoundBatches:
  """The round's batches from a cursor on; `set_dataset` swaps the pairs (new atoms) in place,
  keeping the position."""

  def __init__(self, rt: Runtime, t: int, dataset, cursor: LoaderCursor):
    self.rt, self.t, self.train_cfg = rt, t, rt.config.train_for_round(t)
    self.dataset = dataset
    self.loader = self._loader(dataset)
    self.iterator = self.loader.iterator(cursor, num_epochs=self.train_cfg.epochs)

  def _loader(self, dataset) -> PreferenceLoader:
    d, t_cfg = self.rt.config.data, self.train_cfg
    packing = (
      {
        "packing": True,
        "pack_length": d.resolved_pack_length,
        "micro_batches": t_cfg.micro_batches,
        "row_multiple": tr.packed_row_multiple(self.rt.mesh, t_cfg),
      }
      if d.packing
      else {}
    )
    return PreferenceLoader(
      dataset,
      global_batch_size=t_cfg.global_batch_size,
      seed=stream_seed(self.rt.config.seed, "shuffle", self.t),
      pad_id=self.rt.tokenizer.pad_token_id,
      bucket_size=d.bucket_size,
      bucket_window=d.bucket_window,
      num_hosts=jax.process_count(),
      host_index=jax.process_index(),
      **packing,
    )

  @property
  def num_steps(self) -> int:
    return self.train_cfg.epochs * self.loader.batches_per_epoch

  @property
  def cursor(self) -> LoaderCursor:
    return self.iterator.cursor

  def set_dataset(self, dataset) -> None:
    self.dataset = dataset
    self.loader = self._loader(dataset)
    self.iterator = self.loader.iterator(self.iterator.cursor, num_epochs=self.train_cfg.epochs)

  def next(self):
    """This host's next batch (numpy), or None after the last."""
    return next(self.iterator, None)


@dataclasses.dataclass
class StepContext:
  """What the hooks see: the round, its progress, the current state and the last step's output.

  Attributes:
    t: the round.
    done: steps of the round done (``epoch * batches_per_epoch + step``).
    num_steps: steps of the round.
    global_step: the run's step counter.
    state: the current `TrainState` (after the step, in ``after_step``).
    batches: the round's `RoundBatches`.
    batch: the last step's host-local batch (numpy), in ``after_step``.
    metrics: the last step's metrics (device scalars), in ``after_step``.
    since_restore: steps run since a restored state (0 for a fresh round).
  """

  t: int
  done: int
  num_steps: int
  global_step: int
  state: Any
  batches: RoundBatches
  batch: Any = None
  metrics: dict | None = None
  since_restore: int = 0


class StepHook(Protocol):
  """One concern around the train step; every method may do nothing."""

  def before_step(self, ctx: StepContext) -> None: ...

  def after_step(self, ctx: StepContext) -> None: ...

  def end(self, ctx: StepContext) -> None: ...


def step_loop(step_fn, ctx: StepContext, hooks: Sequence[StepHook]) -> StepContext:
  """Runs ``step_fn`` over ``ctx.batches`` to the round's end, calling the hooks around each
  step (in order); returns the final context."""
  while True:
    for hook in hooks:
      hook.before_step(ctx)
    batch = ctx.batches.next()
    if batch is None:
      break
    ctx.state, ctx.metrics = step_fn(ctx.state, shd.global_batch(ctx.batches.rt.mesh, batch))
    ctx.batch = batch
    ctx.done, ctx.global_step, ctx.since_restore = (
      ctx.done + 1,
      ctx.global_step + 1,
      ctx.since_restore + 1,
    )
    for hook in hooks:
      hook.after_step(ctx)
  for hook in hooks:
    hook.end(ctx)
  return ctx


# ----------------------------------------------------------------------------- hooks


def _refresh_path(rt: Runtime, t: int, round_step: int) -> str:
  return os.path.join(rt.round_dir(t), "follower_refresh", f"step_{round_step:08d}.npz")


def _latest_refresh(rt: Runtime, t: int, round_step: int) -> str | None:
  """Process 0's newest saved refresh at or before ``round_step`` (broadcast), or None."""
  folder = os.path.join(rt.round_dir(t), "follower_refresh")
  latest = None
  if hosts.is_process0() and os.path.isdir(folder):
    steps = sorted(
      int(f[5:13]) for f in os.listdir(folder) if f.endswith(".npz") and f[5:13].isdigit()
    )
    steps = [s for s in steps if s <= round_step]
    latest = _refresh_path(rt, t, steps[-1]) if steps else None
  return hosts.broadcast_json(latest)


def _with_saved_atoms(dataset, path: str):
  atoms = hosts.read_npz(path)
  return with_pair_columns(
    dataset, atom_weights=atoms["atom_weights"], atom_shifts=atoms["atom_shifts"]
  )


def refresh_follower(rt: Runtime, t: int, state, dataset, judge_logps, round_step: int):
  """Re-solves the follower from the current policy's margins (paper eq. 7–8).

  Returns ``(dataset with the new atoms, follower summary)``; the atoms are saved for resume.
  """
  # The scoring cache keys on parameter fingerprints, so every refresh is a fresh pass.
  pol_c, pol_r = rt.scorer.pairs(tr.merge_params(state), dataset, cache_dir=rt.round_dir(t))
  margins = (pol_c - judge_logps["judge_chosen_logps"]) - (
    pol_r - judge_logps["judge_rejected_logps"]
  )
  weights, shifts, summary = solve_follower_on_process0(rt, t, margins)
  if hosts.is_process0():
    path = _refresh_path(rt, t, round_step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rundir.atomic_npz(path, atom_weights=weights, atom_shifts=shifts)
  return with_pair_columns(dataset, atom_weights=weights, atom_shifts=shifts), summary


@dataclasses.dataclass
class FollowerRefresh:
  """Every ``every`` steps, the follower's atoms from the current policy (saved, or reloaded
  when a resumed run reaches a refresh it already made)."""

  rt: Runtime
  judge_logps: dict
  every: int

  def start(self, ctx: StepContext) -> None:
    """A resumed round trains on the atoms in force at its checkpoint."""
    if ctx.done > 0 and (latest := _latest_refresh(self.rt, ctx.t, ctx.done)) is not None:
      ctx.batches.set_dataset(_with_saved_atoms(ctx.batches.dataset, latest))

  def before_step(self, ctx: StepContext) -> None:
    if not (ctx.done > 0 and ctx.done % self.every == 0 and ctx.done < ctx.num_steps):
      return
    path = _refresh_path(self.rt, ctx.t, ctx.done)
    if _latest_refresh(self.rt, ctx.t, ctx.done) == path:  # resumed at a refresh
      dataset = _with_saved_atoms(ctx.batches.dataset, path)
    else:
      dataset, summary = refresh_follower(
        self.rt, ctx.t, ctx.state, ctx.batches.dataset, self.judge_logps, ctx.done
      )
      self.rt.logger.log(ctx.global_step, summary, round=ctx.t, round_step=ctx.done)
    ctx.batches.set_dataset(dataset)

  def after_step(self, ctx: StepContext) -> None:
    pass

  def end(self, ctx: StepContext) -> None:
    pass


class MetricsHook:
  """Every ``rounds.log_every_steps`` steps (and the last): the finite-progress guard, tokens
  per second since the last record, a ``metrics.jsonl`` record and the progress bar."""

  def __init__(self, rt: Runtime, ctx: StepContext):
    self.rt, self.train_cfg = rt, rt.config.train_for_round(ctx.t)
    self.bar = progress(total=ctx.num_steps, initial=ctx.done, desc=f"round {ctx.t}: train")
    self.tokens, self.last = 0, time.perf_counter()

  def before_step(self, ctx: StepContext) -> None:
    pass

  def after_step(self, ctx: StepContext) -> None:
    b = ctx.batch
    real = (
      np.sum(b.segment_ids > 0)
      if self.rt.config.data.packing
      else b.chosen_mask.sum() + b.rejected_mask.sum()
    )
    self.tokens += int(real) * jax.process_count()
    self.bar.update(1)
    if ctx.done % self.rt.config.rounds.log_every_steps and ctx.done != ctx.num_steps:
      return
    metrics = {k: float(v) for k, v in shd.to_host(ctx.metrics).items() if np.ndim(v) == 0}
    tr.check_finite_progress(metrics, self.train_cfg)
    now = time.perf_counter()
    metrics["tokens_per_second"] = self.tokens / max(now - self.last, 1e-9)
    self.tokens, self.last = 0, now
    self.rt.logger.log(ctx.global_step, metrics, round=ctx.t, round_step=ctx.done)
    self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")

  def end(self, ctx: StepContext) -> None:
    self.bar.close()


class CheckpointHook:
  """A checkpoint every ``checkpoint.save_every_steps`` steps (not at the round's end: the run
  saves that), with the loader cursor. A restored state is saved again only after a finite
  step, and a round that ends without one since its restore raises `NonFiniteError`."""

  def __init__(self, rt: Runtime, restored: bool, base_fingerprint: str | None = None):
    self.rt = rt
    self.finite_since_restore = not restored
    self.base_fingerprint = base_fingerprint  # with LoRA: the base the adapters train on

  def _finite_since_restore(self, ctx: StepContext) -> bool:
    # One scalar read, only until the first finite step after a restore.
    if not self.finite_since_restore:
      consecutive = int(shd.to_host(ctx.metrics["nonfinite/consecutive"]))
      self.finite_since_restore = consecutive < ctx.since_restore
    return self.finite_since_restore

  def before_step(self, ctx: StepContext) -> None:
    pass

  def after_step(self, ctx: StepContext) -> None:
    if ctx.done % self.rt.config.checkpoint.save_every_steps or ctx.done >= ctx.num_steps:
      return
    if not self._finite_since_restore(ctx):
      message(
        f"round {ctx.t}: no finite step since the restore; not saving checkpoint {ctx.global_step}"
      )
      return
    meta = {
      "round": ctx.t,
      "phase": "train",
      "round_step": ctx.done,
      "cursor": ctx.batches.cursor.to_dict(),
      "global_step": ctx.global_step,
    }
    if self.base_fingerprint is not None:
      meta["base_fingerprint"] = self.base_fingerprint
    self.rt.save_checkpoint(ctx.global_step, ctx.state, meta)

  def end(self, ctx: StepContext) -> None:
    if ctx.since_restore and not self._finite_since_restore(ctx):
      raise NonFiniteError(
        f"round {ctx.t} ended without a finite step since its restore from "
        "a checkpoint; its state is not saved. Likely causes: corrupted "
        "inputs (train_set, model files), then train.learning_rate"
      )


PROFILE_SUBDIR = "profile"


class ProfileHook:
  """A jax.profiler trace (TensorBoard/Perfetto ``*.xplane.pb`` under
  ``<log_dir>/plugins/profile/<time>/``) of global steps ``start..stop`` (inclusive, the ``step``
  of ``metrics.jsonl``), or of what is left of that window in this round.

  Every process traces its own devices. The trace starts before step ``start`` is dispatched and
  stops once step ``stop``'s state is ready, so it holds the whole device work of the window.
  """

  def __init__(self, log_dir: str, steps: tuple[int, int]):
    self.log_dir, (self.start, self.stop) = log_dir, steps
    self.active = False

  def before_step(self, ctx: StepContext) -> None:
    upcoming = ctx.global_step + 1
    if not self.active and self.start <= upcoming <= self.stop and ctx.done < ctx.num_steps:
      jax.profiler.start_trace(self.log_dir)
      self.active = True

  def after_step(self, ctx: StepContext) -> None:
    if self.active and ctx.global_step >= self.stop:
      self._stop(ctx)

  def end(self, ctx: StepContext) -> None:
    if self.active:  # the round ended inside the window
      self._stop(ctx)

  def _stop(self, ctx: StepContext) -> None:
    jax.block_until_ready(ctx.state)
    jax.profiler.stop_trace()
    self.active = False
    message(
      f"profiler trace of steps {self.start}..{min(ctx.global_step, self.stop)} "
      f"written to {self.log_dir}"
    )


# ----------------------------------------------------------------------------- the round


def new_train_state(
  rt: Runtime, t: int, init: CausalLM, num_train_steps: int, *, abstract: bool = False
):
  """Round t's initial `TrainState` from ``init`` (`train.create_train_state`).

  With ``abstract``, its shapes, dtypes and shardings only: the target a checkpoint is
  restored into, with nothing allocated.
  """
  return tr.create_train_state(
    init, rt.config.train_for_round(t), rt.mesh, num_train_steps=num_train_steps, abstract=abstract
  )


def base_source(rt: Runtime, t: int) -> str:
  """Where round t's initial policy (with LoRA, its frozen base) comes from: ``model.path``
  for round 0, the previous round's exported policy after."""
  return rt.config.model.path if t == 0 else os.path.join(rt.round_dir(t - 1), "policy")


def train_round(
  rt: Runtime,
  t: int,
  init: CausalLM,
  dataset,
  judge_logps,
  *,
  resume_state,
  resume_meta,
  global_step: int,
) -> tuple[Any, int]:
  """Trains round t from ``init`` on ``dataset``; resumes from a restored state and metadata.

  Returns ``(final TrainState, global step)``.
  """
  cfg = rt.config
  train_cfg = cfg.train_for_round(t)
  cursor = LoaderCursor()
  if resume_state is not None:
    cursor = LoaderCursor.from_dict(resume_meta["cursor"])
  batches = RoundBatches(rt, t, dataset, cursor)
  state = new_train_state(rt, t, init, batches.num_steps)
  base_fingerprint = tr.base_fingerprint(state)
  if resume_state is not None:
    # Same structure and shardings; the round's static optimizer/schedule (and, with LoRA, the
    # frozen base rebuilt from `init`, checked against the checkpoint's) come from `state`.
    state = tr.resume_state(
      state,
      resume_state,
      saved_base=resume_meta.get("base_fingerprint"),
      base_source=base_source(rt, t),
    )
  ctx = StepContext(
    t=t,
    done=cursor.epoch * batches.loader.batches_per_epoch + cursor.step,
    num_steps=batches.num_steps,
    global_step=global_step,
    state=state,
    batches=batches,
  )
  hooks: list[StepHook] = []
  every = cfg.rounds.follower_refresh_steps if t > 0 else None
  if every:
    refresh = FollowerRefresh(rt, judge_logps, every)
    refresh.start(ctx)
    hooks.append(refresh)
  hooks += [
    MetricsHook(rt, ctx),
    CheckpointHook(rt, restored=resume_state is not None, base_fingerprint=base_fingerprint),
  ]
  if train_cfg.profile_steps is not None:
    hooks.append(ProfileHook(os.path.join(cfg.output_dir, PROFILE_SUBDIR), train_cfg.profile_steps))
  ctx = step_loop(
    tr.make_train_step(train_cfg, rt.mesh, state, packed=cfg.data.packing), ctx, hooks
  )
  return ctx.state, ctx.global_step
