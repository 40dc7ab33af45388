"""The KV-cache paths of ssapo_jax/models/llama.py as compiled: the decode step updates the
cache in place (no cache-sized copy, bytes per step linear in depth) and the prefill keeps no
``[rows, heads, P, P + N]`` scores and no logits but the last position's.

The compiled checks read the optimised HLO text and XLA's cost/memory analysis of one program
(CPU here; the TPU compile of the same programs is in the slow libtpu suite).
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssapo_jax import sampling
from ssapo_jax.models import Llama, LlamaConfig, load_hf
from ssapo_jax.models import attention as attn
from ssapo_jax.models import llama as llama_mod
from ssapo_jax.models.llama import positions_from_mask
from ssapo_jax.testing.hf_torch import save_tiny_hf

# B rows, S cache slots: a cache [L, 3, 40, 2, 8] float32 is 3840 * L elements.
B, S = 3, 40


def _config(num_layers, **kw):
  return LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=num_layers,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    **kw,
  )


def _computations(hlo: str) -> dict[str, str]:
  """Name -> text of each computation of an HLO module's text."""
  out, name = {}, None
  for line in hlo.splitlines():
    m = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      name, out[m.group(1)] = m.group(1), ""
    elif name is not None:
      out[name] += line + "\n"
  return out


def _moves(hlo: str, *, in_loops: bool = False) -> list[tuple[str, int]]:
  """``(op, elements)`` of every copy and transpose in an HLO module's text (fused ones too);
  with ``in_loops``, only those a while loop's body runs (through the computations it calls).
  """
  comps = _computations(hlo)
  if in_loops:
    todo = [b for text in comps.values() for b in re.findall(r"body=%?([\w.\-]+)", text)]
    seen = set()
    while todo:
      name = todo.pop()
      if name in seen or name not in comps:
        continue
      seen.add(name)
      todo += [c for c in re.findall(r"%([\w.\-]+)", comps[name]) if c in comps]
    assert seen, "no while loop in the program"
    hlo = "".join(comps[n] for n in seen)
  out = []
  for m in re.finditer(r"= \w+\[([\d,]*)\]\S* (copy|transpose)\(", hlo):
    dims = [int(d) for d in m.group(1).split(",") if d]
    out.append((m.group(2), math.prod(dims)))
  return out


def _compiled_step(num_layers, devices=None):
  """One jitted decode step (one token per row, cache donated), from abstract parameters."""
  model = nnx.eval_shape(lambda: Llama(_config(num_layers), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  cache = jax.eval_shape(lambda: model.init_cache(B, S))

  def step(state, cache, token, pos, index, kv_mask):
    return nnx.merge(graphdef, state).decode(token, pos, cache, cache_index=index, kv_mask=kv_mask)

  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  args = (state, cache, ints(B, 1), ints(B, 1), ints(), ints(B, S))
  if devices is not None:  # a TPU topology: place everything on its first chip
    one = jax.sharding.SingleDeviceSharding(devices[0])
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), args)
  return jax.jit(step, donate_argnums=1).lower(*args).compile()


def _check_in_place(devices=None):
  layers = (2, 8)
  compiled = {n: _compiled_step(n, devices) for n in layers}
  for n, c in compiled.items():
    cache_elements = n * B * S * 2 * 8
    moves = _moves(c.as_text(), in_loops=True)
    big = [(op, e) for op, e in moves if e >= cache_elements]
    assert not big, f"{n} layers: the step moves cache-sized buffers {big}"
    if devices is None:  # nor a layer's keys or values (the einsums before blocks did)
      assert max(e for _, e in moves) < cache_elements // n, moves
    # The returned cache is the donated one (keys and values, float32).
    assert c.memory_analysis().alias_size_in_bytes >= 2 * 4 * cache_elements
  if devices is not None:
    # TPU: the bytes XLA's analysis reports for these tiny shapes are dominated by padding
    # to (8, 128) tiles and vary with fusion; the copy and alias checks above are the test.
    return
  # The scan body runs once per layer, and XLA's CPU analysis counts it once: a body that
  # does not grow with depth means bytes per step linear in depth (the old body copied the
  # whole cache, so its bytes grew with depth and a step's with depth squared).
  layer_bytes = 2 * 4 * B * S * 2 * 8  # one layer's keys and values
  bytes_ = {n: c.cost_analysis()["bytes accessed"] for n, c in compiled.items()}
  temp = {n: c.memory_analysis().temp_size_in_bytes for n, c in compiled.items()}
  assert bytes_[8] - bytes_[2] < layer_bytes, bytes_
  assert temp[8] - temp[2] < layer_bytes, temp


