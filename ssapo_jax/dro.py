"""The SSAPO follower: the worst-case distribution in a 1-Wasserstein ball (paper §2, Thm 3.3).

For one group of N scalars ``xi_i`` (a pair's Bradley–Terry probability ``σ(βΔ_i)`` or its margin
``βΔ_i``), pieces ``ℓ_k(z) = a_k z + b_k`` whose maximum ``ℓ̃`` under-approximates the convex loss,
a support ``[lo, hi]`` and a radius ``ε``, the follower solves the finite program of Thm 3.3
(Mohajerin Esfahani & Kuhn 2018, Thm 4.4)::

    max_{s,q} (1/N) Σ_ik [ s_ik (a_k xi_i + b_k) − a_k q_ik ]
    s.t.      (1/N) Σ_ik |q_ik| ≤ ε,   Σ_k s_ik = 1,   s_ik ≥ 0,
              lo·s_ik ≤ s_ik xi_i − q_ik ≤ hi·s_ik.

Its value is ``sup E[ℓ̃]`` over the ball and the worst case is the discrete distribution with atoms
``z_ik = xi_i − q_ik / s_ik`` of mass ``s_ik / N`` (paper eq. 5 and "Reading off P*").

Exact method (default). Dualising the budget with a multiplier ``λ ≥ 0`` separates the program per
point: ``g(λ) = λε + (1/N) Σ_i h_i(λ)`` with ``h_i(λ) = max(ℓ̃(xi_i), ℓ̃(lo) − λ(xi_i − lo),
ℓ̃(hi) − λ(hi − xi_i))``, since a linear piece minus ``λ|z − xi_i|`` peaks at ``xi_i`` or at a
boundary. ``g`` is convex and piecewise linear in ``λ``; each point contributes at most two
breakpoints. Sorting the breakpoints (per group) and accumulating the transport cost they release
finds the minimiser ``λ*`` exactly, and complementary slackness gives the primal: every point takes
the option that is optimal at ``λ*``, and the one point whose breakpoint sits at ``λ*`` splits its
mass fractionally so that the budget is spent exactly. This is the fractional-knapsack reading of
the LP; it needs no iterative solver, is exact up to rounding and costs one sort of ``2N`` keys.
Each point ends with at most two non-zero atoms.

Per-atom cap (``per_atom_cap=True``, the authors' ``|q_ik| ≤ ε``;
``alignment-handbook/scripts/run_wst.py`` bounds ``q`` by ``(-eps, eps)``). With the cap the
per-point problem at a fixed price ``λ`` is a fractional knapsack over ``K`` pieces (each piece
moves at most ``ε / reach`` of its mass); ``λ*`` is found with `jaxopt.Bisection` on the monotone
transport(λ) − N_g ε and the two responses at the ends of the final bracket are mixed so the
budget is spent exactly. Exact up to rounding (matches HiGHS to ~1e-14 in float64); it pads
groups to a common size, so it needs concrete group ids (not under jit).

Generic method (``method="osqp"``). The LP itself, per group, with jaxopt's `BoxOSQP` (matrix-free,
vmapped over groups padded to a common size), written with ``s = m + u`` (``m``: mass moved to
the boundary, ``u``: mass kept) so that only the simplex rows and the budget row are general
constraints; the simplex rows are weighted 10x (OSQP's larger step on equalities). The raw
ADMM iterate is repaired to an exactly feasible point (a lower bound): measured 1e-10..2e-3
relative to HiGHS with the cap and 5e-3..3e-2 without it. ``osqp_polish=True`` (default) then
polishes with the dual: OSQP's budget price brackets ``λ*``, the bisection above closes the
bracket and the per-point problems are solved exactly, which brings both variants to ~1e-14.

Precision: the solvers run in float64 when ``jax_enable_x64`` is on, float32 otherwise. In float32
the objective is accurate to about 1e-6 relative and the budget is met up to float32 rounding
(about 1e-7 relative); atoms may leave the support by a few ulps.

Grouping (paper §2.4): points are split into groups solved independently, each with its own
budget ``ε``; the group solutions are merged proportionally (objective = average over groups
weighted by size). `random_groups` is the paper's §4.3, `chunk_groups` the authors' code
(consecutive chunks of 100), `quantile_groups` App. F.3 (equal-mass bins in ``xi``).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ssapo_jax.config import check_choices
from ssapo_jax.fielddocs import document_fields
from ssapo_jax.losses import SPACES, LossAtoms, Space, unsharded_along

_OSQP_EQ_SCALE = 10.0  # equality rows weighted 10x (= 100x ADMM step on them, as OSQP does)
Method = Literal["exact", "osqp"]
Grouping = Literal["none", "random", "chunks", "quantile"]
WindowMethod = Literal["range", "quantile", "fixed"]
METHODS, GROUPINGS, WINDOW_METHODS = (typing.get_args(t) for t in (Method, Grouping, WindowMethod))


def _float_dtype():
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _concrete(x) -> Optional[np.ndarray]:
  """``x`` as a numpy array, or None when it is a tracer (value checks are skipped under jit)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


# --------------------------------------------------------------------------------------------
# Pieces.


def margin_window(
  xi, *, method: str = "range", tau: float = 1.0, quantile: float = 0.05
) -> tuple[float, float]:
  """Knot window in margin space from data (paper v3 §2.2).

  Args:
    xi: ``[num_pairs]`` margins.
    method: ``"range"`` gives ``[min − tau, max + tau]``; ``"quantile"`` gives the
      ``(quantile, 1 − quantile)`` empirical quantiles.
    tau: padding of the range window (margin units).
    quantile: lower quantile level of the quantile window, in ``[0, 0.5)``.

  Returns:
    ``(lo, hi)`` Python floats with ``lo < hi`` (a degenerate window is widened by ``tau`` or 1).
  """
  x = np.asarray(xi, np.float64).reshape(-1)
  if x.size == 0 or not np.all(np.isfinite(x)):
    raise ValueError(
      f"margin_window: xi must be non-empty and finite, got {x.size} values "
      f"with {int(np.sum(~np.isfinite(x)))} non-finite"
    )
  if method == "range":
    if not tau >= 0:
      raise ValueError(f"margin_window: tau must be >= 0, got {tau}")
    lo, hi = float(x.min() - tau), float(x.max() + tau)
  elif method == "quantile":
    if not 0 <= quantile < 0.5:
      raise ValueError(f"margin_window: quantile must be in [0, 0.5), got {quantile}")
    lo, hi = (float(v) for v in np.quantile(x, [quantile, 1 - quantile]))
  else:
    raise ValueError(f"margin_window: unknown method {method!r}; accepted: ['range', 'quantile']")
  if not hi > lo:
    pad = tau if tau > 0 else 1.0
    lo, hi = lo - pad, hi + pad
  return lo, hi


def tangent_pieces(
  num_pieces: int,
  *,
  space: str = "probability",
  window: Optional[tuple[float, float]] = None,
  data=None,
) -> tuple[jax.Array, jax.Array]:
  """Slopes and intercepts of tangents whose maximum under-approximates the DPO loss.

  * ``space="probability"``: tangents of ``−log p`` at ``p = k/K``, ``k = 1..K``:
    ``ℓ_k(p) = −(K/k)(p − k/K) − log(k/K)`` (paper App. G.1 and the authors' code); support [0, 1].
  * ``space="margin"``: tangents of ``−log σ(z)`` at ``K`` knots evenly spaced over ``window``
    (both ends included; one knot sits at the window's centre): ``a_k = −σ(−t_k)``,
    ``b_k = −log σ(t_k) − a_k t_k`` (paper v3 §2.2). Without ``window`` it is built from ``data``
    with `margin_window` (range method).

  Returns:
    ``(slopes [K], intercepts [K])`` in the solver dtype (float64 under ``jax_enable_x64``).
  """
  if not isinstance(num_pieces, (int, np.integer)) or num_pieces < 1:
    raise ValueError(f"tangent_pieces: num_pieces must be a positive int, got {num_pieces!r}")
  k = np.arange(1, num_pieces + 1, dtype=np.float64)
  if space == "probability":
    if window is not None or data is not None:
      raise ValueError(
        "tangent_pieces: window/data apply to space='margin' only; probability "
        "pieces are the tangents at k/K"
      )
    knots = k / num_pieces
    slopes = -1.0 / knots
    intercepts = 1.0 - np.log(knots)
  elif space == "margin":
    if window is None:
      if data is None:
        raise ValueError("tangent_pieces: space='margin' needs window=(lo, hi) or data=xi")
      window = margin_window(data)
    lo, hi = (float(w) for w in window)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
      raise ValueError(f"tangent_pieces: window must be finite with lo <= hi, got {window}")
    knots = np.array([(lo + hi) / 2]) if num_pieces == 1 else np.linspace(lo, hi, num_pieces)
    slopes = -1.0 / (1.0 + np.exp(knots))  # −σ(−t)
    intercepts = np.logaddexp(0.0, -knots) - slopes * knots  # −log σ(t) − a t
  else:
    raise ValueError(f"tangent_pieces: unknown space {space!r}; accepted: {list(SPACES)}")
  dtype = _float_dtype()
  return jnp.asarray(slopes, dtype), jnp.asarray(intercepts, dtype)


