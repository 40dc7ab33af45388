"""Sequence log-probabilities and the DPO family of preference losses (pure, jit/vmap/grad-safe).

Conventions: log-probs and losses are float32 even for bf16 logits; per-example
``weights`` multiply per-example losses and the batch takes the mean, so uniform weights are ones
and a distribution p over N pairs enters as ``N * p`` (exact under gradient accumulation and
data-parallel sharding). Metric names follow TRL's DPOTrainer.

Every DPO variant is a small pure term of the policy/reference log-probs (`LossTerms`)
registered in `LOSS_TYPES`; `dpo_loss` sums the chosen terms, picked by name before any array
work, so the choice is static under jit. The mean is over the real rows only (``valid``); rows
that are padding or have weight 0 contribute exactly 0 (``where``, so a NaN there cannot leak).
Options that change the log-probs themselves are terms too: `ld_token_weights` (LD-DPO) and
`wpo_weights` (WPO) for the train step, `f_divergence_scores` (f-DPO) inside `dpo_loss`.
"""

from __future__ import annotations

import math
import typing
import zlib
from typing import Callable, Literal, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.sharding import PartitionSpec

Metrics = dict[str, jax.Array]


def debug_check(pred, msg: str) -> None:
  """``checkify.debug_check(pred, msg)`` with an error code that depends on ``msg`` only.

  checkify numbers each check it traces from a process-wide counter and the code is a constant
  of the lowered program, so two traces of one program in processes with different histories
  (a run and its resumed self) would differ and miss the persistent compilation cache. Here
  the code is a hash of the message: the same program lowers to the same module everywhere.
  Checks with equal messages share a code (either reports the same text).
  """
  try:
    from jax._src import checkify as checkify_src  # pylint: disable=import-outside-toplevel

    saved = checkify_src.next_code
  except (ImportError, AttributeError):  # another JAX: its own numbering
    checkify.debug_check(pred, msg)
    return
  checkify_src.next_code = lambda: 1 + zlib.crc32(msg.encode()) % (2**30)
  try:
    checkify.debug_check(pred, msg)
  finally:
    checkify_src.next_code = saved


def unsharded_along(x: jax.Array, axis: int = 0) -> jax.Array:
  """``x`` resharded so that ``axis`` is not split over a mesh axis (a no-op otherwise).

  Sorting needs its operand whole along the sorted axis. Under a mesh with
  ``AxisType.Explicit`` axes the operand's type carries its sharding and ``jnp.sort`` raises
  ``ShardingTypeError`` on a batch-sharded array, so the sorts here (`aot`, `aot_unpaired`,
  the follower's breakpoint sort, `quantile_groups`) replicate that axis first; under Auto
  meshes and outside a mesh the type carries no sharding and XLA's partitioner does it.
  """
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  if spec is None or len(spec) <= axis or spec[axis] is None:
    return x
  new = list(spec)
  new[axis] = None
  return jax.sharding.reshard(x, PartitionSpec(*new))


def sequence_logps(
  logits: jax.Array, labels: jax.Array, loss_mask: jax.Array, *, average: bool = False
) -> jax.Array:
  """Summed (or averaged) token log-probabilities per sequence.

  Args:
    logits: ``[B, T, V]`` (any float dtype, e.g. bf16), already aligned with ``labels``:
      ``logits[:, t]`` scores ``labels[:, t]``.
    labels: ``[B, T]`` int token ids in ``[0, V)`` where the mask counts; values at masked
      positions are ignored (may be -100). An out-of-range counted label raises ``ValueError``
      (naming its row and position) when ``labels`` is concrete; under jit it cannot raise, so
      it is a precondition there: the row's result is NaN, and ``checkify.checkify`` of the
      caller with ``errors=checkify.user_checks`` reports it as an error instead.
    loss_mask: ``[B, T]`` 1 where the token counts, 0 elsewhere.
    average: divide by the number of counted tokens (an all-zero mask row gives 0).

  Returns:
    ``[B]`` float32. The log-softmax is computed as ``x - max - log(sum(exp(x - max)))`` with the
    float32 cast inside the reduction, so under jit XLA fuses it and no float32 copy of the
    ``[B, T, V]`` tensor is materialised.
  """
  if logits.ndim != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
    raise ValueError(
      f"sequence_logps expects logits [B,T,V] and labels/loss_mask [B,T]; got "
      f"logits {logits.shape}, labels {labels.shape}, loss_mask {loss_mask.shape}"
    )
  vocab = logits.shape[-1]
  concrete = _concrete(labels), _concrete(loss_mask)
  if concrete[0] is not None and concrete[1] is not None:
    bad = (concrete[1] > 0) & ((concrete[0] < 0) | (concrete[0] >= vocab))
    if bad.any():
      row, pos = (int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
        f"sequence_logps: labels[{row}, {pos}] = {int(concrete[0][row, pos])} is "
        f"outside the vocabulary [0, {vocab}) at a counted position "
        f"({int(bad.sum())} such labels)"
      )
  else:
    counted = loss_mask > 0
    in_range = (labels >= 0) & (labels < vocab)
    debug_check(
      jnp.all(in_range | ~counted),
      f"sequence_logps: a counted label is outside the vocabulary [0, {vocab})",
    )
  mask = loss_mask.astype(jnp.float32)
  in_vocab = (labels >= 0) & (labels < vocab)
  safe_labels = jnp.where((loss_mask > 0) & in_vocab, labels, 0).astype(jnp.int32)
  max_logit = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)).astype(jnp.float32)
  sum_exp = jnp.sum(jnp.exp(logits.astype(jnp.float32) - max_logit), axis=-1)
  label_logits = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
  token_logps = label_logits.astype(jnp.float32) - max_logit[..., 0] - jnp.log(sum_exp)
  # An out-of-range counted label (a precondition under jit) makes its row NaN, not a wrong value.
  token_logps = jnp.where(in_vocab | (loss_mask <= 0), token_logps, jnp.nan)
  total = jnp.sum(token_logps * mask, axis=-1)
  if average:
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  return total


# ---------------------------------------------------------------------------------------------
# Per-row loss terms. Each reads a `LossTerms` and returns the ``[B]`` per-row loss; formulas
# follow TRL's ``DPOTrainer._compute_loss`` (1.16) unless the docstring says otherwise.
# ---------------------------------------------------------------------------------------------


