"""Tests for ssapo_jax/sampling.py against transformers' generate and numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch

from ssapo_jax.models import load_hf
from ssapo_jax.models.testing import save_tiny_hf
from ssapo_jax.sampling import SamplingConfig, decode, filter_logits, generate

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
    ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=10,
                      do_sample=False, eos_token_id=[EOS, 9], pad_token_id=0)[:, 7:].numpy()
  g = generate(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
               max_new_tokens=10, temperature=0.0, eos_token_ids=(EOS, 9), pad_token_id=0)
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
  g = generate(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(1),
               max_new_tokens=8, temperature=1.0, num_samples=2)
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
  g = generate(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
               max_new_tokens=5, temperature=0.0, num_samples=2)
  g1 = generate(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
                max_new_tokens=5, temperature=0.0, num_samples=1)
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
  g = generate(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(7),
               max_new_tokens=6, temperature=0.8, top_k=top_k, top_p=top_p, num_samples=4,
               eos_token_ids=())
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
      np.testing.assert_array_equal(out[r][np.isfinite(out[r])],
                                    logits[r][np.isfinite(out[r])])


def test_decode_stops_at_eos(tmp_path):
  from ssapo_jax.models.tokenizer import build_test_tokenizer
  tok = build_test_tokenizer(tmp_path, ["hello", "world", "again"])
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
    generate(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), max_new_tokens=2,
             top_p=0.0)
  with pytest.raises(ValueError, match="sampling.top_k"):
    SamplingConfig(top_k=-1)
  cfg = SamplingConfig(temperature=0.0, max_new_tokens=3, num_samples=1)
  g = generate(model, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
               **cfg.generate_kwargs())
  assert g.tokens.shape == (3, 3)


def test_sharded_model_samples_the_same_with_prompts_split_over_the_batch_axes(models):
  """With the parameters on a mesh the prompts (so the KV cache) split over (data, fsdp):
  the same greedy tokens, and a smaller per-device working set than replicated prompts."""
  from flax import nnx
  from ssapo_jax import sampling
  from ssapo_jax import sharding as shd
  from ssapo_jax import train as tr
  _, model = models
  rng = np.random.RandomState(4)
  ids = rng.randint(3, 128, (8, 7))
  mask = np.ones_like(ids)
  kw = dict(max_new_tokens=6, temperature=0.0, eos_token_ids=(EOS,), pad_token_id=0)
  ref = generate(model, ids, mask, jax.random.key(0), **kw)
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  sharded = nnx.merge(graphdef, shd.shard_params(params, tr.param_shardings(params, mesh)), rest)
  got = generate(sharded, ids, mask, jax.random.key(0), **kw)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
  graphdef, state = nnx.split(sharded)
  spec = sampling.prompt_sharding(state, 8)
  assert spec.spec == jax.sharding.PartitionSpec("fsdp", None)

  def temp_bytes(prompt_sharding):
    prompts = jax.ShapeDtypeStruct(ids.shape, jnp.int32, sharding=prompt_sharding)
    compiled = sampling._generate.lower(graphdef, state, prompts, prompts, jax.random.key(0),
                                        num_samples=1, top_p=1.0, top_k=0, **kw).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  assert temp_bytes(spec) < temp_bytes(replicated)