# --------------------------------------------------------------------------------------------
# Groups.


def chunk_groups(num_points: int, group_size: int) -> jax.Array:
  """``[num_points]`` int32 ids of consecutive chunks of ``group_size`` (the authors' code).

  The last group is smaller when ``group_size`` does not divide ``num_points``.
  """
  _check_group_args(num_points, group_size)
  return jnp.arange(num_points, dtype=jnp.int32) // group_size


def random_groups(num_points: int, group_size: int, *, key: jax.Array) -> jax.Array:
  """``[num_points]`` int32 ids of a uniformly random partition into groups of ``group_size``
  (paper §4.3); the last group is smaller when ``group_size`` does not divide ``num_points``."""
  _check_group_args(num_points, group_size)
  perm = jax.random.permutation(key, num_points)
  return (
    jnp.zeros(num_points, jnp.int32)
    .at[perm]
    .set(jnp.arange(num_points, dtype=jnp.int32) // group_size)
  )


def quantile_groups(xi, group_size: int) -> jax.Array:
  """``[num_points]`` int32 ids of equal-mass bins in ``xi`` (paper App. F.3): the
  ``group_size`` smallest values form group 0, and so on (ties broken by index)."""
  xi = jnp.asarray(xi)
  if xi.ndim != 1:
    raise ValueError(f"quantile_groups: xi must be [num_points], got shape {xi.shape}")
  _check_group_args(xi.shape[0], group_size)
  order = jnp.argsort(unsharded_along(xi), stable=True)
  return (
    jnp.zeros(xi.shape[0], jnp.int32)
    .at[order]
    .set(jnp.arange(xi.shape[0], dtype=jnp.int32) // group_size)
  )


def _check_group_args(num_points, group_size):
  if num_points < 1:
    raise ValueError(f"groups: num_points must be >= 1, got {num_points}")
  if not isinstance(group_size, (int, np.integer)) or group_size < 1:
    raise ValueError(f"groups: group_size must be a positive int, got {group_size!r}")


# --------------------------------------------------------------------------------------------
# The worst case.


class WorstCase(NamedTuple):
  """The follower's answer (a pytree).

  Attributes:
    atom_weights: ``[num_pairs, num_pieces]`` ``s_ik ≥ 0``, rows sum to 1.
    atom_shifts: ``[num_pairs, num_pieces]`` ``q_ik / s_ik`` (0 where ``s_ik = 0``); the atom is
      ``z_ik = xi_i − atom_shifts[i, k]``.
    objective: ``[]`` worst-case expected surrogate loss, averaged over groups weighted by size.
    dual: ``[num_groups]`` optimal multiplier of each group's budget constraint (the smallest
      one for the exact method; OSQP's estimate otherwise).
    group_objectives: ``[num_groups]`` worst-case value of each group (0 for an empty group).
    budget_spent: ``[num_groups]`` ``(1/N_g) Σ |q_ik|`` of each group (≤ ε).
    center_objective: ``[]`` ``mean_i ℓ̃(xi_i)``, the value at ``ε = 0``.
  """

  atom_weights: jax.Array
  atom_shifts: jax.Array
  objective: jax.Array
  dual: jax.Array
  group_objectives: jax.Array
  budget_spent: jax.Array
  center_objective: jax.Array


def worst_case(
  xi,
  *,
  epsilon,
  slopes,
  intercepts,
  support,
  group_ids=None,
  num_groups: Optional[int] = None,
  valid=None,
  max_group_size: Optional[int] = None,
  method: str = "exact",
  per_atom_cap: bool = False,
  osqp_tol: float = 1e-5,
  osqp_maxiter: int = 4000,
  osqp_polish: bool = True,
) -> WorstCase:
  """Worst-case distribution of the finite program of Thm 3.3, per group.

  Under ``jax.jit``: every method runs traced, with static shapes (``num_pairs``,
  ``num_pieces``, ``num_groups``, ``max_group_size``) and traced values; pass ``num_groups``
  (and, for ``per_atom_cap`` or ``"osqp"``, which pad groups to a common width,
  ``max_group_size``), since they cannot be read off traced ``group_ids``. Value checks
  (finite, inside the support, ids in range) run only on concrete inputs.

  Differentiable: the solution is piecewise smooth in ``epsilon`` and ``xi`` and ``jax.grad``
  goes through it (the sorts and the fractional split are differentiable almost everywhere);
  for the exact method ``d objective / d epsilon`` equals the budget's dual (one group), and
  ``d objective / d xi_i`` is the slope of the active piece at the point's atoms, divided by
  ``N`` (tested against finite differences).

  Args:
    xi: ``[num_pairs]`` centres ``xi_i`` inside ``support`` (valid rows; invalid ones may hold
      anything, NaN included).
    epsilon: radius ``ε ≥ 0`` of the ball (average transport per point), the same for each group.
    slopes, intercepts: ``[num_pieces]`` pieces ``ℓ_k(z) = a_k z + b_k`` (see `tangent_pieces`).
    support: ``(lo, hi)`` with ``lo ≤ hi``; atoms stay inside.
    group_ids: optional ``[num_pairs]`` ints in ``[0, num_groups)``; None is one group.
    num_groups: number of groups; inferred as ``max(group_ids) + 1`` when the ids are concrete
      (pass it when calling under ``jax.jit``).
    valid: optional ``[num_pairs]`` bool; invalid rows (padding of a fixed-shape batch) carry
      no mass in the objective and no budget (a group's budget is ``ε`` times its number of
      valid rows) and come back as one atom of weight 1 and shift 0, so they leave the valid
      rows' answer exactly as without them. Default all valid.
    max_group_size: static bound on a group's number of rows, the padded width of the
      ``per_atom_cap``/``"osqp"`` paths; needed there when ``group_ids`` are traced (a larger
      group is then a precondition violation). Default: read from concrete ids.
    method: ``"exact"`` (sorted dual, the default; bisection on λ with the cap) or ``"osqp"``
      (jaxopt `BoxOSQP` on the LP).
    per_atom_cap: add the authors' cap ``|q_ik| ≤ ε`` (needs concrete ``group_ids``).
    osqp_tol, osqp_maxiter: `BoxOSQP` tolerance and iteration cap.
    osqp_polish: polish the OSQP point with its budget price (exact per-point solves and a
      bracketed bisection on λ); without it the repaired ADMM point is returned.

  Returns:
    A `WorstCase`.

  Raises:
    ValueError: non-finite or empty ``xi``, ``xi`` outside the support, ``ε < 0``, mismatched
      pieces, bad group ids or options. Value checks run when the inputs are concrete; under
      ``jax.jit`` only shapes are checked.
  """
  if method not in METHODS:
    raise ValueError(f"worst_case: unknown method {method!r}; accepted: {list(METHODS)}")
  xi, slopes, intercepts, lo, hi, epsilon, group_ids, num_groups, valid = _validate(
    xi, epsilon, slopes, intercepts, support, group_ids, num_groups, valid
  )
  if method == "exact" and per_atom_cap:
    slot, width = _pad_layout(group_ids, num_groups, max_group_size, "per_atom_cap=True")
    return _solve_bisection(
      xi,
      slopes,
      intercepts,
      lo,
      hi,
      epsilon,
      group_ids,
      slot,
      valid,
      num_groups=num_groups,
      width=width,
      per_atom_cap=True,
    )
  if method == "exact":
    return _solve_exact(
      xi, slopes, intercepts, lo, hi, epsilon, group_ids, valid, num_groups=num_groups
    )
  return _solve_osqp(
    xi,
    slopes,
    intercepts,
    lo,
    hi,
    epsilon,
    group_ids,
    valid,
    num_groups=num_groups,
    max_group_size=max_group_size,
    per_atom_cap=per_atom_cap,
    tol=osqp_tol,
    maxiter=osqp_maxiter,
    polish=osqp_polish,
  )


def _validate(xi, epsilon, slopes, intercepts, support, group_ids, num_groups, valid):
  dtype = _float_dtype()
  if jnp.ndim(xi) != 1:
    raise ValueError(f"worst_case: xi must be [num_pairs], got shape {jnp.shape(xi)}")
  if jnp.shape(xi)[0] == 0:
    raise ValueError("worst_case: xi is empty; expected at least one point")
  if jnp.ndim(slopes) != 1 or jnp.shape(slopes) != jnp.shape(intercepts) or not jnp.size(slopes):
    raise ValueError(
      f"worst_case: slopes and intercepts must both be [num_pieces] with "
      f"num_pieces >= 1, got {jnp.shape(slopes)} and {jnp.shape(intercepts)}"
    )
  try:
    lo, hi = support
  except (TypeError, ValueError):
    raise ValueError(f"worst_case: support must be a pair (lo, hi), got {support!r}") from None
  for name, value in (("support lo", lo), ("support hi", hi), ("epsilon", epsilon)):
    if jnp.ndim(value) != 0:
      raise ValueError(f"worst_case: {name} must be a scalar, got shape {jnp.shape(value)}")
  c_lo, c_hi, c_eps = _concrete(lo), _concrete(hi), _concrete(epsilon)
  if (
    c_lo is not None
    and c_hi is not None
    and not (np.isfinite(c_lo) and np.isfinite(c_hi) and c_lo <= c_hi)
  ):
    raise ValueError(f"worst_case: support must be finite with lo <= hi, got ({c_lo}, {c_hi})")
  if c_eps is not None and not (np.isfinite(c_eps) and c_eps >= 0):
    raise ValueError(f"worst_case: epsilon must be finite and >= 0, got {c_eps}")
  for name, arr in (("slopes", slopes), ("intercepts", intercepts)):
    c = _concrete(arr)
    if c is not None and not np.all(np.isfinite(c)):
      raise ValueError(f"worst_case: {name} must be finite, got {c}")
  n = jnp.shape(xi)[0]
  if valid is not None and (jnp.shape(valid) != (n,)):
    raise ValueError(f"worst_case: valid must be [num_pairs] = [{n}], got shape {jnp.shape(valid)}")
  c_valid = np.ones(n, bool) if valid is None else _concrete(valid)
  c_xi = _concrete(xi)
  if c_xi is not None and c_valid is not None:
    c_valid = c_valid.astype(bool)
    if not c_valid.any():
      raise ValueError("worst_case: valid has no True row; expected at least one point")
    c_xi = np.where(c_valid, c_xi, np.nan_to_num(c_xi[c_valid][0]))
    bad = ~np.isfinite(c_xi)
    if bad.any():
      raise ValueError(
        f"worst_case: xi has {int(bad.sum())} non-finite value(s), first at index "
        f"{int(np.argmax(bad))}"
      )
    if c_lo is not None and c_hi is not None:
      x64 = c_xi.astype(np.float64)
      out = (x64 < float(c_lo)) | (x64 > float(c_hi))
      if out.any():
        i = int(np.argmax(out))
        raise ValueError(
          f"worst_case: xi must lie in the support [{float(c_lo)}, {float(c_hi)}]; "
          f"{int(out.sum())} value(s) outside, first xi[{i}] = {c_xi[i]}"
        )
  if group_ids is None:
    if num_groups not in (None, 1):
      raise ValueError(f"worst_case: num_groups={num_groups} given without group_ids")
    group_ids, num_groups = jnp.zeros(n, jnp.int32), 1
  else:
    if jnp.shape(group_ids) != (n,) or not jnp.issubdtype(jnp.result_type(group_ids), jnp.integer):
      raise ValueError(
        f"worst_case: group_ids must be [num_pairs] = [{n}] ints, got shape "
        f"{jnp.shape(group_ids)} dtype {jnp.result_type(group_ids)}"
      )
    c_g = _concrete(group_ids)
    if c_g is not None:
      if c_g.min() < 0:
        raise ValueError(f"worst_case: group_ids must be >= 0, found {c_g.min()}")
      if num_groups is None:
        num_groups = int(c_g.max()) + 1
      elif c_g.max() >= num_groups:
        raise ValueError(
          f"worst_case: group_ids must be < num_groups = {num_groups}, found {c_g.max()}"
        )
    elif num_groups is None:
      raise ValueError("worst_case: pass num_groups when group_ids are traced (under jit)")
    group_ids = jnp.asarray(group_ids, jnp.int32)
  valid = jnp.ones(n, bool) if valid is None else jnp.asarray(valid).astype(bool)
  # Replicated on an Explicit mesh: the solvers gather by sorted index (see `unsharded_along`).
  valid, group_ids = unsharded_along(valid), unsharded_along(group_ids)
  xi = unsharded_along(jnp.asarray(xi))
  lo, hi = jnp.asarray(lo, dtype), jnp.asarray(hi, dtype)
  # Invalid rows sit at lo with no reach (below), so whatever they held cannot leak.
  xi = jnp.where(valid, jnp.asarray(xi, dtype), lo)
  return (
    xi,
    jnp.asarray(slopes, dtype),
    jnp.asarray(intercepts, dtype),
    lo,
    hi,
    jnp.asarray(epsilon, dtype),
    group_ids,
    int(num_groups),
    valid,
  )


def _group_counts(valid, group_ids, num_groups: int, dtype) -> jax.Array:
  """Real points per group, ``[num_groups]``: N_g, the group's share of the budget N_g·ε."""
  return jax.ops.segment_sum(valid.astype(dtype), group_ids, num_segments=num_groups)


def _piecewise_loss(xi, slopes, intercepts) -> jax.Array:
  """ℓ̃(ξ) = max_k a_k ξ + b_k, ``[N]``: the piecewise-linear loss at each point."""
  return jnp.max(xi[:, None] * slopes + intercepts, axis=1)


def _segment_exclusive_suffix_sum(values, segment_start):
  """Σ of ``values`` after each position within its segment (segments are contiguous runs;
  ``segment_start`` marks their first element). No subtraction, so no cancellation."""
  rev_v = values[::-1]
  # In reversed order a segment starts where the original segment ends.
  seg_end = jnp.concatenate([segment_start[1:], jnp.ones(1, bool)])
  rev_flag = seg_end[::-1]

  def combine(a, b):
    va, fa = a
    vb, fb = b
    return jnp.where(fb, vb, va + vb), fa | fb

  incl, _ = jax.lax.associative_scan(combine, (rev_v, rev_flag))
  excl = jnp.where(rev_flag, 0.0, jnp.concatenate([jnp.zeros(1, incl.dtype), incl[:-1]]))
  return excl[::-1]


@jax.jit(static_argnames=("num_groups",))
def _solve_exact(xi, slopes, intercepts, lo, hi, epsilon, group_ids, valid, *, num_groups):
  n, num_pieces = xi.shape[0], slopes.shape[0]
  dtype = xi.dtype
  zero = jnp.zeros((), dtype)
  piece_xi = xi[:, None] * slopes + intercepts  # [N, K]
  k_stay = jnp.argmax(piece_xi, axis=1)
  loss_xi = jnp.max(piece_xi, axis=1)  # ℓ̃(xi)
  piece_lo, piece_hi = lo * slopes + intercepts, hi * slopes + intercepts
  k_lo, k_hi = jnp.argmax(piece_lo), jnp.argmax(piece_hi)
  # Transport to each boundary; an invalid row has none, so it has no option but to stay.
  d_lo, d_hi = jnp.where(valid, xi - lo, zero), jnp.where(valid, hi - xi, zero)
  g_lo = jnp.where(d_lo > 0, jnp.max(piece_lo) - loss_xi, zero)  # gain of moving there
  g_hi = jnp.where(d_hi > 0, jnp.max(piece_hi) - loss_xi, zero)

  # Options per point: 0 stay, 1 lo, 2 hi. "A" is the farther boundary (ties: larger gain),
  # "B" the nearer. h_i(λ) is the upper envelope of 0, gA − λ dA and gB − λ dB.
  a_is_hi = (d_hi > d_lo) | ((d_hi == d_lo) & (g_hi > g_lo))
  d_a, g_a = jnp.where(a_is_hi, d_hi, d_lo), jnp.where(a_is_hi, g_hi, g_lo)
  d_b, g_b = jnp.where(a_is_hi, d_lo, d_hi), jnp.where(a_is_hi, g_lo, g_hi)
  opt_a, opt_b = jnp.where(a_is_hi, 2, 1), jnp.where(a_is_hi, 1, 2)
  rho_a = jnp.where(d_a > 0, g_a / jnp.where(d_a > 0, d_a, 1), zero)  # λ where A meets stay
  rho_b = jnp.where(d_b > 0, g_b / jnp.where(d_b > 0, d_b, 1), zero)
  use_a = (g_a > 0) & (g_a > g_b)  # A is optimal just above λ = 0
  use_b = (g_b > 0) & (d_b > 0) & (~use_a | (rho_b > rho_a))  # B is on the envelope
  both = use_a & use_b  # then d_a > d_b strictly
  lam_ab = jnp.where(both, (g_a - g_b) / jnp.where(both, d_a - d_b, 1), zero)
  start = jnp.where(use_a, opt_a, jnp.where(use_b, opt_b, 0))
  # Transition 1: A→B (both), A→stay (A only) or B→stay (B only). Transition 2: B→stay (both).
  inf = jnp.asarray(jnp.inf, dtype)
  lam1 = jnp.where(both, lam_ab, jnp.where(use_a, rho_a, jnp.where(use_b, rho_b, inf)))
  from1 = start
  to1 = jnp.where(both, opt_b, 0)
  drop1 = jnp.where(use_a, d_a - jnp.where(both, d_b, zero), jnp.where(use_b, d_b, zero))
  lam2 = jnp.where(both, jnp.maximum(rho_b, lam1), inf)
  from2, to2 = opt_b, jnp.zeros_like(opt_b)
  drop2 = jnp.where(both, d_b, zero)

  # Sort the 2N transitions by (group, λ, order) and release transport until the budget holds.
  lam = jnp.concatenate([lam1, lam2])
  drop = jnp.concatenate([drop1, drop2])
  gid = jnp.concatenate([group_ids, group_ids])
  order = jnp.concatenate([jnp.zeros(n, jnp.int32), jnp.ones(n, jnp.int32)])
  idx = jnp.arange(2 * n, dtype=jnp.int32)
  gid_s, lam_s, _, idx_s = jax.lax.sort(
    tuple(unsharded_along(x) for x in (gid, lam, order, idx)), num_keys=3
  )
  drop_s = drop[idx_s]
  seg_start = jnp.concatenate([jnp.ones(1, bool), gid_s[1:] != gid_s[:-1]])
  rest = _segment_exclusive_suffix_sum(drop_s, seg_start)  # cost left if this one is applied
  counts = _group_counts(valid, group_ids, num_groups, dtype)
  budget = (counts * epsilon)[gid_s]
  partial = (rest + drop_s - budget) / jnp.where(drop_s > 0, drop_s, 1)
  applied = jnp.where(
    drop_s <= 0,
    zero,
    jnp.where(
      rest >= budget, 1.0, jnp.where(rest + drop_s <= budget, zero, jnp.clip(partial, 0.0, 1.0))
    ),
  )
  dual = jax.ops.segment_max(jnp.where(applied > 0, lam_s, zero), gid_s, num_segments=num_groups)
  dual = jnp.maximum(dual, zero)
  phi = jnp.zeros(2 * n, dtype).at[idx_s].set(applied)
  phi1, phi2 = phi[:n], phi[n:]

  opts = jnp.arange(3)
  onehot = lambda o: (o[:, None] == opts).astype(dtype)  # [N, 3]
  mass = (
    onehot(start)
    + phi1[:, None] * (onehot(to1) - onehot(from1))
    + phi2[:, None] * (onehot(to2) - onehot(from2))
  )
  mass = jnp.clip(mass, 0.0, 1.0)
  w_stay, w_lo, w_hi = mass[:, 0], mass[:, 1], mass[:, 2]
  pieces = jnp.arange(num_pieces)
  at = lambda k: (jnp.reshape(k, (-1, 1)) == pieces).astype(dtype)  # one-hot over pieces
  s = w_stay[:, None] * at(k_stay) + w_lo[:, None] * at(k_lo) + w_hi[:, None] * at(k_hi)
  q = (w_lo * d_lo)[:, None] * at(k_lo) - (w_hi * d_hi)[:, None] * at(k_hi)
  return _finish(xi, s, q, slopes, intercepts, loss_xi, group_ids, counts, dual, num_groups, valid)


def _finish(xi, s, q, slopes, intercepts, loss_xi, group_ids, counts, dual, num_groups, valid):
  """Objective, budget and shifts from a feasible ``(s, q)``; invalid rows count for nothing."""
  dtype = xi.dtype
  shifts = jnp.where(s > 0, q / jnp.where(s > 0, s, 1), 0.0)
  value = jnp.sum(s * (xi[:, None] * slopes + intercepts) - slopes * q, axis=1)  # [N]
  value = jnp.where(valid, value, 0.0)
  loss_xi = jnp.where(valid, loss_xi, 0.0)
  safe = jnp.maximum(counts, 1)
  group_obj = jax.ops.segment_sum(value, group_ids, num_segments=num_groups) / safe
  spent = (
    jax.ops.segment_sum(jnp.sum(jnp.abs(q), axis=1), group_ids, num_segments=num_groups) / safe
  )
  n = jnp.maximum(jnp.sum(valid), 1).astype(dtype)
  return WorstCase(
    atom_weights=s,
    atom_shifts=shifts,
    objective=jnp.sum(value) / n,
    dual=dual,
    group_objectives=group_obj,
    budget_spent=spent,
    center_objective=jnp.sum(loss_xi) / n,
  )


# --------------------------------------------------------------------------------------------
# Exact path with the per-atom cap: bisection on the budget price, per-point greedy inside.


def _point_response(lam, xi, slopes, intercepts, d_lo, d_hi, cap):
  """Per-point maximiser of the Lagrangian at budget price ``lam`` (broadcast to ``[N]``).

  For each point, ``max Σ_k s_k c_k + (|a_k| − λ)⁺ min(reach_k s_k, cap)`` over the simplex,
  with ``c_k = a_k xi + b_k`` and ``reach_k`` the distance to the boundary the piece's slope
  points away from. Piece ``k`` is concave in ``s_k``: a first segment of mass ``cap / reach_k``
  with slope ``c_k + (|a_k| − λ)⁺ reach_k``, then slope ``c_k ≤ ℓ̃(xi)``. So the optimum fills the
  first segments whose slope beats ``ℓ̃(xi)`` in decreasing order of slope and puts the rest of
  the mass on the best piece at ``xi`` (a fractional knapsack of ``K`` items). Segments tied with
  ``ℓ̃(xi)`` are left empty.

  Returns:
    ``(s [N, K], r [N, K], transport [N])`` with ``r = |q|``.
  """
  dtype = xi.dtype
  lam = jnp.broadcast_to(lam, xi.shape)
  num_pieces = slopes.shape[0]
  c = xi[:, None] * slopes + intercepts  # [N, K]
  loss_xi = jnp.max(c, axis=1, keepdims=True)
  k_stay = jnp.argmax(c, axis=1)
  reach = jnp.where(slopes < 0, d_lo[:, None], jnp.where(slopes > 0, d_hi[:, None], 0.0))
  gain = jnp.maximum(jnp.abs(slopes) - lam[:, None], 0.0) * reach
  rate = c + gain
  eligible = (rate > loss_xi) & (reach > 0)
  capacity = jnp.where(eligible, cap / jnp.where(reach > 0, reach, 1.0), 0.0)
  order = jnp.argsort(jnp.where(eligible, -rate, jnp.inf), axis=1, stable=True)
  cap_sorted = jnp.take_along_axis(capacity, order, axis=1)
  before = jnp.concatenate(
    [jnp.zeros((xi.shape[0], 1), dtype), jnp.cumsum(cap_sorted, axis=1)[:, :-1]], axis=1
  )
  fill_sorted = jnp.clip(1.0 - before, 0.0, cap_sorted)
  fill = jnp.zeros_like(fill_sorted).at[jnp.arange(xi.shape[0])[:, None], order].set(fill_sorted)
  rest = jnp.clip(1.0 - jnp.sum(fill, axis=1), 0.0, 1.0)
  s = fill + rest[:, None] * (k_stay[:, None] == jnp.arange(num_pieces)).astype(dtype)
  r = jnp.minimum(reach * fill, cap)
  return s, r, jnp.sum(r, axis=1)


def _pad_layout(group_ids, num_groups, max_group_size, who):
  """Slot of each point inside its group and the common group width.

  Concrete ids: computed here, width = the largest group. Traced ids: the slot is a rank
  computed on device (one stable sort) and the width is the static ``max_group_size``.
  """
  c_g = _concrete(group_ids)
  if c_g is None:
    if max_group_size is None:
      raise ValueError(
        f"worst_case: {who} pads groups to a common width; with traced "
        f"group_ids (under jit) pass max_group_size"
      )
    n = group_ids.shape[0]
    order = jnp.argsort(unsharded_along(group_ids), stable=True)
    sorted_g = group_ids[order]
    pos = jnp.arange(n, dtype=jnp.int32)
    first = jax.ops.segment_min(pos, sorted_g, num_segments=num_groups)
    slot = jnp.zeros(n, jnp.int32).at[order].set(pos - first[sorted_g])
    return slot, int(min(max_group_size, n))
  n = c_g.shape[0]
  counts_np = np.bincount(c_g, minlength=num_groups)
  order = np.argsort(c_g, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts_np)[:-1]])
  slot = np.empty(n, np.int64)
  slot[order] = np.arange(n) - starts[c_g[order]]
  return jnp.asarray(slot, jnp.int32), int(counts_np.max())


