"""Tests for ssapo_jax/models/llama.py against transformers' PyTorch models (float32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ssapo_jax.models import Llama, LlamaConfig, load_hf, logical_axes
from ssapo_jax.testing.hf_torch import FAMILIES, save_tiny_hf

LOGICAL_NAMES = {"vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "norm", "layers"}


def _batch(seq=12, vocab=128, seed=0):
  """Three rows: full, left-padded, right-padded (ids 0 on padding)."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab, (3, seq))
  mask = np.ones((3, seq), np.int64)
  mask[1, :4] = 0
  mask[2, -5:] = 0
  ids[mask == 0] = 0
  return ids, mask


def _positions(mask):
  return np.maximum(np.cumsum(mask, -1) - 1, 0)


def _torch_logits(hf, ids, mask):
  with torch.no_grad():
    return hf(
      torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      position_ids=torch.tensor(_positions(mask)),
    ).logits.numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """family -> (hf torch model, our model), built lazily once per module."""
  cache = {}

  def get(family):
    if family not in cache:
      path = tmp_path_factory.mktemp(family)
      hf = save_tiny_hf(path, family)
      cache[family] = (hf, load_hf(path))
    return cache[family]

  return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(tiny, family):
  hf, model = tiny(family)
  ids, mask = _batch()
  ref = _torch_logits(hf, ids, mask)
  out = np.asarray(
    jax.jit(lambda m, i, a: m(i, a))(
      model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    )
  )
  assert out.shape == ref.shape == (3, 12, 128)
  real = mask > 0
  np.testing.assert_array_less(np.abs(out - ref)[real].max(), 1e-4)


def _rebuilt(model, **runtime):
  """``model`` with the same parameters and runtime config fields replaced."""
  config = dataclasses.replace(model.config, **runtime)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


@pytest.mark.parametrize(
  "family",
  [  # interpret mode is slow: one in the default suite
    "qwen2_sliding",
    pytest.param("mistral", marks=pytest.mark.slow),
    pytest.param("llama_mqa_tied_bias", marks=pytest.mark.slow),
  ],
)
def test_splash_attention_logits_match_transformers(tiny, family):
  """attention="splash" (Pallas interpret mode on CPU): sliding, mixed and MQA layers."""
  hf, model = tiny(family)
  ids, mask = _batch()
  ref = _torch_logits(hf, ids, mask)
  splash = _rebuilt(model, attention="splash")
  out = np.asarray(
    jax.jit(lambda m, i, a: m(i, a))(
      splash, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    )
  )
  np.testing.assert_array_less(np.abs(out - ref)[mask > 0].max(), 1e-4)


def test_left_and_right_padding_agree(tiny):
  """The same real tokens give the same logits whichever side the padding is on."""
  _, model = tiny("mistral")
  ids, mask = _batch()
  left = np.zeros_like(ids)
  left_mask = np.zeros_like(mask)
  n = mask[2].sum()
  left[0, -n:] = ids[2, :n]
  left_mask[0, -n:] = 1
  out_right = np.asarray(model(jnp.asarray(ids[2:3]), jnp.asarray(mask[2:3])))[0, :n]
  out_left = np.asarray(model(jnp.asarray(left[:1]), jnp.asarray(left_mask[:1])))[0, -n:]
  np.testing.assert_allclose(out_left, out_right, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sequence_logps_matches_torch_log_softmax(tiny, family):
  hf, model = tiny(family)
  ids, mask = _batch()
  loss_mask = mask.copy()
  loss_mask[:, :6] = 0
  logits = torch.tensor(_torch_logits(hf, ids, mask))
  token = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(ids[:, 1:, None]))[..., 0]
  lm = torch.tensor(loss_mask[:, 1:], dtype=torch.float32)
  ref_sum = (token * lm).sum(-1).numpy()
  ref_avg = ref_sum / lm.sum(-1).numpy()
  args = (jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(loss_mask))
  for chunk in (None, 50, 128):  # 50 does not divide V = 128: padded last chunk
    got = model.sequence_logps(*args, vocab_chunk_size=chunk)
    assert got.dtype == jnp.float32 and got.shape == (3,)
    np.testing.assert_allclose(np.asarray(got), ref_sum, atol=2e-4)
  got = model.sequence_logps(*args, average=True, vocab_chunk_size=48)
  np.testing.assert_allclose(np.asarray(got), ref_avg, atol=2e-5)


