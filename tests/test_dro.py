"""Tests of ssapo_jax/dro.py against an independent LP (scipy HiGHS on the Thm 3.3 program)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linprog

from ssapo_jax import dro

# --------------------------------------------------------------------------------------------
# Independent reference: the finite program of Thm 3.3 written out for HiGHS, with q = q⁺ − q⁻.


def lp_reference(xi, slopes, intercepts, lo, hi, eps, group_ids=None, per_atom_cap=False):
  """Optimal value of (1/N) Σ_ik s_ik(a_k ξ_i + b_k) − a_k q_ik over the feasible set, per group
  budget (1/N_g) Σ |q| ≤ ε, averaged over groups weighted by size (= plain mean over points)."""
  xi = np.asarray(xi, np.float64)
  a, b = np.asarray(slopes, np.float64), np.asarray(intercepts, np.float64)
  n, k = xi.size, a.size
  group_ids = np.zeros(n, int) if group_ids is None else np.asarray(group_ids)
  groups, gidx = np.unique(group_ids, return_inverse=True)
  nk = n * k
  c = np.concatenate([-(xi[:, None] * a + b).ravel(), np.tile(a, n), -np.tile(a, n)]) / n
  eye = sp.identity(nk, format="csr")
  zeros = sp.csr_matrix((n, nk))
  a_eq = sp.hstack([sp.kron(sp.identity(n), np.ones((1, k))), zeros, zeros])
  d_lo = sp.diags(np.repeat(xi - lo, k))
  d_hi = sp.diags(np.repeat(hi - xi, k))
  member = sp.csr_matrix(
    (np.ones(nk), (np.repeat(gidx, k), np.arange(nk))), shape=(groups.size, nk)
  )
  a_ub = sp.vstack(
    [
      sp.hstack([-d_lo, eye, -eye]),  # q ≤ s (ξ − lo)
      sp.hstack([-d_hi, -eye, eye]),  # −q ≤ s (hi − ξ)
      sp.hstack([sp.csr_matrix((groups.size, nk)), member, member]),
    ],
    format="csr",
  )
  counts = np.bincount(gidx)
  b_ub = np.concatenate([np.zeros(2 * nk), counts * eps])
  cap = eps if per_atom_cap else None
  res = linprog(
    c,
    A_ub=a_ub,
    b_ub=b_ub,
    A_eq=a_eq,
    b_eq=np.ones(n),
    bounds=[(0, None)] * nk + [(0, cap)] * (2 * nk),
    method="highs",
    options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
  )
  assert res.status == 0, res.message
  return -res.fun


def pieces(num_pieces, **kwargs):
  """`dro.tangent_pieces` in float64 numpy (built under x64 so nothing is rounded to float32)."""
  with jax.enable_x64(True):
    return tuple(np.asarray(v) for v in dro.tangent_pieces(num_pieces, **kwargs))


def surrogate(z, slopes, intercepts):
  """max_k ℓ_k(z) in numpy float64."""
  z = np.asarray(z, np.float64)
  return np.max(z[..., None] * np.asarray(slopes, np.float64) + np.asarray(intercepts), axis=-1)


def random_instance(rng, n, k, space):
  if space == "probability":
    xi = 1 / (1 + np.exp(-0.1 * rng.normal(8, 10, n)))
    flags = rng.random(n)
    xi[flags < 0.05] = 0.0  # points on the support boundary
    xi[flags > 0.95] = 1.0
    slopes, intercepts = pieces(k)
    support = (0.0, 1.0)
  else:
    xi = rng.normal(0.5, 2.0, n)
    slopes, intercepts = pieces(k, space="margin", data=xi)
    support = (float(xi.min()) - rng.uniform(0, 3), float(xi.max()) + rng.uniform(0, 3))
  if n > 3 and rng.random() < 0.3:
    xi[: n // 3] = xi[0]  # duplicated centres
  return xi, np.asarray(slopes), np.asarray(intercepts), support


def check_solution(worst, xi, slopes, intercepts, support, eps, group_ids, tol=1e-9):
  """Feasibility of the returned atoms and that they attain the reported objective."""
  s = np.asarray(worst.atom_weights, np.float64)
  shifts = np.asarray(worst.atom_shifts, np.float64)
  n, k = s.shape
  assert s.shape == shifts.shape == (xi.size, slopes.size)
  assert np.all(s >= 0)
  np.testing.assert_allclose(s.sum(axis=1), 1.0, atol=1e-12)
  z = xi[:, None] - shifts
  lo, hi = support
  assert np.all(z[s > 0] >= lo - 1e-12) and np.all(z[s > 0] <= hi + 1e-12)
  assert np.all(shifts[s == 0] == 0)
  gids = np.zeros(n, int) if group_ids is None else np.asarray(group_ids)
  for g in np.unique(gids):
    rows = gids == g
    spent = np.sum(s[rows] * np.abs(shifts[rows])) / rows.sum()
    assert spent <= eps + tol, (g, spent, eps)
  # The worst-case distribution evaluated with max_k ℓ_k attains the objective.
  attained = np.sum(s * surrogate(z, slopes, intercepts)) / n
  assert attained >= float(worst.objective) - 1e-9 * max(1.0, abs(attained))
  # ... and the objective is the piecewise value of (s, q) as in the program.
  q = s * shifts
  value = np.sum(s * (xi[:, None] * slopes + intercepts) - slopes * q) / n
  np.testing.assert_allclose(float(worst.objective), value, rtol=1e-12, atol=1e-12)


def dual_value(lam, xi, slopes, intercepts, support, eps):
  """g(λ) = λε + mean_i max(ℓ̃(ξ_i), ℓ̃(lo) − λ(ξ_i − lo), ℓ̃(hi) − λ(hi − ξ_i)) (one group)."""
  lo, hi = support
  f = lambda z: surrogate(z, slopes, intercepts)
  return lam * eps + np.mean(
    np.maximum.reduce([f(xi), f(lo) - lam * (xi - lo), f(hi) - lam * (hi - xi)])
  )


# --------------------------------------------------------------------------------------------
# Against HiGHS.

SIZES = [1, 2, 7, 40, 150, 600, 1000, 2000]


@pytest.mark.parametrize("seed", range(12))
def test_matches_highs_random_instances(seed):
  rng = np.random.default_rng(seed)
  n = SIZES[seed % len(SIZES)]
  k = int(rng.integers(2, 9))
  space = ("probability", "margin")[seed % 2]
  eps = float(rng.choice([0.0, 1e-3, 0.01, 0.05, 0.3, 5.0]))
  xi, slopes, intercepts, support = random_instance(rng, n, k, space)
  group_ids = None
  if seed % 3 == 0 and n > 1:
    group_ids = np.asarray(dro.random_groups(n, max(1, n // 5), key=jax.random.key(seed)))
  with jax.enable_x64(True):
    worst = dro.worst_case(
      xi, epsilon=eps, slopes=slopes, intercepts=intercepts, support=support, group_ids=group_ids
    )
    assert worst.atom_weights.dtype == jnp.float64
  ref = lp_reference(xi, slopes, intercepts, *support, eps, group_ids)
  np.testing.assert_allclose(float(worst.objective), ref, rtol=1e-6, atol=1e-9)
  check_solution(worst, xi, slopes, intercepts, support, eps, group_ids)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 160))
def test_matches_highs_sweep(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 2001))
  k = int(rng.integers(2, 9))
  space = ("probability", "margin")[seed % 2]
  eps = float(10 ** rng.uniform(-4, 1)) if seed % 5 else 0.0
  xi, slopes, intercepts, support = random_instance(rng, n, k, space)
  group_ids = None
  if seed % 3 == 0:
    group_ids = np.asarray(dro.quantile_groups(xi, int(rng.integers(1, n + 1))))
  with jax.enable_x64(True):
    worst = dro.worst_case(
      xi, epsilon=eps, slopes=slopes, intercepts=intercepts, support=support, group_ids=group_ids
    )
  ref = lp_reference(xi, slopes, intercepts, *support, eps, group_ids)
  np.testing.assert_allclose(float(worst.objective), ref, rtol=1e-6, atol=1e-9)
  check_solution(worst, xi, slopes, intercepts, support, eps, group_ids)


def test_dual_certificate_and_budget_spent_exactly():
  rng = np.random.default_rng(3)
  xi, slopes, intercepts, support = random_instance(rng, 500, 6, "probability")
  eps = 0.02
  with jax.enable_x64(True):
    worst = dro.worst_case(xi, epsilon=eps, slopes=slopes, intercepts=intercepts, support=support)
  lam = float(worst.dual[0])
  assert lam > 0
  # Strong duality: g(λ*) equals the primal value, and λ* minimises g (checked on a grid).
  g_star = dual_value(lam, xi, slopes, intercepts, support, eps)
  np.testing.assert_allclose(g_star, float(worst.objective), rtol=1e-12)
  for other in np.concatenate([lam * np.array([0.5, 0.9, 0.999, 1.001, 1.1, 2.0]), [0.0]]):
    assert dual_value(other, xi, slopes, intercepts, support, eps) >= g_star - 1e-12
  # A binding budget (λ* > 0) is spent exactly.
  np.testing.assert_allclose(float(worst.budget_spent[0]), eps, rtol=1e-12)
  # At most two non-zero atoms per point.
  assert np.max(np.sum(np.asarray(worst.atom_weights) > 0, axis=1)) <= 2


# --------------------------------------------------------------------------------------------
# Properties.


def _solve(xi, slopes, intercepts, support, eps, **kw):
  with jax.enable_x64(True):
    return dro.worst_case(
      xi, epsilon=eps, slopes=slopes, intercepts=intercepts, support=support, **kw
    )


def test_epsilon_zero_is_identity_and_plain_mean():
  rng = np.random.default_rng(0)
  for space in ("probability", "margin"):
    xi, slopes, intercepts, support = random_instance(rng, 300, 6, space)
    worst = _solve(xi, slopes, intercepts, support, 0.0)
    np.testing.assert_allclose(
      float(worst.objective), np.mean(surrogate(xi, slopes, intercepts)), rtol=1e-13
    )
    assert np.all(np.asarray(worst.atom_shifts) == 0)
    assert np.all(np.max(np.asarray(worst.atom_weights), axis=1) == 1.0)
    assert float(worst.budget_spent[0]) == 0.0


def test_value_non_decreasing_in_epsilon():
  rng = np.random.default_rng(1)
  xi, slopes, intercepts, support = random_instance(rng, 400, 6, "probability")
  values = [
    float(_solve(xi, slopes, intercepts, support, e).objective)
    for e in [0.0, 1e-4, 1e-3, 0.01, 0.05, 0.2, 1.0, 10.0]
  ]
  assert np.all(np.diff(values) >= -1e-12), values
  assert values[-1] > values[0]


def test_value_non_decreasing_in_nested_pieces():
  rng = np.random.default_rng(2)
  xi, _, _, support = random_instance(rng, 400, 2, "probability")
  # Tangents at k/K for K = 2, 4, 8 are nested; so is any subset of a set of pieces.
  values = []
  for k in (2, 4, 8):
    slopes, intercepts = pieces(k)
    values.append(float(_solve(xi, slopes, intercepts, support, 0.02).objective))
  assert values[0] <= values[1] + 1e-12 <= values[2] + 2e-12, values
  slopes, intercepts = pieces(8)
  subset = np.array([0, 3, 6])
  sub = float(_solve(xi, slopes[subset], intercepts[subset], support, 0.02).objective)
  assert sub <= values[2] + 1e-12


@pytest.mark.parametrize("space", ["probability", "margin"])
def test_closed_form_when_support_is_wide(space):
  """EK18 Thm 6.3: sup over the ball of E[ℓ̃] = mean + ε·max|a_k| when the budget can be spent
  on the steepest piece without meeting the boundary's mass limit."""
  rng = np.random.default_rng(4)
  if space == "probability":
    xi = rng.uniform(0.05, 0.99, 200)
    xi[0] = 0.1  # on the steepest piece of K = 6 (p <= 1/6)
    slopes, intercepts = pieces(6)
  else:
    xi = rng.normal(0, 2, 200)
    slopes, intercepts = pieces(5, space="margin", window=(xi.min(), xi.max()))
  support = (float(xi.min()) - 1e4, float(xi.max()) + 1e4)
  eps = 0.03
  worst = _solve(xi, slopes, intercepts, support, eps)
  expected = np.mean(surrogate(xi, slopes, intercepts)) + eps * np.max(np.abs(slopes))
  np.testing.assert_allclose(float(worst.objective), expected, rtol=1e-12)
  np.testing.assert_allclose(float(worst.dual[0]), np.max(np.abs(slopes)), rtol=1e-12)


