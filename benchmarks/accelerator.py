"""One-shot accelerator check on one GPU or TPU (at most ~8 minutes): prints a table, writes JSON.

It measures, on the first device:

1. attention: the fused kernel that ``attention: auto`` picks on this backend (splash on TPU,
   cuDNN on GPU) against the ``xla`` einsum path, bf16, causal: the largest differences of the
   values and of the q/k/v gradients (relative to the largest xla entry), and fwd+bwd times;
2. train step: tokens/s and MFU of the DPO train step on a Llama-3.2-1B-shaped random model,
   bf16 compute, float32 master weights, 2,048 tokens per sequence;
3. sampler: new tokens/s of `ssapo_jax.sampling.generate` at batch 64, 300 new tokens
   (no EOS, so every step runs);
4. capacity: the largest Llama-shaped model (1B, 3B, 8B shapes) whose full fine-tuning train
   step (float32 master weights and Adam moments, one pair of 2,048 tokens, full remat) fits the
   device, from XLA's memory analysis of the compiled step.

MFU uses the chip's published dense bf16 peak from `ssapo_jax.plan.CHIPS` and the model flops
of `ssapo_jax.plan` (``6 * params * tokens`` plus attention). On CPU (``--small``) the sizes
shrink so the whole script runs in about a minute, and the peak is a measured matmul rate.
Imports only jax, flax, optax, numpy and ssapo_jax.

    python benchmarks/accelerator.py --json accelerator.json
    python benchmarks/accelerator.py --small
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ssapo_jax import (
  plan,  # noqa: E402
  sampling,  # noqa: E402
)
from ssapo_jax import sharding as shd  # noqa: E402
from ssapo_jax import train as tr  # noqa: E402
from ssapo_jax.batch import make_preference_batch  # noqa: E402
from ssapo_jax.models import Llama, LlamaConfig  # noqa: E402
from ssapo_jax.models.llama import REMAT_POLICIES  # noqa: E402
from ssapo_jax.models.presets import preset  # noqa: E402

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Problem sizes of one run (full on an accelerator, small on CPU)."""

  attn_batch: int
  attn_len: int
  attn_heads: int
  attn_kv_heads: int
  attn_head_dim: int
  train_model: LlamaConfig
  train_pairs: int
  train_len: int
  sample_batch: int
  sample_prompt: int
  sample_new: int
  ladder: tuple[tuple[str, LlamaConfig], ...]  # increasing sizes for the capacity check
  capacity_len: int
  timed_steps: int


def _tiny(layers: int, hidden: int) -> LlamaConfig:
  return LlamaConfig(
    vocab_size=512,
    hidden_size=hidden,
    intermediate_size=2 * hidden,
    num_layers=layers,
    num_heads=4,
    num_kv_heads=2,
    head_dim=hidden // 4,
    eos_token_ids=(2,),
    pad_token_id=0,
  )


def sizes(small: bool) -> Sizes:
  if small:
    return Sizes(
      attn_batch=2,
      attn_len=128,
      attn_heads=4,
      attn_kv_heads=2,
      attn_head_dim=32,
      train_model=_tiny(2, 64),
      train_pairs=2,
      train_len=64,
      sample_batch=4,
      sample_prompt=16,
      sample_new=8,
      ladder=(("tiny-64", _tiny(2, 64)), ("tiny-128", _tiny(2, 128))),
      capacity_len=64,
      timed_steps=2,
    )
  return Sizes(
    attn_batch=4,
    attn_len=2048,
    attn_heads=32,
    attn_kv_heads=8,
    attn_head_dim=128,
    train_model=preset("llama3.2-1b"),
    train_pairs=4,
    train_len=2048,
    sample_batch=64,
    sample_prompt=128,
    sample_new=300,
    ladder=tuple((n, preset(n)) for n in ("llama3.2-1b", "llama3.2-3b", "llama3-8b")),
    capacity_len=2048,
    timed_steps=5,
  )


