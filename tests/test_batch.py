"""Length histograms and the expected padding of padded and packed batches
(ssapo_jax/batch.py; packing itself is tested in tests/train/test_packing.py)."""

import numpy as np
import pytest

from ssapo_jax.batch import expected_padding, length_histogram, pack_pair_rows, row_buckets


def test_length_histogram_bins_by_upper_edge():
  h = length_histogram([1, 64, 65, 128, 129, 300], 64)
  assert h == {"bin_width": 64, "counts": [2, 2, 1, 0, 1], "num_sequences": 6}
  with pytest.raises(ValueError):
    length_histogram([0, 3], 64)


def test_expected_padding_of_one_length_is_exact():
  # Every sequence is 100 tokens: padded to 128 (bucket 64); packed two per 256-token row, so a
  # batch of 4 pairs (8 sequences) fills 4 rows (a row_buckets(4) entry) of 256.
  h = {"bin_width": 100, "counts": [5], "num_sequences": 5}
  out = expected_padding(h, global_batch_size=4, bucket_size=64, pack_length=256, num_batches=3)
  assert out["padded"] == pytest.approx(1 - 100 / 128)
  assert out["packed"] == pytest.approx(1 - 800 / (4 * 256))
  assert out["padded_lengths"] == {128: 3} and out["packed_rows"] == {4: 3}
  # Two micro-batches of 2 pairs: each packs its 4 sequences into 2 rows.
  out = expected_padding(
    h, global_batch_size=4, micro_batches=2, bucket_size=64, pack_length=256, num_batches=2
  )
  assert out["packed_rows"] == {4: 2}
  with pytest.raises(ValueError, match="packed row"):
    expected_padding(h, global_batch_size=4, bucket_size=64, pack_length=64)


def test_expected_padding_matches_the_packer_on_the_drawn_lengths():
  # The packed estimate counts rows as pack_pair_rows lays them out.
  rng = np.random.default_rng(3)
  lengths = rng.integers(20, 200, 16)
  h = length_histogram(lengths, 1)  # bin width 1: every length exact
  out = expected_padding(h, global_batch_size=4, bucket_size=16, pack_length=256, num_batches=1)
  draw = np.random.default_rng(0)
  counts = np.asarray(h["counts"], float)
  drawn = (draw.choice(counts.size, size=8, p=counts / counts.sum()) + 1).tolist()
  seqs = [
    (np.ones(1, np.int32), np.ones(drawn[i] - 1, np.int32), np.ones(drawn[4 + i] - 1, np.int32))
    for i in range(4)
  ]
  packed = pack_pair_rows(seqs, np.ones(4), seq_len=256)
  assert packed["ids"].shape[0] in row_buckets(4)
  assert out["packed_rows"] == {packed["ids"].shape[0]: 1}
  assert out["packed"] == pytest.approx(1 - sum(drawn) / packed["ids"].size)