def test_one_group_equals_no_grouping_and_groups_are_independent():
  rng = np.random.default_rng(5)
  xi, slopes, intercepts, support = random_instance(rng, 300, 6, "probability")
  plain = _solve(xi, slopes, intercepts, support, 0.02)
  one = _solve(xi, slopes, intercepts, support, 0.02, group_ids=np.zeros(300, np.int32))
  np.testing.assert_allclose(np.asarray(one.atom_weights), np.asarray(plain.atom_weights))
  np.testing.assert_allclose(np.asarray(one.atom_shifts), np.asarray(plain.atom_shifts))
  np.testing.assert_allclose(float(one.objective), float(plain.objective), rtol=1e-14)
  # Three groups: each equals the solve of its own points alone; the total is the size-weighted
  # average (group 1 left empty on purpose).
  gids = np.array([0, 2, 3])[rng.integers(0, 3, 300)]
  grouped = _solve(xi, slopes, intercepts, support, 0.02, group_ids=gids)
  assert grouped.dual.shape == (4,) and float(grouped.group_objectives[1]) == 0.0
  total = 0.0
  for g in (0, 2, 3):
    rows = gids == g
    alone = _solve(xi[rows], slopes, intercepts, support, 0.02)
    np.testing.assert_allclose(
      float(grouped.group_objectives[g]), float(alone.objective), rtol=1e-12
    )
    np.testing.assert_allclose(float(grouped.dual[g]), float(alone.dual[0]), rtol=1e-12)
    total += rows.sum() * float(alone.objective)
  np.testing.assert_allclose(float(grouped.objective), total / 300, rtol=1e-12)


