"""Benchmark: our Flax model vs transformers' PyTorch model on the same weights (one process).

Measures forward+backward tokens/s (sum of token log-probs, as the DPO loss needs) and sampling
tokens/s (`ssapo_jax.sampling.generate` vs ``transformers`` ``generate``, same prompts, same
number of new tokens, no early stop), and prints the ratios. Compile time is reported
separately and excluded from throughput.

  python benchmarks/model.py            # 4 layers, hidden 256, vocab 32K, seq 256, batch 8
  python benchmarks/model.py --quick    # tiny smoke run
  python benchmarks/model.py --compile-depths 2,8,32   # compile time of forward+backward only

``--compile-depths`` lowers and compiles the forward+backward (summed sequence log-probs,
``remat="full"`` as in training) of a random model at each depth from abstract parameters,
with the width flags (default hidden 256), and prints wall and process CPU seconds per depth
(CPU seconds are the stable figure on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ssapo_jax.models import load_hf
from ssapo_jax.models.testing import save_tiny_hf
from ssapo_jax.sampling import generate


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
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=int(args.hidden * 2.75), num_layers=layers,
                         num_heads=max(1, args.hidden // 64),
                         num_kv_heads=max(1, args.hidden // 128), head_dim=64, remat="full")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))

    def loss(state, ids):
      model = nnx.merge(graphdef, state)
      mask = jnp.ones_like(ids)
      return -jnp.sum(model.sequence_logps(ids, mask, mask))

    t0, c0 = time.perf_counter(), time.process_time()
    jax.jit(jax.value_and_grad(loss)).lower(state, ids).compile()
    out[layers] = time.perf_counter() - t0
    print(f"compile forward+backward: layers={layers} wall {out[layers]:.1f}s "
          f"cpu {time.process_time() - c0:.1f}s", flush=True)
  return out


def main():
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
  parser.add_argument("--compile-depths", default="",
                      help="comma-separated layer counts: only measure compile time")
  args = parser.parse_args()
  if args.compile_depths:
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} cpus={os.cpu_count()} "
          f"jax={jax.__version__} backend={jax.default_backend()} hidden={args.hidden} "
          f"vocab={args.vocab} seq={args.seq} batch={args.batch}")
    compile_seconds([int(d) for d in args.compile_depths.split(",")], args)
    return
  if args.quick:
    args.layers, args.hidden, args.vocab, args.seq, args.batch = 2, 64, 512, 32, 2
    args.prompt, args.new_tokens, args.repeats = 8, 8, 1

  path = tempfile.mkdtemp()
  hf = save_tiny_hf(path, "llama", vocab_size=args.vocab, hidden_size=args.hidden,
                    intermediate_size=int(args.hidden * 2.75), num_hidden_layers=args.layers,
                    num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128),
                    max_position_embeddings=max(args.seq, args.prompt + args.new_tokens))
  model = load_hf(path)
  print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or platform.machine()}"
        f" cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} jax={jax.__version__}"
        f" backend={jax.default_backend()}")
  print(f"# layers={args.layers} hidden={args.hidden} vocab={args.vocab} seq={args.seq} "
        f"batch={args.batch} prompt={args.prompt} new_tokens={args.new_tokens}")

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
  print(f"forward+backward tokens/s: jax {tokens / jax_fb:,.0f}  torch {tokens / torch_fb:,.0f}"
        f"  ratio jax/torch {torch_fb / jax_fb:.2f}  (jax compile {jax_compile:.1f}s)")

  # ---- sampling
  prompts = rng.randint(3, args.vocab, (args.batch, args.prompt))
  p_mask = np.ones_like(prompts)
  p_mask[0, : args.prompt // 2] = 0  # left padding in one row
  key = jax.random.key(0)

  def jax_gen():
    g = generate(model, jnp.asarray(prompts, jnp.int32), jnp.asarray(p_mask, jnp.int32), key,
                 max_new_tokens=args.new_tokens, temperature=1.0, eos_token_ids=())
    jax.block_until_ready(g.tokens)

  t0 = time.perf_counter()
  jax_gen()
  gen_compile = time.perf_counter() - t0
  jax_gen_t = _timeit(jax_gen, args.repeats)

  def torch_gen():
    with torch.no_grad():
      out = hf.generate(torch.tensor(prompts), attention_mask=torch.tensor(p_mask),
                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    assert out.shape[1] == args.prompt + args.new_tokens

  torch_gen_t = _timeit(torch_gen, args.repeats)
  new = args.batch * args.new_tokens
  print(f"sampling tokens/s: jax {new / jax_gen_t:,.0f}  torch {new / torch_gen_t:,.0f}"
        f"  ratio jax/torch {torch_gen_t / jax_gen_t:.2f}  (jax compile {gen_compile:.1f}s)")


if __name__ == "__main__":
  main()