def _pad(values, group_ids, slot, num_groups, width, fill):
  return jnp.full((num_groups, width), fill, values.dtype).at[group_ids, slot].set(values)


def _padded_points(xi, lo, hi, group_ids, slot, valid, num_groups, width):
  """The points laid out per group ``[num_groups, width]``: ``(counts, real, x_pad, d_lo,
  d_hi)``. Padded slots get an empty support (reach 0 both ways, so nothing moves)."""
  counts = _group_counts(valid, group_ids, num_groups, xi.dtype)
  real = _pad(valid, group_ids, slot, num_groups, width, False)
  x_pad = _pad(xi, group_ids, slot, num_groups, width, lo)
  d_lo = jnp.where(real, x_pad - lo, 0.0)
  d_hi = jnp.where(real, hi - x_pad, 0.0)
  return counts, real, x_pad, d_lo, d_hi


def _bisect_groups(
  x_pad, d_lo, d_hi, real, slopes, intercepts, epsilon, cap, counts, *, lam_lo=None, lam_hi=None
):
  """Exact Lagrangian solution of each padded group ``[G, W]``.

  ``λ* = inf{λ ≥ 0 : transport(λ) ≤ N_g ε}`` is found with `jaxopt.Bisection` on the monotone
  step function ``transport(λ) − N_g ε`` over ``[lam_lo, lam_hi]`` (default ``[0, max|a|]``;
  a bracket that does not hold falls back to the default); the two responses at the ends of the
  final bracket are then mixed so that the budget is spent exactly (complementary slackness).
  Padded slots have ``d_lo = d_hi = 0`` (no transport) and are dropped by the caller.

  Returns:
    ``(s [G, W, K], r [G, W, K], λ* [G])``.
  """
  from jaxopt import Bisection  # imported lazily

  dtype = x_pad.dtype
  a_max = jnp.max(jnp.abs(slopes))
  iters = 110 if dtype == jnp.float64 else 60
  default_lo, default_hi = jnp.zeros((), dtype), a_max
  num_groups = x_pad.shape[0]
  lam_lo = jnp.full(num_groups, default_lo) if lam_lo is None else lam_lo
  lam_hi = jnp.full(num_groups, default_hi) if lam_hi is None else lam_hi

  def one(x, dl, dh, is_real, budget, lo_g, hi_g):
    transport = lambda lam: jnp.sum(
      jnp.where(is_real, _point_response(lam, x, slopes, intercepts, dl, dh, cap)[2], 0.0)
    )
    ok = (transport(lo_g) > budget) & (transport(hi_g) <= budget)
    lo_g = jnp.where(ok, lo_g, default_lo)
    hi_g = jnp.where(ok, hi_g, default_hi)
    width = hi_g - lo_g
    # Bisection on t ∈ [0, 1] (constant bracket), λ = lo + t·width; decreasing in t.
    solver = Bisection(
      optimality_fun=lambda t: transport(lo_g + t * width) - budget,
      lower=0.0,
      upper=1.0,
      maxiter=iters,
      tol=0.0,
      check_bracket=False,
      jit=True,
      unroll=False,
    )
    state = solver.run().state
    at_zero = transport(default_lo) <= budget  # the budget does not bind: λ* = 0
    lam_l = jnp.where(at_zero, default_lo, lo_g + state.low * width)
    lam_h = jnp.where(at_zero, default_lo, lo_g + state.high * width)
    s_l, r_l, t_l = _point_response(lam_l, x, slopes, intercepts, dl, dh, cap)
    s_h, r_h, t_h = _point_response(lam_h, x, slopes, intercepts, dl, dh, cap)
    t_l = jnp.sum(jnp.where(is_real, t_l, 0.0))
    t_h = jnp.sum(jnp.where(is_real, t_h, 0.0))
    gap = t_l - t_h
    theta = jnp.where(gap > 0, jnp.clip((budget - t_h) / jnp.where(gap > 0, gap, 1), 0, 1), 0.0)
    theta = jnp.where(at_zero, 1.0, theta)
    s = theta * s_l + (1 - theta) * s_h
    r = theta * r_l + (1 - theta) * r_h
    return s, r, lam_h

  return jax.vmap(one)(x_pad, d_lo, d_hi, real, counts * epsilon, lam_lo, lam_hi)


