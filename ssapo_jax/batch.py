"""The preference batch that crosses the jit boundary of the train step.

A DPO pair is (prompt, chosen, rejected). Each side is stored as one token sequence
``prompt + response`` so the policy scores it in a single forward pass; ``*_loss_mask``
marks the response tokens whose log-probabilities count.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class PreferenceBatch:
  """A batch of B preference pairs, right-padded to T tokens.

  Attributes:
    chosen_ids: ``[B, T]`` int32, prompt followed by the chosen response, right-padded.
    chosen_mask: ``[B, T]`` int32, 1 on real tokens (prompt and response), 0 on padding.
    chosen_loss_mask: ``[B, T]`` int32, 1 on chosen-response tokens only.
    rejected_ids: ``[B, T]`` int32, same layout for the rejected response.
    rejected_mask: ``[B, T]`` int32.
    rejected_loss_mask: ``[B, T]`` int32.
    weights: ``[B]`` float32 per-pair multipliers (ones = uniform; a distribution p over
      N pairs enters as ``N * p``); padding rows of a partial batch carry weight 0.
    valid: ``[B]`` float32, 1 on real pairs and 0 on the padding rows of a partial batch; the
      loss is the mean over the real rows (numerator and denominator).
    ref_chosen_logps: ``[B]`` float32 reference log-probs, precomputed once per round.
    ref_rejected_logps: ``[B]`` float32.
    atom_weights: ``[B, K]`` float32 follower atoms (rows sum to 1); ``K = 1`` with weight 1
      and shift 0 is plain DPO.
    atom_shifts: ``[B, K]`` float32, worst-case atom ``z_ik = x_i - shift_ik``.
  """

  chosen_ids: jax.Array
  chosen_mask: jax.Array
  chosen_loss_mask: jax.Array
  rejected_ids: jax.Array
  rejected_mask: jax.Array
  rejected_loss_mask: jax.Array
  weights: jax.Array
  valid: jax.Array
  ref_chosen_logps: jax.Array
  ref_rejected_logps: jax.Array
  atom_weights: jax.Array
  atom_shifts: jax.Array

  @property
  def batch_size(self) -> int:
    """Number of pairs ``B``."""
    return self.chosen_ids.shape[0]

  @property
  def seq_len(self) -> int:
    """Padded sequence length ``T``."""
    return self.chosen_ids.shape[1]

  @property
  def chosen_lengths(self) -> jax.Array:
    """``[B]`` chosen-response token counts, from the loss mask (position 0 never counts:
    it has no preceding token to be scored from)."""
    return jnp.sum(self.chosen_loss_mask[..., 1:], axis=-1)

  @property
  def rejected_lengths(self) -> jax.Array:
    """``[B]`` rejected-response token counts, as `chosen_lengths`."""
    return jnp.sum(self.rejected_loss_mask[..., 1:], axis=-1)


def make_preference_batch(
  chosen_ids,
  chosen_mask,
  chosen_loss_mask,
  rejected_ids,
  rejected_mask,
  rejected_loss_mask,
  *,
  weights=None,
  valid=None,
  ref_chosen_logps=None,
  ref_rejected_logps=None,
  atom_weights=None,
  atom_shifts=None,
) -> PreferenceBatch:
  """Builds a `PreferenceBatch` (numpy arrays), filling optional fields with neutral values.

  Neutral values: uniform weights, every row real, zero reference log-probs, one atom of
  weight 1 and shift 0.
  Chosen and rejected sides must share ``[B, T]``; pad them to a common length first.
  """
  arrays = [
    np.asarray(a)
    for a in (
      chosen_ids,
      chosen_mask,
      chosen_loss_mask,
      rejected_ids,
      rejected_mask,
      rejected_loss_mask,
    )
  ]
  shape = arrays[0].shape
  for name, a in zip(
    (
      "chosen_ids",
      "chosen_mask",
      "chosen_loss_mask",
      "rejected_ids",
      "rejected_mask",
      "rejected_loss_mask",
    ),
    arrays,
  ):
    if a.shape != shape or a.ndim != 2:
      raise ValueError(f"{name} has shape {a.shape}; expected [B, T] = {shape}")
  batch = shape[0]

  def vec(x, fill):
    return np.full((batch,), fill, np.float32) if x is None else np.asarray(x, np.float32)

  if (atom_weights is None) != (atom_shifts is None):
    raise ValueError("atom_weights and atom_shifts must be given together")
  if atom_weights is None:
    atom_weights = np.ones((batch, 1), np.float32)
    atom_shifts = np.zeros((batch, 1), np.float32)
  return PreferenceBatch(
    chosen_ids=arrays[0].astype(np.int32),
    chosen_mask=arrays[1].astype(np.int32),
    chosen_loss_mask=arrays[2].astype(np.int32),
    rejected_ids=arrays[3].astype(np.int32),
    rejected_mask=arrays[4].astype(np.int32),
    rejected_loss_mask=arrays[5].astype(np.int32),
    weights=vec(weights, 1.0),
    valid=vec(valid, 1.0),
    ref_chosen_logps=vec(ref_chosen_logps, 0.0),
    ref_rejected_logps=vec(ref_rejected_logps, 0.0),
    atom_weights=np.asarray(atom_weights, np.float32),
    atom_shifts=np.asarray(atom_shifts, np.float32),
  )


def concat_pairs(batch: PreferenceBatch) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Stacks chosen over rejected along the batch: ``(ids, mask, loss_mask)``, each ``[2B, T]``."""
  return (
    jnp.concatenate([batch.chosen_ids, batch.rejected_ids], axis=0),
    jnp.concatenate([batch.chosen_mask, batch.rejected_mask], axis=0),
    jnp.concatenate([batch.chosen_loss_mask, batch.rejected_loss_mask], axis=0),
  )


