"""Deterministic, resumable batching of tokenised pairs into `PreferenceBatch`es.

Epoch ``e`` visits the pairs in the order of a permutation drawn from ``(seed, e)``. With
length bucketing, each window of ``bucket_window`` global batches is sorted by length, cut
into batches, and the batches of the epoch are shuffled again, so a batch holds pairs of
similar length (less padding) while the order stays random. Every batch is a fixed global
size ``G``; the last partial batch of an epoch is filled with copies of its own pairs at
weight 0 and ``valid`` 0 (copies, not empty rows, so attention never sees a fully masked
row; the train step's mean is over the real rows only). Its length
``T`` is the longest sequence of the *global* batch rounded up to ``bucket_size``, so
every host builds the same ``[G / num_hosts, T]`` slice shape.

With ``packing``, the pairs of each global batch are the same (same order, same cursor), but
their ``2G`` sequences are packed whole into rows of ``pack_length`` tokens
(`ssapo_jax.batch.pack_pair_rows`, first-fit decreasing per micro-batch) and the batch is a
`PackedPreferenceBatch`. Its row count comes from the fixed ladder `row_buckets` (steps of
sqrt(2), at most about ``2 log2(2G / M) + 1`` shapes, `packed_shapes`), whose top holds any
batch, so no batch makes a new shape.

The position is a `LoaderCursor` ``(epoch, step)``: everything is a pure function of
``(seed, epoch, step)``, so a run resumed from a saved cursor sees exactly the batches it
would have seen. The loader is single-process NumPy over memory-resident arrays (building a
batch is a few gathers), so it needs no worker processes; see docs/data.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from ssapo_jax.batch import (
  PackedPreferenceBatch,
  PreferenceBatch,
  make_preference_batch,
  pack_pair_rows,
  row_buckets,
)
from ssapo_jax.data.tokenize import PAIR_EXTRAS, round_up


@dataclasses.dataclass(frozen=True)
class LoaderCursor:
  """Position of the next batch: ``epoch`` and ``step`` (batch index within the epoch)."""

  epoch: int = 0
  step: int = 0

  def to_dict(self) -> dict[str, int]:
    """``{"epoch", "step"}`` as plain ints (for JSON and checkpoints)."""
    return {"epoch": int(self.epoch), "step": int(self.step)}

  @classmethod
  def from_dict(cls, d) -> "LoaderCursor":
    """The cursor `to_dict` wrote."""
    return cls(epoch=int(d["epoch"]), step=int(d["step"]))


def _ragged(dataset, name):
  """(values, offsets) of a list column, read straight from Arrow."""
  col = dataset.data.column(name).combine_chunks()
  import pyarrow as pa

  if isinstance(col, pa.ChunkedArray):
    col = col.chunk(0) if col.num_chunks else pa.array([], type=col.type)
  offsets = np.asarray(col.offsets, np.int64)
  values = np.asarray(col.values.to_numpy(zero_copy_only=False), np.int32)
  return values, offsets


class PreferenceLoader:
  """Fixed-size, per-host batches of a tokenised pair dataset.

  Args:
    dataset: a pair dataset from `tokenize_pairs` / `pairs_from_token_ids`.
    global_batch_size: pairs per global batch ``G`` (a multiple of ``num_hosts``).
    seed: shuffle seed.
    pad_id: token id used for padding (masked out).
    bucket_size: ``T`` is a multiple of this.
    shuffle: shuffle per epoch (False: dataset order, e.g. for reference log-probs).
    bucket_window: global batches per length-sorting window (1 = no length bucketing).
    drop_remainder: drop the last partial batch instead of filling it at weight 0.
    max_length: if set, a pair longer than this raises (the tokenizer should have cut it).
    num_hosts, host_index: this process's share of each global batch (rows
      ``[h * G / H, (h + 1) * G / H)``); default single host.
    packing: yield `PackedPreferenceBatch`es (``data.packing``).
    pack_length: tokens per packed row ``T``; default the longest sequence of the dataset
      rounded up to ``bucket_size`` (pass ``data.max_length`` rounded up for one ``T`` across
      rounds).
    micro_batches: the train step's ``M``; each micro-batch's pairs are packed in its own
      rows.
    row_multiple: packed rows per micro-batch are a multiple of this (default ``num_hosts``;
      the train step's `packed_row_multiple` so that rows shard like pairs).
  """

  def __init__(
    self,
    dataset,
    *,
    global_batch_size: int,
    seed: int = 0,
    pad_id: int = 0,
    bucket_size: int = 64,
    shuffle: bool = True,
    bucket_window: int = 1,
    drop_remainder: bool = False,
    max_length: int | None = None,
    num_hosts: int = 1,
    host_index: int = 0,
    packing: bool = False,
    pack_length: int | None = None,
    micro_batches: int = 1,
    row_multiple: int | None = None,
  ):
    if global_batch_size <= 0 or global_batch_size % num_hosts:
      raise ValueError(
        f"global_batch_size must be a positive multiple of num_hosts={num_hosts}, "
        f"got {global_batch_size}"
      )
    if not 0 <= host_index < num_hosts:
      raise ValueError(f"host_index must be in [0, {num_hosts}), got {host_index}")
    if bucket_size <= 0 or bucket_window <= 0:
      raise ValueError(
        f"bucket_size and bucket_window must be > 0, got {bucket_size}, {bucket_window}"
      )
    self.num_pairs = len(dataset)
    if self.num_pairs == 0:
      raise ValueError("dataset has no pairs")
    if drop_remainder and self.num_pairs < global_batch_size:
      raise ValueError(
        f"drop_remainder with {self.num_pairs} pairs < global_batch_size "
        f"{global_batch_size} leaves no batch"
      )
    if getattr(dataset, "_indices", None) is not None:  # After select/filter/shuffle.
      dataset = dataset.flatten_indices()
    self.global_batch_size, self.seed, self.pad_id = global_batch_size, seed, pad_id
    self.bucket_size, self.shuffle, self.bucket_window = bucket_size, shuffle, bucket_window
    self.drop_remainder, self.num_hosts, self.host_index = drop_remainder, num_hosts, host_index
    self._p, self._po = _ragged(dataset, "prompt_ids")
    self._c, self._co = _ragged(dataset, "chosen_ids")
    self._r, self._ro = _ragged(dataset, "rejected_ids")
    lp, lc, lr = np.diff(self._po), np.diff(self._co), np.diff(self._ro)
    self._lengths = lp + np.maximum(lc, lr)
    if max_length is not None and self._lengths.max() > max_length:
      i = int(np.argmax(self._lengths))
      raise ValueError(
        f"pair {i} (row {dataset[i]['row']}) has {self._lengths[i]} tokens > "
        f"max_length={max_length}"
      )
    self.rows = np.asarray(dataset["row"], np.int64)
    self._cache = (None, [])
    self._extras = {}
    for name in PAIR_EXTRAS:
      if name in dataset.column_names:
        arr = np.asarray(dataset[name], np.float32)
        self._extras[name] = arr
    if ("atom_weights" in self._extras) != ("atom_shifts" in self._extras):
      raise ValueError("dataset has only one of atom_weights / atom_shifts")
    self.packing, self.micro_batches = packing, micro_batches
    self.row_multiple = num_hosts if row_multiple is None else row_multiple
    longest = int(max((lp + lc).max(), (lp + lr).max()))
    self.pack_length = round_up(longest, bucket_size) if pack_length is None else pack_length
    if packing:
      if micro_batches < 1 or global_batch_size % micro_batches:
        raise ValueError(
          f"global_batch_size {global_batch_size} is not divisible by micro_batches={micro_batches}"
        )
      if (micro_batches * self.row_multiple) % num_hosts:
        raise ValueError(
          f"packed rows (micro_batches={micro_batches} x a multiple of "
          f"row_multiple={self.row_multiple}) do not split over {num_hosts} hosts"
        )
      if longest > self.pack_length:
        raise ValueError(
          f"a sequence of {longest} tokens does not fit pack_length={self.pack_length}"
        )

  @property
  def batches_per_epoch(self) -> int:
    """Global batches in one pass (a partial last batch counts unless ``drop_remainder``)."""
    g = self.global_batch_size
    return self.num_pairs // g if self.drop_remainder else -(-self.num_pairs // g)

  @property
  def host_batch_size(self) -> int:
    """Rows of each global batch that this host loads."""
    return self.global_batch_size // self.num_hosts

  def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
    n, g = self.num_pairs, self.global_batch_size
    if not self.shuffle:
      order = np.arange(n)
    else:
      rng = np.random.default_rng([self.seed, epoch])
      order = rng.permutation(n)
    if self.bucket_window > 1:
      w = self.bucket_window * g
      order = np.concatenate(
        [
          chunk[np.argsort(-self._lengths[chunk], kind="stable")]
          for chunk in np.split(order, range(w, n, w))
        ]
      )
    num_full = n // g
    batches = [order[i * g : (i + 1) * g] for i in range(num_full)]
    if self.shuffle and self.bucket_window > 1:
      batch_rng = np.random.default_rng([self.seed, epoch, 1])
      batches = [batches[i] for i in batch_rng.permutation(num_full)]
    if n % g and not self.drop_remainder:
      batches.append(order[num_full * g :])
    return batches

  def batch_indices(self, cursor: LoaderCursor) -> tuple[np.ndarray, np.ndarray]:
    """Global batch at ``cursor``: ``(indices [G] into the dataset, weight_mask [G])``.

    Filler rows of a partial batch repeat the batch's own pairs and have mask 0.
    """
    if not 0 <= cursor.step < self.batches_per_epoch:
      raise ValueError(f"cursor step {cursor.step} outside [0, {self.batches_per_epoch})")
    if self._cache[0] != cursor.epoch:  # One epoch's order is reused by all its batches.
      self._cache = (cursor.epoch, self._epoch_batches(cursor.epoch))
    idx = self._cache[1][cursor.step]
    real = np.ones(self.global_batch_size, np.float32)
    if len(idx) < self.global_batch_size:
      fill = self.global_batch_size - len(idx)
      real[len(idx) :] = 0.0
      idx = np.concatenate([idx, np.resize(idx, fill)])
    return idx, real

  def _sequences(self, idx: np.ndarray, resp, resp_off, t: int):
    b = len(idx)
    ids = np.full((b, t), self.pad_id, np.int32)
    mask = np.zeros((b, t), np.int32)
    loss = np.zeros((b, t), np.int32)
    for j, i in enumerate(idx):
      p = self._p[self._po[i] : self._po[i + 1]]
      r = resp[resp_off[i] : resp_off[i + 1]]
      lp, lr = len(p), len(r)
      ids[j, :lp] = p
      ids[j, lp : lp + lr] = r
      mask[j, : lp + lr] = 1
      loss[j, lp : lp + lr] = 1
    return ids, mask, loss

  def packed_shapes(self) -> tuple[tuple[int, int], ...]:
    """The global ``(rows, T)`` shapes a packed batch can have (the train step's programs)."""
    m = self.micro_batches
    return tuple(
      (m * r, self.pack_length) for r in row_buckets(self.global_batch_size // m, self.row_multiple)
    )

  def _packed_batch_at(self, idx: np.ndarray, real: np.ndarray) -> PackedPreferenceBatch:
    # Every host packs the whole global batch (index work only) and keeps its rows and pairs.
    seqs = [
      (
        self._p[self._po[i] : self._po[i + 1]],
        self._c[self._co[i] : self._co[i + 1]],
        self._r[self._ro[i] : self._ro[i + 1]],
      )
      for i in idx
    ]
    packed = pack_pair_rows(
      seqs,
      real,
      seq_len=self.pack_length,
      micro_batches=self.micro_batches,
      row_multiple=self.row_multiple,
      pad_id=self.pad_id,
    )
    rows = packed["ids"].shape[0] // self.num_hosts
    row_sl = slice(self.host_index * rows, (self.host_index + 1) * rows)
    hb = self.host_batch_size
    sl = slice(self.host_index * hb, (self.host_index + 1) * hb)
    idx, real = idx[sl], real[sl]
    pairs = make_preference_batch(
      *(np.zeros((hb, 1), np.int32),) * 6,
      weights=real * (self._extras["weights"][idx] if "weights" in self._extras else 1.0),
      valid=real,
      **{name: self._extras[name][idx] for name in PAIR_EXTRAS[1:] if name in self._extras},
    )
    return PackedPreferenceBatch(
      **{
        k: packed[k][row_sl]
        for k in ("ids", "segment_ids", "positions", "loss_mask", "sequence_index")
      },
      chosen_lengths=packed["chosen_lengths"][sl],
      rejected_lengths=packed["rejected_lengths"][sl],
      weights=pairs.weights,
      valid=pairs.valid,
      ref_chosen_logps=pairs.ref_chosen_logps,
      ref_rejected_logps=pairs.ref_rejected_logps,
      atom_weights=pairs.atom_weights,
      atom_shifts=pairs.atom_shifts,
    )

  def batch_at(self, cursor: LoaderCursor) -> PreferenceBatch | PackedPreferenceBatch:
    """This host's slice of the global batch at ``cursor`` (numpy `PreferenceBatch`, or
    `PackedPreferenceBatch` with ``packing``)."""
    idx, real = self.batch_indices(cursor)
    if self.packing:
      return self._packed_batch_at(idx, real)
    t = round_up(int(self._lengths[idx].max()), self.bucket_size)
    hb = self.host_batch_size
    sl = slice(self.host_index * hb, (self.host_index + 1) * hb)
    idx, real = idx[sl], real[sl]
    chosen = self._sequences(idx, self._c, self._co, t)
    rejected = self._sequences(idx, self._r, self._ro, t)
    weights = real * (self._extras["weights"][idx] if "weights" in self._extras else 1.0)
    kwargs = {name: self._extras[name][idx] for name in PAIR_EXTRAS[1:] if name in self._extras}
    return make_preference_batch(*chosen, *rejected, weights=weights, valid=real, **kwargs)

  def next_cursor(self, cursor: LoaderCursor) -> LoaderCursor:
    """The cursor of the batch after ``cursor`` (the next epoch's first after the last)."""
    if cursor.step + 1 < self.batches_per_epoch:
      return LoaderCursor(cursor.epoch, cursor.step + 1)
    return LoaderCursor(cursor.epoch + 1, 0)

  def iterator(
    self, cursor: LoaderCursor | None = None, *, num_epochs: int | None = None
  ) -> "LoaderIterator":
    """A stateful iterator from ``cursor`` (default start) until epoch ``num_epochs``."""
    return LoaderIterator(self, cursor or LoaderCursor(), num_epochs)

  def __iter__(self) -> Iterator[PreferenceBatch]:
    return self.iterator(num_epochs=1)


class LoaderIterator:
  """Yields `PreferenceBatch`es; ``.cursor`` is the position of the next one (checkpoint it)."""

  def __init__(self, loader: PreferenceLoader, cursor: LoaderCursor, num_epochs: int | None):
    self.loader, self.cursor, self.num_epochs = loader, cursor, num_epochs

  def __iter__(self):
    return self

  def __next__(self) -> PreferenceBatch:
    if self.num_epochs is not None and self.cursor.epoch >= self.num_epochs:
      raise StopIteration
    batch = self.loader.batch_at(self.cursor)
    self.cursor = self.loader.next_cursor(self.cursor)
    return batch
