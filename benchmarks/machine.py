"""The load check the benchmarks that compare against PyTorch share.

A ratio against PyTorch measured beside other jobs says little: on the 2-core VM, with 7-10
other jobs running, transformers' `generate` took 303 s where it takes 6.3 s on the idle
machine, while XLA's time grew 3x, so the ratio read 17x instead of 1.6x. The scripts call
`contention_warning` before they start their own work and print what it returns.
"""

from __future__ import annotations

import os

# A 1-minute load average above this, before the benchmark's own work starts, means other jobs
# share the CPU.
BUSY_LOAD = 1.0


def load_average() -> float:
  """The 1-minute load average (nan where the OS has none)."""
  return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def contention_warning(load: float | None = None) -> str | None:
  """A warning line when other jobs run (``load`` default: now), else None."""
  load = load_average() if load is None else load
  if not load > BUSY_LOAD:
    return None
  return (
    f"WARNING: load average {load:.1f} before this run (cpus={os.cpu_count()}): other jobs "
    "share the CPU, and PyTorch's threads lose far more to them than XLA's do, so the ratios "
    "below overstate ours; rerun on an idle machine before quoting them."
  )
