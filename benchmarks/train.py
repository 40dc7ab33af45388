"""Tokens/s of the DPO train step: ssapo_jax (jit) against PyTorch + transformers, same process.

Both sides train the same small Llama (random weights created by transformers, loaded into
ssapo_jax with ``load_hf``) on the same batch: one forward over chosen and rejected
sequences, summed response log-probs, sigmoid DPO loss against reference log-probs (read
from the batch, or with ``--reference in_step`` computed by a frozen copy of the model in the
step), backward, global-norm clipping, AdamW with warm-up + cosine schedule. float32 on both
sides by default (CPU bf16 matmuls are emulated by both frameworks).

Reports tokens/s (all ``2 * pairs * seq_len`` tokens of a step), the JAX/PyTorch ratio, and
an estimated model FLOPs utilisation: model FLOPs = 6 * params * tokens for the policy
(+ 2 * params * tokens when the reference runs in the step), divided by the step time and by
the machine's measured dense float32 matmul throughput (the CPU has no datasheet peak we can
rely on, so the matmul rate stands in for it).

    python benchmarks/train.py                 # defaults: ~5M-parameter Llama, 8 pairs x 128
    python benchmarks/train.py --reference in_step --json out.json

``--packing`` measures something else: useful (non-padding) tokens/s of the ssapo_jax step with
packed sequences (``data.packing``) against the padded batches of the default loader, over
one epoch of the same pairs after a warm-up epoch that compiles every shape, on a generated
length distribution shaped like UltraFeedback (`ultrafeedback_like_lengths`); it also reports
the padding fraction and the number of step shapes of both.

    python benchmarks/train.py --packing --json packing.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--intermediate", type=int, default=688)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--pairs", type=int, default=8, help="preference pairs per step")
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--micro_batches", type=int, default=1)
  p.add_argument("--reference", choices=("precomputed", "in_step"), default="precomputed")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
  p.add_argument("--repeats", type=int, default=3, help="alternating JAX/PyTorch repeats")
  p.add_argument("--json", default=None, help="write the results here")
  g = p.add_argument_group("--packing: packed against padded batches")
  g.add_argument("--packing", action="store_true", help="run the packing benchmark instead")
  g.add_argument("--num_pairs", type=int, default=256, help="pairs in the generated epoch")
  g.add_argument(
    "--max_length",
    type=int,
    default=512,
    help="longest prompt + response (UltraFeedback: 2048; the lengths are scaled "
    "by max_length / 2048)",
  )
  g.add_argument("--bucket_size", type=int, default=64, help="padded lengths round up to this")
  g = p.add_argument_group("--tunix: against Tunix's DPO trainer step (needs google-tunix)")
  g.add_argument("--tunix", action="store_true", help="run the Tunix comparison instead")
  g.add_argument(
    "--lengths",
    choices=("fixed", "ultrafeedback"),
    default="fixed",
    help="fixed: one [pairs, seq_len] batch; ultrafeedback: an epoch of --num_pairs generated "
    "pairs, ours packed, Tunix padded per batch",
  )
  p.add_argument(
    "--scan_layers",
    type=int,
    choices=(0, 1),
    default=0,
    help="our model.scan_layers (0: unrolled layers, the choice for shallow models)",
  )
  return p.parse_args(argv)


def ultrafeedback_like_lengths(n: int, max_length: int, rng):
  """``(prompt, chosen, rejected)`` token counts ``[n]`` shaped like UltraFeedback's.

  At ``max_length = 2048`` (the paper's): prompt ~ lognormal(median 120, sigma 0.9) clipped to
  [8, 1024]; each response ~ lognormal(median 260, sigma 0.7), clipped so prompt + response <=
  max_length: most pairs are a few hundred tokens, with a long tail to the limit. Other
  ``max_length`` values scale every length by ``max_length / 2048``.
  """
  import numpy as np

  scale = max_length / 2048
  prompt = np.clip(rng.lognormal(np.log(120 * scale), 0.9, n), 8 * scale, 1024 * scale)
  prompt = np.maximum(prompt.astype(int), 1)
  responses = []
  for _ in range(2):
    r = rng.lognormal(np.log(260 * scale), 0.7, n).astype(int)
    responses.append(np.clip(r, 1, max_length - prompt))
  return prompt, responses[0], responses[1]


def packing_benchmark(args):
  """Useful tokens/s, padding fraction and shapes: packed against padded batches (see the
  module docstring)."""
  import jax
  import numpy as np
  from flax import nnx

  from ssapo_jax import compilation
  from ssapo_jax import sharding as shd
  from ssapo_jax import train as tr
  from ssapo_jax.data import PreferenceLoader, pairs_from_token_ids
  from ssapo_jax.models import Llama, LlamaConfig

  rng = np.random.default_rng(0)
  lp, lc, lr = ultrafeedback_like_lengths(args.num_pairs, args.max_length, rng)
  toks = lambda n: list(rng.integers(3, args.vocab, int(n)))
  ds = pairs_from_token_ids(
    [toks(n) for n in lp],
    [toks(n) for n in lc],
    [toks(n) for n in lr],
    eos_id=2,
    max_length=args.max_length,
    max_prompt_length=args.max_length // 2,
    add_eos=False,
    verbose=False,
  )
  cfg = LlamaConfig(
    vocab_size=args.vocab,
    hidden_size=args.hidden,
    intermediate_size=args.intermediate,
    num_layers=args.layers,
    num_heads=args.heads,
    num_kv_heads=args.kv_heads,
    head_dim=args.hidden // args.heads,
    attention="xla",
  )
  mesh = shd.make_mesh(shd.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  config = tr.TrainConfig(
    learning_rate=1e-5,
    global_batch_size=args.pairs,
    micro_batches=args.micro_batches,
    compute_dtype=args.dtype,
    remat="none",
    beta=0.1,
  )
  pack_length = -(-args.max_length // args.bucket_size) * args.bucket_size
  compilation.start_counting()
  runs, results = {}, {}
  for mode in ("padded", "packed"):
    packed = mode == "packed"
    loader = PreferenceLoader(
      ds,
      global_batch_size=args.pairs,
      seed=0,
      pad_id=0,
      bucket_size=args.bucket_size,
      packing=packed,
      pack_length=pack_length,
      micro_batches=args.micro_batches,
    )
    epoch = list(loader.iterator(num_epochs=1))
    state = tr.create_train_state(
      Llama(cfg, rngs=nnx.Rngs(0)), config, mesh, num_train_steps=(2 + args.repeats) * len(epoch)
    )
    step = tr.make_train_step(config, mesh, state, packed=packed)
    gbatches = [shd.global_batch(mesh, b) for b in epoch]
    compilation.reset_stats()
    t0 = time.perf_counter()
    losses = []
    for b in gbatches:  # warm-up epoch: compiles every shape
      state, metrics = step(state, b)
      losses.append(float(metrics["loss"]))
    warm_s = time.perf_counter() - t0
    shapes = sorted({tuple(s) for s in compilation.stats()["compile/shapes"]["train_step"]})
    if packed:
      real = sum(int((b.segment_ids > 0).sum()) for b in epoch)
      cells = sum(b.ids.size for b in epoch)
    else:
      real = sum(int(b.chosen_mask.sum() + b.rejected_mask.sum()) for b in epoch)
      cells = sum(b.chosen_ids.size + b.rejected_ids.size for b in epoch)
    runs[mode] = [step, state, gbatches, []]
    results[mode] = {
      "steps": len(epoch),
      "shapes": [list(s) for s in shapes],
      "useful_tokens": real,
      "token_cells": cells,
      "padding_fraction": 1 - real / cells,
      "warmup_epoch_s": warm_s,
      "first_losses": losses[:3],
    }
  for _ in range(args.repeats):  # interleaved, so a change in machine load hits both
    for run in runs.values():
      step, state, gbatches, times = run
      t0 = time.perf_counter()
      for b in gbatches:
        state, metrics = step(state, b)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - t0)
      run[1] = state
  for mode, (_, _, _, times) in runs.items():
    epoch_s = statistics.median(times)
    results[mode].update(
      epoch_s=epoch_s,
      epoch_s_all=times,
      useful_tokens_per_s=results[mode]["useful_tokens"] / epoch_s,
    )
  result = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
    "jax": jax.__version__,
    "model": {
      "hidden": args.hidden,
      "layers": args.layers,
      "heads": args.heads,
      "kv_heads": args.kv_heads,
      "vocab": args.vocab,
      "dtype": args.dtype,
    },
    "pairs_per_step": args.pairs,
    "micro_batches": args.micro_batches,
    "num_pairs": args.num_pairs,
    "max_length": args.max_length,
    "pack_length": pack_length,
    "bucket_size": args.bucket_size,
    "lengths": {
      "prompt_median": float(np.median(lp)),
      "response_median": float(np.median(np.r_[lc, lr])),
      "sequence_mean": float(np.mean(np.r_[lp + lc, lp + lr])),
      "sequence_p99": float(np.percentile(np.r_[lp + lc, lp + lr], 99)),
    },
    **results,
    "speedup_packed_over_padded": (
      results["packed"]["useful_tokens_per_s"] / results["padded"]["useful_tokens_per_s"]
    ),
  }
  print(json.dumps(result, indent=2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


def _copy_into_tunix(ours, theirs) -> None:
  """Our parameters into Tunix's Llama3 (stacked ``[L, ...]`` rows to its per-layer modules;
  the LM head transposed to its ``[D, V]``)."""
  theirs.embedder.input_embedding.value = ours.embedding[...]
  theirs.final_norm.w.value = ours.final_norm.scale[...]
  theirs.lm_head.w.value = ours.lm_head[...].T
  layers = ours.layers
  for i, layer in enumerate(theirs.layers):
    layer.input_layernorm.w.value = layers.input_norm.scale[...][i]
    layer.post_attention_layernorm.w.value = layers.post_attn_norm.scale[...][i]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      getattr(layer.attn, name).w.value = getattr(layers.attn, name)[...][i]
    for name in ("gate_proj", "up_proj", "down_proj"):
      getattr(layer.mlp, name).kernel.value = getattr(layers.mlp, name)[...][i]


def _tunix_pairs(prompts, chosen, rejected, prompt_bucket: int, response_bucket: int):
  """Tunix's `TrainingInput` of token lists: prompts left-padded, responses right-padded, each
  to its longest in the batch rounded up to its bucket."""
  import numpy as np
  from tunix.sft.dpo import dpo_trainer

  def pad(seqs, left):
    bucket = prompt_bucket if left else response_bucket
    t = -(-max(len(x) for x in seqs) // bucket) * bucket
    ids, mask = np.zeros((len(seqs), t), np.int32), np.zeros((len(seqs), t), np.int32)
    for i, x in enumerate(seqs):
      sl = slice(t - len(x), t) if left else slice(0, len(x))
      ids[i, sl], mask[i, sl] = x, 1
    return ids, mask

  (p, pm), (c, cm), n = pad(prompts, True), pad(chosen + rejected, False), len(prompts)
  c, cm, r, rm = c[:n], cm[:n], c[n:], cm[n:]
  return dpo_trainer.TrainingInput(
    prompt_ids=p, prompt_mask=pm, chosen_ids=c, chosen_mask=cm, rejected_ids=r, rejected_mask=rm
  )


def tunix_benchmark(args):
  """Our DPO step against Tunix's (`tunix.sft.dpo.DPOTrainer`), same weights, same pairs.

  The model is Tunix's Llama3 layout (RoPE theta 1e6, the value its attention applies); our
  weights are copied into it. Tunix's step is what its trainer runs per step:
  ``_prepare_inputs`` (masks, positions and, with ``--reference in_step``, the reference
  log-probs in their own jit) then the jitted train step (AdamW with the same schedule,
  clipping and decay mask). ``--lengths fixed``: one batch of ``pairs x seq_len`` tokens per
  side; ``ultrafeedback``: one epoch of ``--num_pairs`` generated pairs, ours packed, Tunix's
  padded per batch (prompts to the longest prompt, responses to the longest response, each
  rounded up to ``--bucket_size``). Timing: a warm-up pass that compiles every shape, then
  ``--repeats`` interleaved blocks (ours, Tunix); the median block of each.
  """
  try:
    from tunix.models.llama3 import model as tunix_llama
    from tunix.sft.dpo import dpo_trainer
  except ImportError as e:
    raise SystemExit(
      "--tunix needs google-tunix (pip install 'ssapo-jax[tunix]' in an environment of its "
      "own: it upgrades transformers)"
    ) from e
  import importlib.metadata

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from ssapo_jax import sharding as shd
  from ssapo_jax import train as tr
  from ssapo_jax.batch import make_preference_batch
  from ssapo_jax.data import PreferenceLoader, pairs_from_token_ids
  from ssapo_jax.models import Llama, LlamaConfig

  cfg = LlamaConfig(
    vocab_size=args.vocab,
    hidden_size=args.hidden,
    intermediate_size=args.intermediate,
    num_layers=args.layers,
    num_heads=args.heads,
    num_kv_heads=args.kv_heads,
    head_dim=args.hidden // args.heads,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    attention="xla",
    scan_layers=bool(args.scan_layers),
  )
  ours = Llama(cfg, rngs=nnx.Rngs(0))
  theirs = tunix_llama.Llama3(
    tunix_llama.ModelConfig(
      num_layers=args.layers,
      vocab_size=args.vocab,
      embed_dim=args.hidden,
      hidden_dim=args.intermediate,
      num_heads=args.heads,
      head_dim=args.hidden // args.heads,
      num_kv_heads=args.kv_heads,
      rope_theta=1_000_000,
      norm_eps=1e-6,
    ),
    rngs=nnx.Rngs(1),
  )
  _copy_into_tunix(ours, theirs)

  # The pairs: token lists (prompt, chosen, rejected), and the batches of each side.
  rng = np.random.default_rng(0)
  toks = lambda n: [int(x) for x in rng.integers(3, args.vocab, int(n))]  # noqa: E731
  if args.lengths == "fixed":
    prompt_len = args.seq_len // 4
    lp = np.full(args.pairs, prompt_len)
    lc, lr = (
      rng.integers((args.seq_len - prompt_len) // 2, args.seq_len - prompt_len + 1, args.pairs)
      for _ in range(2)
    )
  else:
    lp, lc, lr = ultrafeedback_like_lengths(args.num_pairs, args.max_length, rng)
  prompts, chosen, rejected = ([toks(n) for n in ls] for ls in (lp, lc, lr))
  n, g = len(prompts), args.pairs
  # Precomputed reference log-probs: random for the fixed batch; 0 for the generated epoch
  # (what the loader's batches carry without a reference pass).
  ref = rng.normal(-8.0 * np.mean(lc), 5.0, (2, n)).astype(np.float32)
  if args.reference == "in_step" or args.lengths != "fixed":
    ref[:] = 0.0
  steps = -(-n // g)
  config = tr.TrainConfig(
    learning_rate=1e-5,
    weight_decay=0.01,
    global_batch_size=g,
    compute_dtype=args.dtype,
    remat="none",
    reference=args.reference,
    beta=0.1,
  )
  num_train_steps = (2 + args.repeats) * steps * (args.steps if args.lengths == "fixed" else 1)
  mesh = shd.make_mesh(shd.MeshConfig(1, 1, 1), devices=jax.devices()[:1])

  if args.lengths == "fixed":  # one [G, T] batch, the prompt then the right-padded response
    t = args.seq_len

    def side(resp):
      ids = np.zeros((g, t), np.int32)
      mask, loss_mask = np.zeros_like(ids), np.zeros_like(ids)
      for i in range(g):
        x = prompts[i] + resp[i]
        ids[i, : len(x)], mask[i, : len(x)], loss_mask[i, len(prompts[i]) : len(x)] = x, 1, 1
      return ids, mask, loss_mask

    batch = make_preference_batch(
      *side(chosen), *side(rejected), ref_chosen_logps=ref[0], ref_rejected_logps=ref[1]
    )
    our_batches, packed = [shd.global_batch(mesh, batch)] * args.steps, False
    tunix_batches = [
      (slice(0, g), _tunix_pairs(prompts, chosen, rejected, prompt_len, t - prompt_len))
    ]
    tunix_batches *= args.steps
  else:
    ds = pairs_from_token_ids(
      prompts,
      chosen,
      rejected,
      eos_id=2,
      max_length=args.max_length,
      max_prompt_length=args.max_length // 2,
      add_eos=False,
      verbose=False,
    )
    pack_length = -(-args.max_length // args.bucket_size) * args.bucket_size
    loader = PreferenceLoader(
      ds, global_batch_size=g, shuffle=False, packing=True, pack_length=pack_length
    )
    our_batches, packed = [shd.global_batch(mesh, b) for b in loader.iterator(num_epochs=1)], True
    tunix_batches = [
      (sl, _tunix_pairs(prompts[sl], chosen[sl], rejected[sl], *(args.bucket_size,) * 2))
      for sl in (slice(i, min(i + g, n)) for i in range(0, n, g))
    ]
  state = tr.create_train_state(ours, config, mesh, num_train_steps=num_train_steps)
  step = tr.make_train_step(config, mesh, state, packed=packed)

  # Tunix: the same optimizer (clip, then AdamW with decay on matrices only).
  schedule = tr.make_schedule(config, num_train_steps)
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(schedule, weight_decay=0.01, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),
  )
  ref_model = None
  if args.reference == "in_step":
    ref_model = nnx.clone(theirs)
  trainer = dpo_trainer.DPOTrainer(
    model=theirs,
    ref_model=ref_model,
    optimizer=tx,
    training_config=dpo_trainer.DPOTrainingConfig(
      eval_every_n_steps=10**9, max_steps=num_train_steps, beta=0.1
    ),
  )
  tunix_step, _ = trainer.jit_train_and_eval_step()

  def run_tunix(sl, inputs):
    example = trainer._prepare_inputs(inputs)  # pylint: disable=protected-access
    if ref_model is None:
      example = example.replace(
        ref_chosen_logps=jnp.asarray(ref[0, sl]), ref_rejected_logps=jnp.asarray(ref[1, sl])
      )
    return tunix_step(example)[0]

  t0 = time.perf_counter()
  first = {}
  for b in our_batches[:1] if args.lengths == "fixed" else our_batches:
    state, metrics = step(state, b)
    first.setdefault("ours", float(metrics["loss"]))
  ours_warm_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for sl, inputs in tunix_batches[:1] if args.lengths == "fixed" else tunix_batches:
    loss = run_tunix(sl, inputs)
    first.setdefault("tunix", float(loss))
  tunix_warm_s = time.perf_counter() - t0

  times = {"ours": [], "tunix": []}
  for _ in range(args.repeats):  # interleaved blocks: a change of machine load hits both
    t0 = time.perf_counter()
    for b in our_batches:
      state, metrics = step(state, b)
    jax.block_until_ready(metrics["loss"])
    times["ours"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for sl, inputs in tunix_batches:
      loss = run_tunix(sl, inputs)
    jax.block_until_ready(loss)
    times["tunix"].append(time.perf_counter() - t0)
  block = {k: statistics.median(v) for k, v in times.items()}
  compiled = {}
  if args.lengths == "fixed":  # the compiled programs, compared (XLA counts a loop body once)
    example = trainer._prepare_inputs(tunix_batches[0][1])  # pylint: disable=protected-access
    if ref_model is None:
      example = example.replace(
        ref_chosen_logps=jnp.asarray(ref[0, :g]), ref_rejected_logps=jnp.asarray(ref[1, :g])
      )
    programs = {
      "ours": step.lower(state, our_batches[0]).compile(),
      "tunix": tunix_step.func.lower(*tunix_step.args, example).compile(),
    }
    for k, c in programs.items():
      cost = c.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      text = c.as_text()
      compiled[k] = {
        "flops": cost.get("flops"),
        "bytes_accessed": cost.get("bytes accessed"),
        "fusions": text.count(" fusion("),
        "while_loops": text.count(" while("),
      }
  useful = int(2 * np.sum(lp) + np.sum(lc) + np.sum(lr))
  per_block = useful * (args.steps if args.lengths == "fixed" else 1)
  if args.lengths == "fixed":
    cells = {k: 2 * g * args.seq_len for k in times}
  else:
    cells = {
      "ours": sum(int(np.prod(b.ids.shape)) for b in our_batches),
      "tunix": sum(
        2 * x.prompt_ids.shape[0] * (x.prompt_ids.shape[1] + x.chosen_ids.shape[1])
        for _, x in tunix_batches
      ),
    }
  result = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
    "load_avg_1m": os.getloadavg()[0],
    "jax": jax.__version__,
    "tunix": importlib.metadata.version("google-tunix"),
    "model": {
      "hidden": args.hidden,
      "intermediate": args.intermediate,
      "layers": args.layers,
      "heads": args.heads,
      "kv_heads": args.kv_heads,
      "vocab": args.vocab,
      "dtype": args.dtype,
      "scan_layers": bool(args.scan_layers),
    },
    "lengths": args.lengths,
    "reference": args.reference,
    "pairs_per_step": g,
    "steps_per_block": len(our_batches),
    "useful_tokens_per_block": per_block,
    "padding_fraction": {k: 1 - useful / v for k, v in cells.items()},
    "first_loss": first,
    "first_loss_abs_diff": abs(first["ours"] - first["tunix"]),
    "warmup_s": {"ours": ours_warm_s, "tunix": tunix_warm_s},
    "block_s": block,
    "block_s_all": times,
    "useful_tokens_per_s": {k: per_block / v for k, v in block.items()},
    "speedup_ours_over_tunix": block["tunix"] / block["ours"],
    "compiled": compiled,
  }
  print(json.dumps(result, indent=2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


def make_data(args, rng):
  import numpy as np

  b, t = args.pairs, args.seq_len
  prompt = t // 4

  def side():
    ids = rng.integers(3, args.vocab, (b, t)).astype(np.int32)
    lengths = rng.integers(t // 2, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return ids * mask, mask, (mask * (np.arange(t)[None] >= prompt)).astype(np.int32)

  chosen, rejected = side(), side()
  ref = rng.normal(-8.0 * t, 5.0, (2, b)).astype(np.float32)
  return chosen, rejected, ref


def matmul_flops_per_s(n=1024, reps=10):
  """Measured float32 dense matmul throughput (FLOP/s) with XLA, as the CPU 'peak'."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    y = f(x)
  y.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t0)