class LossTerms(NamedTuple):
  """What a loss term may read; arrays are ``[B]`` float32 (float64 under x64).

  Rows outside ``keep`` hold neutral values (log-probs 0, length 1), so no term sees a NaN.
  ``chosen_scores``/``rejected_scores`` are the f-divergence scores of the log-ratios (the
  log-ratios themselves for reverse KL); ``chosen_nll`` is the summed token NLL of the chosen
  response and ``mean_chosen_length`` the mean chosen length over the real rows of the batch
  the loss is a mean over (a scalar).
  """

  chosen_scores: jax.Array
  rejected_scores: jax.Array
  chosen_logratios: jax.Array
  rejected_logratios: jax.Array
  chosen_logps: jax.Array
  rejected_logps: jax.Array
  ref_chosen_logps: jax.Array
  ref_rejected_logps: jax.Array
  chosen_lengths: jax.Array
  rejected_lengths: jax.Array
  chosen_nll: jax.Array
  mean_chosen_length: jax.Array
  keep: jax.Array
  beta: float
  label_smoothing: float
  discopop_tau: float


def _smoothed_sigmoid(z, eps):
  return -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def _sigmoid(t: LossTerms) -> jax.Array:
  """Rafailov et al. 2023; with label smoothing, the conservative DPO of Mitchell 2023.

  TRL 1.16 ignores ``label_smoothing`` here; this is cDPO's formula (and TRL 0.24's).
  """
  return _smoothed_sigmoid(t.beta * (t.chosen_scores - t.rejected_scores), t.label_smoothing)


def _robust(t: LossTerms) -> jax.Array:
  """Provably robust DPO (Chowdhury et al. 2024), unbiased under flip rate ``label_smoothing``."""
  z, eps = t.beta * (t.chosen_scores - t.rejected_scores), t.label_smoothing
  return (-(1 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1 - 2 * eps)


def _hinge(t: LossTerms) -> jax.Array:
  """SLiC-HF hinge loss (Zhao et al. 2023)."""
  return jax.nn.relu(1 - t.beta * (t.chosen_scores - t.rejected_scores))


def _ipo(t: LossTerms) -> jax.Array:
  """IPO (Azar et al. 2023, eq. 17) on per-token (length-normalised) log-ratios, as TRL."""
  delta = t.chosen_scores / t.chosen_lengths - t.rejected_scores / t.rejected_lengths
  return (delta - 1 / (2 * t.beta)) ** 2


def _exo_pair(t: LossTerms) -> jax.Array:
  """EXO, pairwise form (Ji et al. 2024, eq. 16) with target ``[1 − ε, ε]``.

  ε is ``label_smoothing``, and 0 means the paper's recommended 1e-3 (TRL 0.24's default;
  TRL 1.16 rejects 0). ``log(1 − ε)`` and ``log ε`` are taken in float64 on the host; TRL 1.16
  computes them in float32 whatever the input dtype, so it differs from the formula by
  ~1e-8 relative.
  """
  z = t.beta * (t.chosen_scores - t.rejected_scores)
  if _concrete(t.label_smoothing) is None:  # traced (an array under jit): the same, on device
    eps = jnp.where(t.label_smoothing > 0, t.label_smoothing, 1e-3).astype(z.dtype)
    log_keep, log_eps = jnp.log1p(-eps), jnp.log(eps)
  else:
    eps = float(t.label_smoothing) if float(t.label_smoothing) > 0 else 1e-3
    log_keep, log_eps = math.log1p(-eps), math.log(eps)
  return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - log_keep) + jax.nn.sigmoid(-z) * (
    jax.nn.log_sigmoid(-z) - log_eps
  )


def _bco_pair(t: LossTerms) -> jax.Array:
  """BCO, pairwise form (Jung et al. 2024, eq. 7): rewards shifted by δ.

  The paper's δ is a running mean of the rewards; a pure function keeps no state across
  steps, so δ is the mean (stop-gradient) of the kept rows' chosen and rejected rewards, the
  value of the paper's running mean at the first step (and TRL 0.24's). TRL 1.16 drops δ.
  """
  chosen, rejected = t.beta * t.chosen_logratios, t.beta * t.rejected_logratios
  count = jnp.maximum(2 * jnp.sum(t.keep), 1)
  delta = jax.lax.stop_gradient(jnp.sum(jnp.where(t.keep, chosen + rejected, 0)) / count)
  return -jax.nn.log_sigmoid(chosen - delta) - jax.nn.log_sigmoid(-(rejected - delta))


def _sppo_hard(t: LossTerms) -> jax.Array:
  """SPPO with hard labels (Wu et al. 2024, eq. 4.7 with P = 1 for the winner)."""
  return (t.chosen_logratios - 0.5 / t.beta) ** 2 + (t.rejected_logratios + 0.5 / t.beta) ** 2


def _nca_pair(t: LossTerms) -> jax.Array:
  """NCA, pairwise form (Chen et al. 2024)."""
  chosen, rejected = t.beta * t.chosen_logratios, t.beta * t.rejected_logratios
  return (
    -jax.nn.log_sigmoid(chosen)
    - 0.5 * jax.nn.log_sigmoid(-chosen)
    - 0.5 * jax.nn.log_sigmoid(-rejected)
  )


def _apo_zero(t: LossTerms) -> jax.Array:
  """APO-zero (D'Oosterlinck et al. 2024, eq. 7): raise chosen, lower rejected likelihood."""
  return (1 - jax.nn.sigmoid(t.beta * t.chosen_logratios)) + jax.nn.sigmoid(
    t.beta * t.rejected_logratios
  )


def _apo_down(t: LossTerms) -> jax.Array:
  """APO-down (D'Oosterlinck et al. 2024, eq. 8): lower both, rejected more."""
  return jax.nn.sigmoid(t.beta * t.chosen_logratios) + (
    1 - jax.nn.sigmoid(t.beta * (t.chosen_logratios - t.rejected_logratios))
  )


def _sorted_into_kept(values: jax.Array, keep: jax.Array) -> jax.Array:
  """Sorts the kept rows' values ascending and writes them back into the kept rows in order."""
  values, keep = unsharded_along(values), unsharded_along(keep)
  ordered = jnp.sort(jnp.where(keep, values, jnp.inf))
  rank = jnp.clip(jnp.cumsum(keep) - 1, 0, values.shape[0] - 1)
  return jnp.where(keep, ordered[rank], 0)