@jax.jit(static_argnames=("num_groups", "width", "per_atom_cap"))
def _solve_bisection(
  xi,
  slopes,
  intercepts,
  lo,
  hi,
  epsilon,
  group_ids,
  slot,
  valid,
  *,
  num_groups,
  width,
  per_atom_cap,
  lam_lo=None,
  lam_hi=None,
):
  """Exact solution by bisection on λ (the capped program, or the plain one as a polish)."""
  dtype = xi.dtype
  counts, real, x_pad, d_lo, d_hi = _padded_points(
    xi, lo, hi, group_ids, slot, valid, num_groups, width
  )
  cap = epsilon if per_atom_cap else jnp.asarray(jnp.inf, dtype)
  s, r, lam = _bisect_groups(
    x_pad, d_lo, d_hi, real, slopes, intercepts, epsilon, cap, counts, lam_lo=lam_lo, lam_hi=lam_hi
  )
  s, r = s[group_ids, slot], r[group_ids, slot]
  q = -jnp.sign(slopes) * r
  loss_xi = _piecewise_loss(xi, slopes, intercepts)
  return _finish(xi, s, q, slopes, intercepts, loss_xi, group_ids, counts, lam, num_groups, valid)


# --------------------------------------------------------------------------------------------
# Generic path: the LP per group with jaxopt's BoxOSQP.


