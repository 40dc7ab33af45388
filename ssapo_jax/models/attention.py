"""Causal grouped-query attention behind one signature, with a kernel chosen per backend.

`attention` computes ``softmax(q k^T / sqrt(H) + mask) v`` for one decoder layer. The
implementation is `LlamaConfig.attention`:

* ``"xla"``: einsums with float32 ``[B, K, G, T, S]`` scores (the reference; the CPU default,
  and the only one that runs against a KV cache, where queries and keys differ in length).
  With ``query_chunk_size`` the queries run in chunks of that many (a ``lax.map``), so only
  ``[B, K, G, chunk, S]`` scores exist at a time; each query's row is computed as unchunked.
* ``"splash"``: TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``),
  causal or sliding-window, padding through segment ids, under ``shard_map`` over the batch
  axes (and heads over ``tensor``) of the context mesh (``jax.set_mesh``). Elsewhere it runs in
  Pallas interpret mode, which is slow and only for tests.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU; bfloat16/float16).
* ``"auto"``: splash on TPU, cudnn on GPU with a 16-bit compute dtype, xla otherwise.

Decoding against a KV cache goes through `cached_attention` whatever the implementation: an
online softmax over blocks of `DECODE_KEY_BLOCK` cache slots, in a loop that stops at the last
written slot, so a step's attention costs what the filled part of the cache holds, not what
it was allocated for.

Shape letters as in ``models/llama.py``: B batch, T queries, S keys, N query heads, K kv heads,
G = N // K, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ssapo_jax import sharding as shd

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
# `cached_attention` reads the cache in blocks of this many slots (the last block of a cache
# whose length is not a multiple of it overlaps the one before, its repeated slots masked).
DECODE_KEY_BLOCK = 128
# Splash tiles the sequence in blocks of this many tokens (a multiple of the TPU lane width);
# shorter or ragged sequences are padded up to a multiple of it.
_SPLASH_BLOCK = 512
_SPLASH_MIN_BLOCK = 128


def _target_platform() -> str:
  """The platform the traced program is for: the context mesh's devices, else the default
  backend. They differ when a CPU host compiles for a TPU topology (`ssapo-plan`), where the
  kernel must lower to Mosaic, not to interpret mode's XLA loops."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return getattr(device, "platform", None) or jax.default_backend()


def resolve_implementation(name: str, dtype, backend: str | None = None) -> str:
  """The concrete implementation for ``name`` (`IMPLEMENTATIONS`) on ``backend`` (default: the
  platform the traced program is for, `_target_platform`).

  Raises:
    ValueError: an unknown name, or ``cudnn`` with a compute dtype it does not support.
  """
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {name!r}")
  backend = backend or _target_platform()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if name == "auto":
    return "splash" if backend == "tpu" else "cudnn" if backend == "gpu" and half else "xla"
  if name == "cudnn" and not half:
    raise ValueError(
      f"attention='cudnn' needs a bfloat16/float16 compute dtype, got {jnp.dtype(dtype).name}"
    )
  return name


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  q_slots: jax.Array,
  k_slots: jax.Array,
  kv_mask: jax.Array,
  window: int | None,
  implementation: str = "xla",
  query_chunk_size: int | None = None,
) -> jax.Array:
  """Causal (optionally sliding-window) attention over real keys.

  Args:
    q: ``[B, T, N, H]`` queries (RoPE applied), compute dtype.
    k, v: ``[B, S, K, H]`` keys and values.
    q_slots: ``[T]`` int, index of each query in the (cached) sequence.
    k_slots: ``[S]`` int, index of each key.
    kv_mask: ``[B, S]`` segment id of each key: 0 on padding, > 0 on real tokens (1 for a
      plain row; 1, 2, ... for the sequences of a packed row). A query attends only keys of
      its own segment, the id at its slot ``kv_mask[:, q_slots]`` (a no-op for 0/1 masks).
    window: keys with ``q_slot - k_slot >= window`` are masked; None = full causal.
    implementation: ``"xla"``, ``"splash"`` or ``"cudnn"`` (already resolved). splash and
      cudnn need self-attention (``S == T`` and ``q_slots == k_slots == arange(T)``).
    query_chunk_size: ``xla`` only: compute the queries in chunks of this many (None = all
      at once); the fused kernels tile on their own.

  Returns:
    ``[B, T, N, H]`` in the dtype of ``q``. Rows of padding queries are unspecified
    (they differ between implementations); rows of real queries agree.
  """
  if implementation == "xla":
    if query_chunk_size and q.shape[1] > query_chunk_size:
      return _chunked_xla_attention(
        q, k, v, q_slots, k_slots, kv_mask, window, int(query_chunk_size)
      )
    return _xla_attention(q, k, v, q_slots, k_slots, kv_mask, window)
  if q.shape[1] != k.shape[1]:
    raise ValueError(
      f"attention={implementation!r} needs self-attention (T == S), got "
      f"T={q.shape[1]}, S={k.shape[1]}; use 'xla' with a KV cache"
    )
  if implementation == "splash":
    return splash_attention(q, k, v, kv_mask, window)
  if implementation == "cudnn":
    return jax_nn_attention(q, k, v, kv_mask, window, implementation="cudnn")
  raise ValueError(f"unknown attention implementation {implementation!r}")