def _aot(t: LossTerms) -> jax.Array:
  """AOT, paired (Melnyk et al. 2024): sorted policy log-ratios against sorted reference ones.

  Sorting couples the rows: a row's loss is not its own pair's, so per-pair weights other
  than 0 (drop) and 1 are rejected by `dpo_loss`.
  """
  policy = _sorted_into_kept(t.chosen_logps - t.rejected_logps, t.keep)
  ref = _sorted_into_kept(t.ref_chosen_logps - t.ref_rejected_logps, t.keep)
  return _smoothed_sigmoid(t.beta * (policy - ref), t.label_smoothing)


def _aot_unpaired(t: LossTerms) -> jax.Array:
  """AOT, unpaired (Melnyk et al. 2024): sorted chosen against sorted rejected log-ratios."""
  chosen = _sorted_into_kept(t.chosen_logratios, t.keep)
  rejected = _sorted_into_kept(t.rejected_logratios, t.keep)
  return _smoothed_sigmoid(t.beta * (chosen - rejected), t.label_smoothing)


def _discopop(t: LossTerms) -> jax.Array:
  """DiscoPOP (Chris Lu et al. 2024, eq. 5): log-ratio-modulated logistic/exponential blend.

  ``exp(−z) σ(z/τ)`` is evaluated as ``exp(log σ(z/τ) − z)`` (equal in exact arithmetic), which
  stays finite where TRL's product gives ``inf · 0``.
  """
  z = t.beta * (t.chosen_scores - t.rejected_scores)
  return -jax.nn.log_sigmoid(z) * jax.nn.sigmoid(-z / t.discopop_tau) + jnp.exp(
    jax.nn.log_sigmoid(z / t.discopop_tau) - z
  )


def _sigmoid_norm(t: LossTerms) -> jax.Array:
  """Sigmoid DPO on per-token (length-normalised) scores."""
  delta = t.chosen_scores / t.chosen_lengths - t.rejected_scores / t.rejected_lengths
  return -jax.nn.log_sigmoid(t.beta * delta)


def _sft(t: LossTerms) -> jax.Array:
  """Token-level NLL of the chosen response (RPO's term, Pang et al. 2024).

  TRL gives every row the batch's token mean ``Σ nll / Σ len``; here row i carries
  ``nll_i / mean_chosen_length``, whose mean over the real rows is that same value (exactly,
  under micro-batching too, given the global mean length) and which per-pair weights weigh
  per pair.
  """
  return t.chosen_nll / t.mean_chosen_length


LossFn = Callable[[LossTerms], jax.Array]