def test_edge_cases_single_point_boundary_duplicates_and_huge_budget():
  slopes, intercepts = pieces(6)
  support = (0.0, 1.0)
  for xi in (
    np.array([0.7]),
    np.array([0.0]),
    np.array([1.0]),
    np.full(50, 0.4),
    np.array([0.0, 1.0, 0.5, 0.5]),
  ):
    for eps in (0.0, 0.01, 0.5, 100.0):
      worst = _solve(xi, slopes, intercepts, support, eps)
      ref = lp_reference(xi, slopes, intercepts, *support, eps)
      np.testing.assert_allclose(float(worst.objective), ref, rtol=1e-9, atol=1e-12)
      check_solution(worst, xi, slopes, intercepts, support, eps, None)
  # Budget large enough to move everything: every point sits at p = 0 on the steepest piece.
  worst = _solve(np.full(10, 0.4), slopes, intercepts, support, 100.0)
  np.testing.assert_allclose(float(worst.objective), float(surrogate(0.0, slopes, intercepts)))
  # Degenerate support lo == hi.
  worst = _solve(np.full(3, 0.5), slopes, intercepts, (0.5, 0.5), 1.0)
  assert np.all(np.asarray(worst.atom_shifts) == 0)


def test_jit_and_float32_have_no_nans():
  rng = np.random.default_rng(6)
  xi, slopes, intercepts, support = random_instance(rng, 1000, 6, "probability")
  gids = np.asarray(dro.chunk_groups(1000, 100))
  solve = jax.jit(
    lambda x, e, g: dro.worst_case(
      x,
      epsilon=e,
      slopes=slopes,
      intercepts=intercepts,
      support=support,
      group_ids=g,
      num_groups=10,
    )
  )
  worst32 = solve(jnp.asarray(xi, jnp.float32), 0.01, jnp.asarray(gids))
  assert worst32.atom_weights.dtype == jnp.float32
  for leaf in jax.tree.leaves(worst32):
    assert np.all(np.isfinite(np.asarray(leaf)))
  worst64 = _solve(xi, slopes, intercepts, support, 0.01, group_ids=gids)
  np.testing.assert_allclose(float(worst32.objective), float(worst64.objective), rtol=1e-5)
  assert np.all(np.asarray(worst32.budget_spent) <= 0.01 * (1 + 1e-5))


