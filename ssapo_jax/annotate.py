"""Self-annotation: implicit rewards and the choice of chosen/rejected among sampled responses.

SSAPO labels its own samples (paper §4): each response gets the DPO implicit reward
``β·log(π(y|x)/π_ref(y|x))``; per prompt the highest-reward response becomes *chosen* and the
lowest *rejected*. The authors' code uses β = 1 here (plain log-ratio); the scale only matters
for the follower, which receives the margins.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def implicit_reward(
  policy_logps: jax.Array, ref_logps: jax.Array, *, beta: float = 1.0
) -> jax.Array:
  """``beta * (policy_logps − ref_logps)``, float32, same shape as the inputs (e.g. ``[P, n]``)."""
  if policy_logps.shape != ref_logps.shape:
    raise ValueError(f"policy_logps {policy_logps.shape} and ref_logps {ref_logps.shape} differ")
  return beta * (jnp.asarray(policy_logps, jnp.float32) - jnp.asarray(ref_logps, jnp.float32))


class SelectedPairs(NamedTuple):
  """Per-prompt choice among n responses; all fields ``[P]``.

  Attributes:
    chosen_idx: int32 index of the highest-reward valid response (lowest index on ties).
    rejected_idx: int32 index of the lowest-reward valid response (lowest index on ties).
    margin: float32 ``r_chosen − r_rejected`` (0 where not usable).
    usable: bool; False when a prompt has fewer than two valid responses or all its valid
      rewards are equal — such a prompt yields no pair (never paired with itself).
  """

  chosen_idx: jax.Array
  rejected_idx: jax.Array
  margin: jax.Array
  usable: jax.Array


def select_pairs(rewards: jax.Array, valid: jax.Array | None = None) -> SelectedPairs:
  """Best-vs-worst selection (the authors' ``min_max``).

  Args:
    rewards: ``[P, n]`` implicit rewards of n sampled responses per prompt.
    valid: optional ``[P, n]`` bool; invalid responses (e.g. truncated or empty) are never chosen
      or rejected.

  Returns:
    `SelectedPairs`.
  """
  if rewards.ndim != 2:
    raise ValueError(f"rewards must be [P, n]; got shape {rewards.shape}")
  rewards = jnp.asarray(rewards, jnp.float32)
  valid = jnp.ones(rewards.shape, bool) if valid is None else jnp.asarray(valid, bool)
  if valid.shape != rewards.shape:
    raise ValueError(f"valid {valid.shape} must match rewards {rewards.shape}")
  valid = valid & jnp.isfinite(rewards)
  # argmax/argmin return the first extremum, which makes tie-breaking deterministic.
  chosen_idx = jnp.argmax(jnp.where(valid, rewards, -jnp.inf), axis=1).astype(jnp.int32)
  rejected_idx = jnp.argmin(jnp.where(valid, rewards, jnp.inf), axis=1).astype(jnp.int32)
  take = lambda idx: jnp.take_along_axis(rewards, idx[:, None], axis=1)[:, 0]
  raw_margin = take(chosen_idx) - take(rejected_idx)
  usable = (jnp.sum(valid, axis=1) >= 2) & (raw_margin > 0)
  return SelectedPairs(chosen_idx, rejected_idx, jnp.where(usable, raw_margin, 0.0), usable)


def agreement_rate(
  chosen_idx: jax.Array,
  rejected_idx: jax.Array,
  reference_scores: jax.Array,
  usable: jax.Array | None = None,
) -> jax.Array:
  """Share of usable pairs whose order agrees with ``reference_scores [P, n]`` (e.g. an oracle).

  A reference tie counts one half, as AlpacaEval counts ties. Returns a float32 scalar
  (NaN when no pair is usable).
  """
  scores = jnp.asarray(reference_scores, jnp.float32)
  take = lambda idx: jnp.take_along_axis(scores, idx[:, None], axis=1)[:, 0]
  chosen, rejected = take(chosen_idx), take(rejected_idx)
  agree = jnp.where(chosen > rejected, 1.0, jnp.where(chosen == rejected, 0.5, 0.0))
  usable = jnp.ones(agree.shape, bool) if usable is None else jnp.asarray(usable, bool)
  return jnp.sum(jnp.where(usable, agree, 0.0)) / jnp.sum(usable)