# ---------------------------------------------------------------------------------------------
# Packed batches: several sequences share a row.
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class PackedPreferenceBatch:
  """``P`` preference pairs whose ``2P`` sequences are packed into ``R`` rows of ``T`` tokens.

  Each sequence (prompt + response, chosen or rejected) lies whole in one row, as one segment;
  attention never crosses a segment (`ssapo_jax.models.attention`: the mask is the segment
  ids) and positions restart at 0 in every segment, so a sequence's log-probs equal its
  unpacked ones. The per-pair fields are those of `PreferenceBatch`.

  Micro-batches (`ssapo_jax.train.step`) are strided in both rows and pairs: micro-batch ``j``
  of ``M`` holds rows ``j, j+M, ...`` and pair slots ``j, j+M, ...``, and the packer puts a
  pair's sequences only in rows of its own micro-batch (`pack_pair_rows`). With ``M = 1`` any
  placement is valid.

  Attributes:
    ids: ``[R, T]`` int32 tokens, segments back to back, padding after the last one.
    segment_ids: ``[R, T]`` int32, 1, 2, ... per segment within its row, 0 on padding.
    positions: ``[R, T]`` int32 RoPE position within the segment (0 on its first token).
    loss_mask: ``[R, T]`` int32, 1 on response tokens (never on a segment's first token).
    sequence_index: ``[R, T]`` int32 sequence of each token: ``i`` for the chosen and
      ``P + i`` for the rejected side of pair slot ``i``, ``2P`` on padding.
    chosen_lengths, rejected_lengths: ``[P]`` int32 response token counts (as
      `PreferenceBatch.chosen_lengths`).
    weights, valid, ref_chosen_logps, ref_rejected_logps: ``[P]`` float32.
    atom_weights, atom_shifts: ``[P, K]`` float32.
  """

  ids: jax.Array
  segment_ids: jax.Array
  positions: jax.Array
  loss_mask: jax.Array
  sequence_index: jax.Array
  chosen_lengths: jax.Array
  rejected_lengths: jax.Array
  weights: jax.Array
  valid: jax.Array
  ref_chosen_logps: jax.Array
  ref_rejected_logps: jax.Array
  atom_weights: jax.Array
  atom_shifts: jax.Array

  @property
  def batch_size(self) -> int:
    """Pairs ``P`` (not rows)."""
    return self.weights.shape[0]

  @property
  def num_rows(self) -> int:
    return self.ids.shape[0]

  @property
  def seq_len(self) -> int:
    return self.ids.shape[1]