@pytest.mark.parametrize(
  "bad, match",
  [
    (dict(xi=np.array([0.5, np.nan])), "non-finite"),
    (dict(xi=np.array([0.5, np.inf])), "non-finite"),
    (dict(xi=np.array([0.5, 1.2])), "support"),
    (dict(xi=np.zeros(0)), "empty"),
    (dict(xi=np.zeros((2, 2))), r"\[num_pairs\]"),
    (dict(epsilon=-0.1), "epsilon"),
    (dict(epsilon=np.nan), "epsilon"),
    (dict(intercepts=np.ones(5)), "slopes and intercepts"),
    (dict(support=(1.0, 0.0)), "lo <= hi"),
    (dict(group_ids=np.array([0, -1])), ">= 0"),
    (dict(group_ids=np.array([0.0, 1.0])), "ints"),
    (dict(method="simplex"), "method"),
  ],
)
def test_invalid_input_raises(bad, match):
  slopes, intercepts = pieces(6)
  kwargs = dict(
    xi=np.array([0.5, 0.6]), epsilon=0.01, slopes=slopes, intercepts=intercepts, support=(0.0, 1.0)
  )
  kwargs.update(bad)
  with pytest.raises(ValueError, match=match):
    dro.worst_case(kwargs.pop("xi"), **kwargs)