def _solve_osqp(
  xi,
  slopes,
  intercepts,
  lo,
  hi,
  epsilon,
  group_ids,
  valid,
  *,
  num_groups,
  max_group_size,
  per_atom_cap,
  tol,
  maxiter,
  polish,
):
  slot, width = _pad_layout(group_ids, num_groups, max_group_size, "method='osqp'")
  raw = _osqp_core(
    xi,
    slopes,
    intercepts,
    lo,
    hi,
    epsilon,
    group_ids,
    slot,
    valid,
    num_groups=num_groups,
    width=width,
    per_atom_cap=bool(per_atom_cap),
    tol=float(tol),
    maxiter=int(maxiter),
  )
  if not polish:
    return raw
  # Dual polish: OSQP's budget price brackets λ*; fixing λ separates the LP per point, which is
  # solved exactly, and the bracket is closed by bisection (falls back to [0, max|a|] when the
  # OSQP bracket does not hold). The polished point is kept where it is at least as good.
  a_max = jnp.max(jnp.abs(slopes))
  half = 1e-2 * a_max + 10 * tol
  polished = _solve_bisection(
    xi,
    slopes,
    intercepts,
    lo,
    hi,
    epsilon,
    group_ids,
    slot,
    valid,
    num_groups=num_groups,
    width=width,
    per_atom_cap=bool(per_atom_cap),
    lam_lo=jnp.maximum(raw.dual - half, 0.0),
    lam_hi=jnp.minimum(raw.dual + half, a_max),
  )
  better = polished.group_objectives >= raw.group_objectives
  keep = better[group_ids][:, None]
  s = jnp.where(keep, polished.atom_weights, raw.atom_weights)
  q = s * jnp.where(keep, polished.atom_shifts, raw.atom_shifts)
  counts = _group_counts(valid, group_ids, num_groups, xi.dtype)
  dual = jnp.where(better, polished.dual, raw.dual)
  loss_xi = _piecewise_loss(xi, slopes, intercepts)
  return _finish(xi, s, q, slopes, intercepts, loss_xi, group_ids, counts, dual, num_groups, valid)


