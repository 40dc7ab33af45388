"""The leader's side of a round: training π_t on the round's set, with the follower refreshed.

`train_round` runs the pure sharded step (`ssapo_jax.train`) over the round's loader, logs
metrics, checkpoints every ``checkpoint.save_every_steps`` steps with the loader cursor, and
resumes from such a checkpoint. With ``rounds.follower_refresh_steps`` it re-solves the follower
on the current policy's margins every so many steps (paper eq. 7–8); each refresh's atoms are
saved under ``follower_refresh/`` so a resumed run uses the atoms in force at its checkpoint.
Process 0 reads and writes those files and broadcasts what it finds (`hosts`).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from ssapo_jax import sharding as shd
from ssapo_jax import train as tr
from ssapo_jax.data import LoaderCursor, PreferenceLoader, with_pair_columns
from ssapo_jax.errors import NonFiniteError
from ssapo_jax.experiment import stream_seed
from ssapo_jax.models import Llama
from ssapo_jax.pipeline import hosts, rundir
from ssapo_jax.pipeline.phases import follower_atoms
from ssapo_jax.pipeline.runtime import Runtime
from ssapo_jax.runrecord import message, progress


def _refresh_path(rt: Runtime, t: int, round_step: int) -> str:
  return os.path.join(rt.round_dir(t), "follower_refresh", f"step_{round_step:08d}.npz")


def _latest_refresh(rt: Runtime, t: int, round_step: int) -> str | None:
  """Process 0's newest saved refresh at or before ``round_step`` (broadcast), or None."""
  folder = os.path.join(rt.round_dir(t), "follower_refresh")
  latest = None
  if hosts.is_leader() and os.path.isdir(folder):
    steps = sorted(int(f[5:13]) for f in os.listdir(folder)
                   if f.endswith(".npz") and f[5:13].isdigit())
    steps = [s for s in steps if s <= round_step]
    latest = _refresh_path(rt, t, steps[-1]) if steps else None
  return hosts.broadcast_json(latest)


def _with_saved_atoms(dataset, path: str):
  atoms = hosts.read_npz(path)
  return with_pair_columns(dataset, atom_weights=atoms["atom_weights"],
                           atom_shifts=atoms["atom_shifts"])


