"""Packed sequences (`PackedPreferenceBatch`) against the plain padded batch, on the tiny model.

The reference is the plain path: one sequence per row, right-padded, positions from the mask,
scored by the same model with the ``xla`` attention (no segments). Packing must give the same
per-sequence log-probs, the same loss and the same gradient (float32, 1e-5), whatever the
attention implementation: ``xla`` (block-diagonal mask), ``splash`` (segment ids; Pallas
interpret mode on CPU) and the ``jax.nn.dot_product_attention`` mask that the ``cudnn`` path
passes (checked with its ``xla`` implementation: cuDNN itself needs a GPU).
"""

import dataclasses
import math

import _multihost_worker as w
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssapo_jax import sharding as shd
from ssapo_jax import train as tr
from ssapo_jax.batch import (
  PackedPreferenceBatch,
  first_fit_decreasing,
  make_preference_batch,
  pack_pair_rows,
  row_buckets,
)
from ssapo_jax.models import attention as attn
from ssapo_jax.train.scoring import Scorer


def _mesh(shape):
  return shd.make_mesh(shd.MeshConfig(*shape), devices=jax.devices()[: math.prod(shape)])


def _random_pairs(seed, n, *, vocab=64, max_prompt=9, max_response=14):
  rng = np.random.default_rng(seed)
  toks = lambda lo, hi: rng.integers(1, vocab, rng.integers(lo, hi + 1)).astype(np.int32)
  return [(toks(1, max_prompt), toks(1, max_response), toks(1, max_response)) for _ in range(n)]


def _plain_batch(pairs, t, extras):
  def side(k):
    b = len(pairs)
    ids, mask, loss = (np.zeros((b, t), np.int32) for _ in range(3))
    for j, pair in enumerate(pairs):
      p, r = pair[0], pair[k]
      ids[j, : len(p)], ids[j, len(p) : len(p) + len(r)] = p, r
      mask[j, : len(p) + len(r)] = 1
      loss[j, len(p) : len(p) + len(r)] = 1
    return ids, mask, loss

  return make_preference_batch(*side(1), *side(2), **extras)


def _packed_batch(pairs, extras, *, seq_len, micro_batches, row_multiple):
  packed = pack_pair_rows(
    pairs, extras["valid"], seq_len=seq_len, micro_batches=micro_batches, row_multiple=row_multiple
  )
  plain = make_preference_batch(*(np.zeros((len(pairs), 1), np.int32),) * 6, **extras)
  return PackedPreferenceBatch(
    **packed,
    weights=plain.weights,
    valid=plain.valid,
    ref_chosen_logps=plain.ref_chosen_logps,
    ref_rejected_logps=plain.ref_rejected_logps,
    atom_weights=plain.atom_weights,
    atom_shifts=plain.atom_shifts,
  )


# ----------------------------------------------------------------------------- packing itself


def test_first_fit_decreasing_and_row_ladder():
  lengths = np.random.default_rng(0).integers(1, 30, 200)
  bins = first_fit_decreasing(lengths, 32)
  assert sorted(i for b in bins for i in b) == list(range(200))  # each item once, whole
  assert all(sum(lengths[b]) <= 32 for b in bins)
  assert len(bins) <= math.ceil(11 / 9 * math.ceil(lengths.sum() / 32)) + 1
  with pytest.raises(ValueError, match="does not fit"):
    first_fit_decreasing([33], 32)
  assert row_buckets(4) == (1, 2, 3, 4, 6, 8)  # ceil(8 / sqrt(2)^k): 8, 6, 4, 3, 2, 2, 1
  assert row_buckets(3, 2) == (2, 4, 6)  # 6, 5, 3, 3, 2, 2, 1 rounded up to even
  assert row_buckets(16, 8) == (8, 16, 24, 32)  # 32, 23, 16, 12, 8, ... rounded up to 8s