@jax.jit(static_argnames=("num_groups", "width", "per_atom_cap", "tol", "maxiter"))
def _osqp_core(
  xi,
  slopes,
  intercepts,
  lo,
  hi,
  epsilon,
  group_ids,
  slot,
  valid,
  *,
  num_groups,
  width,
  per_atom_cap,
  tol,
  maxiter,
):
  from jaxopt import BoxOSQP  # imported lazily: only this path needs it

  dtype = xi.dtype
  num_pieces = slopes.shape[0]
  counts, real, x_pad, d_lo, d_hi = _padded_points(
    xi, lo, hi, group_ids, slot, valid, num_groups, width
  )
  mask = real.astype(dtype)

  # Moving an atom against its piece's slope only costs budget, so an optimal q_ik has the sign
  # of −a_k, and |q_ik| ≤ reach_ik s_ik with reach = ξ − lo on a decreasing piece, hi − ξ on an
  # increasing one, 0 on a flat one. Writing s = m + u with m = |q| / reach (mass moved to the
  # boundary) and u (mass kept at ξ) turns the program into an LP with box bounds, one equality
  # per point and one budget row:
  #   max Σ_ik m_ik (c_ik + |a_k| reach_ik) + u_ik c_ik,  c_ik = a_k ξ_i + b_k
  #   s.t. Σ_k (m_ik + u_ik) = 1, m ≥ 0, u ≥ 0, Σ reach·m ≤ N_g ε, [reach_ik m_ik ≤ ε].
  # It is much better conditioned for ADMM than the (s, q) form.
  def solve_group(x_g, d_lo_g, d_hi_g, mask_g, count_g):
    shape = (width, num_pieces)
    reach = jnp.where(slopes < 0, d_lo_g[:, None], jnp.where(slopes > 0, d_hi_g[:, None], 0.0))
    stay = (x_g[:, None] * slopes + intercepts) * mask_g[:, None]
    c = (-(stay + jnp.abs(slopes) * reach), -stay)
    row_scale = _OSQP_EQ_SCALE / np.sqrt(2 * num_pieces)
    norm = jnp.sqrt(jnp.sum(reach**2))
    budget_scale = 1.0 / jnp.where(norm > 0, norm, 1.0)

    def mv_a(_, x):
      m, u = x
      return (jnp.sum(m + u, axis=1) * row_scale, m, u, jnp.sum(reach * m) * budget_scale)

    ones = jnp.ones(shape, dtype)
    rows = jnp.full(width, row_scale, dtype)
    if per_atom_cap:
      m_cap = jnp.where(reach > 0, jnp.minimum(epsilon / jnp.where(reach > 0, reach, 1), 1), 0)
    else:
      m_cap = jnp.where(reach > 0, 1.0, 0.0) * ones
    lower = (rows, 0 * ones, 0 * ones, jnp.asarray(-jnp.inf, dtype))
    upper = (rows, m_cap, ones, count_g * epsilon * budget_scale)
    solver = BoxOSQP(
      matvec_Q=lambda _, x: jax.tree.map(jnp.zeros_like, x),
      matvec_A=mv_a,
      tol=tol,
      maxiter=maxiter,
      check_primal_dual_infeasability=False,
      implicit_diff=False,
      jit=True,
    )
    sol = solver.run(
      init_params=None, params_obj=(None, c), params_eq=None, params_ineq=(lower, upper)
    )
    m, u = sol.params.primal[0]
    # The budget row's multiplier, in the row's unscaled units, prices Σ_i; dividing objective
    # and budget by N_g leaves it unchanged, so it is the program's λ.
    return m, u, reach, jnp.abs(sol.params.dual_eq[3]) * budget_scale

  m, u, reach, lam = jax.vmap(solve_group)(x_pad, d_lo, d_hi, mask, counts)
  m, u, reach = m[group_ids, slot], u[group_ids, slot], reach[group_ids, slot]  # [N, K]
  s = jnp.clip(m, 0, None) + jnp.clip(u, 0, None)
  q = -jnp.sign(slopes) * reach * jnp.clip(m, 0, None)
  zero = jnp.zeros((), dtype)
  s, q = _repair(
    s,
    q,
    jnp.where(valid, xi - lo, zero),
    jnp.where(valid, hi - xi, zero),
    epsilon,
    group_ids,
    counts,
    num_groups,
    per_atom_cap,
  )
  loss_xi = _piecewise_loss(xi, slopes, intercepts)
  return _finish(xi, s, q, slopes, intercepts, loss_xi, group_ids, counts, lam, num_groups, valid)


def _repair(s, q, d_lo, d_hi, epsilon, group_ids, counts, num_groups, per_atom_cap):
  """Projects an approximate LP solution onto the feasible set (rows on the simplex, atoms in
  the support, cap, then the budget by scaling ``q`` per group)."""
  s = jnp.clip(s, 0.0, None)
  total = jnp.sum(s, axis=1, keepdims=True)
  k = s.shape[1]
  s = jnp.where(total > 0, s / jnp.where(total > 0, total, 1), 1.0 / k)
  q = jnp.clip(q, -s * d_hi[:, None], s * d_lo[:, None])
  if per_atom_cap:
    q = jnp.clip(q, -epsilon, epsilon)
  used = jax.ops.segment_sum(jnp.sum(jnp.abs(q), axis=1), group_ids, num_segments=num_groups)
  budget = counts * epsilon
  scale = jnp.where(used > budget, budget / jnp.where(used > 0, used, 1), 1.0)
  return s, q * scale[group_ids][:, None]


# --------------------------------------------------------------------------------------------
# Glue for the leader, the rounds and logging.