# --------------------------------------------------------------------------------------------
# Pieces and groups.


def test_tangent_pieces_are_tangents_and_under_approximate():
  with jax.enable_x64(True):
    slopes, intercepts = pieces(6)
    p = np.linspace(1e-3, 1, 2000)
    assert np.all(surrogate(p, slopes, intercepts) <= -np.log(p) + 1e-12)
    knots = np.arange(1, 7) / 6
    np.testing.assert_allclose(knots * slopes + intercepts, -np.log(knots), rtol=1e-12)
    np.testing.assert_allclose(slopes, -1 / knots)  # d/dp −log p
    ms, mi = pieces(5, space="margin", window=(-3.0, 4.0))
    z = np.linspace(-20, 20, 4001)
    loss = np.logaddexp(0, -z)
    assert np.all(surrogate(z, ms, mi) <= loss + 1e-12)
    t = np.linspace(-3, 4, 5)
    np.testing.assert_allclose(t * ms + mi, np.logaddexp(0, -t), rtol=1e-12)
    np.testing.assert_allclose(ms, -1 / (1 + np.exp(t)), rtol=1e-12)
  assert dro.margin_window(np.array([1.0, 2.0, 5.0]), tau=0.5) == (0.5, 5.5)
  lo, hi = dro.margin_window(np.arange(101.0), method="quantile", quantile=0.1)
  assert (lo, hi) == (10.0, 90.0)
  with pytest.raises(ValueError, match="window"):
    dro.tangent_pieces(4, space="margin")
  with pytest.raises(ValueError, match="num_pieces"):
    dro.tangent_pieces(0)


