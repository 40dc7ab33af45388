"""Tests for ssapo_jax/sampling.py against transformers' generate and numpy references."""

import math
import re

import _multihost_worker as w
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch
from flax import nnx
from jax.sharding import PartitionSpec

from ssapo_jax import sampling
from ssapo_jax import sharding as shd
from ssapo_jax.data.tokenize import left_pad
from ssapo_jax.models import load_hf
from ssapo_jax.sampling import (
  SamplingConfig,
  decode,
  filter_logits,
  gather_samples,
  generate,
  plan_batches,
  prompt_padding_fraction,
)
from ssapo_jax.testing.hf_torch import save_tiny_hf

EOS = 2


def _prompts(seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, 128, (3, 7))
  mask = np.ones((3, 7), np.int64)
  mask[0, :3] = 0
  mask[1, :1] = 0
  ids[mask == 0] = 0
  return ids, mask


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  return save_tiny_hf(path, "llama", seed=3), load_hf(path)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_greedy_matches_transformers_generate(tmp_path, family):
  hf = save_tiny_hf(tmp_path, family, seed=3)
  model = load_hf(tmp_path)
  ids, mask = _prompts()
  # Make EOS the greedy choice somewhere so early stopping is exercised: the reference
  # decides where each row stops.
  with torch.no_grad():
    ref = hf.generate(
      torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      max_new_tokens=10,
      do_sample=False,
      eos_token_id=[EOS, 9],
      pad_token_id=0,
    )[:, 7:].numpy()
  g = generate(
    model,
    jnp.asarray(ids),
    jnp.asarray(mask),
    jax.random.key(0),
    max_new_tokens=10,
    temperature=0.0,
    eos_token_ids=(EOS, 9),
    pad_token_id=0,
  )
  ref = np.pad(ref, ((0, 0), (0, 10 - ref.shape[1])))  # HF stops when all rows finished
  np.testing.assert_array_equal(np.asarray(g.tokens), ref)
  # Mask: 1 up to and including the first EOS.
  for row_tokens, row_mask in zip(np.asarray(g.tokens), np.asarray(g.mask)):
    stop = [i for i, t in enumerate(row_tokens) if t in (EOS, 9)]
    n = stop[0] + 1 if stop else 10
    np.testing.assert_array_equal(row_mask, (np.arange(10) < n).astype(np.int32))


def test_logps_equal_full_forward_log_softmax(models):
  """Per-token log-probs from the cached loop equal a full forward over prompt + response."""
  _, model = models
  ids, mask = _prompts(1)
  g = generate(
    model,
    jnp.asarray(ids),
    jnp.asarray(mask),
    jax.random.key(1),
    max_new_tokens=8,
    temperature=1.0,
    num_samples=2,
  )
  tokens, gmask = np.asarray(g.tokens), np.asarray(g.mask)
  full_ids = np.concatenate([np.repeat(ids, 2, 0), tokens], 1)
  full_mask = np.concatenate([np.repeat(mask, 2, 0), gmask], 1)
  logits = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)), np.float64)
  logits = logits[:, 6:-1]  # the logits that predict each generated token
  logp = scipy.special.log_softmax(logits, axis=-1)
  ref = np.take_along_axis(logp, tokens[..., None], -1)[..., 0] * gmask
  np.testing.assert_allclose(np.asarray(g.logps), ref, atol=1e-4)
  assert g.logps.dtype == jnp.float32 and g.tokens.dtype == jnp.int32


