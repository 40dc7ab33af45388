"""Benchmark of the exact follower (`ssapo_jax.dro.worst_case`) against scipy HiGHS.

Probability space, K = 6 tangents of −log p, ε = 0.01, a synthetic pool
xi = clip(σ(0.1·N(8, 10)), 0.5, 0.999). For each N: one exact group and random groups of G = 100.
`worst_case` is timed after compilation (median of 5 runs); HiGHS solves the same LP (all groups
in one LP; q = q⁺ − q⁻) with a 60 s limit.

A second table times the per-atom-cap / BoxOSQP paths (raw ADMM and polished) at G = 100.

    python benchmarks/dro.py [--sizes 1000 10000 60000 1000000] [--highs-max 100000]
                             [--osqp-sizes 1000 10000]
"""

import argparse
import datetime
import platform
import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from scipy.optimize import linprog  # noqa: E402

from ssapo_jax import dro  # noqa: E402


def highs(xi, slopes, intercepts, eps, group_ids, time_limit, per_atom_cap=False):
  n, k = xi.size, slopes.size
  nk = n * k
  c = (
    np.concatenate(
      [-(xi[:, None] * slopes + intercepts).ravel(), np.tile(slopes, n), -np.tile(slopes, n)]
    )
    / n
  )
  eye = sp.identity(nk, format="csr")
  zeros = sp.csr_matrix((n, nk))
  a_eq = sp.hstack([sp.kron(sp.identity(n, format="csr"), np.ones((1, k))), zeros, zeros])
  d_lo, d_hi = sp.diags(np.repeat(xi, k)), sp.diags(np.repeat(1 - xi, k))
  groups, gidx = np.unique(group_ids, return_inverse=True)
  member = sp.csr_matrix(
    (np.ones(nk), (np.repeat(gidx, k), np.arange(nk))), shape=(groups.size, nk)
  )
  a_ub = sp.vstack(
    [
      sp.hstack([-d_lo, eye, -eye]),
      sp.hstack([-d_hi, -eye, eye]),
      sp.hstack([sp.csr_matrix((groups.size, nk)), member, member]),
    ],
    format="csr",
  )
  b_ub = np.concatenate([np.zeros(2 * nk), np.bincount(gidx) * eps])
  start = time.perf_counter()
  cap = eps if per_atom_cap else None
  res = linprog(
    c,
    A_ub=a_ub,
    b_ub=b_ub,
    A_eq=a_eq,
    b_eq=np.ones(n),
    bounds=[(0, None)] * nk + [(0, cap)] * (2 * nk),
    method="highs",
    options={"time_limit": time_limit},
  )
  elapsed = time.perf_counter() - start
  return (-res.fun if res.status == 0 else None), elapsed


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 60000, 1000000])
  parser.add_argument(
    "--highs-max",
    type=int,
    default=100000,
    help="skip HiGHS above this N (it does not finish within a minute)",
  )
  parser.add_argument("--time-limit", type=float, default=60.0)
  parser.add_argument(
    "--osqp-sizes",
    type=int,
    nargs="*",
    default=[1000, 10000],
    help="N for the per-atom-cap / BoxOSQP table (G = 100)",
  )
  args = parser.parse_args()
  slopes, intercepts = (np.asarray(v) for v in dro.tangent_pieces(6))
  rng = np.random.default_rng(0)
  print(
    f"# {datetime.date.today()} {platform.processor() or platform.machine()}, "
    f"{jax.device_count()} {jax.devices()[0].platform} device(s), jax {jax.__version__}, "
    f"float64"
  )
  print("| N | groups | worst_case (s) | HiGHS (s) | ratio | objective diff |")
  print("|---|---|---|---|---|---|")
  for n in args.sizes:
    xi = np.clip(1 / (1 + np.exp(-0.1 * rng.normal(8, 10, n))), 0.5, 0.999)
    for label, gids in (("1", None), ("G=100", np.asarray(dro.chunk_groups(n, 100)))):
      run = lambda: dro.worst_case(
        xi, epsilon=0.01, slopes=slopes, intercepts=intercepts, support=(0.0, 1.0), group_ids=gids
      )
      jax.block_until_ready(run())  # compile
      times = []
      for _ in range(5):
        start = time.perf_counter()
        worst = jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
      ours = float(np.median(times))
      if n <= args.highs_max:
        ref, t_ref = highs(
          xi, slopes, intercepts, 0.01, np.zeros(n, int) if gids is None else gids, args.time_limit
        )
      else:
        ref, t_ref = None, None
      if ref is None:
        cells = (
          "> 60 (not run)" if t_ref is None else f"> {args.time_limit:.0f} (limit)",
          "–",
          "–",
        )
      else:
        cells = (f"{t_ref:.3g}", f"{t_ref / ours:.0f}×", f"{float(worst.objective) - ref:.1e}")
      print(f"| {n:,} | {label} | {ours:.3g} | {cells[0]} | {cells[1]} | {cells[2]} |", flush=True)
  print()
  print("| N | groups | per_atom_cap | method | time (s) | objective − HiGHS (rel.) |")
  print("|---|---|---|---|---|---|")
  for n in args.osqp_sizes:
    xi = np.clip(1 / (1 + np.exp(-0.1 * rng.normal(8, 10, n))), 0.5, 0.999)
    gids = np.asarray(dro.chunk_groups(n, 100))
    for cap in (True, False):
      ref, _ = highs(xi, slopes, intercepts, 0.01, gids, args.time_limit, per_atom_cap=cap)
      for label, kw in (
        ("exact", {}),
        ("osqp raw", dict(method="osqp", osqp_polish=False)),
        ("osqp+polish", dict(method="osqp")),
      ):
        run = lambda: dro.worst_case(
          xi,
          epsilon=0.01,
          slopes=slopes,
          intercepts=intercepts,
          support=(0.0, 1.0),
          group_ids=gids,
          per_atom_cap=cap,
          **kw,
        )
        jax.block_until_ready(run())  # compile
        start = time.perf_counter()
        worst = jax.block_until_ready(run())
        elapsed = time.perf_counter() - start
        diff = "–" if ref is None else f"{(float(worst.objective) - ref) / ref:.1e}"
        print(f"| {n:,} | G=100 | {cap} | {label} | {elapsed:.3g} | {diff} |", flush=True)


if __name__ == "__main__":
  main()
