"""Tests for ssapo_jax/annotate.py against brute-force numpy selection."""

import jax
import numpy as np
import pytest

from ssapo_jax import annotate


def np_select(rewards, valid):
  """Brute force: loop over responses, first index wins ties."""
  out = []
  for r, v in zip(rewards, valid):
    idx = [j for j in range(len(r)) if v[j] and np.isfinite(r[j])]
    if len(idx) < 2:
      out.append(None)
      continue
    best = min(idx, key=lambda j: (-r[j], j))
    worst = min(idx, key=lambda j: (r[j], j))
    out.append(None if r[best] == r[worst] else (best, worst, r[best] - r[worst]))
  return out


def test_implicit_reward_is_beta_log_ratio():
  pol, ref = np.array([[-3.0, -5.0]]), np.array([[-4.0, -4.5]])
  np.testing.assert_allclose(
    annotate.implicit_reward(pol, ref, beta=0.1), 0.1 * (pol - ref), rtol=1e-6
  )
  np.testing.assert_allclose(annotate.implicit_reward(pol, ref), pol - ref)
  with pytest.raises(ValueError):
    annotate.implicit_reward(pol, ref[:, :1])


@pytest.mark.parametrize("n", [2, 8])
def test_select_pairs_matches_brute_force(n):
  rng = np.random.default_rng(n)
  rewards = rng.integers(-3, 4, (200, n)).astype(np.float32)  # integers make ties frequent
  valid = rng.random((200, n)) < 0.8
  got = jax.jit(annotate.select_pairs)(rewards, valid)
  for p, ref in enumerate(np_select(rewards, valid)):
    assert bool(got.usable[p]) == (ref is not None)
    if ref is None:
      assert got.margin[p] == 0.0
    else:
      assert (int(got.chosen_idx[p]), int(got.rejected_idx[p])) == ref[:2]
      assert got.margin[p] == ref[2]


def test_ties_invalid_and_degenerate_prompts():
  rewards = np.array(
    [
      [1.0, 3.0, 3.0, 0.0, 0.0],  # ties at both ends -> lowest indices
      [2.0, 2.0, 2.0, 2.0, 2.0],  # all equal -> unusable
      [5.0, 1.0, 9.0, 0.0, 7.0],  # best and worst invalid
      [1.0, 2.0, 3.0, 4.0, 5.0],  # one valid response -> unusable
      [np.nan, 1.0, np.inf, 0.5, 2.0],
    ],
    np.float32,
  )
  valid = np.ones_like(rewards, bool)
  valid[2, [2, 3]] = False
  valid[3, 1:] = False
  sel = jax.tree.map(np.asarray, annotate.select_pairs(rewards, valid))
  np.testing.assert_array_equal(sel.chosen_idx[[0, 2, 4]], [1, 4, 4])
  np.testing.assert_array_equal(sel.rejected_idx[[0, 2, 4]], [3, 1, 3])
  np.testing.assert_array_equal(sel.usable, [True, False, True, False, True])
  np.testing.assert_allclose(sel.margin, [3.0, 0.0, 6.0, 0.0, 1.5])
  # Unusable prompts never pair a response with itself as a usable pair.
  assert not np.any(
    np.asarray(sel.usable) & (np.asarray(sel.chosen_idx) == np.asarray(sel.rejected_idx))
  )


def test_agreement_rate_counts_ties_half():
  scores = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [2.0, 1.0]])
  chosen, rejected = np.array([0, 0, 0, 1]), np.array([1, 1, 1, 0])
  usable = np.array([True, True, True, False])
  np.testing.assert_allclose(
    annotate.agreement_rate(chosen, rejected, scores, usable), (1 + 0 + 0.5) / 3
  )


def test_select_pairs_rejects_bad_shapes():
  with pytest.raises(ValueError, match="P, n"):
    annotate.select_pairs(np.zeros(3))
  with pytest.raises(ValueError, match="valid"):
    annotate.select_pairs(np.zeros((2, 3)), np.ones((2, 2), bool))