LOSS_TYPES: dict[str, LossFn] = {
  "sigmoid": _sigmoid,
  "hinge": _hinge,
  "ipo": _ipo,
  "robust": _robust,
  "exo_pair": _exo_pair,
  "bco_pair": _bco_pair,
  "sppo_hard": _sppo_hard,
  "nca_pair": _nca_pair,
  "aot": _aot,
  "aot_unpaired": _aot_unpaired,
  "apo_zero": _apo_zero,
  "apo_down": _apo_down,
  "discopop": _discopop,
  "sft": _sft,
  "sigmoid_norm": _sigmoid_norm,
}
LossType = Literal[tuple(LOSS_TYPES)]
# Types that read the response lengths (`dpo_loss` raises without them).
LENGTH_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm", "sft"})
# Types whose row i depends on other rows' values (sorting, a batch mean): a mean over
# micro-batches is not their mean over the batch.
BATCH_COUPLED_LOSS_TYPES = frozenset({"aot", "aot_unpaired", "bco_pair"})
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
F_DIVERGENCES: tuple[str, ...] = typing.get_args(FDivergence)
# Types built on the chosen − rejected score difference, where f-DPO's log Z(x) cancels.
F_DIVERGENCE_LOSS_TYPES = frozenset(
  {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)

# Accepted label_smoothing per loss type as (low, high, high_inclusive); types not listed
# ignore it.
_SMOOTHING_RANGES = {
  "sigmoid": (0.0, 0.5, True),
  "robust": (0.0, 0.5, False),
  "exo_pair": (0.0, 1.0, False),
  "aot": (0.0, 0.5, True),
  "aot_unpaired": (0.0, 0.5, True),
}


def f_divergence_scores(
  logratios: jax.Array, f_divergence_type: str = "reverse_kl", alpha: float = 0.5
) -> jax.Array:
  """f-DPO scores ``f'(π/ref)`` of log-ratios ``[B]`` (Wang et al. 2023, Table 1).

  reverse KL: ``log t``; forward KL: ``1 − 1/t`` (the α = 0 case of the α-divergence, with its
  exponent ``−log t`` clamped at 80 the same way, so a log-ratio of −1e4 stays finite);
  Jensen-Shannon: ``log 2 + log σ(log t)``; α-divergence: ``(t^(α−1) − 1)/(α − 1)`` with the
  exponent clamped at 80, as TRL (reverse KL for ``|α − 1| < 1e-6``).
  """
  if f_divergence_type == "reverse_kl" or (
    f_divergence_type == "alpha_divergence" and abs(alpha - 1.0) < 1e-6
  ):
    return logratios
  if f_divergence_type == "forward_kl":
    return 1 - jnp.exp(jnp.minimum(-logratios, 80.0))
  if f_divergence_type == "js_divergence":
    return math.log(2) + jax.nn.log_sigmoid(logratios)
  if f_divergence_type == "alpha_divergence":
    return (jnp.exp(jnp.minimum((alpha - 1.0) * logratios, 80.0)) - 1.0) / (alpha - 1.0)
  raise ValueError(
    f"Unknown f_divergence_type {f_divergence_type!r}; accepted: {list(F_DIVERGENCES)}"
  )


def ld_token_weights(
  chosen_loss_mask: jax.Array, rejected_loss_mask: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array]:
  """LD-DPO (Liu et al. 2024) token weights of each side, ``[B, T]`` float32 each.

  1 on the first ``min(len_chosen, len_rejected)`` response tokens (the shared length), ``alpha``
  on the rest, 0 off the response; summing token log-probs with these weights gives the
  length-desensitised sequence log-probs, as TRL's ``ld_alpha``.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"ld_alpha must be in [0, 1], got {alpha}")
  chosen = jnp.asarray(chosen_loss_mask, jnp.float32)
  rejected = jnp.asarray(rejected_loss_mask, jnp.float32)
  shared = jnp.minimum(jnp.sum(chosen, -1), jnp.sum(rejected, -1))[:, None]

  def weights(mask):
    position = jnp.cumsum(mask, axis=-1)
    return mask * jnp.where(position <= shared, 1.0, alpha)

  return weights(chosen), weights(rejected)


def wpo_weights(
  token_logps: jax.Array, token_log_sum_sq: jax.Array, loss_mask: jax.Array
) -> jax.Array:
  """WPO sequence weights (Zhou et al. 2024, eq. 2), ``[N]``, without gradient.

  ``exp(mean_t (log p_t − log Σ_v p_v(t)²))`` over the response tokens; a pair's weight is its
  chosen times its rejected weight.

  Args:
    token_logps: ``[N, T]`` log-probabilities of the sequence's tokens.
    token_log_sum_sq: ``[N, T]`` ``log Σ_v p_v²`` of each position's next-token distribution.
    loss_mask: ``[N, T]`` 1 on response tokens.
  """
  mask = jnp.asarray(loss_mask, jnp.float32)
  aligned = jnp.sum((token_logps - token_log_sum_sq) * mask, axis=-1)
  return jax.lax.stop_gradient(jnp.exp(aligned / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)))


class PairLogps(NamedTuple):
  """Per-pair sequence quantities from token log-probs (`pair_logps`); all ``[B]``."""

  chosen_logps: jax.Array  # summed (LD-weighted with ld_alpha) response log-probs
  rejected_logps: jax.Array
  chosen_lengths: jax.Array  # response token counts
  rejected_lengths: jax.Array
  chosen_nll: jax.Array  # plain summed NLL of the chosen response (the sft term's)
  wpo_weights: jax.Array | None  # chosen × rejected WPO weight, or None


def pair_logps(
  token_logps: jax.Array,
  loss_mask: jax.Array,
  *,
  ld_alpha: float | None = None,
  token_log_sum_sq: jax.Array | None = None,
) -> PairLogps:
  """Reduces token log-probs of stacked pairs to the per-pair inputs of `dpo_loss`.

  Args:
    token_logps: ``[2B, T]`` float32 log-probs, chosen rows over rejected rows (`concat_pairs`).
    loss_mask: ``[2B, T]`` 1 on response tokens.
    ld_alpha: LD-DPO's α (`ld_token_weights`); None sums the tokens plainly.
    token_log_sum_sq: ``[2B, T]`` ``log Σ_v p_v²`` per position, for WPO (`wpo_weights`).
  """
  mask = jnp.asarray(loss_mask, jnp.float32)
  half = mask.shape[0] // 2
  chosen_mask, rejected_mask = mask[:half], mask[half:]
  plain = jnp.sum(token_logps * mask, axis=-1)
  if ld_alpha is None:
    logps = plain
  else:
    ld_chosen, ld_rejected = ld_token_weights(chosen_mask, rejected_mask, ld_alpha)
    logps = jnp.sum(token_logps * jnp.concatenate([ld_chosen, ld_rejected]), axis=-1)
  pair_weights = None
  if token_log_sum_sq is not None:
    seq = wpo_weights(token_logps, token_log_sum_sq, mask)
    pair_weights = seq[:half] * seq[half:]
  lengths = jnp.sum(mask, axis=-1)
  return PairLogps(
    logps[:half], logps[half:], lengths[:half], lengths[half:], -plain[:half], pair_weights
  )


def _combination(loss_type, loss_weights, rpo_alpha) -> tuple[tuple[str, ...], tuple[float, ...]]:
  types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
  if not types:
    raise ValueError("loss_type is empty; give at least one of " + str(sorted(LOSS_TYPES)))
  for name in types:
    if name not in LOSS_TYPES:
      raise ValueError(f"Unknown loss_type {name!r}; accepted: {sorted(LOSS_TYPES)}")
  lambdas = (1.0,) * len(types) if loss_weights is None else tuple(float(w) for w in loss_weights)
  if len(lambdas) != len(types):
    raise ValueError(f"loss_weights has {len(lambdas)} entries for {len(types)} loss types")
  if rpo_alpha is not None:  # RPO's α · NLL is the sft term at weight α (TRL 1.16's spelling)
    if not rpo_alpha >= 0:
      raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
    types, lambdas = types + ("sft",), lambdas + (float(rpo_alpha),)
  return types, lambdas


def check_loss_options(
  loss_type: str | Sequence[str] = "sigmoid",
  *,
  beta: float = 0.1,
  label_smoothing: float = 0.0,
  loss_weights: Sequence[float] | None = None,
  f_divergence_type: str = "reverse_kl",
  discopop_tau: float = 0.05,
  rpo_alpha: float | None = None,
) -> tuple[tuple[str, ...], tuple[float, ...]]:
  """Validates `dpo_loss` options (host-side); returns the ``(types, weights)`` combination."""
  types, lambdas = _combination(loss_type, loss_weights, rpo_alpha)
  if not isinstance(beta, jax.core.Tracer) and not beta > 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  users = [name for name in types if name in _SMOOTHING_RANGES]
  if _concrete(label_smoothing) is None:
    # A traced label_smoothing (e.g. swept under jit or vmap) cannot be range-checked here: its
    # range is a precondition (`dpo_loss`'s docstring); whether a type reads it is static.
    if not users:
      raise ValueError(
        f"label_smoothing is a traced array but loss_type {list(types)} does not "
        f"use it; accepted: 0 (it applies to {sorted(_SMOOTHING_RANGES)})"
      )
    if jnp.ndim(label_smoothing) != 0:
      raise ValueError(f"label_smoothing must be a scalar, got shape {jnp.shape(label_smoothing)}")
    users, label_smoothing = [], 0.0  # checked: a user exists; its value is a precondition
  elif np.ndim(label_smoothing) != 0:
    raise ValueError(f"label_smoothing must be a scalar, got shape {np.shape(label_smoothing)}")
  else:
    label_smoothing = float(label_smoothing)
  if not users and label_smoothing != 0:
    raise ValueError(
      f"label_smoothing={label_smoothing} has no effect on loss_type {list(types)}; "
      f"accepted: 0 (it applies to {sorted(_SMOOTHING_RANGES)})"
    )
  for name in users:
    low, high, inclusive = _SMOOTHING_RANGES[name]
    ok = low <= label_smoothing and (
      label_smoothing <= high if inclusive else label_smoothing < high
    )
    if not ok:
      bracket = "]" if inclusive else ")"
      raise ValueError(
        f"label_smoothing={label_smoothing} is out of range for loss_type "
        f"{name!r}; accepted: [{low}, {high}{bracket}"
      )
  if f_divergence_type not in F_DIVERGENCES:
    raise ValueError(
      f"Unknown f_divergence_type {f_divergence_type!r}; accepted: {list(F_DIVERGENCES)}"
    )
  if f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSS_TYPES:
    raise ValueError(
      f"f_divergence_type={f_divergence_type!r} needs loss types built on the "
      f"chosen-rejected score difference; accepted: {sorted(F_DIVERGENCE_LOSS_TYPES)}, "
      f"got {list(types)}"
    )
  if "discopop" in types and not discopop_tau > 0:
    raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
  return types, lambdas


def _concrete(x) -> np.ndarray | None:
  """``x`` as numpy when its value is known here (outside jit), else None."""
  if x is None or isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _as_float(*arrays):
  shapes = {jnp.shape(a) for a in arrays}
  if len(shapes) != 1 or len(next(iter(shapes))) != 1:
    raise ValueError(
      f"log-prob inputs must share one [B] shape; got {[jnp.shape(a) for a in arrays]}"
    )
  # At least float32 (bf16 is promoted); float64 stays float64 when x64 is enabled.
  dtype = jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
  return [jnp.asarray(a, dtype) for a in arrays]


class _Rows(NamedTuple):
  """Row bookkeeping shared by `dpo_loss` and `robust_dpo_loss`."""

  weights: jax.Array  # [B] per-row multipliers (ones when none were given)
  valid: jax.Array  # [B] bool: real rows (not padding)
  keep: jax.Array  # [B] bool: real rows with nonzero weight, the rows that reach a loss
  num_real_rows: jax.Array  # [] the mean's denominator


def _rows(batch: int, dtype, weights, valid, num_real_rows) -> _Rows:
  w = jnp.ones((batch,), dtype) if weights is None else jnp.asarray(weights, dtype)
  if w.shape != (batch,):
    raise ValueError(f"weights has shape {w.shape}; expected ({batch},)")
  concrete = _concrete(weights)
  if concrete is not None and np.any(concrete < 0):
    raise ValueError(
      f"weights must be >= 0; row {int(np.argmax(concrete < 0))} has "
      f"{concrete[np.argmax(concrete < 0)]}"
    )
  v = jnp.ones((batch,), bool) if valid is None else jnp.asarray(valid) > 0
  if v.shape != (batch,):
    raise ValueError(f"valid has shape {v.shape}; expected ({batch},)")
  # `where`, not a product: a dropped row's NaN times 0 would still be NaN.
  keep = v & (w != 0)
  count = jnp.sum(v).astype(dtype) if num_real_rows is None else jnp.asarray(num_real_rows, dtype)
  return _Rows(w, v, keep, jnp.maximum(count, 1))


def _masked(x, keep, neutral=0.0):
  return jnp.where(keep, x, neutral)


def _mean_chosen_length(lengths, valid, mean_chosen_length, dtype):
  """The sft normaliser: mean chosen length over the real rows (at least 1); a scalar."""
  if mean_chosen_length is None:
    if lengths is None:
      return jnp.ones((), dtype)
    lengths = jnp.maximum(jnp.asarray(lengths, dtype), 1.0)
    mean_chosen_length = jnp.sum(jnp.where(valid, lengths, 0)) / jnp.maximum(
      jnp.sum(valid), 1
    ).astype(dtype)
  return jnp.maximum(jnp.asarray(mean_chosen_length, dtype), 1.0)


def _reward_metrics(pc, pr, rc, rr, beta, keep) -> Metrics:
  """TRL's reward/log-prob metrics, means over the kept rows."""
  chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
  count = jnp.maximum(jnp.sum(keep), 1).astype(pc.dtype)

  def mean(x):
    return jnp.sum(jnp.where(keep, x, 0)) / count

  return {
    "rewards/chosen": mean(chosen_rewards),
    "rewards/rejected": mean(rejected_rewards),
    "rewards/accuracies": mean((chosen_rewards > rejected_rewards).astype(pc.dtype)),
    "rewards/margins": mean(chosen_rewards - rejected_rewards),
    "logps/chosen": mean(pc),
    "logps/rejected": mean(pr),
  }


def dpo_loss(
  policy_chosen_logps: jax.Array,
  policy_rejected_logps: jax.Array,
  ref_chosen_logps: jax.Array,
  ref_rejected_logps: jax.Array,
  *,
  beta: float = 0.1,
  loss_type: str | Sequence[str] = "sigmoid",
  loss_weights: Sequence[float] | None = None,
  label_smoothing: float = 0.0,
  weights: jax.Array | None = None,
  valid: jax.Array | None = None,
  num_real_rows: jax.Array | int | None = None,
  chosen_lengths: jax.Array | None = None,
  rejected_lengths: jax.Array | None = None,
  chosen_nll: jax.Array | None = None,
  mean_chosen_length: jax.Array | None = None,
  f_divergence_type: str = "reverse_kl",
  f_alpha_divergence_coef: float = 0.5,
  discopop_tau: float = 0.05,
  rpo_alpha: float | None = None,
  reference_free: bool = False,
) -> tuple[jax.Array, Metrics]:
  """DPO-family preference loss: weighted mean over the real rows of a sum of loss terms.

  With ``Δ = (π_c − ref_c) − (π_r − ref_r)``: ``sigmoid`` is ``−log σ(βΔ)`` (with label smoothing
  ε the conservative form ``−(1−ε) log σ(βΔ) − ε log σ(−βΔ)``), ``hinge`` ``relu(1 − βΔ)``,
  ``ipo`` ``(Δ_len − 1/(2β))²`` on per-token log-ratios, ``robust``
  ``(−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)``; the other types follow TRL 1.16's
  ``DPOTrainer`` (each term's docstring in `LOSS_TYPES` names its paper and any deviation).

  ``loss = Σ_k λ_k Σ_{i kept} w_i ℓ_k(i) / num_real_rows``. A row is kept when it is real
  (``valid``) and its weight is nonzero; other rows contribute exactly 0 to the loss and its
  gradient even when their inputs are NaN or inf.

  Args:
    policy_chosen_logps: ``[B]`` summed log-probs of the chosen responses under the policy.
    policy_rejected_logps: ``[B]``.
    ref_chosen_logps: ``[B]`` under the reference model.
    ref_rejected_logps: ``[B]``.
    beta: inverse temperature of the implicit reward (> 0).
    loss_type: a key of `LOSS_TYPES`, or several, summed with ``loss_weights`` (TRL's MPO-style
      combinations).
    loss_weights: λ_k per loss type; default 1 each.
    label_smoothing: ε for ``sigmoid``/``aot``/``aot_unpaired`` ([0, 0.5]), ``robust``
      ([0, 0.5)) and ``exo_pair`` ([0, 1); 0 means 1e-3); must be 0 when no type uses it.
      A float or a scalar array: a traced value (under jit, vmap or grad) is accepted when a
      chosen type uses it, and its range is then a precondition (it cannot be checked there).
    weights: optional ``[B]`` per-pair multipliers (>= 0); a distribution p over N pairs enters
      as ``N * p``. ``aot``/``aot_unpaired`` sort rows, so they accept only weights 0 and 1.
    valid: optional ``[B]`` 1 on real rows, 0 on padding rows; default all real.
    num_real_rows: the mean's denominator; default ``Σ valid``. A micro-batch passes the real
      rows of its global batch, so micro-batch losses sum to the global mean exactly.
    chosen_lengths: ``[B]`` response token counts; needed by ``ipo``, ``sigmoid_norm``, ``sft``
      and ``rpo_alpha`` (a ValueError otherwise).
    rejected_lengths: ``[B]``.
    chosen_nll: ``[B]`` summed token NLL of the chosen response for ``sft``/``rpo_alpha``;
      default ``−policy_chosen_logps`` (pass it when those log-probs are LD-weighted).
    mean_chosen_length: mean of ``chosen_lengths`` over the real rows of the global batch;
      default this batch's.
    f_divergence_type: f-DPO regulariser (`F_DIVERGENCES`); non-default values only with
      `F_DIVERGENCE_LOSS_TYPES`.
    f_alpha_divergence_coef: α of ``alpha_divergence``.
    discopop_tau: τ of ``discopop``.
    rpo_alpha: adds ``rpo_alpha ×`` the ``sft`` term (RPO; TRL 1.16 spells it as
      ``loss_type=[..., "sft"]``).
    reference_free: use a uniform reference (reference log-probs 0).

  Returns:
    ``(loss, metrics)``: scalar loss (float32, float64 under x64) and TRL-named metrics
    (means over the kept rows), ``nll_loss`` with an ``sft`` term, and ``losses``, the
    per-row ``[B]`` combined loss (0 on dropped rows).
  """
  types, lambdas = check_loss_options(
    loss_type,
    beta=beta,
    label_smoothing=label_smoothing,
    loss_weights=loss_weights,
    f_divergence_type=f_divergence_type,
    discopop_tau=discopop_tau,
    rpo_alpha=rpo_alpha,
  )
  needs = sorted(LENGTH_LOSS_TYPES & set(types))
  if needs and (chosen_lengths is None or rejected_lengths is None):
    raise ValueError(
      f"loss_type {needs} needs chosen_lengths and rejected_lengths (response "
      "token counts); the train step takes them from the batch's loss masks"
    )
  pc, pr, rc, rr = _as_float(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
  )
  dtype, batch = pc.dtype, pc.shape[0]
  rows = _rows(batch, dtype, weights, valid, num_real_rows)
  if {"aot", "aot_unpaired"} & set(types):
    concrete = _concrete(weights)
    if concrete is not None and not np.all((concrete == 0) | (concrete == 1)):
      raise ValueError("aot/aot_unpaired sort rows, so per-pair weights must be 0 or 1")
  keep = rows.keep
  if reference_free:
    rc, rr = jnp.zeros_like(rc), jnp.zeros_like(rr)
  pc, pr, rc, rr = (_masked(x, keep) for x in (pc, pr, rc, rr))
  ones = jnp.ones((batch,), dtype)
  lc = ones if chosen_lengths is None else _masked(jnp.asarray(chosen_lengths, dtype), keep, 1.0)
  lr = (
    ones if rejected_lengths is None else _masked(jnp.asarray(rejected_lengths, dtype), keep, 1.0)
  )
  lc, lr = jnp.maximum(lc, 1.0), jnp.maximum(lr, 1.0)
  nll = -pc if chosen_nll is None else _masked(jnp.asarray(chosen_nll, dtype), keep)
  chosen_lr, rejected_lr = pc - rc, pr - rr
  terms = LossTerms(
    chosen_scores=f_divergence_scores(chosen_lr, f_divergence_type, f_alpha_divergence_coef),
    rejected_scores=f_divergence_scores(rejected_lr, f_divergence_type, f_alpha_divergence_coef),
    chosen_logratios=chosen_lr,
    rejected_logratios=rejected_lr,
    chosen_logps=pc,
    rejected_logps=pr,
    ref_chosen_logps=rc,
    ref_rejected_logps=rr,
    chosen_lengths=lc,
    rejected_lengths=lr,
    chosen_nll=nll,
    mean_chosen_length=_mean_chosen_length(chosen_lengths, rows.valid, mean_chosen_length, dtype),
    keep=keep,
    beta=beta,
    label_smoothing=label_smoothing,
    discopop_tau=discopop_tau,
  )
  per_row = sum(lam * LOSS_TYPES[name](terms) for name, lam in zip(types, lambdas))
  per_row = _masked(per_row, keep)
  loss = jnp.sum(_masked(rows.weights * per_row, keep)) / rows.num_real_rows
  metrics = _reward_metrics(pc, pr, rc, rr, beta, keep)
  if "sft" in types:
    metrics["nll_loss"] = jnp.sum(_masked(_sft(terms), keep)) / jnp.maximum(
      jnp.sum(keep), 1
    ).astype(dtype)
  metrics["losses"] = per_row
  return loss, metrics


# Where the robust loss (and the follower, `ssapo_jax.dro`) places the atoms: on σ(βΔ) or on βΔ.
Space = Literal["probability", "margin"]
SPACES: tuple[str, ...] = typing.get_args(Space)


@flax.struct.dataclass
class LossAtoms:
  """The follower's worst-case atoms for `robust_dpo_loss`, and the space they were made in.

  A pytree: ``weights`` and ``shifts`` are its leaves (they go through jit, vmap, sharding and
  optax like any array); ``space`` and ``margin_scale`` are static metadata (part of the tree
  structure, so a change re-traces instead of being silently ignored).

  Pair ``i`` carries ``K`` atoms ``z_ik = x_i − shifts[i, k]`` of mass ``weights[i, k]``, with
  ``x_i = σ(margin_scale·m_i)`` (``space="probability"``) or ``margin_scale·m_i``
  (``space="margin"``) for the pair's implicit-reward margin ``m_i``.

  Attributes:
    weights: ``[B, K]`` float, non-negative, each row sums to 1 (the follower's ``s_ik``).
    shifts: ``[B, K]`` float, ``q_ik / s_ik`` (0 where the weight is 0).
    space: ``"probability"`` or ``"margin"`` (static): where the atoms live.
    margin_scale: the scale that mapped margins to ``x`` when the atoms were solved (static); the
      loss reads ``x`` at ``β·m``, so it must equal the loss's ``beta`` unless the caller allows a
      mismatch. None marks atoms that hold at any scale (every shift 0, e.g. `LossAtoms.point`).
  """

  weights: jax.Array
  shifts: jax.Array
  space: str = flax.struct.field(pytree_node=False, default="probability")
  margin_scale: float | None = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def point(cls, batch: int, *, space: str = "probability", dtype=jnp.float32) -> "LossAtoms":
    """One atom of weight 1 and shift 0 per row (``[batch, 1]``): plain sigmoid DPO."""
    return cls(
      jnp.ones((batch, 1), dtype), jnp.zeros((batch, 1), dtype), space=space, margin_scale=None
    )

  def check(self, batch: int | None = None) -> "LossAtoms":
    """Validates the atoms; returns them unchanged (see `check_atoms`)."""
    check_atoms(self, batch)
    return self


def check_atoms(
  atoms: LossAtoms, batch: int | None = None, *, valid=None, tol: float = 1e-5
) -> None:
  """Raises ``ValueError`` when ``atoms`` are malformed.

  Always (shapes and static fields are known under jit): ``weights`` and ``shifts`` are both
  ``[B, K]`` with ``K ≥ 1`` (and ``B = batch`` when given), and ``space`` is one of `SPACES`.
  On concrete arrays (outside jit): weights are finite and ``≥ 0``, every row sums to 1 within
  ``tol``, shifts are finite, and atoms with ``margin_scale=None`` have zero shifts; the message
  names the first bad row. Rows where ``valid`` (optional ``[B]``) is False are not
  value-checked (padding may hold anything). Under jit these value checks cannot raise; they are emitted as
  ``checkify.debug_check`` instead, a no-op unless the caller wraps its function with
  ``checkify.checkify(f, errors=checkify.user_checks)``, which then returns them as errors.
  """
  if not isinstance(atoms, LossAtoms):
    raise TypeError(
      f"atoms must be a LossAtoms (weights [B, K], shifts [B, K], space, "
      f"margin_scale), got {type(atoms).__name__}; wrap raw arrays with "
      f"LossAtoms(weights, shifts, space=..., margin_scale=...)"
    )
  if atoms.space not in SPACES:
    raise ValueError(f"atoms.space must be one of {list(SPACES)}, got {atoms.space!r}")
  w_shape, s_shape = jnp.shape(atoms.weights), jnp.shape(atoms.shifts)
  if len(w_shape) != 2 or w_shape != s_shape or w_shape[1] < 1:
    raise ValueError(
      f"atoms.weights {w_shape} and atoms.shifts {s_shape} must both be [B, K] with K >= 1"
    )
  if batch is not None and w_shape[0] != batch:
    raise ValueError(f"atoms have {w_shape[0]} rows; the loss has B = {batch} pairs")
  if atoms.margin_scale is not None and not (
    np.isfinite(atoms.margin_scale) and atoms.margin_scale > 0
  ):
    raise ValueError(f"atoms.margin_scale must be finite and > 0 or None, got {atoms.margin_scale}")
  w, s = _concrete(atoms.weights), _concrete(atoms.shifts)
  v = np.ones(w_shape[0], bool) if valid is None else _concrete(valid)
  if w is None or s is None or v is None:
    rows = (jnp.ones(w_shape[0], bool) if valid is None else jnp.asarray(valid) > 0)[:, None]
    weights = jnp.where(rows, jnp.asarray(atoms.weights), 1.0 / w_shape[1])
    shifts = jnp.where(rows, jnp.asarray(atoms.shifts), 0.0)
    total = jnp.sum(weights, axis=1)
    debug_check(
      jnp.all(jnp.isfinite(weights) & (weights >= 0)), "atoms.weights must be finite and >= 0"
    )
    debug_check(
      jnp.all(jnp.abs(total - 1) <= tol), f"atoms.weights rows must sum to 1 within {tol}"
    )
    debug_check(jnp.all(jnp.isfinite(shifts)), "atoms.shifts must be finite")
    if atoms.margin_scale is None:
      debug_check(jnp.all(shifts == 0), "atoms with margin_scale=None must have zero shifts")
    return
  rows = (np.asarray(v) > 0)[:, None]
  w = np.where(rows, w.astype(np.float64), 1.0 / w_shape[1])
  s = np.where(rows, s.astype(np.float64), 0.0)
  bad = ~np.isfinite(w) | (w < 0)
  if bad.any():
    row = int(np.argwhere(bad)[0, 0])
    raise ValueError(f"atoms.weights must be finite and >= 0; row {row} is {w[row].tolist()}")
  total = w.sum(axis=1)
  bad = np.abs(total - 1) > tol
  if bad.any():
    row = int(np.argmax(bad))
    raise ValueError(
      f"atoms.weights rows must sum to 1 within {tol}; row {row} sums to "
      f"{total[row]!r} ({int(bad.sum())} such rows)"
    )
  bad = ~np.isfinite(s)
  if bad.any():
    raise ValueError(f"atoms.shifts must be finite; row {int(np.argwhere(bad)[0, 0])} is not")
  if atoms.margin_scale is None and np.any(s != 0):
    raise ValueError(
      f"atoms with margin_scale=None hold at any scale only with zero shifts; row "
      f"{int(np.argwhere(s != 0)[0, 0])} has a non-zero shift: give the "
      f"margin_scale the follower used"
    )


def check_atom_scale(
  margin_scale: float | None, beta, *, allow_scale_mismatch: bool = False, rtol: float = 1e-6
) -> None:
  """Raises ``ValueError`` when atoms solved at ``margin_scale`` are used by a loss at ``beta``.

  The follower reads each pair at ``x = σ(margin_scale·m)`` (or ``margin_scale·m``) and the loss
  at ``σ(β·m)``: unless the two scales agree, the worst case was computed at another point than
  the one the loss shifts. ``allow_scale_mismatch=True`` accepts it on purpose (the authors'
  Llama-3 run: ``σ(0.1·m)`` in the follower with ``β = 0.05``; see ``dro.allow_scale_mismatch``).
  ``margin_scale=None`` (scale-free atoms) and a traced ``beta`` are not checked.
  """
  if margin_scale is None or allow_scale_mismatch or isinstance(beta, jax.core.Tracer):
    return
  if not math.isclose(float(margin_scale), float(beta), rel_tol=rtol):
    raise ValueError(
      f"atoms were solved with margin_scale={margin_scale} but the loss uses "
      f"beta={beta}; set them equal (dro.margin_scale: null follows train.beta) "
      f"or pass allow_scale_mismatch=True (dro.allow_scale_mismatch: true) to "
      f"keep the difference on purpose"
    )


def robust_dpo_loss(
  policy_chosen_logps: jax.Array,
  policy_rejected_logps: jax.Array,
  ref_chosen_logps: jax.Array,
  ref_rejected_logps: jax.Array,
  atoms: LossAtoms,
  *,
  beta: float = 0.1,
  space: str = "probability",
  floor: float = 1e-6,
  allow_scale_mismatch: bool = False,
  weights: jax.Array | None = None,
  valid: jax.Array | None = None,
  num_real_rows: jax.Array | int | None = None,
  chosen_lengths: jax.Array | None = None,
  chosen_nll: jax.Array | None = None,
  mean_chosen_length: jax.Array | None = None,
  rpo_alpha: float | None = None,
  reference_free: bool = False,
) -> tuple[jax.Array, Metrics]:
  """The leader's DPO loss under the follower's worst-case distribution (paper §3).

  Each pair i carries K atoms ``z_ik = x_i − shift_ik`` of mass ``atom_weights[i, k]``:

  * ``space="probability"``: ``x_i = σ(βΔ_i)`` and the pair loss is
    ``Σ_k w_ik · −log(max(x_i − shift_ik, floor))`` — the authors' released code
    (``loss_type="weighted"`` in their TRL fork). Atoms in the clamp get zero gradient, as there.
    Atoms with shift exactly 0 use ``−log σ(βΔ_i)`` directly, so one zero-shift atom of weight 1
    is the sigmoid DPO loss exactly (also where σ underflows the floor, where the authors'
    clamp gives ``−log floor`` and zero gradient: a deliberate difference, see the README).
  * ``space="margin"``: ``x_i = βΔ_i`` and the pair loss is ``Σ_k w_ik · −log σ(βΔ_i − shift_ik)``.

  Rows are kept, weighted and averaged as in `dpo_loss`; the options shared with it
  (``valid``, ``num_real_rows``, ``rpo_alpha`` with ``chosen_lengths``/``chosen_nll``/
  ``mean_chosen_length``, ``reference_free``) mean the same. The atoms of padding rows
  (``valid`` 0) are neither checked nor read.

  Checks (`check_atoms`, `check_atom_scale`), all before any array work: the atoms' shapes and
  ``space`` (always, also under jit); their values (outside jit: ``ValueError`` naming the row;
  under jit: ``checkify`` checks, see `check_atoms`); ``atoms.space == space``; and
  ``atoms.margin_scale == beta`` unless ``allow_scale_mismatch``.

  Args:
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``.
    atoms: `LossAtoms` with ``weights``/``shifts`` ``[B, K]`` (the follower's answer, e.g.
      `ssapo_jax.dro.follower_atoms`).
    beta: inverse temperature of the implicit reward (> 0).
    space: ``"probability"`` or ``"margin"``; must equal ``atoms.space``.
    floor: lower clamp of the shifted probability (probability space only).
    allow_scale_mismatch: accept atoms whose ``margin_scale`` differs from ``beta`` (a
      deliberate choice, as the authors' Llama-3 run; see `check_atom_scale`).
    weights: optional ``[B]`` per-pair multipliers (>= 0), as in `dpo_loss`.

  Returns:
    ``(loss, metrics)`` as `dpo_loss`.
  """
  if space not in SPACES:
    raise ValueError(f"Unknown space {space!r}; accepted: {list(SPACES)}")
  if not floor > 0:
    raise ValueError(f"floor must be > 0, got {floor}")
  if not isinstance(beta, jax.core.Tracer) and not beta > 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  if rpo_alpha is not None and not rpo_alpha >= 0:
    raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
  if rpo_alpha is not None and chosen_lengths is None:
    raise ValueError("rpo_alpha needs chosen_lengths (response token counts)")
  pc, pr, rc, rr = _as_float(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
  )
  check_atoms(atoms, pc.shape[0], valid=valid)
  if atoms.space != space:
    raise ValueError(
      f"atoms were solved in space={atoms.space!r} but the loss uses "
      f"space={space!r}; the follower and the leader must agree (dro.space)"
    )
  check_atom_scale(atoms.margin_scale, beta, allow_scale_mismatch=allow_scale_mismatch)
  atom_weights, atom_shifts = atoms.weights, atoms.shifts
  dtype, batch = pc.dtype, pc.shape[0]
  rows = _rows(batch, dtype, weights, valid, num_real_rows)
  keep = rows.keep
  if reference_free:
    rc, rr = jnp.zeros_like(rc), jnp.zeros_like(rr)
  pc, pr, rc, rr = (_masked(x, keep) for x in (pc, pr, rc, rr))
  atom_weights = _masked(jnp.asarray(atom_weights, dtype), keep[:, None])
  atom_shifts = _masked(jnp.asarray(atom_shifts, dtype), keep[:, None])
  z = (beta * ((pc - rc) - (pr - rr)))[:, None]  # [B, 1]
  if space == "probability":
    shifted = jnp.maximum(jax.nn.sigmoid(z) - atom_shifts, floor)
    atom_losses = jnp.where(atom_shifts == 0, -jax.nn.log_sigmoid(z), -jnp.log(shifted))
  else:
    atom_losses = -jax.nn.log_sigmoid(z - atom_shifts)
  per_row = jnp.sum(atom_weights * atom_losses, axis=-1)
  metrics = _reward_metrics(pc, pr, rc, rr, beta, keep)
  if rpo_alpha is not None:
    nll = -pc if chosen_nll is None else _masked(jnp.asarray(chosen_nll, dtype), keep)
    sft = _masked(
      nll / _mean_chosen_length(chosen_lengths, rows.valid, mean_chosen_length, dtype), keep
    )
    per_row = per_row + rpo_alpha * sft
    metrics["nll_loss"] = jnp.sum(sft) / jnp.maximum(jnp.sum(keep), 1).astype(dtype)
  per_row = _masked(per_row, keep)
  loss = jnp.sum(_masked(rows.weights * per_row, keep)) / rows.num_real_rows
  metrics["losses"] = per_row
  return loss, metrics
