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
    return self.chosen_ids.shape[0]

  @property
  def seq_len(self) -> int:
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
    chosen_ids, chosen_mask, chosen_loss_mask,
    rejected_ids, rejected_mask, rejected_loss_mask, *,
    weights=None, valid=None, ref_chosen_logps=None, ref_rejected_logps=None,
    atom_weights=None, atom_shifts=None,
) -> PreferenceBatch:
  """Builds a `PreferenceBatch` (numpy arrays), filling optional fields with neutral values.

  Neutral values: uniform weights, every row real, zero reference log-probs, one atom of
  weight 1 and shift 0.
  Chosen and rejected sides must share ``[B, T]``; pad them to a common length first.
  """
  arrays = [np.asarray(a) for a in (chosen_ids, chosen_mask, chosen_loss_mask,
                                    rejected_ids, rejected_mask, rejected_loss_mask)]
  shape = arrays[0].shape
  for name, a in zip(("chosen_ids", "chosen_mask", "chosen_loss_mask", "rejected_ids",
                      "rejected_mask", "rejected_loss_mask"), arrays):
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
      chosen_ids=arrays[0].astype(np.int32), chosen_mask=arrays[1].astype(np.int32),
      chosen_loss_mask=arrays[2].astype(np.int32), rejected_ids=arrays[3].astype(np.int32),
      rejected_mask=arrays[4].astype(np.int32), rejected_loss_mask=arrays[5].astype(np.int32),
      weights=vec(weights, 1.0), valid=vec(valid, 1.0), ref_chosen_logps=vec(ref_chosen_logps, 0.0),
      ref_rejected_logps=vec(ref_rejected_logps, 0.0),
      atom_weights=np.asarray(atom_weights, np.float32),
      atom_shifts=np.asarray(atom_shifts, np.float32))


def concat_pairs(batch: PreferenceBatch) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Stacks chosen over rejected along the batch: ``(ids, mask, loss_mask)``, each ``[2B, T]``."""
  return (jnp.concatenate([batch.chosen_ids, batch.rejected_ids], axis=0),
          jnp.concatenate([batch.chosen_mask, batch.rejected_mask], axis=0),
          jnp.concatenate([batch.chosen_loss_mask, batch.rejected_loss_mask], axis=0))
