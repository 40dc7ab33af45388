"""Sequence log-probabilities and the DPO family of preference losses (pure, jit/vmap/grad-safe).

Conventions: log-probs and losses are float32 even for bf16 logits; per-example
``weights`` multiply per-example losses and the batch takes the mean, so uniform weights are ones
and a distribution p over N pairs enters as ``N * p`` (exact under gradient accumulation and
data-parallel sharding). Metric names follow TRL's DPOTrainer.

Every DPO variant is a small function of the policy/reference log-ratios registered in
`LOSS_TYPES`; `dpo_loss` picks one by name before any array work, so the choice is static under jit.
"""

from __future__ import annotations

import math
import typing
from typing import Callable, Literal

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


def sequence_logps(logits: jax.Array, labels: jax.Array, loss_mask: jax.Array, *,
                   average: bool = False) -> jax.Array:
  """Summed (or averaged) token log-probabilities per sequence.

  Args:
    logits: ``[B, T, V]`` (any float dtype, e.g. bf16), already aligned with ``labels``:
      ``logits[:, t]`` scores ``labels[:, t]``.
    labels: ``[B, T]`` int token ids; values at masked positions are ignored (may be -100).
    loss_mask: ``[B, T]`` 1 where the token counts, 0 elsewhere.
    average: divide by the number of counted tokens (an all-zero mask row gives 0).

  Returns:
    ``[B]`` float32. The log-softmax is computed as ``x - max - log(sum(exp(x - max)))`` with the
    float32 cast inside the reduction, so under jit XLA fuses it and no float32 copy of the
    ``[B, T, V]`` tensor is materialised.
  """
  if logits.ndim != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
    raise ValueError(f"sequence_logps expects logits [B,T,V] and labels/loss_mask [B,T]; got "
                     f"logits {logits.shape}, labels {labels.shape}, loss_mask {loss_mask.shape}")
  mask = loss_mask.astype(jnp.float32)
  safe_labels = jnp.where(loss_mask > 0, labels, 0).astype(jnp.int32)
  max_logit = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)).astype(jnp.float32)
  sum_exp = jnp.sum(jnp.exp(logits.astype(jnp.float32) - max_logit), axis=-1)
  label_logits = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
  token_logps = label_logits.astype(jnp.float32) - max_logit[..., 0] - jnp.log(sum_exp)
  total = jnp.sum(token_logps * mask, axis=-1)
  if average:
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  return total


# Per-example losses. Arguments: chosen/rejected log-ratios log(pi/ref), each [B] float32.
# Formulas follow TRL's DPOTrainer.dpo_loss; the references are in each docstring.

def _sigmoid(chosen_lr, rejected_lr, *, beta, label_smoothing):
  """Rafailov et al. 2023; with label smoothing, the conservative DPO of Mitchell 2023."""
  z = beta * (chosen_lr - rejected_lr)
  return -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def _robust(chosen_lr, rejected_lr, *, beta, label_smoothing):
  """Provably robust DPO (Chowdhury et al. 2024), unbiased under flip rate ``label_smoothing``."""
  z = beta * (chosen_lr - rejected_lr)
  return (-(1 - label_smoothing) * jax.nn.log_sigmoid(z)
          + label_smoothing * jax.nn.log_sigmoid(-z)) / (1 - 2 * label_smoothing)


def _hinge(chosen_lr, rejected_lr, *, beta, label_smoothing):
  """SLiC-HF hinge loss (Zhao et al. 2023)."""
  del label_smoothing
  return jax.nn.relu(1 - beta * (chosen_lr - rejected_lr))


def _ipo(chosen_lr, rejected_lr, *, beta, label_smoothing):
  """IPO (Azar et al. 2023, eq. 17); log-ratios are length-normalised by `dpo_loss`."""
  del label_smoothing
  return (chosen_lr - rejected_lr - 1 / (2 * beta)) ** 2


def _exo_pair(chosen_lr, rejected_lr, *, beta, label_smoothing):
  """EXO, pairwise form (Ji et al. 2024, eq. 16); TRL uses smoothing 1e-3 when given 0."""
  eps = label_smoothing if label_smoothing > 0 else 1e-3
  z = beta * (chosen_lr - rejected_lr)
  return (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log(1 - eps))
          + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - math.log(eps)))


def _bco_pair(chosen_lr, rejected_lr, *, beta, label_smoothing):
  """BCO, pairwise form (Jung et al. 2024).

  TRL shifts rewards by a running mean over steps; a pure function cannot keep that state,
  so the shift is the batch mean of all rewards (stop-gradient), as in TRL's first step.
  """
  del label_smoothing
  chosen_rewards, rejected_rewards = beta * chosen_lr, beta * rejected_lr
  delta = jax.lax.stop_gradient(jnp.mean(jnp.concatenate([chosen_rewards, rejected_rewards])))
  return -jax.nn.log_sigmoid(chosen_rewards - delta) - jax.nn.log_sigmoid(-(rejected_rewards - delta))