def test_sampling_is_reproducible_and_prompt_major(models):
  _, model = models
  ids, mask = _prompts(2)
  kw = dict(max_new_tokens=6, temperature=1.0, num_samples=3)
  a = generate(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(5), **kw)
  b = generate(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(5), **kw)
  c = generate(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(6), **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert a.tokens.shape == (9, 6)
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  # Greedy samples of one prompt are identical and ordered prompt-major.
  g = generate(
    model,
    jnp.asarray(ids),
    jnp.asarray(mask),
    jax.random.key(0),
    max_new_tokens=5,
    temperature=0.0,
    num_samples=2,
  )
  g1 = generate(
    model,
    jnp.asarray(ids),
    jnp.asarray(mask),
    jax.random.key(0),
    max_new_tokens=5,
    temperature=0.0,
    num_samples=1,
  )
  np.testing.assert_array_equal(np.asarray(g.tokens), np.repeat(np.asarray(g1.tokens), 2, 0))


def _allowed(logits, *, top_k, top_p):
  """Numpy reference: the set of token ids top-k/top-p may emit, per row."""
  out = []
  for row in logits:
    order = np.argsort(-row, kind="stable")
    if top_k:
      order = order[:top_k]
    p = np.exp(row[order] - row[order].max())
    p /= p.sum()
    keep = (np.cumsum(p) - p < top_p) | (top_p >= 1.0)
    out.append(set(order[keep].tolist()))
  return out


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (8, 0.3)])
def test_top_k_top_p_never_emit_excluded_tokens(models, top_k, top_p):
  _, model = models
  ids, mask = _prompts(3)
  g = generate(
    model,
    jnp.asarray(ids),
    jnp.asarray(mask),
    jax.random.key(7),
    max_new_tokens=6,
    temperature=0.8,
    top_k=top_k,
    top_p=top_p,
    num_samples=4,
    eos_token_ids=(),
  )
  tokens = np.asarray(g.tokens)
  full_ids = np.concatenate([np.repeat(ids, 4, 0), tokens], 1)
  full_mask = np.concatenate([np.repeat(mask, 4, 0), np.ones_like(tokens)], 1)
  logits = np.asarray(model(jnp.asarray(full_ids), jnp.asarray(full_mask)))[:, 6:-1] / 0.8
  for t in range(tokens.shape[1]):
    allowed = _allowed(logits[:, t], top_k=top_k, top_p=top_p)
    for r in range(tokens.shape[0]):
      assert tokens[r, t] in allowed[r], (r, t)