@pytest.mark.parametrize("block", [128, 8])
def test_decode_step_updates_the_cache_in_place(monkeypatch, block):
  """Blocks of 128 slots: the 40-slot cache is one block (no loop); of 8: five, read in a
  loop whose trip count is traced (the block reads stay inside it, the cache is not copied)."""
  monkeypatch.setattr(attn, "DECODE_KEY_BLOCK", block)
  _check_in_place()


@pytest.mark.parametrize("block,rows", [(128, 0), (8, 0), (128, 4), (8, 4)])
def test_sampling_loop_moves_no_cache_sized_buffer(monkeypatch, block, rows):
  """The sampler's loops (the prefill's and the decode steps' scans over the layers) copy no
  buffer of the cache's size; the old cached layer copied it 4 times per layer. ``rows`` 4:
  the refill loop (4 rows in flight for 6 jobs: per-row cache slots, refill prefills)."""
  monkeypatch.setattr(attn, "DECODE_KEY_BLOCK", block)
  model = nnx.eval_shape(lambda: Llama(_config(4), rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  settings = sampling._settings(
    model.config,
    max_new_tokens=24,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    num_samples=2,
    eos_token_ids=(2,),
    pad_token_id=0,
    rows=rows,
  )
  ids = jax.ShapeDtypeStruct((3, 16), jnp.int32)
  index = jax.ShapeDtypeStruct((3,), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  hlo = (
    sampling._generate.lower(graphdef, params, rest, ids, ids, index, key, settings=settings)
    .compile()
    .as_text()
  )
  cache_elements = 4 * (rows or 6) * (16 + 24) * 2 * 8  # [L, rows, K, P + N, H]
  moves = _moves(hlo, in_loops=True)
  assert moves  # the prefill's attention transposes its scores
  assert max(e for _, e in moves) < cache_elements, moves


@pytest.mark.slow
@pytest.mark.parametrize("block", [128, 8])
def test_decode_step_updates_the_cache_in_place_on_tpu(monkeypatch, block):
  """The same step compiled for a TPU chip (v5e, ahead of time through libtpu): no cache-sized
  copy or transpose in its loop, and the donated cache is the returned one. (The TPU compile
  of the old read-before-write layer had no such copy either: the copies were CPU's.)"""
  from ssapo_jax import plan

  if not plan.libtpu_available():
    pytest.skip('libtpu is not installed (pip install -e ".[tpu]")')
  monkeypatch.setattr(attn, "DECODE_KEY_BLOCK", block)
  _check_in_place(plan.topology_devices(plan.tpu_slice("v5litepod-8")))


# ----------------------------------------------------------------------------- prefill


def _prompts(prompt, total, vocab=128, seed=0):
  """Three rows of ``total`` tokens whose first ``prompt`` are left-padded (ids 0 on padding)."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab, (3, total))
  mask = np.ones((3, total), np.int64)
  mask[1, :4] = 0
  mask[2, : prompt - 1] = 0  # a one-token prompt
  ids[mask == 0] = 0
  return ids, mask


@pytest.mark.parametrize(
  "family,chunk",
  [
    ("llama", 4),
    ("qwen2_sliding", 4),
    pytest.param("mistral", 4, marks=pytest.mark.slow),
    pytest.param("llama", 256, marks=pytest.mark.slow),
  ],
)
def test_prefill_equals_full_forward(tmp_path, monkeypatch, family, chunk):
  """Prefill's last-position logits and its cache (read back through decode steps) equal the
  full forward; chunk 4 splits the 10 queries into 3 chunks, one padded, across windows."""
  monkeypatch.setattr(llama_mod, "PREFILL_QUERY_CHUNK", chunk)
  save_tiny_hf(tmp_path, family, seed=1)
  model = load_hf(tmp_path)
  prompt, total = 10, 13
  ids, mask = _prompts(prompt, total)
  full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
  kv_mask = np.zeros((3, total), np.int32)
  kv_mask[:, :prompt] = mask[:, :prompt]
  logits, cache = jax.jit(lambda m, i, p, kv: m.prefill(i, p, m.init_cache(3, total), kv_mask=kv))(
    model, jnp.asarray(ids[:, :prompt]), jnp.asarray(pos[:, :prompt]), jnp.asarray(kv_mask)
  )
  assert logits.shape == (3, model.config.vocab_size)
  np.testing.assert_allclose(np.asarray(logits), full[:, prompt - 1], atol=1e-5)
  step_fn = jax.jit(lambda m, i, p, c, t, kv: m.decode(i, p, c, cache_index=t, kv_mask=kv))
  for t in range(prompt, total):
    kv_mask[:, t] = 1
    step, cache = step_fn(
      model,
      jnp.asarray(ids[:, t : t + 1]),
      jnp.asarray(pos[:, t : t + 1]),
      cache,
      t,
      jnp.asarray(kv_mask),
    )
    np.testing.assert_allclose(np.asarray(step[:, 0]), full[:, t], atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_chunked_xla_attention_equals_unchunked(window):
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.randn(2, 11, 4, 8).astype(np.float32))
  k, v = (jnp.asarray(rng.randn(2, 11, 2, 8).astype(np.float32)) for _ in range(2))
  mask = np.ones((2, 11), np.int32)
  mask[1, :3] = 0
  slots = jnp.arange(11)
  run = lambda chunk: np.asarray(
    attn.attention(
      q,
      k,
      v,
      q_slots=slots,
      k_slots=slots,
      kv_mask=jnp.asarray(mask),
      window=window,
      implementation="xla",
      query_chunk_size=chunk,
    )
  )
  np.testing.assert_allclose(run(4), run(None), atol=1e-6)
  np.testing.assert_array_equal(run(11), run(None))  # one chunk: the unchunked path


def test_prefill_keeps_no_prompt_square_scores_or_all_logits():
  """Compiled memory of a 1024-token prefill (P + N = 1088 slots). The reference is the full
  forward over the prompt, which holds float32 ``[rows, N, P, P]`` scores and returns all
  ``P`` positions' logits (as prefill through a decode step at slot 0 did); prefill's
  temporaries stay under a third of those scores (its chunks hold ``[rows, N, 128, P]``) and
  it returns one position's logits besides the cache."""
  rows, prompt, slots, vocab = 2, 1024, 1088, 4096
  config = LlamaConfig(
    vocab_size=vocab,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
  )
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  ids = jax.ShapeDtypeStruct((rows, prompt), jnp.int32)
  kv = jax.ShapeDtypeStruct((rows, slots), jnp.int32)

  def memory(fn):
    def run(state, ids, kv):
      m = nnx.merge(graphdef, state)
      return fn(m, ids, positions_from_mask(kv[:, :prompt]), m.init_cache(rows, slots), kv)

    return jax.jit(run).lower(state, ids, kv).compile().memory_analysis()

  old = memory(lambda m, i, p, c, kv: m(i, kv[:, :prompt], p))
  new = memory(lambda m, i, p, c, kv: m.prefill(i, p, c, kv_mask=kv))
  scores = rows * 4 * prompt * prompt * 4
  logits = rows * vocab * 4  # one position's
  cache = 2 * 4 * 2 * rows * 2 * slots * 8  # keys and values [L, rows, K, S, H] float32
  assert old.temp_size_in_bytes >= scores  # the reference: what the test would catch
  assert new.temp_size_in_bytes < scores / 3, (new.temp_size_in_bytes, scores)
  assert old.output_size_in_bytes == prompt * logits
  assert logits <= new.output_size_in_bytes - cache < 2 * logits  # (and the tuple's pointers)