def test_group_helpers_partition_with_the_right_sizes():
  ids = np.asarray(dro.chunk_groups(250, 100))
  np.testing.assert_array_equal(np.bincount(ids), [100, 100, 50])
  assert np.all(np.diff(ids) >= 0)
  ids = np.asarray(dro.random_groups(250, 100, key=jax.random.key(0)))
  np.testing.assert_array_equal(np.bincount(ids), [100, 100, 50])
  assert not np.all(np.diff(ids) >= 0)  # shuffled
  again = np.asarray(dro.random_groups(250, 100, key=jax.random.key(0)))
  np.testing.assert_array_equal(ids, again)
  xi = np.random.default_rng(0).normal(size=250)
  ids = np.asarray(dro.quantile_groups(xi, 100))
  np.testing.assert_array_equal(np.bincount(ids), [100, 100, 50])
  assert xi[ids == 0].max() <= xi[ids == 1].min() and xi[ids == 1].max() <= xi[ids == 2].min()


# --------------------------------------------------------------------------------------------
# Per-atom cap (exact bisection) and the BoxOSQP path.


@pytest.mark.parametrize(
  "seed", [0, 1, 2] + [pytest.param(s, marks=pytest.mark.slow) for s in (3, 4, 5)]
)
def test_per_atom_cap_exact_matches_highs(seed):
  rng = np.random.default_rng(40 + seed)
  n = [1, 7, 40, 150, 300, 200][seed]
  k = int(rng.integers(2, 9))
  space = ("probability", "margin")[seed % 2]
  eps = float(rng.choice([0.0, 1e-3, 0.01, 0.05, 0.3, 5.0]))
  xi, slopes, intercepts, support = random_instance(rng, n, k, space)
  group_ids = None if seed % 2 or n < 10 else np.arange(n) % 3
  worst = _solve(xi, slopes, intercepts, support, eps, group_ids=group_ids, per_atom_cap=True)
  ref = lp_reference(xi, slopes, intercepts, *support, eps, group_ids, per_atom_cap=True)
  np.testing.assert_allclose(float(worst.objective), ref, rtol=1e-9, atol=1e-12)
  check_solution(worst, xi, slopes, intercepts, support, eps, group_ids)
  q = np.asarray(worst.atom_weights) * np.asarray(worst.atom_shifts)
  assert np.all(np.abs(q) <= eps * (1 + 1e-12))
  # The cap only removes options: never above the uncapped optimum.
  plain = _solve(xi, slopes, intercepts, support, eps, group_ids=group_ids)
  assert float(worst.objective) <= float(plain.objective) + 1e-12


def test_per_atom_cap_binding_budget_is_spent_and_dual_certifies():
  rng = np.random.default_rng(11)
  xi = np.clip(1 / (1 + np.exp(-0.1 * rng.normal(8, 10, 300))), 0.5, 0.999)
  slopes, intercepts = pieces(6)
  eps = 0.01
  worst = _solve(xi, slopes, intercepts, (0.0, 1.0), eps, per_atom_cap=True)
  assert float(worst.dual[0]) > 0
  np.testing.assert_allclose(float(worst.budget_spent[0]), eps, rtol=1e-12)
  # The cap spreads the budget: more points move than without it.
  plain = _solve(xi, slopes, intercepts, (0.0, 1.0), eps)
  moved = lambda w: np.sum(np.any(np.asarray(w.atom_shifts) != 0, axis=1))
  assert moved(worst) > moved(plain)


def _osqp_instance():
  rng = np.random.default_rng(7)
  xi = np.clip(1 / (1 + np.exp(-0.1 * rng.normal(8, 10, 60))), 0.5, 0.999)
  slopes, intercepts = pieces(4)
  return xi, slopes, intercepts, np.arange(60) // 30, 0.02


