"""Benchmark: the sharded sampler (`ssapo_jax.sampling.Sampler`) against the replicated path.

Two parts:

1. Prompt padding of the batch plans (no model): the fraction of prompt positions that are
   padding, batches in input order (the replicated path's batches) vs length-bucketed, for
   the tiny world's prompts (chat-templated with the demo tokenizer, ``configs/tiny_cpu.yaml``
   batching) and for a long-tailed UltraFeedback-like length distribution at the paper's
   scale (58K prompts, log-normal lengths with median 100 tokens, clipped to [8, 1024];
   ``configs/zephyr_7b_ultrafeedback.yaml`` batching).
2. New tokens/s on 8 simulated CPU devices (mesh ``data=1, fsdp=8`` as ``tiny_cpu.yaml``),
   same prompts (long-tailed lengths), same key, compile excluded (each path runs once to
   compile, then is timed): the replicated path (each batch a plain-jit `generate` on the
   FSDP-sharded parameters with host numpy prompts, as the rounds did before the sampler),
   and the sampler unbucketed and bucketed. Prints each path's tokens/s, the overall padding
   fraction (prefill and decode positions) and the ratios to the replicated path, and checks
   that the replicated and unbucketed paths sampled the same tokens.

The 8 devices share the host's cores, so the ratio within one process is the figure to read:
absolute tokens/s move with the machine's load.

    python benchmarks/rollout.py            # hidden 512, 4 layers, vocab 8192, 64 prompts
    python benchmarks/rollout.py --quick    # tiny smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ssapo_jax import sharding as shd  # noqa: E402
from ssapo_jax import train as tr  # noqa: E402
from ssapo_jax.data.tokenize import left_pad  # noqa: E402
from ssapo_jax.models import Llama, LlamaConfig  # noqa: E402
from ssapo_jax.sampling import (  # noqa: E402
  Sampler,
  SamplingConfig,
  gather_samples,
  generate,
  plan_batches,
  prompt_padding_fraction,
)

EOS, PAD = 1, 0


def ultrafeedback_like_lengths(
  n: int,
  rng: np.random.Generator,
  *,
  median: float = 100.0,
  sigma: float = 0.9,
  low: int = 8,
  high: int = 1024,
) -> np.ndarray:
  """Long-tailed prompt lengths: log-normal (UltraFeedback's prompts: median ~100 tokens, a
  tail past 1K), clipped to ``[low, high]``."""
  return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), low, high).astype(int)


def tiny_world_lengths(n: int = 64) -> np.ndarray:
  """Chat-templated lengths of ``n`` demo-task prompts under the demo's tokenizer."""
  from ssapo_jax.demo import task  # pylint: disable=import-outside-toplevel
  from ssapo_jax.models.tokenizer import build_word_tokenizer, chat_prompt_ids_batch

  tokenizer = build_word_tokenizer(tempfile.mkdtemp(), task.VOCAB_WORDS)
  rng = np.random.default_rng(0)
  prompts = [task.sample_problem(rng).prompt for _ in range(n)]
  return np.array([len(x) for x in chat_prompt_ids_batch(tokenizer, prompts)])


def padding_table() -> None:
  rng = np.random.default_rng(0)
  cases = [
    ("tiny world (64 prompts, B=16, bucket 16)", tiny_world_lengths(64), 16, 16),
    (
      "UltraFeedback-like (58K prompts, B=64, bucket 64)",
      ultrafeedback_like_lengths(58_000, rng),
      64,
      64,
    ),
  ]
  print("prompt padding fraction (padding / prompt positions computed)")
  for name, lengths, batch, bucket in cases:
    before = prompt_padding_fraction(
      plan_batches(lengths, batch_size=batch, bucket_size=bucket, bucketed=False), lengths
    )
    after = prompt_padding_fraction(
      plan_batches(lengths, batch_size=batch, bucket_size=bucket, bucketed=True), lengths
    )
    print(
      f"  {name}: lengths {lengths.min()}-{lengths.max()} (median "
      f"{int(np.median(lengths))}); input order {before:.1%} -> bucketed {after:.1%}"
    )


