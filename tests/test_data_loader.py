"""Tests for the pair loader (determinism, resume, host slices) and seed/pool selection."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from ssapo_jax import data as D


def toy_dataset(n=23, seed=0, extras=True):
  """Pairs with random lengths; token values encode (pair, side) so batches can be decoded."""
  rng = np.random.default_rng(seed)
  prompts = [list(1000 + 10 * i + np.arange(rng.integers(1, 6))) for i in range(n)]
  chosen = [[i + 1] * int(rng.integers(1, 9)) for i in range(n)]
  rejected = [[-(i + 1)] * int(rng.integers(1, 9)) for i in range(n)]
  ex = None
  if extras:
    ex = {
      "weights": rng.uniform(0.5, 2, n),
      "ref_chosen_logps": -np.arange(n, dtype=float),
      "ref_rejected_logps": -2 * np.arange(n, dtype=float),
      "atom_weights": rng.dirichlet(np.ones(3), n),
      "atom_shifts": rng.normal(size=(n, 3)),
    }
  ds = D.pairs_from_token_ids(
    prompts,
    chosen,
    rejected,
    eos_id=10**6,
    max_length=64,
    max_prompt_length=32,
    add_eos=False,
    rows=np.arange(n) + 100,
    extras=ex,
    verbose=False,
  )
  return ds, prompts, chosen, rejected, ex


def batches(loader, cursor=None, num_epochs=2):
  it = loader.iterator(cursor, num_epochs=num_epochs)
  return [b for b in it]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for name in x.__dataclass_fields__:
      np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)


@pytest.mark.parametrize("window", [1, 3])
def test_batches_decode_to_the_right_pairs(window):
  ds, prompts, chosen, rejected, ex = toy_dataset()
  loader = D.PreferenceLoader(
    ds, global_batch_size=4, seed=3, bucket_size=8, pad_id=0, bucket_window=window
  )
  assert loader.batches_per_epoch == 6
  seen = []
  for step in range(loader.batches_per_epoch):
    cursor = D.LoaderCursor(0, step)
    b = loader.batch_at(cursor)
    idx, real = loader.batch_indices(cursor)
    assert b.seq_len % 8 == 0 and b.batch_size == 4
    for j, i in enumerate(idx):
      for side, resp in (("chosen", chosen), ("rejected", rejected)):
        want = prompts[i] + resp[i]  # Independent reference: concatenate and pad.
        ids = getattr(b, f"{side}_ids")[j]
        np.testing.assert_array_equal(ids[: len(want)], want)
        assert np.all(ids[len(want) :] == 0)
        np.testing.assert_array_equal(
          getattr(b, f"{side}_mask")[j], np.arange(b.seq_len) < len(want)
        )
        np.testing.assert_array_equal(
          getattr(b, f"{side}_loss_mask")[j],
          (np.arange(b.seq_len) >= len(prompts[i])) & (np.arange(b.seq_len) < len(want)),
        )
    np.testing.assert_allclose(b.weights, real * ex["weights"][idx], rtol=1e-6)
    np.testing.assert_array_equal(b.valid, real)  # the step's mean excludes the filler rows
    np.testing.assert_array_equal(b.chosen_lengths, [len(chosen[i]) for i in idx])
    np.testing.assert_array_equal(b.rejected_lengths, [len(rejected[i]) for i in idx])
    np.testing.assert_allclose(b.atom_shifts, ex["atom_shifts"][idx], rtol=1e-6)
    np.testing.assert_allclose(b.ref_rejected_logps, ex["ref_rejected_logps"][idx])
    longest = max(len(prompts[i]) + max(len(chosen[i]), len(rejected[i])) for i in idx)
    assert b.seq_len == -(-longest // 8) * 8
    seen += list(idx[real > 0])
  assert sorted(seen) == list(range(23))  # Each pair exactly once per epoch.
  # The partial last batch is filled with copies at weight 0 that are marked not valid.
  idx, real = loader.batch_indices(D.LoaderCursor(0, 5))
  np.testing.assert_array_equal(real, [1, 1, 1, 0])
  assert idx[3] in idx[:3]
  np.testing.assert_array_equal(loader.batch_at(D.LoaderCursor(0, 5)).valid, [1, 1, 1, 0])


def test_bucketing_reduces_padding_and_epochs_differ():
  ds, *_ = toy_dataset(n=64, extras=False)
  pad = {}
  for window in (1, 8):
    loader = D.PreferenceLoader(
      ds, global_batch_size=4, seed=0, bucket_size=1, bucket_window=window
    )
    bs = batches(loader, num_epochs=1)
    pad[window] = sum(int((1 - b.chosen_mask).sum()) for b in bs)
  assert pad[8] < pad[1]
  loader = D.PreferenceLoader(ds, global_batch_size=4, seed=0)
  e0 = [loader.batch_indices(D.LoaderCursor(0, s))[0] for s in range(16)]
  e1 = [loader.batch_indices(D.LoaderCursor(1, s))[0] for s in range(16)]
  assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))
  loader2 = D.PreferenceLoader(ds, global_batch_size=4, seed=1)
  assert not np.array_equal(e0[0], loader2.batch_indices(D.LoaderCursor(0, 0))[0])
  fixed = D.PreferenceLoader(ds, global_batch_size=4, shuffle=False)
  np.testing.assert_array_equal(fixed.batch_indices(D.LoaderCursor(3, 2))[0], [8, 9, 10, 11])


def test_resume_from_any_batch_gives_identical_remainder():
  ds, *_ = toy_dataset()
  make = lambda: D.PreferenceLoader(
    ds,
    global_batch_size=4,
    seed=5,
    bucket_size=4,  # noqa: E731
    bucket_window=2,
  )
  full = batches(make(), num_epochs=2)
  assert len(full) == 12
  for stop in range(len(full) + 1):
    it = make().iterator(num_epochs=2)
    head = [next(it) for _ in range(stop)]
    saved = json.loads(json.dumps(it.cursor.to_dict()))  # As a checkpoint would store it.
    rest = batches(make(), D.LoaderCursor.from_dict(saved), num_epochs=2)  # Fresh loader.
    assert_batches_equal(head + rest, full)


def test_two_hosts_partition_each_global_batch():
  ds, *_ = toy_dataset()
  kw = dict(global_batch_size=6, seed=9, bucket_size=4, bucket_window=2)
  glob = batches(D.PreferenceLoader(ds, **kw), num_epochs=2)
  hosts = [
    batches(D.PreferenceLoader(ds, num_hosts=2, host_index=h, **kw), num_epochs=2) for h in range(2)
  ]
  assert len(hosts[0]) == len(hosts[1]) == len(glob) == 8
  for g, h0, h1 in zip(glob, *hosts):
    assert h0.batch_size == h1.batch_size == 3 and h0.seq_len == h1.seq_len == g.seq_len
    for name in g.__dataclass_fields__:
      np.testing.assert_array_equal(
        np.concatenate([getattr(h0, name), getattr(h1, name)]), getattr(g, name), err_msg=name
      )


def test_loader_argument_errors():
  ds, *_ = toy_dataset(extras=False)
  with pytest.raises(ValueError, match="multiple of num_hosts"):
    D.PreferenceLoader(ds, global_batch_size=5, num_hosts=2)
  with pytest.raises(ValueError, match="max_length"):
    D.PreferenceLoader(ds, global_batch_size=4, max_length=5)
  loader = D.PreferenceLoader(ds, global_batch_size=4, drop_remainder=True)
  assert loader.batches_per_epoch == 5
  with pytest.raises(ValueError, match="outside"):
    loader.batch_at(D.LoaderCursor(0, 5))


def test_with_pair_columns_reach_the_batch():
  ds, *_ = toy_dataset(n=8, extras=False)
  ds = D.with_pair_columns(ds, weights=np.arange(8) / 4, ref_chosen_logps=np.ones(8))
  ds = D.with_pair_columns(ds, weights=np.full(8, 2.0))  # Replaced, not duplicated.
  b = D.PreferenceLoader(ds, global_batch_size=8, shuffle=False).batch_at(D.LoaderCursor())
  np.testing.assert_allclose(b.weights, 2.0)
  np.testing.assert_allclose(b.ref_chosen_logps, 1.0)
  assert b.atom_weights.shape == (8, 1)
  with pytest.raises(ValueError, match="together"):
    D.with_pair_columns(ds, atom_weights=np.ones((8, 2)))
  sub = ds.select([5, 2])  # An indices mapping over the Arrow table.
  b = D.PreferenceLoader(sub, global_batch_size=2, shuffle=False).batch_at(D.LoaderCursor())
  np.testing.assert_array_equal(b.chosen_loss_mask.sum(1), [len(x) for x in sub["chosen_ids"]])
  np.testing.assert_array_equal(
    b.chosen_ids[:, 0], [sub[0]["prompt_ids"][0], sub[1]["prompt_ids"][0]]
  )


# ----------------------------------------------------------------------------- seed and pools


def fps_reference(x, num, first):
  """Brute force: recompute the sum of scipy cosine distances to the chosen set every step."""
  chosen = [first]
  while len(chosen) < num:
    sums = cdist(x, x[chosen], metric="cosine").sum(axis=1)
    sums[chosen] = -np.inf
    chosen.append(int(np.argmax(sums)))
  return chosen


@pytest.mark.parametrize("n,d,num,first", [(40, 5, 12, 0), (100, 16, 30, 17), (7, 3, 7, 6)])
def test_farthest_point_matches_bruteforce(n, d, num, first):
  x = np.random.default_rng(n).normal(size=(n, d))
  got = D.farthest_point_sampling(x, num, first_index=first)
  assert got.tolist() == fps_reference(x, num, first)
  assert len(set(got.tolist())) == num


def test_farthest_point_errors_and_last_token():
  with pytest.raises(ValueError, match="row 1 is zero"):
    D.farthest_point_sampling(np.array([[1.0, 0], [0, 0]]), 1)
  with pytest.raises(ValueError, match="num must be"):
    D.farthest_point_sampling(np.ones((3, 2)), 4)
  hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  left = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])
  right = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(D.last_token_embeddings(hidden, left), hidden[:, 3])
  np.testing.assert_array_equal(
    D.last_token_embeddings(hidden, right), np.stack([hidden[0, 1], hidden[1, 0]])
  )


def test_split_rows_random_matches_authors_slicing(tmp_path):
  rows = np.arange(50) * 2 + 1  # Source row ids are not positions.
  m = D.split_rows(rows, seed_size=5, pool_sizes=[8, 0.5], seed=42, source="toy")
  order = np.random.default_rng(42).permutation(50)  # shuffle(seed), then consecutive slices.
  np.testing.assert_array_equal(m.seed_rows, rows[order[:5]])
  np.testing.assert_array_equal(m.pool_rows[0], rows[order[5:13]])
  np.testing.assert_array_equal(m.pool_rows[1], rows[order[13:35]])  # 0.5 of the 45 left.
  np.testing.assert_array_equal(m.rest_rows, rows[order[35:]])
  D.save_manifest(m, tmp_path / "split.json")
  back = D.load_manifest(tmp_path / "split.json")
  assert back.settings == m.settings and json.load(open(tmp_path / "split.json"))["counts"] == {
    "seed": 5,
    "pools": [8, 22],
    "rest": 15,
  }
  for a, b in zip(back.pool_rows, m.pool_rows):
    np.testing.assert_array_equal(a, b)
  again = D.split_rows(rows, seed_size=0.1, pool_sizes=[8, 0.5], seed=42)
  np.testing.assert_array_equal(again.seed_rows, m.seed_rows)
  with pytest.raises(ValueError, match="only 45 remain"):
    D.split_rows(rows, seed_size=5, pool_sizes=[40, 6])
  recs = [D.PromptRecord([{"role": "user", "content": str(r)}], int(r)) for r in rows]
  picked = D.select_rows(recs, m.pool_rows[0])
  assert [r.row for r in picked] == m.pool_rows[0].tolist()


def test_split_rows_farthest_point_partitions():
  x = np.random.default_rng(1).normal(size=(30, 4))
  m = D.split_rows(
    30, seed_size=6, pool_sizes=[10, 10], method="farthest_point", embeddings=x, seed=0
  )
  first = int(np.random.default_rng(0).permutation(30)[0])
  assert m.seed_rows.tolist() == fps_reference(x, 6, first)
  everything = np.concatenate([m.seed_rows, *m.pool_rows, m.rest_rows])
  assert sorted(everything.tolist()) == list(range(30))
  with pytest.raises(ValueError, match="needs embeddings"):
    D.split_rows(30, seed_size=6, method="farthest_point")


# ----------------------------------------------------------------------------- packing


def _decode_packed(b, prompts):
  """{(pair, side): tokens} of a packed batch, decoded from its rows alone (the toy's response
  tokens name their pair and side); checks each sequence is whole and contiguous in one row."""
  out = {}
  num_slots = b.batch_size
  for s in np.unique(b.sequence_index):
    if s == 2 * num_slots:
      continue
    rows, cols = np.nonzero(b.sequence_index == s)
    assert len(set(rows)) == 1, "a sequence split over rows"
    assert np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols))), "not contiguous"
    row = rows[0]
    toks = b.ids[row, cols]
    np.testing.assert_array_equal(b.positions[row, cols], np.arange(len(cols)))
    assert len(set(b.segment_ids[row, cols])) == 1 and b.segment_ids[row, cols[0]] > 0
    first = toks[b.loss_mask[row, cols] > 0][0]
    pair, side = (int(first) - 1, "chosen") if first > 0 else (-int(first) - 1, "rejected")
    assert (s < num_slots) == (side == "chosen")
    assert (pair, side) not in out
    out[(pair, side)] = (s % num_slots, toks)
  return out


@pytest.mark.parametrize("micro_batches,window", [(1, 1), (2, 3)])
def test_packed_batches_cover_every_pair_once_whole_and_resume_exactly(micro_batches, window):
  ds, prompts, chosen, rejected, ex = toy_dataset()
  loader = D.PreferenceLoader(
    ds,
    global_batch_size=4,
    seed=3,
    bucket_size=8,
    pad_id=0,
    bucket_window=window,
    packing=True,
    pack_length=24,
    micro_batches=micro_batches,
  )
  shapes = set(loader.packed_shapes())
  # row_buckets(4 / M): 1, 2, 3, 4, 6, 8 (M = 1) or 1, 2, 3, 4 (M = 2)
  assert len(shapes) <= {1: 6, 2: 4}[micro_batches]
  for epoch in range(2):
    seen = []
    for step in range(loader.batches_per_epoch):
      b = loader.batch_at(D.LoaderCursor(epoch, step))
      assert b.ids.shape in shapes and b.batch_size == 4
      decoded = _decode_packed(b, prompts)
      pairs = sorted({p for p, _ in decoded})
      for (pair, side), (slot, toks) in decoded.items():
        resp = chosen if side == "chosen" else rejected
        np.testing.assert_array_equal(toks, prompts[pair] + resp[pair])
        rows = np.nonzero(b.sequence_index == (slot if side == "chosen" else slot + 4))[0]
        assert rows[0] % micro_batches == slot % micro_batches  # in its micro-batch's rows
        assert b.valid[slot] == 1
        np.testing.assert_allclose(b.weights[slot], ex["weights"][pair], rtol=1e-6)
        np.testing.assert_allclose(b.ref_chosen_logps[slot], -pair)
        np.testing.assert_array_equal(b.chosen_lengths[slot], len(chosen[pair]))
      assert all((p, "rejected") in decoded for p in pairs)  # never half a pair
      np.testing.assert_array_equal(b.valid.sum(), len(pairs))  # fillers are not packed
      assert b.weights[b.valid == 0].sum() == 0
      seen += pairs
    assert sorted(seen) == list(range(23))  # every pair exactly once per epoch
  # Resume: from any cursor the batches are those of the uninterrupted iteration.
  full = batches(loader)
  assert_batches_equal(batches(loader, D.LoaderCursor(1, 2)), full[loader.batches_per_epoch + 2 :])
  # Two hosts: their slices are the single-host batch's rows and pairs.
  hosts = [
    D.PreferenceLoader(
      ds,
      global_batch_size=4,
      seed=3,
      bucket_size=8,
      pad_id=0,
      bucket_window=window,
      packing=True,
      pack_length=24,
      micro_batches=micro_batches,
      num_hosts=2,
      host_index=h,
      row_multiple=2,
    )
    for h in range(2)
  ]
  one = D.PreferenceLoader(
    ds,
    global_batch_size=4,
    seed=3,
    bucket_size=8,
    pad_id=0,
    bucket_window=window,
    packing=True,
    pack_length=24,
    micro_batches=micro_batches,
    row_multiple=2,
  )
  for step in range(one.batches_per_epoch):
    whole = one.batch_at(D.LoaderCursor(0, step))
    parts = [h.batch_at(D.LoaderCursor(0, step)) for h in hosts]
    for name in whole.__dataclass_fields__:
      np.testing.assert_array_equal(
        np.concatenate([getattr(p, name) for p in parts]), getattr(whole, name), err_msg=name
      )


def test_packing_pads_less_than_bucketed_padding():
  ds, *_ = toy_dataset(n=64, seed=1)
  kw = {"global_batch_size": 16, "seed": 0, "bucket_size": 8, "pad_id": 0}
  plain = D.PreferenceLoader(ds, **kw)
  packed = D.PreferenceLoader(ds, packing=True, pack_length=32, **kw)
  cells = lambda b: b.ids.size if hasattr(b, "ids") else 2 * b.chosen_ids.size
  real = sum(int((b.segment_ids > 0).sum()) for b in batches(packed, num_epochs=1))
  assert real == sum(
    int(b.chosen_mask.sum() + b.rejected_mask.sum()) for b in batches(plain, num_epochs=1)
  )
  assert sum(cells(b) for b in batches(packed, num_epochs=1)) < 0.8 * sum(
    cells(b) for b in batches(plain, num_epochs=1)
  )


def test_packing_rejects_a_sequence_longer_than_a_row():
  ds, *_ = toy_dataset()
  with pytest.raises(ValueError, match="pack_length"):
    D.PreferenceLoader(ds, global_batch_size=4, packing=True, pack_length=8)