@pytest.mark.parametrize("cap", [True, False])
def test_osqp_polished_agrees_with_exact_and_highs(cap):
  xi, slopes, intercepts, gids, eps = _osqp_instance()
  worst = _solve(
    xi, slopes, intercepts, (0.0, 1.0), eps, group_ids=gids, method="osqp", per_atom_cap=cap
  )
  exact = _solve(xi, slopes, intercepts, (0.0, 1.0), eps, group_ids=gids, per_atom_cap=cap)
  ref = lp_reference(xi, slopes, intercepts, 0.0, 1.0, eps, gids, per_atom_cap=cap)
  np.testing.assert_allclose(float(worst.objective), ref, rtol=1e-9)
  np.testing.assert_allclose(
    np.asarray(worst.group_objectives), np.asarray(exact.group_objectives), rtol=1e-12
  )
  check_solution(worst, xi, slopes, intercepts, (0.0, 1.0), eps, gids)


@pytest.mark.parametrize("cap, gap", [(True, 1e-6), (False, 2e-2)])
def test_osqp_raw_admm_is_feasible_and_close(cap, gap):
  """Unpolished BoxOSQP: a feasible (repaired) point below the LP optimum, within the gap measured
  on this instance (1.8e-10 with the cap, 4.8e-3 without; see docs/dro.md)."""
  xi, slopes, intercepts, gids, eps = _osqp_instance()
  worst = _solve(
    xi,
    slopes,
    intercepts,
    (0.0, 1.0),
    eps,
    group_ids=gids,
    method="osqp",
    per_atom_cap=cap,
    osqp_polish=False,
    osqp_tol=1e-10,
  )
  ref = lp_reference(xi, slopes, intercepts, 0.0, 1.0, eps, gids, per_atom_cap=cap)
  check_solution(worst, xi, slopes, intercepts, (0.0, 1.0), eps, gids)
  if cap:
    assert np.all(np.abs(np.asarray(worst.atom_weights * worst.atom_shifts)) <= eps + 1e-12)
  assert float(worst.center_objective) - 1e-9 <= float(worst.objective) <= ref + 1e-9
  assert (ref - float(worst.objective)) / ref < gap


# --------------------------------------------------------------------------------------------
# Glue: config, follower, atoms for the leader, summary.


def test_to_loss_atoms_feeds_robust_dpo_loss():
  from ssapo_jax.losses import robust_dpo_loss

  rng = np.random.default_rng(8)
  margins = rng.normal(5, 10, 300)
  config = dro.DroConfig(epsilon=0.02, margin_scale=0.1, grouping="random", group_size=100)
  worst = dro.solve_follower(margins, config, key=jax.random.key(0))
  atoms = dro.to_loss_atoms(worst, config)
  weights, shifts = atoms.weights, atoms.shifts
  assert weights.shape == shifts.shape == (300, 6) and weights.dtype == jnp.float32
  assert atoms.space == "probability" and atoms.margin_scale == 0.1
  atoms2 = dro.to_loss_atoms(worst, config, num_atoms=2)
  w2, s2 = atoms2.weights, atoms2.shifts
  assert w2.shape == (300, 2)
  # Lossless compaction: the same multiset of (weight, shift) per row.
  for row in range(300):
    full = sorted((float(w), float(s)) for w, s in zip(weights[row], shifts[row]) if w > 0)
    comp = sorted((float(w), float(s)) for w, s in zip(w2[row], s2[row]) if w > 0)
    assert full == comp
  # With beta·Δ = margin_scale·m the leader's centre equals the follower's xi, so the leader loss
  # is E_worst[−log z] >= E_worst[max_k ℓ_k(z)] = objective (tangents under-approximate −log).
  beta = 0.1
  logps = jnp.asarray(margins / beta * config.margin_scale, jnp.float32)
  zeros = jnp.zeros_like(logps)
  loss, _ = robust_dpo_loss(logps, zeros, zeros, zeros, atoms2, beta=beta, floor=1e-12)
  xi = np.asarray(dro.margins_to_xi(margins, config), np.float64)
  z = np.clip(xi[:, None] - np.asarray(s2, np.float64), 1e-12, None)
  expected = np.mean(np.sum(np.asarray(w2) * -np.log(z), axis=1))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  assert float(loss) >= float(worst.objective) - 1e-5