def to_loss_atoms(
  worst: WorstCase,
  config: Optional[DroConfig] = None,
  *,
  space: Optional[str] = None,
  margin_scale: Optional[float] = None,
  num_atoms: Optional[int] = None,
  dtype=jnp.float32,
) -> LossAtoms:
  """The `LossAtoms` of `losses.robust_dpo_loss` from a `WorstCase`.

  ``weights = s`` (rows sum to 1) and ``shifts = q / s`` (0 where ``s = 0``), so the leader's
  atom is ``xi_i − shift``. The atoms carry the space and margin scale they were solved in,
  from ``config`` or given explicitly (``space``/``margin_scale`` override it).

  Args:
    worst: a `WorstCase`.
    config: the `DroConfig` the worst case was solved with (its ``space``, ``margin_scale``).
    space: ``"probability"`` or ``"margin"``; default ``config.space`` (else probability).
    margin_scale: default ``config.margin_scale``; None only for atoms that are all shift 0.
    num_atoms: keep the ``num_atoms`` heaviest atoms of each row, ``[num_pairs, num_atoms]``
      (atoms are not tied to pieces in the loss). Only a lossless reduction is accepted: on
      concrete input a row with mass outside its ``num_atoms`` heaviest atoms raises
      ``ValueError`` (under jit it cannot be checked; the row would be renormalised). The exact
      method without the cap puts at most two non-zero atoms on a row, so ``num_atoms=2`` is
      lossless there; with ``per_atom_cap=True`` a row can carry three or more (measured: 3 of
      500 rows at ε = 0.01 and 9 of 500 at ε = 0.05, up to 12% of a row's mass outside the top
      two), so keep every column (None, the default) there. None keeps all ``num_pieces``
      columns.
    dtype: output dtype (float32 for the loss).

  Returns:
    `LossAtoms` with ``weights``/``shifts`` ``[num_pairs, K']``.
  """
  weights, shifts = worst.atom_weights, worst.atom_shifts
  if num_atoms is not None:
    if not isinstance(num_atoms, (int, np.integer)) or num_atoms < 1:
      raise ValueError(f"to_loss_atoms: num_atoms must be a positive int, got {num_atoms!r}")
    if num_atoms < weights.shape[1]:
      if not isinstance(weights, jax.core.Tracer):
        nonzero = np.count_nonzero(np.asarray(weights) > 0, axis=1)
        if np.any(nonzero > num_atoms):
          row = int(np.argmax(nonzero > num_atoms))
          raise ValueError(
            f"to_loss_atoms: num_atoms={num_atoms} would drop mass: row {row} has "
            f"{int(nonzero[row])} non-zero atoms ({int(np.sum(nonzero > num_atoms))} rows "
            "have more than num_atoms; per_atom_cap=True solutions can); keep every atom "
            "with num_atoms=None"
          )
      weights, order = jax.lax.top_k(weights, num_atoms)
      shifts = jnp.take_along_axis(shifts, order, axis=1)
      weights = weights / jnp.sum(weights, axis=1, keepdims=True)
  shifts = jnp.where(weights > 0, shifts, 0.0)
  if space is None:
    space = "probability" if config is None else config.space
  if margin_scale is None and config is not None:
    margin_scale = config.margin_scale
  return LossAtoms(
    weights.astype(dtype),
    shifts.astype(dtype),
    space=space,
    margin_scale=None if margin_scale is None else float(margin_scale),
  )


def summarize(worst: WorstCase, xi) -> dict[str, float]:
  """Plain-float summary for logging.

  Keys: ``dro/objective`` (worst-case surrogate loss), ``dro/center_objective`` (its value at
  ``ε = 0``), ``dro/budget_spent`` (``(1/N) Σ s|shift|``), ``dro/mass_moved`` (share of mass on
  displaced atoms), ``dro/moved_atoms`` (their count), ``dro/dual_max`` (largest budget price),
  ``dro/xi_mean`` and ``dro/worst_mean`` (means of the centre and of the worst case).
  """
  s = np.asarray(worst.atom_weights, np.float64)
  shifts = np.asarray(worst.atom_shifts, np.float64)
  x = np.asarray(xi, np.float64)
  if x.shape != s.shape[:1]:
    raise ValueError(f"summarize: xi must be [num_pairs] = [{s.shape[0]}], got {x.shape}")
  moved = (s > 0) & (shifts != 0)
  n = s.shape[0]
  return {
    "dro/objective": float(worst.objective),
    "dro/center_objective": float(worst.center_objective),
    "dro/budget_spent": float(np.sum(s * np.abs(shifts)) / n),
    "dro/mass_moved": float(np.sum(s[moved]) / n),
    "dro/moved_atoms": float(np.sum(moved)),
    "dro/dual_max": float(np.max(np.asarray(worst.dual))),
    "dro/xi_mean": float(np.mean(x)),
    "dro/worst_mean": float(np.sum(s * (x[:, None] - shifts)) / n),
  }


@document_fields
@dataclasses.dataclass(frozen=True)
class DroConfig:
  """Follower settings (paper §2, §5; defaults follow the paper's best Mistral run)."""

  epsilon: float = 0.01  # radius of the 1-Wasserstein ball, in xi units (mean transport per pair)
  num_pieces: int = 6  # K, tangent pieces of the loss (paper: K = 6)
  # "probability": xi = σ(margin_scale·m); "margin": xi = margin_scale·m. The leader's robust
  # loss works in the same space (the experiment config copies it to train.robust_space).
  space: Space = "probability"
  # Maps implicit-reward margins m to xi (authors: σ(0.1·m) with β = 0.1); None = train.beta,
  # resolved by the experiment config.
  margin_scale: Optional[float] = None
  grouping: Grouping = "none"  # none | random (paper §4.3) | chunks (authors' code) | quantile
  group_size: int = 100  # G, points per group (paper default 100)
  method: Method = "exact"  # exact (sorted dual) | osqp (jaxopt BoxOSQP on the LP)
  per_atom_cap: bool = False  # authors' extra |q_ik| <= epsilon (exact: bisection on λ)
  window_method: WindowMethod = "range"  # margin-space knot window: range | quantile | fixed
  window: Optional[tuple[float, float]] = None  # (lo, hi) for window_method="fixed"
  window_tau: float = 1.0  # padding of the "range" window, in xi units
  window_quantile: float = 0.05  # lower quantile level of the "quantile" window
  # Let margin_scale differ from train.beta on purpose: the follower then solves at σ(scale·m)
  # while the leader's loss reads σ(β·m) (the authors' Llama-3 run: 0.1 with β = 0.05).
  allow_scale_mismatch: bool = False

  def __post_init__(self):
    check_choices(self, "dro")
    if not (np.isfinite(self.epsilon) and self.epsilon >= 0):
      raise ValueError(f"dro.epsilon must be finite and >= 0, got {self.epsilon}")
    if not isinstance(self.num_pieces, int) or self.num_pieces < 1:
      raise ValueError(f"dro.num_pieces must be an int >= 1, got {self.num_pieces!r}")
    if self.margin_scale is not None and not (
      np.isfinite(self.margin_scale) and self.margin_scale > 0
    ):
      raise ValueError(f"dro.margin_scale must be finite and > 0 or null, got {self.margin_scale}")
    if not isinstance(self.group_size, int) or self.group_size < 1:
      raise ValueError(f"dro.group_size must be an int >= 1, got {self.group_size!r}")
    if self.window_method == "fixed":
      if self.window is None or len(self.window) != 2 or not self.window[0] < self.window[1]:
        raise ValueError(
          f"dro.window must be (lo, hi) with lo < hi for window_method='fixed', got {self.window!r}"
        )
    elif self.window is not None:
      raise ValueError(
        f"dro.window is only used with window_method='fixed' (got window="
        f"{self.window!r} with window_method={self.window_method!r})"
      )
    if not self.window_tau >= 0:
      raise ValueError(f"dro.window_tau must be >= 0, got {self.window_tau}")
    if not 0 <= self.window_quantile < 0.5:
      raise ValueError(f"dro.window_quantile must be in [0, 0.5), got {self.window_quantile}")


def margins_to_xi(margins, config: DroConfig) -> jax.Array:
  """``[num_pairs]`` follower variable from implicit-reward margins: ``σ(scale·m)`` in
  probability space (the authors' ``σ(0.1·(r_w − r_l))``), ``scale·m`` in margin space."""
  if config.margin_scale is None:
    raise ValueError(
      "dro.margin_scale is null: it defaults to train.beta when an ExperimentConfig "
      "resolves; set it explicitly to use DroConfig on its own"
    )
  m = jnp.asarray(margins, _float_dtype())
  z = config.margin_scale * m
  return jax.nn.sigmoid(z) if config.space == "probability" else z