def _sppo_hard(chosen_lr, rejected_lr, *, beta, label_smoothing):
  """SPPO with hard labels (Wu et al. 2024)."""
  del label_smoothing
  return (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2


def _nca_pair(chosen_lr, rejected_lr, *, beta, label_smoothing):
  """NCA, pairwise form (Chen et al. 2024)."""
  del label_smoothing
  chosen_rewards, rejected_rewards = beta * chosen_lr, beta * rejected_lr
  return (-jax.nn.log_sigmoid(chosen_rewards) - 0.5 * jax.nn.log_sigmoid(-chosen_rewards)
          - 0.5 * jax.nn.log_sigmoid(-rejected_rewards))


def _apo_zero(chosen_lr, rejected_lr, *, beta, label_smoothing):
  """APO-zero (D'Oosterlinck et al. 2024): raise chosen, lower rejected likelihood."""
  del label_smoothing
  return (1 - jax.nn.sigmoid(beta * chosen_lr)) + jax.nn.sigmoid(beta * rejected_lr)


def _apo_down(chosen_lr, rejected_lr, *, beta, label_smoothing):
  """APO-down (D'Oosterlinck et al. 2024): lower both, rejected more."""
  del label_smoothing
  return jax.nn.sigmoid(beta * chosen_lr) + (1 - jax.nn.sigmoid(beta * (chosen_lr - rejected_lr)))


LossFn = Callable[..., jax.Array]

LOSS_TYPES: dict[str, LossFn] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "nca_pair": _nca_pair,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
}

# Accepted label_smoothing per loss type as (low, high, high_inclusive); others must use 0.
_SMOOTHING_RANGES = {"sigmoid": (0.0, 0.5, True), "robust": (0.0, 0.5, False),
                     "exo_pair": (0.0, 1.0, False)}


def _check_loss_options(loss_type: str, label_smoothing: float) -> LossFn:
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"Unknown loss_type {loss_type!r}; accepted: {sorted(LOSS_TYPES)}")
  low, high, inclusive = _SMOOTHING_RANGES.get(loss_type, (0.0, 0.0, True))
  ok = low <= label_smoothing and (label_smoothing <= high if inclusive else label_smoothing < high)
  if not ok:
    bracket = "]" if inclusive else ")"
    raise ValueError(f"label_smoothing={label_smoothing} is out of range for loss_type "
                     f"{loss_type!r}; accepted: [{low}, {high}{bracket}")
  return LOSS_TYPES[loss_type]


def _reward_metrics(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, beta, losses) -> Metrics:
  chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
  rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
  return {
      "rewards/chosen": jnp.mean(chosen_rewards),
      "rewards/rejected": jnp.mean(rejected_rewards),
      "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
      "logps/chosen": jnp.mean(policy_chosen_logps),
      "logps/rejected": jnp.mean(policy_rejected_logps),
      "losses": losses,
  }


def _weighted_mean(losses: jax.Array, weights: jax.Array | None) -> jax.Array:
  if weights is None:
    return jnp.mean(losses)
  weights = jnp.asarray(weights)
  if weights.shape != losses.shape:
    raise ValueError(f"weights has shape {weights.shape}; expected {losses.shape}")
  return jnp.mean(weights.astype(losses.dtype) * losses)


def _as_f32(*arrays):
  shapes = {a.shape for a in arrays}
  if len(shapes) != 1 or len(next(iter(shapes))) != 1:
    raise ValueError(f"log-prob inputs must share one [B] shape; got {[a.shape for a in arrays]}")
  # At least float32 (bf16 is promoted); float64 stays float64 when x64 is enabled.
  return [jnp.asarray(a, jnp.promote_types(jnp.result_type(a), jnp.float32)) for a in arrays]


def dpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
             ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             weights: jax.Array | None = None, chosen_lengths: jax.Array | None = None,
             rejected_lengths: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """DPO-family preference loss, weighted mean over the batch.

  With ``Δ = (π_c − ref_c) − (π_r − ref_r)``: ``sigmoid`` is ``−log σ(βΔ)`` (with label smoothing
  ε the conservative form ``−(1−ε) log σ(βΔ) − ε log σ(−βΔ)``), ``hinge`` ``relu(1 − βΔ)``,
  ``ipo`` ``(Δ_len − 1/(2β))²``, ``robust`` ``(−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)``;
  the other types follow TRL's DPOTrainer (see `LOSS_TYPES`).

  Args:
    policy_chosen_logps: ``[B]`` summed log-probs of the chosen responses under the policy.
    policy_rejected_logps: ``[B]``.
    ref_chosen_logps: ``[B]`` under the reference model.
    ref_rejected_logps: ``[B]``.
    beta: inverse temperature of the implicit reward.
    loss_type: a key of `LOSS_TYPES`.
    label_smoothing: ε for ``sigmoid`` ([0, 0.5]), ``robust`` ([0, 0.5)) and ``exo_pair``
      ((0, 1); 0 means TRL's 1e-3); must be 0 for the other types.
    weights: optional ``[B]`` per-example multipliers; ``loss = mean(weights * losses)``.
    chosen_lengths: ``[B]`` completion lengths, used by ``ipo`` to length-normalise the
      log-ratios (TRL averages log-probs for IPO). If None, ``ipo`` takes the log-probs as
      already averaged.
    rejected_lengths: ``[B]``.

  Returns:
    ``(loss, metrics)``: scalar float32 loss and TRL-named metrics (scalars) plus ``losses``,
    the per-example ``[B]`` vector.
  """
  loss_fn = _check_loss_options(loss_type, label_smoothing)
  pc, pr, rc, rr = _as_f32(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                           ref_rejected_logps)
  chosen_lr, rejected_lr = pc - rc, pr - rr
  if loss_type == "ipo" and (chosen_lengths is None) != (rejected_lengths is None):
    raise ValueError("ipo needs both chosen_lengths and rejected_lengths, or neither")
  if loss_type == "ipo" and chosen_lengths is not None:
    chosen_lr = chosen_lr / jnp.maximum(jnp.asarray(chosen_lengths, jnp.float32), 1.0)
    rejected_lr = rejected_lr / jnp.maximum(jnp.asarray(rejected_lengths, jnp.float32), 1.0)
  losses = loss_fn(chosen_lr, rejected_lr, beta=beta, label_smoothing=label_smoothing)
  return _weighted_mean(losses, weights), _reward_metrics(pc, pr, rc, rr, beta, losses)


# Where the robust loss (and the follower, `ssapo_jax.dro`) places the atoms: on σ(βΔ) or on βΔ.
Space = Literal["probability", "margin"]
SPACES: tuple[str, ...] = typing.get_args(Space)


def robust_dpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
                    ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array,
                    atom_weights: jax.Array, atom_shifts: jax.Array, *, beta: float = 0.1,
                    space: str = "probability", floor: float = 1e-6,
                    weights: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """The leader's DPO loss under the follower's worst-case distribution (paper §3).

  Each pair i carries K atoms ``z_ik = x_i − shift_ik`` of mass ``atom_weights[i, k]``:

  * ``space="probability"``: ``x_i = σ(βΔ_i)`` and the pair loss is
    ``Σ_k w_ik · −log(max(x_i − shift_ik, floor))`` — the authors' released code
    (``loss_type="weighted"`` in their TRL fork). Atoms in the clamp get zero gradient, as there.
    Atoms with shift exactly 0 use ``−log σ(βΔ_i)`` directly, so one zero-shift atom of weight 1
    is the sigmoid DPO loss exactly (also where σ underflows the floor).
  * ``space="margin"``: ``x_i = βΔ_i`` and the pair loss is ``Σ_k w_ik · −log σ(βΔ_i − shift_ik)``.

  Args:
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``.
    atom_weights: ``[B, K]`` non-negative, rows sum to 1 (the follower's ``s_ik``).
    atom_shifts: ``[B, K]`` (the follower's ``q_ik / s_ik``).
    beta: inverse temperature of the implicit reward.
    space: ``"probability"`` or ``"margin"``.
    floor: lower clamp of the shifted probability (probability space only).
    weights: optional ``[B]`` per-pair multipliers, as in `dpo_loss`.

  Returns:
    ``(loss, metrics)`` as `dpo_loss`.
  """
  if space not in SPACES:
    raise ValueError(f"Unknown space {space!r}; accepted: {list(SPACES)}")
  if not floor > 0:
    raise ValueError(f"floor must be > 0, got {floor}")
  pc, pr, rc, rr = _as_f32(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                           ref_rejected_logps)
  if atom_weights.shape != atom_shifts.shape or atom_weights.shape[:1] != pc.shape:
    raise ValueError(f"atom_weights {atom_weights.shape} and atom_shifts {atom_shifts.shape} "
                     f"must both be [B, K] with B = {pc.shape[0]}")
  atom_weights = jnp.asarray(atom_weights, pc.dtype)
  atom_shifts = jnp.asarray(atom_shifts, pc.dtype)
  z = (beta * ((pc - rc) - (pr - rr)))[:, None]  # [B, 1]
  if space == "probability":
    shifted = jnp.maximum(jax.nn.sigmoid(z) - atom_shifts, floor)
    atom_losses = jnp.where(atom_shifts == 0, -jax.nn.log_sigmoid(z), -jnp.log(shifted))
  else:
    atom_losses = -jax.nn.log_sigmoid(z - atom_shifts)
  losses = jnp.sum(atom_weights * atom_losses, axis=-1)
  return _weighted_mean(losses, weights), _reward_metrics(pc, pr, rc, rr, beta, losses)