def test_pack_pair_rows_layout():
  """Every real sequence is whole in one row of its micro-batch, positions restart per
  segment, filler slots are not packed, and lengths are the plain batch's."""
  pairs = _random_pairs(1, 8)
  real = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
  m, t = 2, 24
  out = pack_pair_rows(pairs, real, seq_len=t, micro_batches=m, row_multiple=2)
  assert out["ids"].shape[1] == t and out["ids"].shape[0] % (2 * m) == 0
  plain = _plain_batch(pairs, t, {})
  for slot, (prompt, chosen, rejected) in enumerate(pairs):
    for side, response in ((0, chosen), (1, rejected)):
      where = out["sequence_index"] == slot + side * len(pairs)
      if not real[slot]:
        assert not where.any()
        continue
      rows = np.nonzero(where.any(axis=1))[0]
      assert len(rows) == 1 and rows[0] % m == slot % m  # one row, in its micro-batch
      cols = np.nonzero(where[rows[0]])[0]
      assert np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols)))  # contiguous
      np.testing.assert_array_equal(out["ids"][rows[0], cols], np.concatenate([prompt, response]))
      np.testing.assert_array_equal(out["positions"][rows[0], cols], np.arange(len(cols)))
      assert len(set(out["segment_ids"][rows[0], cols])) == 1
      np.testing.assert_array_equal(out["loss_mask"][rows[0], cols][len(prompt) :], 1)
      assert out["loss_mask"][rows[0], cols][: len(prompt)].sum() == 0
    if real[slot]:
      assert out["chosen_lengths"][slot] == plain.chosen_lengths[slot]
      assert out["rejected_lengths"][slot] == plain.rejected_lengths[slot]
  assert np.all((out["segment_ids"] == 0) == (out["sequence_index"] == 2 * len(pairs)))


def test_packed_attention_is_block_diagonal_in_every_implementation():
  """Attention over a packed row equals attention over each segment alone (real queries),
  for the xla mask, the jax.nn mask the cudnn path uses, and splash's segment ids."""
  rng = np.random.default_rng(0)
  t, n, k, h = 128, 4, 2, 8
  seg = np.zeros((2, t), np.int32)
  bounds = [(0, 30, 1), (30, 75, 2), (75, 120, 3)]
  for s0, s1, i in bounds:
    seg[0, s0:s1] = i
  seg[1, :50], seg[1, 50:128] = 1, 2
  q, kk, v = (jnp.asarray(rng.normal(size=(2, t, x, h)), jnp.float32) for x in (n, k, k))
  ref = np.zeros((2, t, n, h), np.float32)
  for b, spans in ((0, bounds), (1, [(0, 50, 1), (50, 128, 2)])):
    for s0, s1, _ in spans:
      sl = slice(s0, s1)
      one = attn.attention(
        q[b : b + 1, sl],
        kk[b : b + 1, sl],
        v[b : b + 1, sl],
        q_slots=jnp.arange(s1 - s0),
        k_slots=jnp.arange(s1 - s0),
        kv_mask=jnp.ones((1, s1 - s0), jnp.int32),
        window=None,
      )
      ref[b, sl] = np.asarray(one[0])
  real = seg > 0
  slots = jnp.arange(t)
  outs = {
    "xla": attn.attention(
      q, kk, v, q_slots=slots, k_slots=slots, kv_mask=jnp.asarray(seg), window=None
    ),
    "jax_nn (cudnn's mask)": attn.jax_nn_attention(
      q, kk, v, jnp.asarray(seg), None, implementation="xla"
    ),
    "splash (interpret)": attn.splash_attention(q, kk, v, jnp.asarray(seg), None),
  }
  for name, out in outs.items():
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------- model level


@pytest.mark.parametrize("attention", ["xla", pytest.param("splash", marks=pytest.mark.slow)])
def test_packed_scoring_equals_unpacked(attention, tmp_path):
  """Per-sequence log-probs of the packed scorer equal the plain scorer's (float32, 1e-5),
  for token lists (`Scorer.sequences`) and a pair dataset (`Scorer.pairs`, cached)."""
  from ssapo_jax.data import pairs_from_token_ids

  pairs = _random_pairs(2, 10)
  prompts = [p for p, _, _ in pairs] * 2
  responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
  mesh = _mesh((2, 1, 1))
  plain_scorer = Scorer(mesh, 0, 4, bucket_size=8)
  reference = plain_scorer.sequences(w.tiny_model(), prompts, responses)
  model = w.tiny_model(attention=attention)
  scorer = Scorer(
    mesh, 0, 4, bucket_size=8, packing=True, pack_length=128 if attention == "splash" else 32
  )
  np.testing.assert_allclose(
    scorer.sequences(model, prompts, responses), reference, rtol=1e-5, atol=1e-5
  )
  if attention == "xla":
    ds = pairs_from_token_ids(
      *([list(x[k]) for x in pairs] for k in range(3)),
      eos_id=63,
      max_length=32,
      max_prompt_length=16,
      add_eos=False,
      verbose=False,
    )
    want = plain_scorer.pairs(w.tiny_model(), ds)
    for _ in range(2):  # computed, then read back from the cache
      got = scorer.pairs(model, ds, cache_dir=str(tmp_path))
      for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert len(list(tmp_path.glob("ref_logps-packed-*.npz"))) == 1