def _xla_attention(q, k, v, q_slots, k_slots, kv_mask, window):
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * (h**-0.5)
  allowed = k_slots[None, :] <= q_slots[:, None]  # [T, S] causal
  if window is not None:
    allowed &= k_slots[None, :] > q_slots[:, None] - window
  allowed = allowed[None, :, :] & (kv_mask[:, None, :] > 0)  # [B, T, S]
  # Packed rows: block-diagonal by segment (a query's segment is the id at its own slot).
  allowed &= jnp.take(kv_mask, q_slots, axis=1)[:, :, None] == kv_mask[:, None, :]
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)


def _chunked_xla_attention(q, k, v, q_slots, k_slots, kv_mask, window, chunk):
  """`_xla_attention` over query chunks of ``chunk`` (T padded up to a multiple of it).

  A ``lax.map`` (a loop, not a vmap) so only one chunk's ``[B, K, G, chunk, S]`` float32 scores
  are live; the padded queries (slot -1: no key allowed) are dropped.
  """
  b, t, n, h = q.shape
  num = -(-t // chunk)
  pad = num * chunk - t
  q = jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0)])
  q_slots = jnp.pad(q_slots, (0, pad), constant_values=-1)
  qc = jnp.moveaxis(q.reshape(b, num, chunk, n, h), 1, 0)  # [num, B, chunk, N, H]
  out = jax.lax.map(
    lambda a: _xla_attention(a[0], k, v, a[1], k_slots, kv_mask, window),
    (qc, q_slots.reshape(num, chunk)),
  )
  return jnp.moveaxis(out, 0, 1).reshape(b, num * chunk, n, h)[:, :t]