def prompt_shapes_table(new_tokens: int = 300) -> None:
  """The sampler's prompt buckets (multiples of ``data.bucket_size``) against a power-of-two
  ladder like the packed loader's row ladder (``ceil(P / 2^k)`` rounded to the bucket), on the
  UltraFeedback-like prompts at zephyr's batching: programs compiled, prompt padding, and the
  cache slots the decode steps read (prompt slots plus the filled new ones, every step of
  ``new_tokens``) over the real ones. The shapes are compiled once per run (the persistent
  cache serves the later rounds); the slots are read at every step of every round."""
  lengths = ultrafeedback_like_lengths(58_000, np.random.default_rng(0))
  batch, bucket, top = 64, 64, 1024
  ladder, n = set(), top
  while n > bucket:
    ladder.add(-(-n // bucket) * bucket)
    n = -(-n // 2)
  ladder = sorted(ladder | {bucket})
  plan = plan_batches(lengths, batch_size=batch, bucket_size=1, bucketed=True)
  real_reads = sum(
    int(lengths[b.indices].sum()) * new_tokens + batch * new_tokens * (new_tokens - 1) // 2
    for b in plan
  )
  print(f"sampler prompt shapes (UltraFeedback-like, B={batch}, {new_tokens} new tokens)")
  for name, pad_to in (
    (f"multiples of {bucket}", lambda x: -(-x // bucket) * bucket),
    (f"ladder {ladder}", lambda x: next(v for v in ladder if v >= x)),
  ):
    padded = [b._replace(length=pad_to(b.length)) for b in plan]
    reads = sum(
      batch * (b.length * new_tokens + new_tokens * (new_tokens - 1) // 2) for b in padded
    )
    print(
      f"  {name}: {len({b.length for b in padded})} programs, prompt padding "
      f"{prompt_padding_fraction(padded, lengths):.1%}, decode cache reads "
      f"{reads / real_reads:.2f}x the real slots"
    )


def replicated_rollout(model, prompts, key, config: SamplingConfig, bucket: int):
  """The replicated path: batches in input order, each a plain-jit `generate` call."""
  plan = plan_batches(
    [len(p) for p in prompts], batch_size=config.batch_size, bucket_size=bucket, bucketed=False
  )
  tokens, new = [], 0
  for batch in plan:
    ids, mask = left_pad([prompts[i] for i in batch.indices], pad_id=PAD, length=batch.length)
    gen = generate(
      model,
      ids,
      mask,
      key,
      prompt_index=batch.indices,
      max_new_tokens=config.max_new_tokens,
      temperature=config.temperature,
      num_samples=config.num_samples,
      eos_token_ids=(EOS,),
      pad_token_id=PAD,
    )
    rows = batch.num_real * config.num_samples
    tokens.append(np.asarray(gen.tokens)[:rows])
    new += int(np.asarray(gen.mask)[:rows].sum())
  return np.concatenate(tokens), new


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--vocab", type=int, default=8192)
  parser.add_argument("--prompts", type=int, default=64)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--median-prompt", type=float, default=48)
  parser.add_argument("--max-prompt", type=int, default=256)
  parser.add_argument("--bucket", type=int, default=16)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--samples", type=int, default=2)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  if args.quick:
    args.layers, args.hidden, args.vocab, args.prompts = 2, 64, 256, 16
    args.batch, args.max_prompt, args.new_tokens = 8, 64, 8

  print(
    f"# {time.strftime('%Y-%m-%d')} {platform.node()} "
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
    f"{jax.device_count()} {jax.devices()[0].platform} devices"
  )
  padding_table()
  prompt_shapes_table()

  heads = max(1, args.hidden // 64)
  model_config = LlamaConfig(
    vocab_size=args.vocab,
    hidden_size=args.hidden,
    intermediate_size=int(args.hidden * 2.75),
    num_layers=args.layers,
    num_heads=heads,
    num_kv_heads=max(1, heads // 2),
    head_dim=64,
    eos_token_ids=(EOS,),
    pad_token_id=PAD,
  )
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=-1, tensor=1))
  model = Llama(model_config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = shd.shard_params(params, tr.param_shardings(params, mesh))  # the train layout
  model = nnx.merge(graphdef, params, rest)
  rng = np.random.default_rng(1)
  lengths = ultrafeedback_like_lengths(
    args.prompts, rng, median=args.median_prompt, low=4, high=args.max_prompt
  )
  prompts = [rng.integers(2, args.vocab, n).tolist() for n in lengths]
  config = SamplingConfig(
    temperature=1.0, max_new_tokens=args.new_tokens, num_samples=args.samples, batch_size=args.batch
  )
  key = jax.random.key(0)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(
    f"model: {n_params / 1e6:.1f}M parameters ({args.layers} layers, hidden {args.hidden}, "
    f"vocab {args.vocab}); {args.prompts} prompts x {args.samples} samples, lengths "
    f"{lengths.min()}-{lengths.max()} (median {int(np.median(lengths))}), "
    f"{args.new_tokens} new tokens, batch {args.batch}, mesh {dict(mesh.shape)}"
  )

  replicated_rollout(model, prompts, key, config, args.bucket)  # compile
  start = time.perf_counter()
  ref_tokens, new = replicated_rollout(model, prompts, key, config, args.bucket)
  base = new / (time.perf_counter() - start)
  print(f"  replicated (plain jit)    {base:9,.0f} new tokens/s")
  for bucketed in (False, True):
    sampler = Sampler(
      mesh,
      config,
      pad_token_id=PAD,
      eos_token_ids=(EOS,),
      bucket_size=args.bucket,
      bucketed=bucketed,
    )
    sampler.sample(model, prompts, key)  # compile
    out = sampler.sample(model, prompts, key)
    rate = out.stats.new_tokens / out.stats.seconds
    name = "sharded, bucketed  " if bucketed else "sharded, input order"
    print(
      f"  {name}      {rate:9,.0f} new tokens/s  ratio {rate / base:5.2f}x  padding "
      f"{out.stats.padding_fraction:.1%}"
    )
    tokens = gather_samples(out, len(prompts)).tokens
    if not bucketed:
      assert np.array_equal(tokens, ref_tokens), "sharded and replicated samples differ"
    else:
      print(f"    (same tokens as the replicated path: {np.mean(tokens == ref_tokens):.1%})")


if __name__ == "__main__":
  main()
