"""Tokens/s of the SSAPO train step with LoRA adapters against full fine-tuning, same process.

Both build the state with `train.create_train_state` (LoRA: ``train.lora``) for the same random
Llama on one CPU device and time the jitted `make_train_step` on the same batch (float32, the
reference log-probs in the batch). Prints tokens/s (``2 * pairs * seq_len`` per step) of each,
their ratio, and the trained and optimizer-state parameter counts.

    python benchmarks/lora.py                      # ~5M-parameter Llama, 8 pairs x 128 tokens
    python benchmarks/lora.py --rank 16 --steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--intermediate", type=int, default=688)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--vocab", type=int, default=2048)
  p.add_argument("--pairs", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--steps", type=int, default=5)
  args = p.parse_args(argv)

  import jax
  import numpy as np
  from flax import nnx

  from ssapo_jax import sharding as shd
  from ssapo_jax import train as tr
  from ssapo_jax.batch import make_preference_batch
  from ssapo_jax.lora import LoraConfig
  from ssapo_jax.models import Llama, LlamaConfig

  config = LlamaConfig(
    vocab_size=args.vocab,
    hidden_size=args.hidden,
    intermediate_size=args.intermediate,
    num_layers=args.layers,
    num_heads=args.hidden // 64,
    num_kv_heads=args.hidden // 128,
    head_dim=64,
    max_position_embeddings=args.seq_len,
  )
  mesh = shd.make_mesh(shd.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  n, t = args.pairs, args.seq_len

  def side():
    ids = rng.integers(1, args.vocab, (n, t))
    mask = np.ones((n, t), np.int32)
    return ids, mask, mask * (np.arange(t)[None] >= t // 2)

  batch = make_preference_batch(
    *side(),
    *side(),
    weights=np.ones(n),
    ref_chosen_logps=rng.normal(-400.0, 3.0, n),
    ref_rejected_logps=rng.normal(-400.0, 3.0, n),
  )
  results = {}
  for name, lora in (("full", None), ("lora", LoraConfig(rank=args.rank, alpha=2.0 * args.rank))):
    cfg = tr.TrainConfig(
      learning_rate=1e-4, global_batch_size=n, compute_dtype="float32", remat="none", lora=lora
    )
    model = Llama(config, rngs=nnx.Rngs(0))
    state = tr.create_train_state(model, cfg, mesh, num_train_steps=args.steps + 1)
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    step = tr.make_train_step(cfg, mesh, state)
    global_batch = shd.global_batch(mesh, batch)
    state, m = step(state, global_batch)  # compile
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      state, m = step(state, global_batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - start)
    results[name] = 2 * n * t / statistics.median(times)
    print(
      f"{name:5s}: {results[name]:9.0f} tokens/s  trained params {trained:,}  "
      f"optimizer-moment entries {moments:,}  (median of {args.steps} steps)"
    )
  print(f"lora/full tokens/s: {results['lora'] / results['full']:.2f}")


if __name__ == "__main__":
  main()