def _masked_window(x, valid, config: DroConfig):
  """`margin_window` of the valid rows of ``x``, on device (traced-safe); ``(lo, hi)`` scalars."""
  if config.window_method == "fixed":
    return (jnp.asarray(config.window[0], x.dtype), jnp.asarray(config.window[1], x.dtype))
  if config.window_method == "range":
    lo = jnp.min(jnp.where(valid, x, jnp.inf)) - config.window_tau
    hi = jnp.max(jnp.where(valid, x, -jnp.inf)) + config.window_tau
    pad = config.window_tau if config.window_tau > 0 else 1.0
  else:
    q = jnp.nanquantile(
      jnp.where(valid, x, jnp.nan),
      jnp.asarray([config.window_quantile, 1 - config.window_quantile], x.dtype),
    )
    lo, hi = q[0], q[1]
    pad = config.window_tau if config.window_tau > 0 else 1.0
  degenerate = ~(hi > lo)  # as `margin_window`: widen a single-point window
  return jnp.where(degenerate, lo - pad, lo), jnp.where(degenerate, hi + pad, hi)


def _margin_pieces(lo, hi, num_pieces: int):
  """`tangent_pieces` in margin space for a traced window ``[lo, hi]``."""
  if num_pieces == 1:
    knots = jnp.reshape((lo + hi) / 2, (1,))
  else:
    knots = lo + (hi - lo) * jnp.linspace(0.0, 1.0, num_pieces, dtype=lo.dtype)
  slopes = -jax.nn.sigmoid(-knots)  # −σ(−t)
  intercepts = jnp.logaddexp(0.0, -knots) - slopes * knots  # −log σ(t) − a t
  return slopes, intercepts


def group_ids_on_device(xi, valid, config: DroConfig, *, key=None) -> tuple[jax.Array, int]:
  """``([num_pairs] int32 ids, num_groups)`` of ``config.grouping``, traced-safe.

  The valid rows are ordered (none/chunks: by index; random: a uniform permutation of
  ``key``; quantile: by ``xi``) and cut into consecutive groups of ``group_size``; invalid rows
  follow them, so they only fill groups' tails or empty groups. ``num_groups =
  ceil(num_pairs / group_size)`` is static (1 for ``"none"``); groups past the valid rows are
  empty (no rows, no budget). With every row valid the ids equal `chunk_groups`,
  `random_groups` (same key) and `quantile_groups`.
  """
  n = xi.shape[0]
  if config.grouping == "none":
    return jnp.zeros(n, jnp.int32), 1
  size = config.group_size
  invalid = (~valid).astype(jnp.int32)
  if config.grouping == "random":
    if key is None:
      raise ValueError("dro.grouping='random' draws its groups: pass key=")
    perm = jax.random.permutation(key, n)
    order = perm[jnp.argsort(unsharded_along(invalid[perm]), stable=True)]
  elif config.grouping == "chunks":
    order = jnp.argsort(unsharded_along(invalid), stable=True)
  else:  # quantile
    keys = (unsharded_along(invalid), unsharded_along(xi), jnp.arange(n, dtype=jnp.int32))
    order = jax.lax.sort(keys, num_keys=3)[2]
  ids = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32) // size)
  return ids, -(-n // size)


def solve_follower(
  margins, config: DroConfig, *, valid=None, key: jax.Array | None = None
) -> WorstCase:
  """One follower step: margins → ξ → pieces, support, groups → `worst_case`.

  Runs eagerly and under ``jax.jit`` alike (``config`` is static: a frozen dataclass, pass it by
  closure or ``static_argnames``). Everything is computed on device from the arrays: ξ, the
  margin-space knot window and support (over the valid rows), and the grouping
  (`group_ids_on_device`), so for a fixed ``num_pairs`` a jitted caller compiles once, whatever
  the values and the number of valid rows. Pad a varying number of pairs to a fixed size and
  mark the padding with ``valid``: padding rows get no mass and no budget.

  What needs concrete input, and why: the value checks (finite margins, at least one valid row)
  raise ``ValueError`` only eagerly, since a traced value cannot raise; under jit they are
  preconditions. Every method runs under jit (``per_atom_cap`` and ``"osqp"`` pad groups to
  ``group_size`` rows, a static width).

  Differentiable in ``config.epsilon`` (pass ε traced through `worst_case` to differentiate)
  and in the margins (through ξ): see `worst_case`.

  Args:
    margins: ``[num_pairs]`` implicit-reward margins ``r_w − r_l``.
    config: a `DroConfig` with a numeric ``margin_scale``.
    valid: optional ``[num_pairs]`` bool (default all rows).
    key: PRNG key, needed only by ``grouping="random"`` (optional otherwise).

  Returns:
    The `WorstCase` over ``xi = margins_to_xi(margins, config)``; `to_loss_atoms` turns it into
    the loss's `LossAtoms` (`follower_atoms` does both).
  """
  if jnp.ndim(margins) != 1 or jnp.shape(margins)[0] == 0:
    raise ValueError(
      f"solve_follower: margins must be a non-empty [num_pairs] array, got shape "
      f"{jnp.shape(margins)}"
    )
  n = jnp.shape(margins)[0]
  if valid is not None and jnp.shape(valid) != (n,):
    raise ValueError(
      f"solve_follower: valid must be [num_pairs] = [{n}], got shape {jnp.shape(valid)}"
    )
  if config.grouping == "random" and key is None:
    raise ValueError("solve_follower: dro.grouping='random' draws its groups: pass key=")
  c_m, c_v = _concrete(margins), (np.ones(n, bool) if valid is None else _concrete(valid))
  if c_m is not None and c_v is not None:
    c_v = c_v.astype(bool)
    bad = ~np.isfinite(np.asarray(c_m, np.float64)) & c_v
    if bad.any() or not c_v.any():
      raise ValueError(
        f"solve_follower: margins must be finite on at least one valid row; got "
        f"{int(c_v.sum())} valid rows, {int(bad.sum())} non-finite, first at "
        f"index {int(np.argmax(bad)) if bad.any() else None}"
      )
  valid = jnp.ones(n, bool) if valid is None else jnp.asarray(valid).astype(bool)
  # The follower is a small O(N log N) computation with gathers by sorted index, so on an
  # Explicit mesh it runs replicated (no-op on Auto meshes and off a mesh).
  valid = unsharded_along(valid)
  xi = unsharded_along(margins_to_xi(margins, config))
  xi = jnp.where(valid, xi, jnp.zeros((), xi.dtype))
  if config.space == "probability":
    slopes, intercepts = tangent_pieces(config.num_pieces)
    support = (0.0, 1.0)
  else:
    lo, hi = _masked_window(xi, valid, config)
    slopes, intercepts = _margin_pieces(lo, hi, config.num_pieces)
    # The support is the window widened to hold every valid point (paper: [a_t, b_t]).
    support = (
      jnp.minimum(lo, jnp.min(jnp.where(valid, xi, jnp.inf))),
      jnp.maximum(hi, jnp.max(jnp.where(valid, xi, -jnp.inf))),
    )
  group_ids, num_groups = group_ids_on_device(xi, valid, config, key=key)
  group_size = n if config.grouping == "none" else config.group_size
  return worst_case(
    xi,
    epsilon=config.epsilon,
    slopes=slopes,
    intercepts=intercepts,
    support=support,
    group_ids=group_ids,
    num_groups=num_groups,
    valid=valid,
    max_group_size=group_size,
    method=config.method,
    per_atom_cap=config.per_atom_cap,
  )


def follower_atoms(
  margins,
  config: DroConfig,
  *,
  valid=None,
  key: jax.Array | None = None,
  num_atoms: Optional[int] = None,
  dtype=jnp.float32,
) -> LossAtoms:
  """The follower for research loops: margins → the leader's `LossAtoms`, jittable.

  ``to_loss_atoms(solve_follower(margins, config, valid=valid, key=key), config=config)``;
  see `solve_follower` for what runs under jit (all of it, for fixed shapes) and what is checked
  only eagerly. ``num_atoms`` keeps the heaviest atoms of each row (`to_loss_atoms`). The
  atoms carry ``config.space`` and ``config.margin_scale``, which `losses.robust_dpo_loss`
  checks against its own ``space`` and ``beta``. Invalid rows come back as one atom of weight 1
  and shift 0 (mask them in the loss with ``valid``).

  Example (a fixed batch of 64 slots, any number of them real)::

    @jax.jit
    def atoms_for(margins, valid, key):
      return follower_atoms(margins, DroConfig(epsilon=0.01, margin_scale=0.1),
                            valid=valid, key=key)
  """
  worst = solve_follower(margins, config, valid=valid, key=key)
  return to_loss_atoms(worst, config=config, num_atoms=num_atoms, dtype=dtype)
