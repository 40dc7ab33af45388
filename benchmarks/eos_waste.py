"""Benchmark: the share of decode work spent on rows that already ended, and refill's gain.

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

``--measure`` also times the sampler itself, with and without refill (`generate` with
``rows``: ended rows take the next prompt's sample), on a random model
(``--layers``/``--hidden``, vocabulary 32,000) whose near-uniform next-token distribution
makes a response end at each step with probability ``E / V`` for ``E`` EOS tokens, chosen so
that the median length is ``--median``: geometric lengths capped at 300, UltraFeedback-like in
median and waste. Without refill the prompts go through `generate` ``--prompts-per-call``
at a time (``2x`` rows, two samples each), as `Sampler` batches them; with refill, all prompts
in one call with that many rows in flight. It checks that both give the same tokens and
prints the row-steps, the wall and process CPU time (fastest of ``--repeats`` interleaved
calls, compile excluded) and the gains.

  nice -n 10 python benchmarks/eos_waste.py --measure
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


def measure(args) -> None:
  """Times `generate` with and without refill on a random model (see the module docstring)."""
  import os
  import time

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from ssapo_jax import sampling
  from ssapo_jax.models import Llama, LlamaConfig, split_params

  vocab, max_new, samples = 32000, 300, 2
  config = LlamaConfig(
    vocab_size=vocab,
    hidden_size=args.hidden,
    intermediate_size=int(args.hidden * 2.75),
    num_layers=args.layers,
    num_heads=args.hidden // 64,
    num_kv_heads=max(1, args.hidden // 128),
    head_dim=64,
  )
  model = Llama(config, rngs=nnx.Rngs(0))
  p_end = 1.0 - 0.5 ** (1.0 / args.median)  # geometric lengths with this median
  eos = tuple(range(3, 3 + max(1, round(p_end * vocab))))
  rng = np.random.RandomState(0)
  ids = rng.randint(3 + len(eos), vocab, (args.prompts, args.prompt_len)).astype(np.int32)
  mask = np.ones_like(ids)
  index = np.arange(args.prompts, dtype=np.int32)
  per_call = args.prompts_per_call
  graphdef, params, rest = split_params(model)
  key = jax.random.key(0)

  def run(prompts, rows):
    settings = sampling._settings(
      config,
      max_new_tokens=max_new,
      temperature=1.0,
      top_p=1.0,
      top_k=0,
      num_samples=samples,
      eos_token_ids=eos,
      pad_token_id=0,
      rows=rows,
    )
    gen, steps = sampling._generate(
      graphdef,
      params,
      rest,
      jnp.asarray(ids[prompts]),
      jnp.asarray(mask[prompts]),
      jnp.asarray(index[prompts]),
      key,
      settings=settings,
    )
    return np.asarray(gen.tokens), np.asarray(gen.mask), int(steps)

  def batched():
    out, steps = [], 0
    for start in range(0, args.prompts, per_call):
      tokens, m, n = run(np.arange(start, start + per_call), 0)
      out.append((tokens, m))
      steps += n
    return np.concatenate([t for t, _ in out]), np.concatenate([m for _, m in out]), steps

  def refill():
    return run(np.arange(args.prompts), samples * per_call)

  rows = samples * per_call
  results = {}
  times = {"batched": [], "refill": []}
  for fn in (batched, refill):
    fn()  # compile
  for _ in range(args.repeats):  # interleaved, so both see the same load
    for name, fn in (("batched", batched), ("refill", refill)):
      start, cpu = time.perf_counter(), time.process_time()
      results[name] = fn()
      times[name].append((time.perf_counter() - start, time.process_time() - cpu))
  best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in times.items()}
  (t_b, m_b, steps_b), (t_r, m_r, steps_r) = results["batched"], results["refill"]
  (sec_b, cpu_b), (sec_r, cpu_r) = best["batched"], best["refill"]
  lengths = m_b.sum(axis=1)
  print(
    f"# measured: random model layers={args.layers} hidden={args.hidden} vocab={vocab}, "
    f"{len(eos)} EOS tokens (median length {args.median:.0f}), {args.prompts} prompts x "
    f"{samples} samples of {args.prompt_len} tokens, {rows} rows per call, max_new_tokens "
    f"{max_new}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
    f"load1 {os.getloadavg()[0]:.1f}"
  )
  print(
    f"lengths: mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, "
    f"{(lengths >= max_new).mean():.0%} hit the cap; same tokens with and without refill: "
    f"{bool((t_b == t_r).all() and (m_b == m_r).all())}"
  )
  waste_b = 1 - lengths.sum() / (steps_b * rows)
  waste_r = 1 - lengths.sum() / (steps_r * rows)
  print(
    f"batched: {steps_b} steps x {rows} rows, {waste_b:.1%} of row-steps on ended rows, "
    f"{sec_b:.1f} s ({cpu_b:.1f} CPU-s)\nrefill:  {steps_r} steps x {rows} rows, "
    f"{waste_r:.1%} on ended or idle rows, {sec_r:.1f} s ({cpu_r:.1f} CPU-s)\n"
    f"refill gain: row-steps x{steps_b / steps_r:.2f}, wall time x{sec_b / sec_r:.2f}, "
    f"CPU time x{cpu_b / cpu_r:.2f}"
  )


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
  p.add_argument("--measure", action="store_true", help="also time the sampler (see above)")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--prompts", type=int, default=64)
  p.add_argument("--prompts-per-call", type=int, default=16)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--repeats", type=int, default=2)
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
  if args.measure:
    measure(args)


if __name__ == "__main__":
  main()