def test_filter_logits_against_numpy():
  rng = np.random.RandomState(0)
  logits = rng.randn(6, 50).astype(np.float32) * 3
  for top_k, top_p in [(0, 1.0), (3, 1.0), (0, 0.7), (10, 0.9), (0, 1e-6)]:
    out = np.asarray(filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
    allowed = _allowed(logits, top_k=top_k, top_p=top_p)
    for r in range(6):
      assert set(np.flatnonzero(np.isfinite(out[r])).tolist()) == allowed[r]
      np.testing.assert_array_equal(out[r][np.isfinite(out[r])], logits[r][np.isfinite(out[r])])


def test_decode_stops_at_eos(tmp_path):
  from ssapo_jax.models.tokenizer import build_word_tokenizer

  tok = build_word_tokenizer(tmp_path, ["hello", "world", "again"])
  h, w, a = tok.convert_tokens_to_ids(["hello", "world", "again"])
  eos, pad = tok.eos_token_id, tok.pad_token_id
  tokens = np.array([[h, w, eos, pad], [a, h, a, w], [eos, pad, pad, pad]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
  assert decode(tok, tokens, mask) == ["hello world", "again hello again", ""]


def test_argument_errors(models):
  _, model = models
  ids, mask = _prompts()
  right = mask[:, ::-1].copy()
  with pytest.raises(ValueError, match="left-padded"):
    generate(model, jnp.asarray(ids), jnp.asarray(right), jax.random.key(0), max_new_tokens=2)
  with pytest.raises(ValueError, match="top_p"):
    generate(
      model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), max_new_tokens=2, top_p=0.0
    )
  with pytest.raises(ValueError, match="sampling.top_k"):
    SamplingConfig(top_k=-1)
  g = generate(
    model,
    jnp.asarray(ids),
    jnp.asarray(mask),
    jax.random.key(0),
    temperature=0.0,
    max_new_tokens=3,
    num_samples=1,
  )
  assert g.tokens.shape == (3, 3)


# ----------------------------------------------------------------------------- many prompts

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (1, 4, 2)]
KEY = 7


def _mesh(shape):
  return shd.make_mesh(shd.MeshConfig(*shape), jax.devices()[: math.prod(shape)])


def _sample(shape):
  mesh = _mesh(shape)
  prompts = w.sampler_prompts()
  return w.sampler(mesh).sample(w.sharded_tiny_model(mesh), prompts, jax.random.key(KEY))


@pytest.fixture(scope="module")
def single_device():
  """The (1, 1, 1) samples: ``(prompts, Samples, gathered Generation)``."""
  prompts = w.sampler_prompts()
  out = _sample((1, 1, 1))
  return prompts, out, gather_samples(out, len(prompts))


def test_plan_batches_cover_every_prompt_once():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 50, 23)
  for bucketed in (False, True):
    plan = plan_batches(lengths, batch_size=4, bucket_size=8, bucketed=bucketed)
    real = np.concatenate([b.indices[: b.num_real] for b in plan])
    assert sorted(real.tolist()) == list(range(23))
    for b in plan:
      assert b.indices.shape == (4,)
      assert (b.indices[b.num_real :] == b.indices[b.num_real - 1]).all()
      assert b.length == -(-lengths[b.indices].max() // 8) * 8
    if not bucketed:
      np.testing.assert_array_equal(real, np.arange(23))
    slots = sum(4 * b.length for b in plan)
    assert prompt_padding_fraction(plan, lengths) == pytest.approx(1 - lengths.sum() / slots)
  unbucketed = plan_batches(lengths, batch_size=4, bucket_size=8, bucketed=False)
  bucketed = plan_batches(lengths, batch_size=4, bucket_size=8)
  assert prompt_padding_fraction(bucketed, lengths) < prompt_padding_fraction(unbucketed, lengths)
  with pytest.raises(ValueError, match="prompt 2 is empty"):
    plan_batches([3, 1, 0], batch_size=2)


def test_sampler_rows_equal_sampling_each_prompt_alone(single_device):
  """Keys come from the prompt's global index: `generate` on one prompt with its index (same
  padded length, 16) gives the sampler's rows, whatever else shared the batch."""
  prompts, out, gen = single_device
  model = w.tiny_model(0)
  for i in (0, 5, 12):
    ids, mask = left_pad([prompts[i]], pad_id=0, length=16)
    alone = generate(
      model,
      ids,
      mask,
      jax.random.key(KEY),
      max_new_tokens=6,
      temperature=1.0,
      num_samples=2,
      eos_token_ids=(2,),
      pad_token_id=0,
      prompt_index=[i],
    )
    np.testing.assert_array_equal(gen.tokens[2 * i : 2 * i + 2], np.asarray(alone.tokens))
    np.testing.assert_allclose(gen.logps[2 * i : 2 * i + 2], np.asarray(alone.logps), atol=1e-5)
  # Stats: 13 prompts in 2 batches of 8 (3 filler rows), 2 samples each, prompts padded to 16.
  s = out.stats
  assert (s.prompts, s.rows, s.prompt_slots) == (13, 32, 32 * 16)
  assert s.prompt_tokens == 2 * sum(map(len, prompts))
  assert s.new_tokens == int(gen.mask.sum())
  assert s.decode_slots <= 32 * 6
  assert s.padding_fraction == pytest.approx(
    1 - (s.prompt_tokens + s.new_tokens) / (s.prompt_slots + s.decode_slots)
  )
  np.testing.assert_array_equal(out.prompt_index, np.arange(13))


@pytest.mark.parametrize("shape", MESHES[1:])
def test_sampler_same_samples_on_every_mesh(single_device, shape):
  _, _, ref = single_device
  gen = gather_samples(_sample(shape), 13)
  np.testing.assert_array_equal(gen.tokens, ref.tokens)
  np.testing.assert_array_equal(gen.mask, ref.mask)
  np.testing.assert_allclose(gen.logps, ref.logps, atol=1e-5)


@pytest.mark.parametrize("shape", MESHES)
def test_sampler_refill_gives_the_same_samples_on_every_mesh(single_device, shape):
  """``refill_batches=2``: the plan's two batches (both padded to 16) decode as one refill
  queue of 32 jobs in 16 rows; every prompt's samples equal those without refill."""
  _, _, ref = single_device
  mesh = _mesh(shape)
  sampler = w.sampler(mesh, refill_batches=2)
  prompts = w.sampler_prompts()
  plan = plan_batches(
    [len(p) for p in prompts], batch_size=8, bucket_size=sampler.bucket_size, bucketed=True
  )
  assert [len(c) for c in sampler.calls(plan)] == [2]  # one queue: refill runs
  out = sampler.sample(w.sharded_tiny_model(mesh), prompts, jax.random.key(KEY))
  gen = gather_samples(out, len(prompts))
  np.testing.assert_array_equal(gen.tokens, ref.tokens)
  np.testing.assert_array_equal(gen.mask, ref.mask)
  np.testing.assert_allclose(gen.logps, ref.logps, atol=1e-5)
  assert out.stats.new_tokens == int(ref.mask.sum())


def test_decode_layout_is_gathered_once_outside_the_loop():
  """Decoding parameters drop the FSDP axis (heads stay over ``tensor``), so the compiled
  sampling loop on an FSDP mesh contains no all-gather."""
  mesh = _mesh((1, 8, 1))
  model = w.sharded_tiny_model(mesh)
  # [L, D, N, H]: the stacked layers' q projection, embedding dim over fsdp.
  assert model.layers.attn.q_proj[...].sharding.spec == PartitionSpec(None, "fsdp", None, None)
  sampler = w.sampler(mesh)
  graphdef, params, rest = sampler.decode_layout(model)
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
  settings = sampling._settings(
    model.config,
    max_new_tokens=4,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    num_samples=2,
    eos_token_ids=(2,),
    pad_token_id=0,
  )
  rows = jax.sharding.NamedSharding(mesh, shd.batch_spec(2, 8, mesh))
  ids = jax.device_put(np.ones((8, 16), np.int32), rows)
  index = jax.device_put(
    np.arange(8, dtype=np.int32), jax.sharding.NamedSharding(mesh, shd.batch_spec(1, 8, mesh))
  )
  key = shd.put_global(jax.random.key(0), shd.replicated(mesh))
  hlo = (
    sampling._generate.lower(
      graphdef, params, rest, ids, ids, index, key, settings=settings, mesh=mesh
    )
    .compile()
    .as_text()
  )
  assert "while" in hlo and not re.search(r"all-gather", hlo)

  mesh = _mesh((1, 4, 2))
  _, params, _ = w.sampler(mesh).decode_layout(w.sharded_tiny_model(mesh))
  q = params["layers"]["attn"]["q_proj"]
  assert q.sharding.spec == PartitionSpec(
    None, None, "tensor", None
  )  # [L, D, N, H]: heads over tensor


def test_decode_layout_casts_to_the_compute_dtype_with_the_same_samples():
  """A bfloat16-compute model with float32 master weights decodes from bfloat16 copies (half
  the memory and bytes per token) and samples exactly what its float32 weights give."""
  mesh = _mesh((1, 8, 1))
  model = w.tiny_model(dtype="bfloat16")
  graphdef, params, rest = w.sampler(mesh).decode_layout(model)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  _, master, _ = nnx.split(model, nnx.Param, ...)
  assert {x.dtype for x in jax.tree.leaves(master)} == {jnp.dtype(jnp.float32)}
  settings = sampling._settings(
    model.config,
    max_new_tokens=6,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    num_samples=2,
    eos_token_ids=(2,),
    pad_token_id=0,
  )
  ids, mask = left_pad(w.sampler_prompts(8), pad_id=0)
  args = (jnp.asarray(ids), jnp.asarray(mask), jnp.arange(8, dtype=jnp.int32), jax.random.key(3))
  cast, _ = sampling._generate(graphdef, params, rest, *args, settings=settings)
  full, _ = sampling._generate(graphdef, master, rest, *args, settings=settings)
  np.testing.assert_array_equal(np.asarray(cast.tokens), np.asarray(full.tokens))
  np.testing.assert_array_equal(np.asarray(cast.logps), np.asarray(full.logps))


def test_sampler_argument_errors():
  with pytest.raises(ValueError, match="sampling.batch_size 6 is not divisible by data\\*fsdp = 4"):
    w.sampler(_mesh((1, 4, 1)), batch_size=6)


def test_two_processes_sample_their_share(tmp_path, single_device):
  """2 processes x 4 CPU devices: each samples only its rows of every batch (its half), and
  the gathered samples equal one process's."""
  prompts, _, ref = single_device
  results = w.run_two_processes(str(tmp_path), "--task", "sample")
  assert [r["process_count"] for r in results] == [2, 2]
  # Process i holds rows 4i..4i+3 of each batch of 8 (mesh (2, 2, 2)).
  plan = plan_batches([len(p) for p in prompts], batch_size=8, bucket_size=16)
  for i, r in enumerate(results):
    share = [
      int(x)
      for b in plan
      for j, x in enumerate(b.indices)
      if 4 * i <= j < 4 * i + 4 and j < b.num_real
    ]
    assert r["prompt_index"] == sorted(share)
    assert r["local_rows"] == 2 * len(share)
    np.testing.assert_array_equal(np.array(r["tokens"]), ref.tokens)
    np.testing.assert_allclose(np.array(r["logps"]), ref.logps, atol=1e-5)
    assert r["new_tokens"] == int(ref.mask.sum())


@pytest.mark.parametrize("per_call,temperature", [(4, 1.0), (3, 1.0), (3, 0.0)])
def test_refill_gives_the_samples_of_decoding_in_batches(per_call, temperature):
  """11 prompts x 2 samples = 22 jobs, decoded ``2 * per_call`` rows at a time: with refill
  (rows whose response ended take the next job) every job's tokens, mask and log-probs equal
  those of `generate` on batches of ``per_call`` prompts (the last one filled up with copies
  of its last prompt, as `plan_batches` does) bit for bit, and the tokens and mask those of
  decoding all 22 rows at once (log-probs within float rounding: a step's matmuls have
  another row count). Four EOS tokens of a near-uniform model end responses at many
  lengths, so rows are refilled at many different steps."""
  model = w.tiny_model(0)
  rng = np.random.RandomState(1)
  num = 11
  prompts = [list(rng.randint(6, 64, rng.randint(1, 12))) for _ in range(num)]
  ids, mask = left_pad(prompts, pad_id=0, length=12)
  index = np.arange(num) + 100
  kw = dict(
    max_new_tokens=24,
    temperature=temperature,
    num_samples=2,
    eos_token_ids=(2, 3, 4, 5),
    pad_token_id=0,
  )
  key = jax.random.key(KEY)
  refill = generate(model, ids, mask, key, rows=2 * per_call, prompt_index=index, **kw)
  parts = []
  for start in range(0, num, per_call):
    take = np.minimum(np.arange(start, start + per_call), num - 1)
    gen = generate(model, ids[take], mask[take], key, prompt_index=index[take], **kw)
    real = 2 * min(per_call, num - start)
    parts.append([np.asarray(x)[:real] for x in gen])
  batched = [np.concatenate(x) for x in zip(*parts)]
  every = generate(model, ids, mask, key, prompt_index=index, **kw)
  lengths = np.asarray(every.mask).sum(1)
  if temperature:
    assert len(set(lengths.tolist())) > 5 and lengths.min() < 12, lengths
  for got, want in zip(refill, batched):
    np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(np.asarray(refill.tokens), np.asarray(every.tokens))
  np.testing.assert_array_equal(np.asarray(refill.mask), np.asarray(every.mask))
  np.testing.assert_allclose(np.asarray(refill.logps), np.asarray(every.logps), atol=2e-6)
