"""The leader receives the follower's atoms in the follower's space (ssapo_jax/pipeline/leader.py).

One in-process round with ``dro.space=margin``: the robust loss is traced with ``space="margin"``,
the atoms it trains on are the follower's margin-space solution (budget ε in units of β·m, atoms
inside the margin-space support), and the first logged loss equals the margin-space formula on the
first batch's atoms, not the probability-space one.
"""

import json
import os

import numpy as np
import pytest

from ssapo_jax.testing import write_tiny_model, write_tiny_preferences

CONFIG = """\
output_dir: {out}
seed: 3
model: {{path: {world}/model}}
data: {{source: {world}/prefs.jsonl, max_length: 64, max_prompt_length: 32, bucket_size: 16,
        seed_size: 24, pool_sizes: [48]}}
sampling: {{temperature: 1.0, max_new_tokens: 8, num_samples: 4, batch_size: 16}}
train: {{beta: 0.1, learning_rate: 1.0e-3, global_batch_size: 8,
         compute_dtype: float32, remat: none}}
dro: {{epsilon: 0.05, space: margin}}
rounds: {{num_rounds: 1}}
checkpoint: {{save_every_steps: 100}}
"""


def _neg_log_sigmoid(z):
  return np.logaddexp(0.0, -z)


def _experiment(tmp_path, template: str, *, num_pairs: int):
  """The resolved config of ``template`` over a tiny model and ``num_pairs`` preferences."""
  from ssapo_jax.experiment import load_experiment

  world = tmp_path / "world"
  write_tiny_model(str(world / "model"))
  write_tiny_preferences(str(world / "prefs.jsonl"), num_pairs)
  path = tmp_path / "config.yaml"
  path.write_text(template.format(out=tmp_path / "run", world=world))
  return load_experiment(path)


def test_margin_space_round_trains_on_margin_space_atoms(tmp_path, monkeypatch):
  import datasets

  from ssapo_jax.data import LoaderCursor, PreferenceLoader
  from ssapo_jax.experiment import stream_seed
  from ssapo_jax.pipeline import run as pipeline
  from ssapo_jax.train import step as step_lib

  config = _experiment(tmp_path, CONFIG, num_pairs=120)
  assert config.train.robust_space == "margin" and config.dro.margin_scale == 0.1

  traced_spaces = []
  real_loss = step_lib.robust_dpo_loss

  def spy(*args, space, **kwargs):
    traced_spaces.append(space)
    return real_loss(*args, space=space, **kwargs)

  monkeypatch.setattr(step_lib, "robust_dpo_loss", spy)
  from ssapo_jax.pipeline.residency import models_held

  held_after = {}  # round -> the policies the run keeps on the devices after it
  real_round = pipeline.run_round

  def recording_round(rt, t, *args, **kwargs):
    out = real_round(rt, t, *args, **kwargs)
    held_after[t] = sorted(rt.policies)
    return out

  monkeypatch.setattr(pipeline, "run_round", recording_round)
  pipeline.run(config, resume=False)
  assert traced_spaces and set(traced_spaces) == {"margin"}
  # The run holds what the residency the plan counts says, no more (the SFT model is rt.sft).
  assert held_after and all(
    held == [s for s in models_held(config.rounds, t + 1) if s >= 0]
    for t, held in held_after.items()
  )

  out = config.output_dir
  train_set = datasets.load_from_disk(os.path.join(out, "round_1", "train_set", "data"))
  weights = np.asarray(train_set["atom_weights"], np.float64)
  shifts = np.asarray(train_set["atom_shifts"], np.float64)
  # The follower's centre in margin space: ξ = β·m with m the implicit-reward margin of π_0
  # against the SFT judge (π_0 is also the round's reference).
  m = (
    np.asarray(train_set["ref_chosen_logps"], np.float64)
    - np.asarray(train_set["judge_chosen_logps"], np.float64)
  ) - (
    np.asarray(train_set["ref_rejected_logps"], np.float64)
    - np.asarray(train_set["judge_rejected_logps"], np.float64)
  )
  xi = config.train.beta * m
  n = len(xi)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
  # The whole budget ε is spent, measured in units of β·m (the exact solver spends it exactly).
  assert np.sum(weights * np.abs(shifts)) / n == pytest.approx(config.dro.epsilon, rel=1e-3)
  # The worst-case atoms ξ − shift lie in the margin-space support [min ξ − τ, max ξ + τ], and the
  # moved ones sit at its lower end (a pair is made as unlikely as the budget allows).
  atoms = xi[:, None] - shifts
  tau = config.dro.window_tau
  used = weights > 0
  assert np.all(atoms[used] >= xi.min() - tau - 1e-4) and np.all(
    atoms[used] <= xi.max() + tau + 1e-4
  )
  moved = used & (np.abs(shifts) > 1e-6)
  assert moved.any()
  np.testing.assert_allclose(atoms[moved], xi.min() - tau, atol=1e-4)
  with open(os.path.join(out, "round_1", "follower.json")) as f:
    assert json.load(f)["dro/xi_mean"] == pytest.approx(xi.mean(), rel=1e-4, abs=1e-6)

  # First leader step of round 1: the policy is its reference (βΔ = 0), so the loss of pair i is
  # Σ_k w_ik · −log σ(0 − shift_ik), averaged over the first batch the loader gives.
  loader = PreferenceLoader(
    train_set,
    global_batch_size=config.train.global_batch_size,
    seed=stream_seed(config.seed, "shuffle", 1),
    pad_id=0,
    bucket_size=config.data.bucket_size,
  )
  rows, real = loader.batch_indices(LoaderCursor(0, 0))
  per_pair = np.sum(weights[rows] * _neg_log_sigmoid(-shifts[rows]), axis=1)
  expected = float(np.sum(real * per_pair) / len(rows))
  with open(os.path.join(out, "metrics.jsonl")) as f:
    first = next(r for r in map(json.loads, f) if r.get("round") == 1 and "loss" in r)
  assert first["loss"] == pytest.approx(expected, rel=1e-4)
  # The probability-space formula on the same atoms (the old, mismatched leader) differs.
  probability_space = np.sum(
    weights[rows] * -np.log(np.clip(0.5 - shifts[rows], 1e-6, None)), axis=1
  )
  assert abs(float(np.sum(real * probability_space) / len(rows)) - expected) > 1e-2