def refresh_follower(rt: Runtime, t: int, state, dataset, judge_logps, round_step: int):
  """Re-solves the follower from the current policy's margins (paper eq. 7–8).

  Returns ``(dataset with the new atoms, follower summary)``; the atoms are saved for resume.
  """
  # The scoring cache keys on parameter fingerprints, so every refresh is a fresh pass.
  pol_c, pol_r = rt.scorer.pairs(tr.merge_params(state), dataset, cache_dir=rt.round_dir(t))
  margins = ((pol_c - judge_logps["judge_chosen_logps"])
             - (pol_r - judge_logps["judge_rejected_logps"]))
  weights, shifts, summary = follower_atoms(rt, t, margins)
  if hosts.is_leader():
    path = _refresh_path(rt, t, round_step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rundir.atomic_npz(path, atom_weights=weights, atom_shifts=shifts)
  return with_pair_columns(dataset, atom_weights=weights, atom_shifts=shifts), summary


def _loader(rt: Runtime, dataset, t: int, train_cfg) -> PreferenceLoader:
  d = rt.config.data
  return PreferenceLoader(dataset, global_batch_size=train_cfg.global_batch_size,
                          seed=stream_seed(rt.config.seed, "shuffle", t), pad_id=rt.tokenizer.pad_token_id,
                          bucket_size=d.bucket_size, bucket_window=d.bucket_window,
                          num_hosts=jax.process_count(), host_index=jax.process_index())


def new_train_state(rt: Runtime, t: int, init: Llama, num_train_steps: int, *,
                    abstract: bool = False):
  """Round t's initial `TrainState` from ``init`` (its key from the ``train`` seed stream).

  With ``abstract``, its shapes, dtypes and shardings only (`train.abstract_train_state`): the
  target a checkpoint is restored into, with nothing allocated.
  """
  make = tr.abstract_train_state if abstract else tr.create_train_state
  return make(init, rt.config.train_for_round(t), rt.mesh, num_train_steps=num_train_steps,
              key=rt.config.key("train", t))


def train_round(rt: Runtime, t: int, init: Llama, dataset, judge_logps, *,
                resume_state, resume_meta, global_step: int) -> tuple[Any, int]:
  """Trains round t from ``init`` on ``dataset``; resumes from a restored state and metadata.

  Returns ``(final TrainState, global step)``.
  """
  cfg = rt.config
  train_cfg = cfg.train_for_round(t)
  loader = _loader(rt, dataset, t, train_cfg)
  num_steps = train_cfg.epochs * loader.batches_per_epoch
  state = new_train_state(rt, t, init, num_steps)
  cursor = LoaderCursor()
  if resume_state is not None:
    # Same structure and shardings; the round's static optimizer/schedule come from `state`.
    state = jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(resume_state))
    cursor = LoaderCursor.from_dict(resume_meta["cursor"])
  done = cursor.epoch * loader.batches_per_epoch + cursor.step
  refresh = cfg.rounds.follower_refresh_steps if t > 0 else None
  if refresh and done > 0 and (latest := _latest_refresh(rt, t, done)) is not None:
    dataset = _with_saved_atoms(dataset, latest)  # the atoms in force at the checkpoint
    loader = _loader(rt, dataset, t, train_cfg)
  step_fn = tr.make_train_step(train_cfg, rt.mesh, state)
  it = loader.iterator(cursor, num_epochs=train_cfg.epochs)
  bar = progress(total=num_steps, initial=done, desc=f"round {t}: train")
  # A restored state is saved again only after a finite step: never re-save a bad state.
  since_restore, finite_since_restore = 0, resume_state is None
  tokens, last = 0, time.perf_counter()
  while True:
    if refresh and done > 0 and done % refresh == 0 and done < num_steps:
      if _latest_refresh(rt, t, done) == _refresh_path(rt, t, done):  # resumed at a refresh
        dataset = _with_saved_atoms(dataset, _refresh_path(rt, t, done))
      else:
        dataset, summary = refresh_follower(rt, t, state, dataset, judge_logps, done)
        rt.logger.log(global_step, summary, round=t, round_step=done)
      loader = _loader(rt, dataset, t, train_cfg)
      it = loader.iterator(it.cursor, num_epochs=train_cfg.epochs)
    try:
      batch = next(it)
    except StopIteration:
      break
    tokens += int(batch.chosen_mask.sum() + batch.rejected_mask.sum()) * jax.process_count()
    state, metrics = step_fn(state, shd.global_batch(rt.mesh, batch))
    done, global_step, since_restore = done + 1, global_step + 1, since_restore + 1
    bar.update(1)
    if done % cfg.rounds.log_every_steps == 0 or done == num_steps:
      metrics = {k: float(v) for k, v in shd.to_host(metrics).items() if np.ndim(v) == 0}
      tr.check_finite_progress(metrics, train_cfg)
      now = time.perf_counter()
      metrics["tokens_per_second"] = tokens / max(now - last, 1e-9)
      tokens, last = 0, now
      rt.logger.log(global_step, metrics, round=t, round_step=done)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}")
    if done % cfg.checkpoint.save_every_steps == 0 and done < num_steps:
      if not finite_since_restore:  # one scalar read, only until the first finite step
        finite_since_restore = int(metrics["nonfinite/consecutive"]) < since_restore
      if not finite_since_restore:
        message(f"round {t}: no finite step since the restore; not saving checkpoint "
                f"{global_step}")
        continue
      rt.ckpt.save(global_step, state, {"round": t, "phase": "train", "round_step": done,
                                         "cursor": it.cursor.to_dict(),
                                         "global_step": global_step}, force=True)
  bar.close()
  if not finite_since_restore and since_restore:
    if int(metrics["nonfinite/consecutive"]) >= since_restore:
      raise NonFiniteError(f"round {t} ended without a finite step since its restore from a "
                           "checkpoint; its state is not saved. Likely causes: corrupted inputs "
                           "(train_set, model files), then train.learning_rate")
  return state, global_step
