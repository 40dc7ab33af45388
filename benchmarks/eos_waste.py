"""Benchmark (no model): the share of decode work spent on rows that already ended.

`ssapo_jax.sampling.generate` decodes every row of a batch until all rows have emitted EOS (or
``max_new_tokens``): a row that ended early still occupies its slot each step. For a batch of
``R`` rows with response lengths ``n_r`` (EOS included), the loop runs ``max n_r`` steps and
the wasted fraction of row-steps is ``1 - sum(n_r) / (R * max n_r)``.

Two length distributions, batched as their configs batch them (``batch_size * num_samples``
rows per call, in prompt order: response lengths are not known when batches are formed):

* the tiny world (`ssapo_jax.demo`): answers of 4-7 digits plus EOS (a well-trained policy's
  lengths; ``max_new_tokens`` 12, 512 prompts x 1 sample per call);
* UltraFeedback-like: log-normal response lengths (median ``--median`` tokens, ``--sigma``),
  capped at ``max_new_tokens`` 300 (configs/zephyr_7b_ultrafeedback.yaml: 64 prompts x 2).

For each it also simulates refilling (ended rows take the next prompts' rows every ``K``
steps, continuous batching) and compaction: every ``K`` steps the live rows are gathered into a
batch of the next power of two (at least ``--min-rows``, one compiled program per size), and
reports the row-steps and the modelled time saved. The time model is a decode step of
``a + b * rows`` seconds, fitted to two measured step times (``--step-ms``, e.g. from
``benchmarks/model.py --decode --step-batches 8,64``; default flat: memory-bound accelerator
decoding, where a step costs the same whatever its rows), plus a gather of the live rows'
caches per compaction (``--gather-ms``).

  python benchmarks/eos_waste.py
"""

from __future__ import annotations

import argparse

import numpy as np


def waste(lengths: np.ndarray, rows: int, max_new: int) -> tuple[float, int]:
  """(wasted fraction of row-steps, row-steps run) for batches of ``rows`` consecutive rows
  (the last batch padded with rows of length 0: filler rows are waste too)."""
  n = np.minimum(lengths, max_new)
  pad = -n.size % rows
  n = np.concatenate([n, np.zeros(pad, n.dtype)]).reshape(-1, rows)
  slots = int((n.max(axis=1) * rows).sum())
  return 1.0 - n.sum() / slots, slots


def _next_pow2(x: int, floor: int) -> int:
  return max(floor, 1 << int(np.ceil(np.log2(max(x, 1)))))


def compacted(lengths: np.ndarray, rows: int, max_new: int, every: int, min_rows: int):
  """Row-steps, steps at each batch size and compactions when live rows are compacted into
  the next power of two every ``every`` steps."""
  n = np.minimum(lengths, max_new)
  pad = -n.size % rows
  n = np.concatenate([n, np.zeros(pad, n.dtype)]).reshape(-1, rows)
  slots, steps_at, compactions = 0, {}, 0
  for batch in n:
    width, step = rows, 0
    while step < batch.max():
      run = min(every, batch.max() - step)
      slots += width * run
      steps_at[width] = steps_at.get(width, 0) + run
      step += run
      live = int((batch > step).sum())
      new_width = min(width, _next_pow2(live, min_rows))
      if live and new_width < width:
        width, compactions = new_width, compactions + 1
  return slots, steps_at, compactions


def refilled(lengths: np.ndarray, rows: int, max_new: int, every: int) -> int:
  """Steps of a batch of ``rows`` slots whose ended rows take the next responses every
  ``every`` steps (continuous batching at chunk boundaries), until all responses are done."""
  n = list(np.minimum(lengths, max_new)[::-1])
  left = np.array([n.pop() if n else 0 for _ in range(rows)])
  steps = 0
  while left.max() > 0:
    run = every if n else int(left.max())  # the tail: run to the end
    left = np.maximum(left - run, 0)
    steps += run
    for i in np.flatnonzero(left == 0):
      if n:
        left[i] = n.pop()
  return steps


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--median", type=float, default=180.0)
  p.add_argument("--sigma", type=float, default=0.6)
  p.add_argument(
    "--every",
    type=int,
    default=32,
    help="UltraFeedback-like: steps between compactions/refills (tiny world: 4)",
  )
  p.add_argument("--min-rows", type=int, default=8)
  p.add_argument(
    "--step-ms",
    default=None,
    help="measured decode step times 'rows:ms,rows:ms' for a time model "
    "a + b * rows (default: a step's time does not depend on its rows, as "
    "in memory-bound accelerator decoding)",
  )
  p.add_argument(
    "--gather-ms",
    type=float,
    default=0.0,
    help="modelled cost of one compaction (gather of the live rows' caches)",
  )
  args = p.parse_args()
  if args.step_ms:
    (r1, t1), (r2, t2) = [tuple(float(v) for v in x.split(":")) for x in args.step_ms.split(",")]
    b = (t2 - t1) / (r2 - r1)
    a = t1 - b * r1
  else:
    a, b = 1.0, 0.0
  step_ms = lambda r: a + b * r

  rng = np.random.default_rng(0)
  from ssapo_jax.demo import task  # pylint: disable=import-outside-toplevel

  tiny = np.array([len(task.sample_problem(rng).answer) + 1 for _ in range(4500)])
  uf = np.maximum(1, np.round(rng.lognormal(np.log(args.median), args.sigma, 58_000))).astype(int)
  # (name, lengths, rows per call, max_new_tokens, steps between compactions/refills)
  cases = [("tiny world", tiny, 512, 12, 4), ("UltraFeedback-like", uf, 128, 300, args.every)]
  print(
    f"# step model: {a:.1f} + {b:.2f} * rows ms ({args.step_ms or 'flat in rows'}); "
    f"compaction to powers of two >= {args.min_rows} rows"
  )
  for name, lengths, rows, max_new, every in cases:
    frac, slots = waste(lengths, rows, max_new)
    capped = float((lengths >= max_new).mean())
    c_slots, steps_at, compactions = compacted(lengths, rows, max_new, every, args.min_rows)
    base_ms = slots / rows * step_ms(rows)
    comp_ms = sum(s * step_ms(w) for w, s in steps_at.items()) + compactions * args.gather_ms
    r_steps = refilled(lengths, rows, max_new, every)
    refill_ms = r_steps * step_ms(rows)
    print(
      f"{name}: {lengths.size} responses, {rows} rows per call, max_new_tokens {max_new}, "
      f"mean length {np.minimum(lengths, max_new).mean():.0f}, {capped:.0%} hit the cap: "
      f"{frac:.1%} of decode row-steps on ended rows"
    )
    print(
      f"  compacted every {every} steps: row-steps -{1 - c_slots / slots:.0%}, "
      f"modelled decode time x{base_ms / comp_ms:.2f} faster"
    )
    print(
      f"  refilled every {every} steps: row-steps -{1 - r_steps * rows / slots:.0%}, "
      f"modelled decode time x{base_ms / refill_ms:.2f} faster"
    )


if __name__ == "__main__":
  main()