def test_sequence_logps_agrees_with_losses_module(tiny):
  from ssapo_jax.losses import sequence_logps

  _, model = tiny("llama")
  ids, mask = _batch()
  loss_mask = mask.copy()
  loss_mask[:, :5] = 0
  logits = model(jnp.asarray(ids), jnp.asarray(mask))
  ref = sequence_logps(logits[:, :-1], jnp.asarray(ids[:, 1:]), jnp.asarray(loss_mask[:, 1:]))
  got = model.sequence_logps(
    jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(loss_mask), vocab_chunk_size=32
  )
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4)


@pytest.mark.parametrize("chunk", [24, None])  # None: V = 128 in one chunk, the plain pass
def test_token_logps_log_sum_sq_matches_numpy(tiny, chunk):
  """WPO's log Σ_v p_v² from the chunked pass equals numpy on the full logits."""
  _, model = tiny("llama")
  ids, mask = _batch()
  logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)), np.float64)[:, :-1]
  logp = (
    logits
    - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    - logits.max(-1, keepdims=True)
  )
  token, log_sum_sq = model.token_logps(
    jnp.asarray(ids), jnp.asarray(mask), vocab_chunk_size=chunk, log_sum_sq=True
  )
  expected_token = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(token), expected_token, atol=1e-4)
  np.testing.assert_allclose(np.asarray(log_sum_sq), np.log(np.exp(2 * logp).sum(-1)), atol=1e-4)


@pytest.mark.parametrize("remat,chunk", [("full", 40), ("dots", 40), ("full", None)])
def test_chunked_logps_gradient_matches_naive(tiny, remat, chunk):
  """Gradients through the chunked/rematerialised path (and the one-chunk pass, chunk None
  with V = 128) equal a plain log_softmax."""
  _, model = tiny("qwen2")
  ids, mask = _batch()
  ids, mask, loss_mask = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(mask)

  def naive(m):
    logp = jax.nn.log_softmax(m(ids, mask)[:, :-1].astype(jnp.float32))
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    return jnp.sum(tok * loss_mask[:, 1:])

  remat_model = _rebuilt(model, remat=remat)
  chunked = lambda m: jnp.sum(m.sequence_logps(ids, mask, loss_mask, vocab_chunk_size=chunk))
  g_ref = nnx.jit(nnx.grad(naive))(model)
  g = nnx.jit(nnx.grad(chunked))(remat_model)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolled_layers_equal_scanned(tiny, remat):
  """``scan_layers=False`` runs the same stacked parameters: equal logits, gradients (of the
  same parameter tree) and KV-cache decoding; mixed sliding/full windows included."""
  _, model = tiny("qwen2_sliding")
  scanned = _rebuilt(model, remat=remat)
  unrolled = _rebuilt(model, remat=remat, scan_layers=False)
  assert jax.tree.structure(nnx.state(unrolled)) == jax.tree.structure(nnx.state(scanned))
  ids, mask = (jnp.asarray(a) for a in _batch())
  np.testing.assert_allclose(
    np.asarray(jax.jit(lambda m: m(ids, mask))(unrolled)),
    np.asarray(jax.jit(lambda m: m(ids, mask))(scanned)),
    atol=1e-5,
  )
  loss = lambda m: jnp.sum(m.sequence_logps(ids, mask, mask))  # noqa: E731
  g_scan, g_unroll = (nnx.jit(nnx.grad(loss))(m) for m in (scanned, unrolled))
  for (path, a), b in zip(jax.tree.leaves_with_path(g_scan), jax.tree.leaves(g_unroll)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, err_msg=str(path))
  prompt = jnp.asarray(ids[:, :6]), jnp.asarray(_positions(np.asarray(mask))[:, :6])
  kv_mask = jnp.zeros((3, 8), jnp.int32).at[:, :6].set(mask[:, :6])
  out = [m.prefill(*prompt, m.init_cache(3, 8), kv_mask=kv_mask) for m in (scanned, unrolled)]
  np.testing.assert_allclose(np.asarray(out[1][0]), np.asarray(out[0][0]), atol=1e-5)
  for a, b in zip(out[0][1], out[1][1]):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2_sliding", "llama3_rope"])