def cached_attention(
  q: jax.Array,
  keys: jax.Array,
  values: jax.Array,
  *,
  layer: jax.Array | int,
  q_slots: jax.Array,
  kv_mask: jax.Array,
  window: int | None,
  block_size: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Causal attention of new queries over a stacked KV cache, reading only the slots a query
  can attend (flash-decoding: an online softmax over key blocks).

  Args:
    q: ``[B, T, N, H]`` queries (RoPE applied), compute dtype.
    keys, values: ``[L, B, K, S, H]`` the stacked cache, already holding the queries' own keys.
    layer: int scalar (may be traced), the layer whose ``[B, K, S, H]`` slice is read.
    q_slots: ``[T]`` int, the queries' slots (consecutive: ``q_slots[0] + arange(T)``), or
      ``[B, T]``: each row's own.
    kv_mask: ``[B, S]`` segment ids as in `attention` (0 on padding and unwritten slots).
    window: keys with ``q_slot - k_slot >= window`` are masked; None = full causal.
    block_size: slots per block (default `DECODE_KEY_BLOCK`, at most ``S``).

  Blocks ``lo .. hi - 1`` are read in a ``fori_loop`` whose bounds are traced: ``hi`` ends at
  the last query's slot (later slots are masked by causality) and, with a window, ``lo``
  starts at the first slot in the window (over all rows, with per-row slots). A block with
  no allowed key for a query adds exactly nothing to its sums, so a row's result does not
  depend on how many blocks the other rows make the loop run. Each block is sliced from the cache where it lies
  (its ``[B, K, blk, H]`` layout is the einsums' operand layout: no transpose, no copy of the
  layer's slice). Scores and the running sums are float32; the result equals `attention`'s
  ``xla`` path up to float rounding (the sums run in another order).

  Returns:
    ``(out [B, T, N, H]`` in the dtype of ``q``, ``keys``, ``values)``: the cache comes back
    unchanged, threaded through the loop. Using the returned cache (not the argument) after
    the call is what keeps a decode step in place: a loop that only reads a buffer still
    used after it makes XLA copy the whole cache into the loop first.
  """
  _, b, kh, s, h = keys.shape
  t, n = q.shape[1], q.shape[2]
  g = n // kh
  blk = min(int(block_size or DECODE_KEY_BLOCK), s)
  qg = q.reshape(b, t, kh, g, h)
  scale = h**-0.5
  q_slots = jnp.broadcast_to(q_slots, (b, t))  # [B, T]
  first, last = jnp.min(q_slots), jnp.max(q_slots)
  hi = jnp.minimum(last // blk + 1, -(-s // blk))
  lo = 0 if window is None else jnp.maximum(first - window + 1, 0) // blk
  own_segment = jnp.take_along_axis(kv_mask, q_slots, axis=1)  # [B, T]
  neg = jnp.finfo(jnp.float32).min

  def body(j, carry):
    run_max, run_sum, acc, keys, values = carry
    start = jnp.minimum(j * blk, s - blk)  # the last block may overlap its predecessor
    read = lambda c: jax.lax.dynamic_slice(c, (layer, 0, 0, start, 0), (1, b, kh, blk, h))[0]
    k, v = read(keys).astype(q.dtype), read(values).astype(q.dtype)
    slots = start + jnp.arange(blk)
    seg = jax.lax.dynamic_slice_in_dim(kv_mask, start, blk, axis=1)  # [B, blk]
    qs = q_slots[:, :, None]
    allowed = (slots <= qs) & (slots >= j * blk)  # [B, T, blk]
    if window is not None:
      allowed &= slots > qs - window
    allowed &= (seg[:, None, :] > 0) & (own_segment[:, :, None] == seg[:, None, :])
    allowed = allowed[:, None, None]  # [B, 1, 1, T, blk]
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed, scores, neg)
    new_max = jnp.maximum(run_max, jnp.max(scores, axis=-1))
    p = jnp.where(allowed, jnp.exp(scores - new_max[..., None]), 0.0)
    correction = jnp.exp(run_max - new_max)
    run_sum = run_sum * correction + jnp.sum(p, axis=-1)
    pv = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(q.dtype), v, preferred_element_type=jnp.float32)
    return new_max, run_sum, acc * correction[..., None] + pv, keys, values

  init = (
    jnp.full((b, kh, g, t), neg, jnp.float32),
    jnp.zeros((b, kh, g, t), jnp.float32),
    jnp.zeros((b, kh, g, t, h), jnp.float32),
    keys,
    values,
  )
  if blk == s:  # one block: no loop (XLA would hoist its read out of one, then copy the cache)
    _, run_sum, acc, keys, values = body(0, init)
  else:
    _, run_sum, acc, keys, values = jax.lax.fori_loop(lo, hi, body, init)
  out = jnp.where(run_sum[..., None] > 0, acc / run_sum[..., None], 0.0)  # no key: a padding query
  out = jnp.einsum("BKGTH->BTKGH", out).reshape(b, t, n, h).astype(q.dtype)
  return out, keys, values


def jax_nn_attention(q, k, v, kv_mask, window, *, implementation: str):
  """Self-attention through ``jax.nn.dot_product_attention`` (``implementation`` "cudnn" or
  "xla"; the latter checks the masks on CPU). Shapes as `attention`."""
  # Packed rows: a block-diagonal mask by segment id (cuDNN takes it as a dense mask input;
  # jax.nn.dot_product_attention exposes no segment ids).
  mask = (kv_mask[:, None, None, :] > 0) & (
    kv_mask[:, None, :, None] == kv_mask[:, None, None, :]
  )  # [B, 1, T, S]
  return jax.nn.dot_product_attention(
    q,
    k,
    v,
    mask=mask,
    scale=q.shape[-1] ** -0.5,
    is_causal=True,
    local_window_size=None if window is None else (window - 1, 0),
    implementation=implementation,
  )


# ----------------------------------------------------------------------------- splash


@functools.lru_cache(maxsize=64)
def _splash_kernel(seq_len: int, num_heads: int, window: int | None, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  shape = (seq_len, seq_len)
  if window is None:
    mask = splash.CausalMask(shape)
  else:
    mask = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  block = min(_SPLASH_BLOCK, seq_len)
  sizes = splash.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  return splash.make_splash_mha(
    splash.MultiHeadMask([mask] * num_heads),
    block_sizes=sizes,
    head_shards=1,
    q_seq_shards=1,
    interpret=interpret,
  )


def _splash_local(q, k, v, segment_ids, window, interpret):
  """Splash on one device's block: q ``[b, T, n, H]``, k/v ``[b, T, k, H]``, ids ``[b, T]``."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  t = q.shape[1]
  with jax.ensure_compile_time_eval():  # the kernel's mask tables are constants, cached
    kernel = _splash_kernel(t, q.shape[2], window, interpret)
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q * scale, k, v))  # [b, heads, T, H]
  ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
  out = jax.vmap(kernel)(qt, kt, vt, segment_ids=ids)
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def splash_attention(q, k, v, kv_mask, window):
  """Splash self-attention; the segment ids are ``kv_mask`` (0 padding, 1 or the packed
  sequence's id on real tokens). Shapes as `attention`.

  The sequence is padded to a multiple of the kernel block. Under a context mesh with
  ``data``/``fsdp``/``tensor`` axes the kernel runs in ``shard_map``: batch over the batch axes
  and heads over ``tensor`` where they divide (`ssapo_jax.sharding.logical_to_spec`).
  """
  t = q.shape[1]
  block = _SPLASH_MIN_BLOCK if t <= _SPLASH_BLOCK else _SPLASH_BLOCK
  padded = -(-t // block) * block
  segment_ids = kv_mask.astype(jnp.int32)  # packed rows: one id per sequence
  if padded != t:
    pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2))
    q, k, v, segment_ids = pad(q), pad(k), pad(v), pad(segment_ids)
  fn = functools.partial(_splash_local, window=window, interpret=_target_platform() != "tpu")
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1 and set(shd.MESH_AXES) <= set(mesh.axis_names):
    q_spec = shd.logical_to_spec(("batch", None, "q_heads", None), q.shape, mesh)
    k_spec = shd.logical_to_spec(("batch", None, "kv_heads", None), k.shape, mesh)
    if q_spec[2] != k_spec[2]:  # heads must split alike to keep each group with its kv head
      q_spec = k_spec = PartitionSpec(q_spec[0], None, None, None)
    ids_spec = PartitionSpec(q_spec[0], None)
    fn = jax.shard_map(
      fn, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, ids_spec), out_specs=q_spec, check_vma=False
    )
  return fn(q, k, v, segment_ids)[:, :t]