def _step_loss_and_gradient(cfg, batch, mesh, *, model, packed):
  """The step's loss and gradient, read off one AdamW step (as tests/train/test_step.py):
  with ``learning_rate = adam_eps = 1e8`` the first update is ``-g (1 + O(|g| / 1e8))``."""
  cfg = dataclasses.replace(
    cfg,
    learning_rate=1e8,
    adam_eps=1e8,
    warmup_ratio=0.0,
    schedule="constant",
    max_grad_norm=0.0,
    weight_decay=0.0,
  )
  state = tr.create_train_state(model, cfg, mesh, num_train_steps=1)
  before = jax.tree.map(np.asarray, state.params)
  step = tr.make_train_step(cfg, mesh, state, packed=packed)
  state, metrics = step(state, shd.global_batch(mesh, batch))
  grads = jax.tree.map(lambda old, new: old - np.asarray(new), before, state.params)
  return {k: float(v) for k, v in metrics.items()}, grads


@pytest.mark.parametrize(
  "attention,objective,mesh_shape",
  [
    ("xla", "dpo", (2, 2, 2)),
    pytest.param("xla", "robust", (1, 1, 1), marks=pytest.mark.slow),
    pytest.param("splash", "dpo", (2, 1, 1), marks=pytest.mark.slow),
  ],
)
def test_packed_step_equals_unpacked(attention, objective, mesh_shape):
  """One step on a packed partial batch (2 micro-batches, 2 filler slots) has the loss,
  metrics and gradient of the plain batch (float32, 1e-5)."""
  pairs = _random_pairs(3, w.GLOBAL_BATCH)
  rng = np.random.default_rng(3)
  g = w.GLOBAL_BATCH
  valid = np.ones(g, np.float32)
  valid[-2:] = 0.0
  atoms = rng.dirichlet(np.ones(3), g).astype(np.float32)
  extras = {
    "weights": rng.uniform(0.5, 1.5, g) * valid,
    "valid": valid,
    "ref_chosen_logps": rng.normal(-30, 3, g),
    "ref_rejected_logps": rng.normal(-30, 3, g),
    "atom_weights": atoms,
    "atom_shifts": rng.uniform(0, 0.1, (g, 3)).astype(np.float32),
  }
  cfg = w.train_config(objective=objective, rpo_alpha=0.5, use_weighting=objective == "dpo")
  mesh = _mesh(mesh_shape)
  t = 128 if attention == "splash" else 32
  plain = _plain_batch(pairs, 24, extras)
  packed = _packed_batch(
    pairs,
    extras,
    seq_len=t,
    micro_batches=cfg.micro_batches,
    row_multiple=tr.packed_row_multiple(mesh, cfg),
  )
  assert packed.num_rows < 2 * g  # it packed something
  m_plain, g_plain = _step_loss_and_gradient(cfg, plain, mesh, model=w.tiny_model(), packed=False)
  m_packed, g_packed = _step_loss_and_gradient(
    cfg, packed, mesh, model=w.tiny_model(attention=attention), packed=True
  )
  for key in ("loss", "grad_norm", "rewards/chosen", "logps/rejected"):
    if key in m_plain:
      np.testing.assert_allclose(m_packed[key], m_plain[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_packed_step_rejects_ld_alpha():
  cfg = w.train_config(reference="in_step", ld_alpha=0.5)
  pairs = _random_pairs(4, w.GLOBAL_BATCH)
  packed = _packed_batch(
    pairs, {"valid": np.ones(w.GLOBAL_BATCH)}, seq_len=32, micro_batches=2, row_multiple=1
  )
  mesh = _mesh((1, 1, 1))
  state = tr.create_train_state(w.tiny_model(), cfg, mesh, num_train_steps=1)
  with pytest.raises(ValueError, match="data.packing"):
    tr.train_step(state, jax.tree.map(jnp.asarray, packed), config=cfg)
