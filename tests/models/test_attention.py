"""Tests for ssapo_jax/models/attention.py: the fused kernels against the xla einsum path.

Splash runs in Pallas interpret mode on CPU; the cuDNN call is checked through the same
``jax.nn.dot_product_attention`` call with ``implementation="xla"`` (masks, window, GQA), since
cuDNN itself needs a GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssapo_jax import sharding as shd
from ssapo_jax.models import attention as attn


def _inputs(*, batch=3, seq=40, heads=4, kv_heads=2, head_dim=16, seed=0):
  """q, k, v and a key mask with a full row, a left-padded row and a right-padded row."""
  rng = np.random.RandomState(seed)
  q = rng.randn(batch, seq, heads, head_dim).astype(np.float32)
  k = rng.randn(batch, seq, kv_heads, head_dim).astype(np.float32)
  v = rng.randn(batch, seq, kv_heads, head_dim).astype(np.float32)
  mask = np.ones((batch, seq), np.int32)
  mask[1 % batch, :7] = 0  # left padding
  mask[2 % batch, -9:] = 0  # right padding
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)


def _reference(q, k, v, mask, window):
  slots = jnp.arange(q.shape[1])
  return attn.attention(
    q, k, v, q_slots=slots, k_slots=slots, kv_mask=mask, window=window, implementation="xla"
  )


def _check_against_xla(fused, q, k, v, mask, window, *, atol=2e-5):
  """Outputs on real queries and the gradients of a weighted sum of them agree."""
  weights = jnp.asarray(np.random.RandomState(1).randn(*q.shape).astype(np.float32))
  weights = weights * mask[:, :, None, None]  # padding queries are unspecified

  def loss(f, q, k, v):
    return jnp.sum(f(q, k, v, mask, window) * weights)

  out, ref = (
    jax.jit(fused, static_argnums=4)(q, k, v, mask, window),
    _reference(q, k, v, mask, window),
  )
  real = np.asarray(mask) > 0
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=atol)
  grads = jax.jit(jax.grad(functools.partial(loss, fused), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.grad(functools.partial(loss, _reference), argnums=(0, 1, 2))(q, k, v)
  for g, r, name in zip(grads, ref_grads, "qkv"):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=atol, err_msg=name)


CASES = [  # (window, heads, kv_heads)
  (None, 4, 2),  # causal, GQA
  (5, 4, 2),  # sliding window, GQA
  (None, 4, 4),  # multi-head
  (3, 4, 1),  # sliding window, one kv head
]
# Interpret-mode splash is slow on CPU: two cases in the default suite, all with -m slow.
_SLOW = pytest.mark.slow
SPLASH_CASES = [
  CASES[0],
  pytest.param(*CASES[1], marks=_SLOW),
  pytest.param(*CASES[2], marks=_SLOW),
  CASES[3],
]


@pytest.mark.parametrize("window,heads,kv_heads", SPLASH_CASES)
def test_splash_matches_xla(window, heads, kv_heads):
  q, k, v, mask = _inputs(heads=heads, kv_heads=kv_heads)
  _check_against_xla(attn.splash_attention, q, k, v, mask, window)


@pytest.mark.parametrize("window,heads,kv_heads", CASES)
def test_jax_nn_attention_call_matches_xla(window, heads, kv_heads):
  q, k, v, mask = _inputs(heads=heads, kv_heads=kv_heads)
  fused = functools.partial(attn.jax_nn_attention, implementation="xla")
  _check_against_xla(fused, q, k, v, mask, window)


def test_splash_under_mesh_shards_batch_and_heads():
  """Under `jax.set_mesh` the kernel runs in shard_map (batch over data/fsdp, heads over
  tensor) and still equals the unsharded xla path."""
  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
  q, k, v, mask = _inputs(batch=4, heads=4, kv_heads=2)
  with jax.set_mesh(mesh):
    _check_against_xla(attn.splash_attention, q, k, v, mask, 6)
    lowered = jax.jit(attn.splash_attention, static_argnums=4).lower(q, k, v, mask, None)
  assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()


@pytest.mark.slow
def test_splash_on_multiple_blocks():
  """A sequence longer than one kernel block (block 512 after padding to 1,024)."""
  q, k, v, mask = _inputs(batch=2, seq=600, heads=2, kv_heads=1, head_dim=8)
  out = jax.jit(attn.splash_attention, static_argnums=4)(q, k, v, mask, 200)
  ref = _reference(q, k, v, mask, 200)
  real = np.asarray(mask) > 0
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5)


def test_splash_targets_the_context_meshs_platform():
  """Under a mesh of TPU devices ``auto`` picks splash and the kernel lowers for the TPU
  (Mosaic), even when the host that traces it is a CPU: `ssapo-plan` compiles for a topology from a CPU machine, and
  interpret mode there would plan an emulation's loops instead of the kernel."""
  from jax._src.mesh import AbstractDevice, AbstractMesh  # no public constructor in JAX 0.10

  tpu = AbstractMesh(
    (2,),
    ("fsdp",),
    abstract_device=AbstractDevice(device_kind="TPU v5", num_cores=None, platform="tpu"),
  )
  with jax.sharding.use_abstract_mesh(tpu):
    assert attn._target_platform() == "tpu"
    assert attn.resolve_implementation("auto", jnp.bfloat16) == "splash"  # what the TPU runs
  assert attn._target_platform() == jax.default_backend() == "cpu"
  assert attn.resolve_implementation("auto", jnp.bfloat16) == "xla"