def test_kv_cache_decoding_equals_full_forward(tiny, family):
  _, model = tiny(family)
  ids, mask = _batch(seq=10)
  ids[2] = ids[1]  # left-pad all rows for decoding
  mask[2] = mask[1]
  prefix, total = 6, 10
  full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  cache = model.init_cache(3, total)
  pos = np.asarray(_positions(mask))
  kv_mask = np.zeros((3, total), np.int32)
  kv_mask[:, :prefix] = mask[:, :prefix]
  logits, cache = model.decode(
    jnp.asarray(ids[:, :prefix]),
    jnp.asarray(pos[:, :prefix]),
    cache,
    cache_index=0,
    kv_mask=jnp.asarray(kv_mask),
  )
  steps = [np.asarray(logits)]
  step_fn = jax.jit(lambda m, i, p, c, idx, kv: m.decode(i, p, c, cache_index=idx, kv_mask=kv))
  for t in range(prefix, total):
    kv_mask[:, t] = 1
    logits, cache = step_fn(
      model,
      jnp.asarray(ids[:, t : t + 1]),
      jnp.asarray(pos[:, t : t + 1]),
      cache,
      t,
      jnp.asarray(kv_mask),
    )
    steps.append(np.asarray(logits))
  dec = np.concatenate(steps, axis=1)
  real = mask > 0
  np.testing.assert_array_less(np.abs(dec - full)[real].max(), 1e-5)


def test_bfloat16_compute_close_to_float32(tiny, tmp_path):
  hf, model = tiny("llama")
  hf.save_pretrained(tmp_path)
  bf = load_hf(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(nnx.state(bf, nnx.Param)))
  ids, mask = _batch()
  out = bf(jnp.asarray(ids), jnp.asarray(mask))
  assert out.dtype == jnp.bfloat16
  ref = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  assert np.abs(np.asarray(out, np.float32) - ref)[mask > 0].max() < 0.1
  lp = bf.sequence_logps(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(mask))
  assert lp.dtype == jnp.float32


def test_logical_axes_cover_every_parameter():
  config = LlamaConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
  )
  model = Llama(config, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  axes = logical_axes(state)
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(
    state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  flat_axes = {p: a for p, a in nnx.to_flat_state(axes)}
  flat_params = dict(nnx.to_flat_state(state))
  assert flat_axes.keys() == flat_params.keys()
  for path, var in flat_params.items():
    names = flat_axes[path]
    assert len(names) == var.ndim, path
    assert set(names) <= LOGICAL_NAMES, (path, names)
    if path[0] == "layers":  # stacked: one leading row per decoder layer
      assert names[0] == "layers" and var.shape[0] == config.num_layers, (path, names)
  assert flat_axes[("layers", "attn", "q_proj")] == ("layers", "embed", "q_heads", "head_dim")
  assert flat_axes[("lm_head",)] == ("vocab", "embed")
  assert logical_axes(model) == axes


def test_config_from_hf_and_back():
  import transformers

  from ssapo_jax.testing.hf_torch import tiny_hf_config

  for family in FAMILIES:
    hf_config = tiny_hf_config(family)
    config = LlamaConfig.from_hf(hf_config)
    again = LlamaConfig.from_hf(config.to_hf_dict())
    assert again == config, family
    reloaded = transformers.AutoConfig.for_model(**config.to_hf_dict())
    assert LlamaConfig.from_hf(reloaded) == config
  # Old-style config.json (rope_theta and rope_scaling at top level), as Llama-3.1 ships.
  old = dict(
    model_type="llama",
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    rope_scaling=dict(
      rope_type="llama3",
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=8192,
    ),
    eos_token_id=[128001, 128009],
  )
  config = LlamaConfig.from_hf(old)
  assert config.rope_theta == 500000.0 and config.rope_type == "llama3"
  assert dict(config.rope_scaling)["original_max_position_embeddings"] == 8192
  assert config.eos_token_ids == (128001, 128009) and config.head_dim == 8
  hash(config)


def test_config_errors():
  with pytest.raises(ValueError, match="model_type"):
    LlamaConfig.from_hf(dict(model_type="gpt2", vocab_size=8))
  with pytest.raises(ValueError, match="yarn"):
    LlamaConfig.from_hf(
      dict(
        model_type="qwen2",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=32),
      )
    )
  with pytest.raises(ValueError, match="num_kv_heads"):
    LlamaConfig(
      vocab_size=8,
      hidden_size=8,
      intermediate_size=8,
      num_layers=1,
      num_heads=3,
      num_kv_heads=2,
      head_dim=4,
    )
  with pytest.raises(ValueError, match="remat"):
    LlamaConfig(
      vocab_size=8,
      hidden_size=8,
      intermediate_size=8,
      num_layers=1,
      num_heads=2,
      num_kv_heads=2,
      head_dim=4,
      remat="sometimes",
    )