class TorchDPO:
  """The same DPO step in PyTorch: transformers LlamaForCausalLM + torch.optim.AdamW."""

  def __init__(self, model, args, num_steps):
    import torch
    import transformers

    self.torch = torch
    self.model = model.train()
    self.ref_model = None
    if args.reference == "in_step":
      import copy

      self.ref_model = copy.deepcopy(model).eval()
      for p in self.ref_model.parameters():
        p.requires_grad_(False)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    self.opt = torch.optim.AdamW(
      [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-5
    )
    self.sched = transformers.get_cosine_schedule_with_warmup(
      self.opt, num_warmup_steps=math.ceil(0.1 * num_steps), num_training_steps=num_steps
    )
    self.beta = 0.1

  def _logps(self, model, ids, mask, loss_mask):
    torch = self.torch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    tok = torch.gather(logp, 2, ids[:, 1:, None].long())[..., 0]
    return (tok * loss_mask[:, 1:]).sum(-1)

  def step(self, ids, mask, loss_mask, ref_chosen, ref_rejected):
    torch = self.torch
    b = ids.shape[0] // 2
    logps = self._logps(self.model, ids, mask, loss_mask)
    if self.ref_model is not None:
      with torch.no_grad():
        ref = self._logps(self.ref_model, ids, mask, loss_mask)
      ref_chosen, ref_rejected = ref[:b], ref[b:]
    z = self.beta * ((logps[:b] - ref_chosen) - (logps[b:] - ref_rejected))
    loss = -torch.nn.functional.logsigmoid(z).mean()
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    self.sched.step()
    return float(loss.detach())


def main(argv=None):
  from machine import contention_warning, load_average  # this folder's, on sys.path

  load_before = load_average()  # before this process adds to the load
  args = parse_args(argv)
  if args.packing:
    return packing_benchmark(args)
  if args.tunix:
    return tunix_benchmark(args)
  warning = contention_warning(load_before)
  if warning:
    print(warning, flush=True)
  import jax
  import numpy as np
  import torch
  import transformers

  from ssapo_jax import sharding as shd
  from ssapo_jax import train as tr
  from ssapo_jax.batch import concat_pairs, make_preference_batch
  from ssapo_jax.models.params import load_hf

  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  rng = np.random.default_rng(0)
  (c_ids, c_mask, c_lm), (r_ids, r_mask, r_lm), ref = make_data(args, rng)
  num_train_steps = 1 + args.repeats * (args.steps + 1)

  hf_config = transformers.LlamaConfig(
    vocab_size=args.vocab,
    hidden_size=args.hidden,
    intermediate_size=args.intermediate,
    num_hidden_layers=args.layers,
    num_attention_heads=args.heads,
    num_key_value_heads=args.kv_heads,
    max_position_embeddings=max(2048, args.seq_len),
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
  )
  torch.manual_seed(0)
  torch_model = transformers.LlamaForCausalLM(hf_config).float()
  num_params = sum(p.numel() for p in torch_model.parameters())
  with tempfile.TemporaryDirectory() as tmp:
    torch_model.save_pretrained(tmp)
    jax_model = load_hf(tmp, scan_layers=bool(args.scan_layers))
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  torch_model = torch_model.to(torch_dtype)

  # --- JAX side: one CPU device (XLA uses all cores), the project's sharded step.
  mesh = shd.make_mesh(shd.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  config = tr.TrainConfig(
    learning_rate=1e-5,
    weight_decay=0.01,
    global_batch_size=args.pairs,
    micro_batches=args.micro_batches,
    compute_dtype=args.dtype,
    remat="none",
    reference=args.reference,
    beta=0.1,
  )
  state = tr.create_train_state(jax_model, config, mesh, num_train_steps=num_train_steps)
  step = tr.make_train_step(config, mesh, state)
  batch = make_preference_batch(
    c_ids, c_mask, c_lm, r_ids, r_mask, r_lm, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1]
  )
  gbatch = shd.global_batch(mesh, batch)

  t0 = time.perf_counter()
  state, metrics = step(state, gbatch)
  jax_first_loss = float(metrics["loss"])
  compile_s = time.perf_counter() - t0

  # --- PyTorch side: same weights, same batch.
  ids, mask, loss_mask = (torch.from_numpy(np.array(x)) for x in concat_pairs(batch))
  ref_c, ref_r = torch.from_numpy(ref[0]), torch.from_numpy(ref[1])
  torch_dpo = TorchDPO(torch_model, args, num_train_steps)
  torch_first_loss = torch_dpo.step(ids, mask, loss_mask, ref_c, ref_r)

  jax_times, torch_times = [], []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = step(state, gbatch)
    jax.block_until_ready(metrics["loss"])
    jax_times.append((time.perf_counter() - t0) / args.steps)
    t0 = time.perf_counter()
    for _ in range(args.steps):
      torch_dpo.step(ids, mask, loss_mask, ref_c, ref_r)
    torch_times.append((time.perf_counter() - t0) / args.steps)

  tokens = 2 * args.pairs * args.seq_len
  flops_per_token = 6 * num_params + (2 * num_params if args.reference == "in_step" else 0)
  peak = matmul_flops_per_s()
  jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
  result = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "machine": f"{platform.processor() or platform.machine()}, {threads} CPU cores "
    f"({platform.platform()})",
    "load_avg_1m_before": load_before,
    "jax": jax.__version__,
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "params": num_params,
    "pairs": args.pairs,
    "seq_len": args.seq_len,
    "tokens_per_step": tokens,
    "reference": args.reference,
    "dtype": args.dtype,
    "micro_batches": args.micro_batches,
    "first_loss": {"jax": jax_first_loss, "torch": torch_first_loss},
    "jax_compile_s": compile_s,
    "step_s": {"jax": jax_s, "torch": torch_s},
    "step_s_all": {"jax": jax_times, "torch": torch_times},
    "tokens_per_s": {"jax": tokens / jax_s, "torch": tokens / torch_s},
    "speedup_jax_over_torch": torch_s / jax_s,
    "model_flops_per_step": flops_per_token * tokens,
    "matmul_peak_flops_per_s": peak,
    "mfu_vs_matmul_peak": {
      "jax": flops_per_token * tokens / jax_s / peak,
      "torch": flops_per_token * tokens / torch_s / peak,
    },
  }
  print(json.dumps(result, indent=2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