# ------------------------------------------------------------------------------ helpers


def chip_of(device) -> plan.Chip | None:
  """The `plan.CHIPS` entry of a device, from its kind (None on CPU or an unknown device)."""
  kind = device.device_kind.lower()
  for needle, key in (
    ("h200", "h200"),
    ("h100", "h100"),
    ("a100", "a100"),
    ("v5 lite", "v5e"),
    ("v5e", "v5e"),
    ("v6", "v6e"),
    ("v5", "v5p"),
    ("v4", "v4"),
  ):
    if needle in kind:
      return plan.CHIPS[key]
  return None


def measured_peak(dtype=jnp.bfloat16, n: int = 1024) -> float:
  """Dense matmul FLOP/s measured on the default device (stands in for a datasheet peak)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  reps = 10
  start = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return reps * 2 * n**3 / (time.perf_counter() - start)


def timed(fn, *args, reps: int) -> float:
  """Median seconds of ``fn(*args)`` (already compiled) over ``reps`` runs."""
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def one_device_mesh():
  return shd.make_mesh(shd.MeshConfig(), jax.devices()[:1])


def device_capacity(small: bool) -> int:
  """Bytes of memory on the device (XLA's limit); on CPU a nominal 8 MiB for ``--small``, so
  the tiny ladder has one model that fits and one that does not."""
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return 8 * 1024**2 if small else 16 * GiB


# ------------------------------------------------------------------------------ sections


def bench_attention(sz: Sizes, small: bool) -> dict:
  """Fused attention (the backend's ``auto`` choice) against ``xla``: values, grads, times."""
  from ssapo_jax.models import attention as attn  # pylint: disable=import-outside-toplevel

  fused = attn.resolve_implementation("auto", jnp.bfloat16)
  if fused == "xla":
    if not small:
      return {"skipped": f"no fused attention on {jax.default_backend()}"}
    fused = "splash"  # CPU: the TPU kernel in Pallas interpret mode, for coverage only
  b, t, n, k, h = sz.attn_batch, sz.attn_len, sz.attn_heads, sz.attn_kv_heads, sz.attn_head_dim
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
  kk = jax.random.normal(keys[1], (b, t, k, h), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, t, k, h), jnp.bfloat16)
  cot = jax.random.normal(keys[3], (b, t, n, h), jnp.bfloat16)
  slots = jnp.arange(t)
  mask = jnp.ones((b, t), jnp.int32)

  def make(impl):
    def f(q, k, v):
      return attn.attention(
        q, k, v, q_slots=slots, k_slots=slots, kv_mask=mask, window=None, implementation=impl
      )

    def fwd_bwd(q, k, v):
      out, vjp = jax.vjp(f, q, k, v)
      return (out,) + vjp(cot)

    return jax.jit(fwd_bwd)

  mesh = one_device_mesh()
  results = {}
  with jax.set_mesh(mesh):
    for impl in ("xla", fused):
      fn = make(impl)
      outs = jax.block_until_ready(fn(q, kk, v))
      results[impl] = (outs, timed(fn, q, kk, v, reps=sz.timed_steps))
  ref, got = results["xla"][0], results[fused][0]
  errors = {}
  for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
    a32, r32 = np.asarray(a, np.float32), np.asarray(r, np.float32)
    errors[name] = float(np.max(np.abs(a32 - r32)) / max(np.max(np.abs(r32)), 1e-30))
  return {
    "implementation": fused,
    "shape": [b, t, n, k, h],
    "max_rel_error": errors,
    "xla_ms": 1e3 * results["xla"][1],
    "fused_ms": 1e3 * results[fused][1],
  }


def _train_config(pairs: int, remat: str) -> tr.TrainConfig:
  return tr.TrainConfig(
    global_batch_size=pairs,
    micro_batches=1,
    compute_dtype="bfloat16",
    param_dtype="float32",
    remat=remat,
  )


def _random_batch(pairs: int, length: int, vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = lambda: rng.integers(3, vocab, (pairs, length), dtype=np.int32)  # noqa: E731
  mask = np.ones((pairs, length), np.int32)
  loss_mask = mask.copy()
  loss_mask[:, : length // 2] = 0  # the first half is the prompt
  return make_preference_batch(ids(), mask, loss_mask, ids(), mask, loss_mask)


def bench_train(sz: Sizes, peak: float, remat: str) -> dict:
  """Tokens/s and MFU of the jitted train step (random weights, one device)."""
  config = dataclasses.replace(sz.train_model, dtype="bfloat16", param_dtype="float32", remat=remat)
  t = _train_config(sz.train_pairs, remat)
  mesh = one_device_mesh()
  model = Llama(config, rngs=nnx.Rngs(0))
  state = tr.create_train_state(model, t, mesh, num_train_steps=100)
  del model
  step = tr.make_train_step(t, mesh, state)
  batch = _random_batch(sz.train_pairs, sz.train_len, config.vocab_size)
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(sz.timed_steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  tokens = 2 * sz.train_pairs * sz.train_len
  flops = plan.train_step_flops(config, t, sz.train_len)
  return {
    "params": config.matmul_params(),
    "pairs": sz.train_pairs,
    "seq_len": sz.train_len,
    "remat": remat,
    "compile_s": compile_s,
    "step_ms": 1e3 * seconds,
    "tokens_per_s": tokens / seconds,
    "mfu": flops / seconds / peak,
    "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
  }


def bench_sampler(sz: Sizes) -> dict:
  """New tokens/s of `generate` (bf16 compute, from the bf16 copies of float32 master weights
  that `Sampler.decode_layout` decodes from)."""
  config = dataclasses.replace(sz.train_model, dtype="bfloat16", param_dtype="float32")
  graphdef, params, rest = nnx.split(Llama(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
  params = jax.tree.map(lambda x: x.astype(sampling.decode_dtype(x.dtype, config.dtype)), params)
  model = nnx.merge(graphdef, params, rest)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, config.vocab_size, (sz.sample_batch, sz.sample_prompt), np.int32)
  mask = np.ones_like(prompts)
  kwargs = dict(max_new_tokens=sz.sample_new, temperature=1.0, eos_token_ids=(-1,), pad_token_id=0)
  start = time.perf_counter()
  jax.block_until_ready(sampling.generate(model, prompts, mask, jax.random.key(0), **kwargs))
  compile_s = time.perf_counter() - start
  seconds = timed(
    lambda key: sampling.generate(model, prompts, mask, key, **kwargs),
    jax.random.key(1),
    reps=max(sz.timed_steps // 2, 1),
  )
  new_tokens = sz.sample_batch * sz.sample_new
  return {
    "batch": sz.sample_batch,
    "prompt_len": sz.sample_prompt,
    "new_tokens": sz.sample_new,
    "compile_s": compile_s,
    "seconds": seconds,
    "tokens_per_s": new_tokens / seconds,
  }


def bench_capacity(sz: Sizes, capacity: int) -> dict:
  """Compiles (no weights) the full fine-tuning train step of each ladder model, smallest first,
  and reports which fit ``capacity`` bytes."""
  mesh = one_device_mesh()
  rows = []
  largest = None
  for name, arch in sz.ladder:
    config = dataclasses.replace(arch, dtype="bfloat16", param_dtype="float32", remat="full")
    t = _train_config(1, "full")
    start = time.perf_counter()
    lowered, _ = plan.lower_train_step(t, config, mesh, seq_len=sz.capacity_len)
    memory = lowered.compile().memory_analysis()
    total = (
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      - memory.alias_size_in_bytes
      + memory.temp_size_in_bytes
    )
    fits = total <= capacity
    rows.append(
      {
        "model": name,
        "params": config.matmul_params(),
        "hbm_bytes": int(total),
        "fits": fits,
        "compile_s": time.perf_counter() - start,
      }
    )
    if not fits:
      break  # larger ones will not fit either
    largest = name
  return {"capacity_bytes": capacity, "largest": largest, "models": rows}


# ------------------------------------------------------------------------------ main


def run(small: bool, remat: str) -> dict:
  device = jax.devices()[0]
  chip = chip_of(device)
  peak = chip.peak_flops if chip is not None else measured_peak()
  sz = sizes(small)
  report = {
    "date": datetime.date.today().isoformat(),
    "device": device.device_kind,
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "small": small,
    "peak_flops": peak,
    "peak_source": "datasheet" if chip else "measured matmul",
  }
  sections = (
    ("attention", lambda: bench_attention(sz, small)),
    ("train_step", lambda: bench_train(sz, peak, remat)),
    ("sampler", lambda: bench_sampler(sz)),
    ("capacity", lambda: bench_capacity(sz, device_capacity(small))),
  )
  for name, fn in sections:
    start = time.perf_counter()
    try:
      report[name] = fn()
    except Exception as e:  # one failing section must not hide the others' numbers
      report[name] = {
        "error": f"{type(e).__name__}: {e}",
        "traceback": traceback.format_exc(limit=3),
      }
    report[name]["section_s"] = time.perf_counter() - start
  return report


def format_report(r: dict) -> str:
  lines = [
    f"accelerator check {r['date']}: {r['device']} ({r['backend']}, jax {r['jax']}), "
    f"peak {r['peak_flops'] / 1e12:.3g} TFLOP/s ({r['peak_source']})"
  ]

  def row(name, text):
    lines.append(f"  {name:<11} {text}")

  for name in ("attention", "train_step", "sampler", "capacity"):
    s = r[name]
    if "error" in s:
      row(name, "ERROR " + s["error"])
      continue
    if "skipped" in s:
      row(name, "skipped: " + s["skipped"])
      continue
    if name == "attention":
      errs = ", ".join(f"{k} {v:.1e}" for k, v in s["max_rel_error"].items())
      row(
        name,
        f"{s['implementation']} vs xla {s['shape']}: max rel err {errs}; "
        f"fwd+bwd {s['fused_ms']:.2f} ms vs {s['xla_ms']:.2f} ms",
      )
    elif name == "train_step":
      row(
        name,
        f"{s['params'] / 1e9:.2f}B params, {s['pairs']} pairs x {s['seq_len']}, "
        f"remat {s['remat']}: {s['step_ms']:.1f} ms/step, {s['tokens_per_s']:,.0f} "
        f"tokens/s, MFU {100 * s['mfu']:.1f}%",
      )
    elif name == "sampler":
      row(
        name,
        f"batch {s['batch']}, prompt {s['prompt_len']}, {s['new_tokens']} new: "
        f"{s['seconds']:.2f} s, {s['tokens_per_s']:,.0f} new tokens/s",
      )
    else:
      fits = "; ".join(
        f"{m['model']} {m['hbm_bytes'] / GiB:.3g} GiB {'fits' if m['fits'] else 'does not fit'}"
        for m in s["models"]
      )
      row(
        name,
        f"largest full-FT train step that fits {s['capacity_bytes'] / GiB:.3g} GiB: "
        f"{s['largest']} ({fits})",
      )
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--small", action="store_true", help="reduced sizes (CPU, about a minute)")
  p.add_argument(
    "--remat",
    default="none",
    choices=REMAT_POLICIES,
    help="remat policy of the timed train step (default none: the 1B step fits)",
  )
  p.add_argument("--json", default=None, help="write the report here")
  args = p.parse_args(argv)
  report = run(args.small, args.remat)
  print(format_report(report))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  failed = [k for k in ("attention", "train_step", "sampler", "capacity") if "error" in report[k]]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