def first_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
  """Bins of at most ``capacity`` total length; each item (index into ``lengths``) whole in one.

  First-fit decreasing (ties by index, so the result is a pure function of ``lengths``): at
  most ``11/9 OPT + 1`` bins. Raises ValueError for an item longer than ``capacity``.
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and lengths.max() > capacity:
    raise ValueError(
      f"a sequence of {int(lengths.max())} tokens does not fit a packed row of {capacity}"
    )
  bins: list[list[int]] = []
  free: list[int] = []
  for i in np.argsort(-lengths, kind="stable"):
    n = int(lengths[i])
    for b, room in enumerate(free):
      if n <= room:
        bins[b].append(int(i))
        free[b] -= n
        break
    else:
      bins.append([int(i)])
      free.append(capacity - n)
  return bins


def row_buckets(pairs_per_micro: int, row_multiple: int = 1) -> tuple[int, ...]:
  """The packed row counts per micro-batch: ``ceil(2p / sqrt(2)^k)`` for ``k = 0, 1, ...``,
  rounded up to ``row_multiple``.

  The largest, ``2p`` (rounded), holds any micro-batch of ``p`` pairs (each sequence fits a
  row alone), so a batch never overflows into a new shape; a run compiles at most
  ``len(row_buckets(...))`` train-step shapes (about ``2 log2(2p) + 1``). Steps of sqrt(2),
  not 2: a batch takes the smallest entry that holds its rows, so at most about 30% of its
  rows are empty instead of 50% (on UltraFeedback-like lengths 21% of the packed cells
  instead of 33%, `benchmarks/train.py --packing`), for at most twice the shapes.
  """
  if pairs_per_micro < 1 or row_multiple < 1:
    raise ValueError(
      f"pairs_per_micro {pairs_per_micro} and row_multiple {row_multiple} must be >= 1"
    )
  out, top, k = set(), 2 * pairs_per_micro, 0
  while True:
    n = int(np.ceil(top / 2 ** (k / 2) - 1e-9))  # exact at even k (powers of two)
    out.add(-(-n // row_multiple) * row_multiple)
    if n <= 1:
      break
    k += 1
  return tuple(sorted(out))


def length_histogram(lengths, bin_width: int) -> dict:
  """``{"bin_width", "counts", "num_sequences"}`` of sequence lengths (prompt + response):
  ``counts[k]`` sequences have ``k * bin_width < length <= (k + 1) * bin_width``. What
  ``ssapo-train --check --length-histogram`` writes and `expected_padding` reads."""
  lengths = np.asarray(lengths, np.int64)
  if bin_width < 1 or (lengths.size and lengths.min() < 1):
    raise ValueError(f"length_histogram: bin_width {bin_width} and lengths must be >= 1")
  bins = (lengths - 1) // bin_width
  counts = np.bincount(bins, minlength=int(bins.max()) + 1 if lengths.size else 0)
  return {"bin_width": int(bin_width), "counts": counts.tolist(), "num_sequences": lengths.size}


def expected_padding(
  histogram: dict,
  *,
  global_batch_size: int,
  bucket_size: int,
  pack_length: int,
  micro_batches: int = 1,
  row_multiple: int = 1,
  num_batches: int = 200,
  seed: int = 0,
) -> dict:
  """The padding fraction a run's batches can expect, padded and packed, from a
  `length_histogram` of its sequences.

  ``num_batches`` global batches of ``2 * global_batch_size`` sequences are drawn from the
  histogram (each length at its bin's upper edge, so the estimate errs towards padding; the
  chosen and rejected side drawn independently). Padded, as the loader without packing: every
  sequence of a batch padded to the batch's longest, rounded up to ``bucket_size``. Packed, as
  `pack_pair_rows`: each micro-batch's sequences first-fit decreasing into rows of
  ``pack_length``, the row count per micro-batch the `row_buckets` entry that holds the fullest
  one. Returns ``{"padded", "packed"}`` (fractions of the computed token slots that are
  padding), ``"padded_lengths"`` and ``"packed_rows"`` (how many of the drawn batches took each
  padded ``T`` and each packed global row count: the shapes a run compiles).
  """
  counts = np.asarray(histogram["counts"], np.float64)
  width = int(histogram["bin_width"])
  if counts.sum() <= 0:
    raise ValueError("expected_padding: the histogram is empty")
  uppers = (np.arange(counts.size) + 1) * width
  if uppers[counts > 0].max() > pack_length:
    raise ValueError(
      f"expected_padding: the histogram has sequences up to {uppers[counts > 0].max()} tokens, "
      f"more than a packed row of {pack_length}"
    )
  rng = np.random.default_rng(seed)
  g, m = global_batch_size, micro_batches
  buckets = row_buckets(-(-g // m), row_multiple)
  real = padded = packed = 0
  lengths_used: dict[int, int] = {}
  rows_used: dict[int, int] = {}
  for _ in range(num_batches):
    lengths = uppers[rng.choice(counts.size, size=2 * g, p=counts / counts.sum())]
    real += int(lengths.sum())
    t = -(-int(lengths.max()) // bucket_size) * bucket_size
    padded += 2 * g * t
    lengths_used[t] = lengths_used.get(t, 0) + 1
    slot = np.arange(2 * g) % g  # sequence k is pair slot k mod g (chosen, then rejected)
    fullest = max(len(first_fit_decreasing(lengths[slot % m == j], pack_length)) for j in range(m))
    rows = m * next(r for r in buckets if r >= fullest)
    packed += rows * pack_length
    rows_used[rows] = rows_used.get(rows, 0) + 1
  return {
    "padded": 1 - real / padded,
    "packed": 1 - real / packed,
    "padded_lengths": dict(sorted(lengths_used.items())),
    "packed_rows": dict(sorted(rows_used.items())),
  }


def pack_pair_rows(
  sequences, real, *, seq_len: int, micro_batches: int = 1, row_multiple: int = 1, pad_id: int = 0
) -> dict[str, np.ndarray]:
  """Packs the sequences of ``P`` pair slots into ``R = M * r`` rows of ``seq_len`` tokens.

  Args:
    sequences: ``P`` tuples ``(prompt, chosen, rejected)`` of 1-D int token arrays.
    real: ``[P]`` 0 for filler slots of a partial batch (their sequences are not packed: they
      score 0 and have ``valid = 0``).
    seq_len: ``T``, tokens per row.
    micro_batches: ``M``; pair slot ``i`` goes to a row of micro-batch ``i % M``.
    row_multiple: ``r`` is a `row_buckets` entry (a multiple of this).
    pad_id: token of the padding.

  Returns:
    numpy ``ids``, ``segment_ids``, ``positions``, ``loss_mask``, ``sequence_index`` (each
    ``[R, T]``) and ``chosen_lengths``, ``rejected_lengths`` (``[P]``), as
    `PackedPreferenceBatch`.
  """
  p_total, m = len(sequences), micro_batches
  if p_total % m:
    raise ValueError(f"{p_total} pair slots do not split into {m} micro-batches")
  real = np.asarray(real) > 0
  seqs = []  # (slot, side, prompt, response)
  for i, (prompt, chosen, rejected) in enumerate(sequences):
    if real[i]:
      seqs += [(i, 0, prompt, chosen), (i, 1, prompt, rejected)]
  per_micro = []
  for j in range(m):
    mine = [s for s in seqs if s[0] % m == j]
    bins = first_fit_decreasing([len(s[2]) + len(s[3]) for s in mine], seq_len)
    per_micro.append([[mine[k] for k in b] for b in bins])
  need = max((len(b) for b in per_micro), default=0)
  r = next(n for n in row_buckets(p_total // m, row_multiple) if n >= max(need, 1))
  rows = [
    [
      [(slot + side * p_total, prompt, response) for slot, side, prompt, response in b]
      for b in bins
    ]
    for bins in per_micro
  ]
  # Strided: micro-batch j owns rows j, j+M, ...
  out = _fill_rows(
    {k * m + j: b for j, bins in enumerate(rows) for k, b in enumerate(bins)},
    num_rows=m * r,
    seq_len=seq_len,
    num_sequences=2 * p_total,
    pad_id=pad_id,
  )
  lengths = out.pop("lengths")
  return {**out, "chosen_lengths": lengths[:p_total], "rejected_lengths": lengths[p_total:]}


def _fill_rows(rows: dict, *, num_rows: int, seq_len: int, num_sequences: int, pad_id: int):
  """Writes ``rows {row: [(sequence index, prompt, response), ...]}`` into `PackedPreferenceBatch`
  token arrays ``[num_rows, seq_len]``; also ``lengths [num_sequences]`` (scored tokens)."""
  shape = (num_rows, seq_len)
  ids = np.full(shape, pad_id, np.int32)
  seg, pos, loss = (np.zeros(shape, np.int32) for _ in range(3))
  index = np.full(shape, num_sequences, np.int32)
  lengths = np.zeros((num_sequences,), np.int32)
  for row, row_seqs in rows.items():
    at = 0
    for n, (k, prompt, response) in enumerate(row_seqs):
      lp, length = len(prompt), len(prompt) + len(response)
      ids[row, at : at + lp], ids[row, at + lp : at + length] = prompt, response
      seg[row, at : at + length] = n + 1
      pos[row, at : at + length] = np.arange(length)
      loss[row, at + max(lp, 1) : at + length] = 1  # a segment's first token is never scored
      index[row, at : at + length] = k
      lengths[k] = max(length - max(lp, 1), 0)
      at += length
  return {
    "ids": ids,
    "segment_ids": seg,
    "positions": pos,
    "loss_mask": loss,
    "sequence_index": index,
    "lengths": lengths,
  }


def pack_sequence_rows(
  prompts, responses, *, seq_len: int, max_sequences: int, row_multiple: int = 1, pad_id: int = 0
) -> dict[str, np.ndarray]:
  """Packs ``n <= max_sequences`` (prompt, response) sequences into rows for scoring.

  The row count is a `row_buckets` entry for ``max_sequences / 2`` pairs (the scorer's buckets
  are the train step's). Sequence ``k`` gets ``sequence_index`` ``k``; padding
  ``max_sequences``. Returns the token arrays of `pack_pair_rows` (no lengths).
  """
  n = len(prompts)
  if n > max_sequences:
    raise ValueError(f"{n} sequences > max_sequences={max_sequences}")
  bins = first_fit_decreasing([len(p) + len(r) for p, r in zip(prompts, responses)], seq_len)
  r = next(c for c in row_buckets(-(-max_sequences // 2), row_multiple) if c >= max(len(bins), 1))
  out = _fill_rows(
    {row: [(k, prompts[k], responses[k]) for k in b] for row, b in enumerate(bins)},
    num_rows=r,
    seq_len=seq_len,
    num_sequences=max_sequences,
    pad_id=pad_id,
  )
  out.pop("lengths")
  return out


def sequence_sums(values: jax.Array, sequence_index: jax.Array, num_sequences: int) -> jax.Array:
  """``[num_sequences]`` sums of ``values [R, T]`` per `PackedPreferenceBatch.sequence_index`
  (``[R, T]``); entries with index ``>= num_sequences`` (padding) are dropped."""
  return jax.ops.segment_sum(
    values.reshape(-1), sequence_index.reshape(-1), num_segments=num_sequences + 1
  )[:num_sequences]