def test_resolve_implementation():
  resolve = attn.resolve_implementation
  assert resolve("auto", jnp.float32, "cpu") == "xla"
  assert resolve("auto", jnp.bfloat16, "tpu") == "splash"
  assert resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert resolve("auto", jnp.float32, "gpu") == "xla"
  assert resolve("splash", jnp.float32, "cpu") == "splash"
  with pytest.raises(ValueError, match="bfloat16/float16"):
    resolve("cudnn", jnp.float32, "gpu")
  with pytest.raises(ValueError, match="attention must be one of"):
    resolve("flash", jnp.float32, "gpu")
  q, k, v, mask = _inputs()
  with pytest.raises(ValueError, match="KV cache"):
    attn.attention(
      q,
      k[:, :20],
      v[:, :20],
      q_slots=jnp.arange(40),
      k_slots=jnp.arange(20),
      kv_mask=mask[:, :20],
      window=None,
      implementation="splash",
    )


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("block", [8, 12, 40])
@pytest.mark.parametrize("first,num", [(0, 40), (29, 3), (35, 1), (3, 1)])
def test_cached_attention_equals_xla(window, block, first, num):
  """New queries at slots ``first .. first + num - 1`` over layer 1 of a stacked cache of 40
  slots, read in blocks (8: five; 12: the last overlapping its predecessor; 40: no loop), equal
  the xla path over the whole cache. Slots after the last query hold large finite garbage
  (masked), and NaN from the block after the last query's on (never read: a read NaN value
  would poison the sums); row 0 is a packed row of two segments."""
  q, k, v, mask = _inputs(seq=40)
  mask = jnp.asarray(np.asarray(mask)).at[0, 20:].set(2)
  slots = jnp.arange(first, first + num)
  last = first + num - 1
  s = jnp.arange(40)[None, None, :, None]  # the slot axis of [B, K, S, H]
  unread = s >= (last // block + 1) * block if block < 40 else s > 40
  garbage = lambda x: jnp.where(unread, jnp.nan, jnp.where(s > last, 1e30, x))
  other = lambda x: jnp.full_like(x, jnp.nan)  # layers 0 and 2
  keys, values = (
    jnp.stack([other(x), garbage(x), other(x)])
    for x in (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
  )
  fn = jax.jit(functools.partial(attn.cached_attention, window=window, block_size=block))
  out, keys_back, values_back = fn(q[:, slots], keys, values, layer=1, q_slots=slots, kv_mask=mask)
  ref = attn.attention(
    q[:, slots],
    k,
    v,
    q_slots=slots,
    k_slots=jnp.arange(40),
    kv_mask=mask,
    window=window,
    implementation="xla",
  )
  real = np.asarray(mask[:, slots]) > 0
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5)
  for back, sent in ((keys_back, keys), (values_back, values)):  # returned as it came
    np.testing.assert_array_equal(np.asarray(back), np.asarray(sent))