GUARD_CONFIG = """\
output_dir: {out}
seed: 0
model: {{path: {world}/model}}
data: {{source: {world}/prefs.jsonl, max_length: 64, max_prompt_length: 32, bucket_size: 16,
        seed_size: 32, pool_sizes: []}}
train: {{beta: 0.1, learning_rate: 1.0e-3, global_batch_size: 8,
         compute_dtype: float32, remat: none}}
dro: {{epsilon: 0}}
rounds: {{num_rounds: 0}}
checkpoint: {{save_every_steps: 1, keep: 10}}
"""


def test_restored_state_is_not_saved_before_a_finite_step(tmp_path, monkeypatch):
  """Resumed mid-round, steps whose loss is NaN save nothing, and the round fails loudly."""
  import shutil

  import jax.numpy as jnp

  from ssapo_jax import sharding
  from ssapo_jax.checkpoint import Checkpointer, checkpoint_dir
  from ssapo_jax.errors import NonFiniteError
  from ssapo_jax.pipeline import run as pipeline
  from ssapo_jax.runrecord import run_log

  config = _experiment(tmp_path, GUARD_CONFIG, num_pairs=40)
  pipeline.run(config, resume=False)  # 4 steps: train checkpoints 1, 2, 3 and round_done 5
  out = config.output_dir
  with Checkpointer(checkpoint_dir(out)) as ckpt:
    assert ckpt.all_steps() == [1, 2, 3, 5]
  for step in ("3", "5"):  # as if killed right after step 2 was saved
    shutil.rmtree(os.path.join(checkpoint_dir(out), step))
  shutil.rmtree(os.path.join(out, "final_policy"))

  real = sharding.global_batch

  def poisoned(mesh, batch):  # a NaN reference log-prob: every step after the restore is skipped
    batch = real(mesh, batch)
    return batch.replace(ref_chosen_logps=batch.ref_chosen_logps * jnp.nan)

  monkeypatch.setattr(sharding, "global_batch", poisoned)
  with run_log(str(tmp_path / "log")), pytest.raises(NonFiniteError, match="without a finite step"):
    pipeline.run(config, resume=True)
  with Checkpointer(checkpoint_dir(out)) as ckpt:
    assert ckpt.all_steps() == [1, 2]  # nothing saved from the restored, never-updated state
  log = open(tmp_path / "log" / "run.log").read()
  assert "resuming from checkpoint step 2 (round 0, phase train, step 2 of the round)" in log
  assert "round 0: no finite step since the restore; not saving checkpoint 3" in log