def test_solve_follower_options_and_summary():
  rng = np.random.default_rng(9)
  margins = rng.normal(3, 8, 500)
  key = jax.random.key(1)
  for grouping in ("none", "random", "chunks", "quantile"):
    for space in ("probability", "margin"):
      config = dro.DroConfig(
        space=space, margin_scale=0.1, grouping=grouping, group_size=100, num_pieces=4
      )
      worst = dro.solve_follower(margins, config, key=key)
      expected_groups = 1 if grouping == "none" else 5
      assert worst.dual.shape == (expected_groups,)
      xi = np.asarray(dro.margins_to_xi(margins, config))
      summary = dro.summarize(worst, xi)
      assert all(isinstance(v, float) for v in summary.values())
      assert summary["dro/budget_spent"] <= 0.01 * (1 + 1e-5)
      assert summary["dro/objective"] >= summary["dro/center_objective"] - 1e-6
      assert summary["dro/worst_mean"] <= summary["dro/xi_mean"] + 1e-6  # mass moves left
  config = dro.DroConfig(
    space="margin", margin_scale=0.1, window_method="fixed", window=(-2.0, 2.0)
  )
  assert dro.solve_follower(margins, config, key=key).atom_weights.shape == (500, 6)
  # On its own a DroConfig has no margin scale: an experiment config resolves it to train.beta.
  with pytest.raises(ValueError, match="margin_scale is null"):
    dro.solve_follower(margins, dro.DroConfig(), key=key)
  with pytest.raises(ValueError, match="margins"):
    dro.solve_follower(np.array([1.0, np.nan]), dro.DroConfig(), key=key)


@pytest.mark.parametrize(
  "field, value",
  [
    ("epsilon", -0.1),
    ("num_pieces", 0),
    ("space", "logit"),
    ("margin_scale", 0.0),
    ("grouping", "kmeans"),
    ("group_size", 0),
    ("method", "slsqp"),
    ("window_method", "auto"),
    ("window", (1.0, 2.0)),
    ("window_tau", -1.0),
    ("window_quantile", 0.5),
  ],
)
def test_dro_config_rejects_bad_values(field, value):
  with pytest.raises(ValueError, match=field.split("_")[0]):
    dro.DroConfig(**{field: value})
  with pytest.raises(ValueError, match="window"):
    dro.DroConfig(window_method="fixed")


def test_to_loss_atoms_rejects_a_lossy_reduction_of_capped_rows():
  """With the per-atom cap a row can carry three atoms: num_atoms=2 would drop mass, so it
  raises naming a row; keeping every column is exact."""
  margins = np.random.default_rng(1).normal(0, 1, 500)
  config = dro.DroConfig(
    epsilon=0.01, grouping="random", group_size=100, per_atom_cap=True, margin_scale=0.1
  )
  worst = dro.solve_follower(margins, config, key=jax.random.key(0))
  nonzero = np.count_nonzero(np.asarray(worst.atom_weights) > 0, axis=1)
  assert np.any(nonzero > 2)
  with pytest.raises(ValueError, match=f"row {int(np.argmax(nonzero > 2))} has"):
    dro.to_loss_atoms(worst, num_atoms=2)
  weights = dro.to_loss_atoms(worst, config, num_atoms=int(nonzero.max())).weights
  np.testing.assert_allclose(np.sort(np.asarray(weights), 1)[:, ::-1].sum(1), 1.0, rtol=1e-6)
