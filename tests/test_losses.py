"""Tests for ssapo_jax/losses.py against independent numpy implementations of each formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssapo_jax import losses

B = 16


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_dpo(pc, pr, rc, rr, *, beta, loss_type, ls=0.0, lc=None, lr=None, tau=0.05):
  """Reference per-example losses written from the papers/TRL formulas in float64."""
  clr, rlr = pc - rc, pr - rr
  if loss_type in ("ipo", "sigmoid_norm"):
    clr, rlr = clr / lc, rlr / lr
  d = clr - rlr
  if loss_type == "sigmoid_norm":
    return -_np_log_sigmoid(beta * d)
  if loss_type == "sft":  # row i's share of the batch's token-mean NLL
    return -pc / np.mean(lc)
  if loss_type == "discopop":
    z = beta * d
    mod = _np_sigmoid(z / tau)
    return -_np_log_sigmoid(z) * (1 - mod) + np.exp(-z) * mod
  if loss_type in ("aot", "aot_unpaired"):
    if loss_type == "aot":
      delta = np.sort(pc - pr) - np.sort(rc - rr)
    else:
      delta = np.sort(clr) - np.sort(rlr)
    return -(1 - ls) * _np_log_sigmoid(beta * delta) - ls * _np_log_sigmoid(-beta * delta)
  z = beta * d
  if loss_type == "sigmoid":
    return -(1 - ls) * _np_log_sigmoid(z) - ls * _np_log_sigmoid(-z)
  if loss_type == "robust":
    return (-(1 - ls) * _np_log_sigmoid(z) + ls * _np_log_sigmoid(-z)) / (1 - 2 * ls)
  if loss_type == "hinge":
    return np.maximum(0.0, 1 - z)
  if loss_type == "ipo":
    return (d - 1 / (2 * beta)) ** 2
  if loss_type == "exo_pair":
    e = ls if ls > 0 else 1e-3
    return _np_sigmoid(z) * (_np_log_sigmoid(z) - math.log(1 - e)) + _np_sigmoid(-z) * (
      _np_log_sigmoid(-z) - math.log(e)
    )
  if loss_type == "bco_pair":
    cr, rj = beta * clr, beta * rlr
    delta = np.mean(np.concatenate([cr, rj]))
    return -_np_log_sigmoid(cr - delta) - _np_log_sigmoid(-(rj - delta))
  if loss_type == "sppo_hard":
    return (clr - 0.5 / beta) ** 2 + (rlr + 0.5 / beta) ** 2
  if loss_type == "nca_pair":
    cr, rj = beta * clr, beta * rlr
    return -_np_log_sigmoid(cr) - 0.5 * _np_log_sigmoid(-cr) - 0.5 * _np_log_sigmoid(-rj)
  if loss_type == "apo_zero":
    return (1 - _np_sigmoid(beta * clr)) + _np_sigmoid(beta * rlr)
  if loss_type == "apo_down":
    return _np_sigmoid(beta * clr) + (1 - _np_sigmoid(beta * (clr - rlr)))
  raise AssertionError(loss_type)


def _random_logps(seed, n=B):
  rng = np.random.default_rng(seed)
  return [rng.normal(-40.0, 8.0, n).astype(np.float32) for _ in range(4)]


LOSS_CASES = [
  ("sigmoid", 0.0),
  ("sigmoid", 0.2),
  ("robust", 0.0),
  ("robust", 0.1),
  ("hinge", 0.0),
  ("ipo", 0.0),
  ("exo_pair", 0.0),
  ("exo_pair", 0.05),
  ("bco_pair", 0.0),
  ("sppo_hard", 0.0),
  ("nca_pair", 0.0),
  ("apo_zero", 0.0),
  ("apo_down", 0.0),
  ("aot", 0.0),
  ("aot", 0.2),
  ("aot_unpaired", 0.1),
  ("discopop", 0.0),
  ("sigmoid_norm", 0.0),
  ("sft", 0.0),
]
SORTING = ("aot", "aot_unpaired")


def test_every_registered_type_is_tested():
  assert {t for t, _ in LOSS_CASES} == set(losses.LOSS_TYPES)


@pytest.mark.parametrize("loss_type,ls", LOSS_CASES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_numpy(loss_type, ls, beta):
  pc, pr, rc, rr = _random_logps(hash((loss_type, ls, beta)) % 1000)
  rng = np.random.default_rng(3)
  lc, lr = rng.integers(1, 50, B).astype(np.float32), rng.integers(1, 50, B).astype(np.float32)
  # Sorting losses have no per-pair weight (their rows are not pairs): 0/1 only.
  weights = (
    np.ones(B, np.float32) if loss_type in SORTING else rng.uniform(0, 2, B).astype(np.float32)
  )
  loss, metrics = losses.dpo_loss(
    pc,
    pr,
    rc,
    rr,
    beta=beta,
    loss_type=loss_type,
    label_smoothing=ls,
    weights=weights,
    chosen_lengths=lc,
    rejected_lengths=lr,
  )
  args64 = [a.astype(np.float64) for a in (pc, pr, rc, rr)]
  expected = np_dpo(*args64, beta=beta, loss_type=loss_type, ls=ls, lc=lc, lr=lr)
  np.testing.assert_allclose(metrics["losses"], expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(loss, np.mean(weights * expected), rtol=1e-6, atol=1e-6)
  assert loss.dtype == jnp.float32 and metrics["losses"].shape == (B,)


def test_uniform_weights_equal_plain_mean_and_trl_metrics():
  pc, pr, rc, rr = _random_logps(7)
  beta = 0.1
  loss_w, _ = losses.dpo_loss(pc, pr, rc, rr, beta=beta, weights=np.ones(B, np.float32))
  loss, m = losses.dpo_loss(pc, pr, rc, rr, beta=beta)
  np.testing.assert_allclose(loss_w, loss, rtol=1e-7)
  chosen, rejected = beta * (pc - rc), beta * (pr - rr)
  np.testing.assert_allclose(m["rewards/chosen"], chosen.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["rewards/rejected"], rejected.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["rewards/margins"], (chosen - rejected).mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["rewards/accuracies"], (chosen > rejected).mean())
  np.testing.assert_allclose(m["logps/chosen"], pc.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["logps/rejected"], pr.mean(), rtol=1e-6)


def test_distribution_weights_enter_as_n_times_p():
  pc, pr, rc, rr = _random_logps(11)
  p = np.random.default_rng(0).dirichlet(np.ones(B)).astype(np.float32)
  loss, m = losses.dpo_loss(pc, pr, rc, rr, weights=B * p)
  np.testing.assert_allclose(loss, np.sum(p * np.asarray(m["losses"])), rtol=1e-5)


@pytest.mark.parametrize(
  "loss_type,ls",
  [
    ("nope", 0.0),
    ("sigmoid", 0.6),
    ("robust", 0.5),
    ("hinge", 0.1),
    ("sigmoid", -0.1),
    ("exo_pair", 1.0),
  ],
)
def test_bad_options_raise_naming_accepted_values(loss_type, ls):
  pc, pr, rc, rr = _random_logps(0)
  with pytest.raises(ValueError, match="accepted"):
    losses.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=ls)


@pytest.mark.parametrize(
  "loss_type",
  ["sigmoid", "hinge", "ipo", "robust", "nca_pair", "apo_down", "discopop", "sigmoid_norm", "sft"],
)
def test_gradients_match_finite_differences(loss_type):
  pc, pr, rc, rr = [a.astype(np.float64) for a in _random_logps(5, n=4)]
  pr = pc - np.array([0.3, -2.0, 4.0, 1.5])  # keep hinge away from its kink
  ls = 0.1 if loss_type == "robust" else 0.0
  lengths = jnp.asarray([3.0, 7.0, 1.0, 12.0])
  with jax.enable_x64(True):
    f = lambda c, r: losses.dpo_loss(
      c,
      r,
      jnp.asarray(rc),
      jnp.asarray(rr),
      beta=0.3,
      loss_type=loss_type,
      label_smoothing=ls,
      chosen_lengths=lengths,
      rejected_lengths=lengths[::-1],
    )[0]
    gc, gr = jax.grad(f, argnums=(0, 1))(jnp.asarray(pc), jnp.asarray(pr))
    h = 1e-6
    for i in range(4):
      e = np.zeros(4)
      e[i] = h
      fd_c = (f(jnp.asarray(pc + e), jnp.asarray(pr)) - f(jnp.asarray(pc - e), jnp.asarray(pr))) / (
        2 * h
      )
      fd_r = (f(jnp.asarray(pc), jnp.asarray(pr + e)) - f(jnp.asarray(pc), jnp.asarray(pr - e))) / (
        2 * h
      )
      np.testing.assert_allclose(gc[i], fd_c, rtol=1e-5, atol=1e-8)
      np.testing.assert_allclose(gr[i], fd_r, rtol=1e-5, atol=1e-8)


def test_jit_vmap_grad():
  pc, pr, rc, rr = _random_logps(9)
  f = lambda *a: losses.dpo_loss(*a, beta=0.2, loss_type="robust", label_smoothing=0.1)[0]
  np.testing.assert_allclose(jax.jit(f)(pc, pr, rc, rr), f(pc, pr, rc, rr), rtol=1e-6)
  # vmap over 3 independent batches equals a loop.
  stacked = [np.stack([a, a * 0.9, a * 1.1]) for a in (pc, pr, rc, rr)]
  vm = jax.vmap(f)(*stacked)
  loop = [f(*[s[i] for s in stacked]) for i in range(3)]
  np.testing.assert_allclose(vm, loop, rtol=1e-6)
  grads = jax.grad(f)(pc, pr, rc, rr)
  assert grads.shape == (B,) and np.all(np.isfinite(grads))


# ---------------------------------------------------------------- options, errors, row masks

LENGTHS = np.arange(1, B + 1, dtype=np.float32)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(loss_type="ipo"),
    dict(loss_type="sigmoid_norm"),
    dict(loss_type="sft"),
    dict(loss_type=["sigmoid", "ipo"]),
    dict(rpo_alpha=0.5),
  ],
)
def test_length_losses_without_lengths_raise(kwargs):
  pc, pr, rc, rr = _random_logps(0)
  with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
    losses.dpo_loss(pc, pr, rc, rr, **kwargs)
  with pytest.raises(ValueError, match="chosen_lengths"):
    losses.dpo_loss(pc, pr, rc, rr, chosen_lengths=LENGTHS, **kwargs)


def _negative_row_5():
  weights = np.ones(B, np.float32)
  weights[5] = -0.5
  return weights


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (lambda: {"beta": 0.0}, "beta must be > 0"),
    (lambda: {"beta": -0.1}, "beta must be > 0"),
    (lambda: {"weights": _negative_row_5()}, "row 5"),
  ],
)
def test_bad_beta_and_negative_weights_raise(kwargs, message):
  """Both losses reject β ≤ 0 and negative weights (naming the row) before any computation."""
  pc, pr, rc, rr = _random_logps(0)
  with pytest.raises(ValueError, match=message):
    losses.dpo_loss(pc, pr, rc, rr, **kwargs())
  with pytest.raises(ValueError, match=message):
    losses.robust_dpo_loss(pc, pr, rc, rr, losses.LossAtoms.point(B), **kwargs())


def test_option_errors():
  pc, pr, rc, rr = _random_logps(0)
  with pytest.raises(ValueError, match="0 or 1"):
    losses.dpo_loss(pc, pr, rc, rr, loss_type="aot", weights=np.full(B, 0.5, np.float32))
  with pytest.raises(ValueError, match="f_divergence_type='forward_kl'"):
    losses.dpo_loss(pc, pr, rc, rr, loss_type="apo_zero", f_divergence_type="forward_kl")
  with pytest.raises(ValueError, match="accepted"):
    losses.dpo_loss(pc, pr, rc, rr, f_divergence_type="kl")
  with pytest.raises(ValueError, match="loss_weights has 1 entries for 2"):
    losses.dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
  with pytest.raises(ValueError, match="discopop_tau"):
    losses.dpo_loss(pc, pr, rc, rr, loss_type="discopop", discopop_tau=0.0)


def test_label_smoothing_applies_to_the_types_that_use_it():
  pc, pr, rc, rr = _random_logps(1)
  # sft ignores ε, sigmoid uses it: the combination accepts it and sigmoid's term changes.
  both, _ = losses.dpo_loss(
    pc,
    pr,
    rc,
    rr,
    loss_type=["sigmoid", "sft"],
    label_smoothing=0.2,
    chosen_lengths=LENGTHS,
    rejected_lengths=LENGTHS,
  )
  sig, _ = losses.dpo_loss(pc, pr, rc, rr, label_smoothing=0.2)
  sft, _ = losses.dpo_loss(
    pc, pr, rc, rr, loss_type="sft", chosen_lengths=LENGTHS, rejected_lengths=LENGTHS
  )
  np.testing.assert_allclose(both, sig + sft, rtol=1e-6)


def _all_type_kwargs(loss_type):
  ls = {"exo_pair": 0.01}.get(loss_type, 0.0)
  return dict(
    loss_type=loss_type,
    label_smoothing=ls,
    chosen_lengths=LENGTHS,
    rejected_lengths=LENGTHS[::-1].copy(),
    mean_chosen_length=3.0,
  )


@pytest.mark.parametrize("loss_type", sorted(losses.LOSS_TYPES))
def test_zero_weight_row_is_removed_exactly_even_when_nan(loss_type):
  pc, pr, rc, rr = _random_logps(31)
  kwargs = _all_type_kwargs(loss_type)
  keep = np.arange(B) != 4
  weights = keep.astype(np.float32)
  poisoned = [a.copy() for a in (pc, pr, rc, rr)]
  poisoned[0][4], poisoned[1][4], poisoned[3][4] = np.nan, np.inf, -np.inf

  def f(pc, pr):
    return losses.dpo_loss(pc, pr, poisoned[2], poisoned[3], weights=weights, **kwargs)[0]

  loss, (gc, gr) = jax.value_and_grad(f, argnums=(0, 1))(poisoned[0], poisoned[1])
  sub = {k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}

  def f_sub(pc, pr):
    return losses.dpo_loss(pc, pr, rc[keep], rr[keep], **sub)[0] * (B - 1) / B

  loss_sub, (gc_sub, gr_sub) = jax.value_and_grad(f_sub, argnums=(0, 1))(pc[keep], pr[keep])
  np.testing.assert_allclose(loss, loss_sub, rtol=1e-6)
  assert gc[4] == 0.0 and gr[4] == 0.0
  np.testing.assert_allclose(gc[keep], gc_sub, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(gr[keep], gr_sub, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("loss_type", sorted(losses.LOSS_TYPES))
def test_padding_rows_leave_the_mean_over_real_rows(loss_type):
  pc, pr, rc, rr = _random_logps(32)
  kwargs = _all_type_kwargs(loss_type)
  kwargs.pop("mean_chosen_length")
  real = 11
  valid = np.arange(B) < real
  # Padding copies the real rows at weight 0, as the loader does.
  pad = lambda a: np.concatenate([a[:real], a[: B - real]])
  padded = losses.dpo_loss(
    *(pad(a) for a in (pc, pr, rc, rr)),
    valid=valid,
    weights=valid.astype(np.float32),
    **{k: (pad(v) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()},
  )
  plain = losses.dpo_loss(
    pc[:real],
    pr[:real],
    rc[:real],
    rr[:real],
    **{k: (v[:real] if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()},
  )
  np.testing.assert_allclose(padded[0], plain[0], rtol=1e-6)
  for name in ("rewards/chosen", "rewards/margins", "logps/rejected"):
    np.testing.assert_allclose(padded[1][name], plain[1][name], rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(margin=st.floats(-3e4, 3e4), scale=st.floats(0.01, 2.0))
def test_every_loss_type_is_finite_and_differentiable_on_large_margins(margin, scale):
  rng = np.random.default_rng(0)
  pc = rng.normal(-50, 5, B).astype(np.float32)
  pr = (pc - margin * rng.uniform(0.5, 1.5, B)).astype(np.float32)
  rc, rr = np.full(B, -50.0, np.float32), np.full(B, -50.0, np.float32)
  for loss_type in losses.LOSS_TYPES:
    kwargs = _all_type_kwargs(loss_type)
    f = lambda c, r: losses.dpo_loss(c, r, rc, rr, beta=scale, **kwargs)[0]
    loss, grads = jax.value_and_grad(f, argnums=(0, 1))(pc, pr)
    assert np.isfinite(loss), loss_type
    assert all(np.all(np.isfinite(g)) for g in grads), loss_type


def test_robust_zero_weight_and_padding_rows_are_removed_exactly():
  pc, pr, rc, rr = _random_logps(33)
  rng = np.random.default_rng(1)
  w = rng.dirichlet(np.ones(3), B).astype(np.float32)
  s = rng.uniform(0, 0.4, (B, 3)).astype(np.float32)
  weights = np.ones(B, np.float32)
  weights[2] = 0.0
  valid = np.arange(B) < B - 1
  pc = pc.copy()
  pc[2] = np.nan
  loss, m = losses.robust_dpo_loss(pc, pr, rc, rr, _atoms(w, s), weights=weights, valid=valid)
  expected = np_robust(
    *[a.astype(np.float64) for a in (pc, pr, rc, rr)], w, s, beta=0.1, space="probability"
  )
  keep = valid & (weights > 0)
  np.testing.assert_allclose(loss, expected[keep].sum() / valid.sum(), rtol=1e-5)
  assert m["losses"][2] == 0.0 and np.isfinite(m["rewards/chosen"])
  g = jax.grad(
    lambda x: losses.robust_dpo_loss(x, pr, rc, rr, _atoms(w, s), weights=weights, valid=valid)[0]
  )(pc)
  assert g[2] == 0.0 and g[B - 1] == 0.0 and np.all(np.isfinite(g))


def test_robust_rpo_alpha_and_reference_free():
  pc, pr, rc, rr = _random_logps(34)
  robust, rm = losses.robust_dpo_loss(
    pc,
    pr,
    rc,
    rr,
    losses.LossAtoms.point(B),
    rpo_alpha=0.3,
    chosen_lengths=LENGTHS,
    reference_free=True,
  )
  plain, pm = losses.dpo_loss(
    pc,
    pr,
    rc,
    rr,
    rpo_alpha=0.3,
    chosen_lengths=LENGTHS,
    rejected_lengths=LENGTHS,
    reference_free=True,
  )
  np.testing.assert_allclose(robust, plain, rtol=1e-6)
  np.testing.assert_allclose(rm["nll_loss"], -pc.sum() / LENGTHS.sum(), rtol=1e-6)
  np.testing.assert_allclose(rm["rewards/chosen"], 0.1 * pc.mean(), rtol=1e-6)


def test_ld_token_weights_match_numpy():
  chosen = np.array([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], np.int32)
  rejected = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], np.int32)
  wc, wr = losses.ld_token_weights(chosen, rejected, 0.25)
  np.testing.assert_array_equal(wc, [[0, 1, 1, 0.25, 0.25, 0], [0, 0, 1, 1, 0, 0]])
  np.testing.assert_array_equal(wr, [[0, 0, 1, 1, 0, 0], [0, 1, 1, 0.25, 0.25, 0.25]])
  with pytest.raises(ValueError, match="ld_alpha"):
    losses.ld_token_weights(chosen, rejected, 1.5)


# ---------------------------------------------------------------- sequence_logps


def np_sequence_logps(logits, labels, mask, average=False):
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  safe = np.where(mask > 0, labels, 0)
  tok = np.take_along_axis(logp, safe[..., None], -1)[..., 0]
  total = (tok * mask).sum(-1)
  if average:
    return np.where(mask.sum(-1) > 0, total / np.maximum(mask.sum(-1), 1), 0.0)
  return total


def _logits_case(seed, b=4, t=7, v=11):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 3, (b, t, v)).astype(np.float32)
  labels = rng.integers(0, v, (b, t))
  mask = (rng.random((b, t)) < 0.7).astype(np.int32)
  mask[1, 4:] = 0  # right padding
  labels[1, 4:] = -100
  mask[2] = 0  # an all-zero row
  return logits, labels, mask


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_numpy(average):
  logits, labels, mask = _logits_case(1)
  out = losses.sequence_logps(logits, labels, mask, average=average)
  np.testing.assert_allclose(
    out, np_sequence_logps(logits, labels, mask, average), rtol=1e-6, atol=1e-5
  )
  assert out.dtype == jnp.float32 and out.shape == (4,)
  assert out[2] == 0.0 and np.all(np.isfinite(out))


def test_sequence_logps_average_divides_by_token_count():
  logits, labels, mask = _logits_case(2)
  total = losses.sequence_logps(logits, labels, mask)
  avg = losses.sequence_logps(logits, labels, mask, average=True)
  counts = mask.sum(-1)
  np.testing.assert_allclose(
    avg[counts > 0], (total / np.maximum(counts, 1))[counts > 0], rtol=1e-6
  )


def test_sequence_logps_bf16_logits_give_float32_close_to_float32_path():
  logits, labels, mask = _logits_case(3, t=32, v=64)
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  out = jax.jit(losses.sequence_logps)(bf16, labels, mask)
  assert out.dtype == jnp.float32
  # The reference sees the same rounded logits; only the reduction precision may differ.
  exact = np_sequence_logps(np.asarray(bf16.astype(jnp.float32)), labels, mask)
  np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-4)
  # Versus unrounded float32 logits the error is bf16 rounding of the inputs (~2^-8 relative).
  np.testing.assert_allclose(out, np_sequence_logps(logits, labels, mask), rtol=2e-2, atol=0.5)


def test_sequence_logps_gradient_is_softmax_minus_onehot():
  logits, labels, mask = _logits_case(4)
  g = jax.grad(lambda x: losses.sequence_logps(x, labels, mask).sum())(logits)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(logits.shape[-1])[np.where(mask > 0, labels, 0)]
  np.testing.assert_allclose(g, (onehot - p) * mask[..., None], atol=1e-6)


def test_sequence_logps_shape_errors():
  with pytest.raises(ValueError, match="logits"):
    losses.sequence_logps(np.zeros((2, 3, 4)), np.zeros((2, 4), int), np.zeros((2, 4)))


# ---------------------------------------------------------------- robust_dpo_loss


def _atoms(w, s, space="probability", margin_scale=0.1):
  """Test atoms at the losses' default beta (0.1)."""
  return losses.LossAtoms(
    jnp.asarray(w, jnp.float32), jnp.asarray(s, jnp.float32), space=space, margin_scale=margin_scale
  )


def np_robust(pc, pr, rc, rr, w, s, *, beta, space, floor=1e-6):
  z = beta * ((pc - rc) - (pr - rr))
  if space == "probability":
    atom = np.where(
      s == 0, -_np_log_sigmoid(z)[:, None], -np.log(np.maximum(_np_sigmoid(z)[:, None] - s, floor))
    )
  else:
    atom = -_np_log_sigmoid(z[:, None] - s)
  return (w * atom).sum(-1)


@pytest.mark.parametrize("space", ["probability", "margin"])
def test_robust_single_zero_shift_atom_is_sigmoid_dpo(space):
  pc, pr, rc, rr = _random_logps(21)
  robust, rm = losses.robust_dpo_loss(
    pc, pr, rc, rr, losses.LossAtoms.point(B, space=space), beta=0.1, space=space
  )
  plain, pm = losses.dpo_loss(pc, pr, rc, rr, beta=0.1)
  np.testing.assert_array_equal(rm["losses"], pm["losses"])
  np.testing.assert_array_equal(robust, plain)


@pytest.mark.parametrize("space", ["probability", "margin"])
def test_robust_matches_numpy_with_several_atoms(space):
  pc, pr, rc, rr = _random_logps(22)
  rng = np.random.default_rng(0)
  k = 6
  w = rng.dirichlet(np.ones(k), B).astype(np.float32)
  s = (rng.uniform(0, 0.6, (B, k)) if space == "probability" else rng.normal(0, 2, (B, k))).astype(
    np.float32
  )
  s[:, 0] = 0.0
  weights = rng.uniform(0, 2, B).astype(np.float32)
  loss, m = losses.robust_dpo_loss(
    pc, pr, rc, rr, _atoms(w, s, space), beta=0.1, space=space, weights=weights
  )
  expected = np_robust(
    *[a.astype(np.float64) for a in (pc, pr, rc, rr)], w, s, beta=0.1, space=space
  )
  np.testing.assert_allclose(m["losses"], expected, rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(weights * expected), rtol=1e-5)


def test_robust_floor_clamps_with_zero_gradient():
  # sigma(beta * delta) is 0.5 at delta = 0; a shift of 0.9 falls below the floor.
  zeros = np.zeros(3, np.float32)
  w = np.array([[0.3, 0.7]] * 3, np.float32)
  s = np.array([[0.9, 0.0]] * 3, np.float32)

  def f(pc):
    return losses.robust_dpo_loss(pc, zeros, zeros, zeros, _atoms(w, s), beta=0.1, floor=1e-6)[1][
      "losses"
    ]

  out = f(zeros)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, 0.3 * -np.log(1e-6) + 0.7 * np.log(2.0), rtol=1e-6)
  grad = jax.grad(lambda pc: f(pc).sum())(zeros)
  # Only the unclamped zero-shift atom contributes: d/dpc of 0.7 * -log sigmoid(0.1 pc) at 0.
  np.testing.assert_allclose(grad, -0.7 * 0.1 * 0.5, rtol=1e-6)
  # And with only the clamped atom the gradient is exactly zero.
  g_clamped = jax.grad(
    lambda pc: losses.robust_dpo_loss(
      pc, zeros, zeros, zeros, _atoms(np.ones((3, 1)), np.full((3, 1), 0.9))
    )[0]
  )(zeros)
  np.testing.assert_array_equal(g_clamped, 0.0)


def test_robust_rejects_bad_arguments():
  pc, pr, rc, rr = _random_logps(0, n=2)
  w = np.ones((2, 1), np.float32)
  with pytest.raises(ValueError, match="space"):
    losses.robust_dpo_loss(pc, pr, rc, rr, _atoms(w, 0 * w), space="logit")
  with pytest.raises(ValueError, match="3 rows; the loss has B = 2"):
    losses.robust_dpo_loss(pc, pr, rc, rr, _atoms(np.ones((3, 1)), np.zeros((3, 1))))
  with pytest.raises(TypeError, match="LossAtoms"):
    losses.robust_dpo_loss(pc, pr, rc, rr, w)


# ---------------------------------------------------------------- atoms are checked


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda: _atoms(np.ones(2), np.zeros(2)), r"must both be \[B, K\]"),  # 1-D [B] atoms
    (lambda: _atoms(np.ones((2, 2)), np.zeros((2, 3))), r"must both be \[B, K\]"),
    (lambda: _atoms([[1.5, -0.5], [0.5, 0.5]], np.zeros((2, 2))), "row 0"),  # negative
    (lambda: _atoms([[0.5, 0.5], [0.5, 0.4]], np.zeros((2, 2))), "row 1 sums to"),
    (lambda: _atoms([[1.0], [1.0]], [[0.1], [np.inf]]), "shifts must be finite"),
    (lambda: _atoms([[1.0], [1.0]], [[0.1], [0.0]], margin_scale=None), "zero shifts"),
  ],
)
def test_malformed_atoms_raise(make, message):
  pc, pr, rc, rr = _random_logps(0, n=2)
  with pytest.raises(ValueError, match=message):
    losses.robust_dpo_loss(pc, pr, rc, rr, make())


def test_atoms_of_another_space_or_scale_raise_unless_allowed():
  pc, pr, rc, rr = _random_logps(3, n=4)
  w, s = np.full((4, 2), 0.5), np.array([[0.0, 0.1]] * 4)
  with pytest.raises(ValueError, match="space='margin' but the loss uses space='probability'"):
    losses.robust_dpo_loss(pc, pr, rc, rr, _atoms(w, s, space="margin"))
  with pytest.raises(ValueError, match="margin_scale=0.1 but the loss uses beta=0.05"):
    losses.robust_dpo_loss(pc, pr, rc, rr, _atoms(w, s), beta=0.05)
  # The deliberate mismatch (authors' Llama-3 run) computes the same formula at beta.
  allowed, m = losses.robust_dpo_loss(
    pc, pr, rc, rr, _atoms(w, s), beta=0.05, allow_scale_mismatch=True
  )
  expected = np_robust(
    *[a.astype(np.float64) for a in (pc, pr, rc, rr)], w, s, beta=0.05, space="probability"
  )
  np.testing.assert_allclose(m["losses"], expected, rtol=1e-5)
  # Zero-shift atoms hold at any scale.
  losses.robust_dpo_loss(pc, pr, rc, rr, losses.LossAtoms.point(4), beta=0.05)


def test_atom_checks_lower_to_the_same_module_whatever_was_traced_before():
  """The checks' error codes are not a process-wide count: a program traced again (a resumed
  run) lowers to the same module, so the persistent compilation cache finds it."""
  from jax.experimental import checkify

  pc, pr, rc, rr = _random_logps(4, n=2)

  def lowered():  # a new function each time: traced anew, not taken from jit's cache
    loss = lambda w, s: losses.robust_dpo_loss(pc, pr, rc, rr, _atoms(w, s))[0]  # noqa: E731
    return jax.jit(loss).lower(w, s).as_text(debug_info=False)

  w, s = jnp.full((2, 2), 0.5), jnp.zeros((2, 2))
  first = lowered()
  plain = lambda x: (checkify.debug_check(jnp.all(x > 0), "another check"), x)[1]  # noqa: E731
  jax.jit(plain).lower(w)  # checkify's own numbering moves on
  assert lowered() == first


def test_atom_checks_under_jit_are_checkify_checks():
  """Under jit values cannot raise: shapes still do, values report through checkify."""
  from jax.experimental import checkify

  pc, pr, rc, rr = _random_logps(4, n=2)

  @jax.jit
  def loss(w, s):
    return losses.robust_dpo_loss(pc, pr, rc, rr, _atoms(w, s))[0]

  bad_w, s = jnp.asarray([[0.5, 0.5], [0.9, 0.0]]), jnp.zeros((2, 2))
  assert np.isfinite(loss(bad_w, s))  # plain jit: a documented precondition
  err, _ = checkify.checkify(loss, errors=checkify.user_checks)(bad_w, s)
  with pytest.raises(Exception, match="rows must sum to 1"):
    err.throw()
  err, _ = checkify.checkify(loss, errors=checkify.user_checks)(jnp.full((2, 2), 0.5), s)
  assert err.get() is None
  with pytest.raises(ValueError, match=r"\[B, K\]"):
    jax.jit(lambda w: losses.robust_dpo_loss(pc, pr, rc, rr, _atoms(w, w))[0])(jnp.ones(2))


# ---------------------------------------------------------------- edge cases


def test_forward_kl_is_clamped_like_the_alpha_divergence():
  lr = jnp.asarray([-1e4, -100.0, -1.0, 0.0, 3.0])
  fkl = losses.f_divergence_scores(lr, "forward_kl")
  assert np.all(np.isfinite(fkl))
  # forward KL is the alpha = 0 divergence, with the same clamp of the exponent at 80.
  np.testing.assert_allclose(
    fkl, losses.f_divergence_scores(lr, "alpha_divergence", 0.0), rtol=1e-6
  )
  np.testing.assert_allclose(fkl[2:], 1 - np.exp(-np.asarray(lr[2:], np.float64)), rtol=1e-6)
  pc, pr, rc, rr = _random_logps(5)
  pc = pc.copy()
  pc[0] = -1e4
  loss, _ = losses.dpo_loss(pc, pr, rc, rr, f_divergence_type="forward_kl")
  assert np.isfinite(loss)


@pytest.mark.parametrize(
  "loss_type, ls",
  [("sigmoid", 0.2), ("robust", 0.1), ("exo_pair", 0.0), ("exo_pair", 0.3), ("aot", 0.2)],
)
def test_label_smoothing_may_be_traced(loss_type, ls):
  pc, pr, rc, rr = _random_logps(6)
  eager, _ = losses.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=ls)
  traced = jax.jit(
    lambda e: losses.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=e)[0]
  )(jnp.float32(ls))
  np.testing.assert_allclose(traced, eager, rtol=1e-6)
  # A sweep over ε with vmap, and its gradient in ε.
  sweep = jax.vmap(
    lambda e: losses.dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=e)[0]
  )(jnp.asarray([ls, ls]))
  np.testing.assert_allclose(sweep, [eager, eager], rtol=1e-6)


def test_traced_label_smoothing_on_a_type_that_ignores_it_raises():
  pc, pr, rc, rr = _random_logps(7)
  with pytest.raises(ValueError, match="traced array but loss_type"):
    jax.jit(lambda e: losses.dpo_loss(pc, pr, rc, rr, loss_type="hinge", label_smoothing=e)[0])(
      jnp.float32(0.1)
    )
  with pytest.raises(ValueError, match="scalar"):
    losses.dpo_loss(pc, pr, rc, rr, label_smoothing=np.zeros(2))


def test_sequence_logps_rejects_out_of_range_labels():
  from jax.experimental import checkify

  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
  labels = np.array([[1, 2, 3], [4, 5, -100]])
  mask = np.array([[1, 1, 1], [1, 1, 0]])
  with pytest.raises(ValueError, match=r"labels\[1, 1\] = 5 is outside the vocabulary \[0, 5\)"):
    losses.sequence_logps(logits, labels, mask)
  ok = losses.sequence_logps(logits, np.where(labels == 5, 0, labels), mask)  # -100 masked
  assert np.all(np.isfinite(ok))
  out = jax.jit(losses.sequence_logps)(logits, labels, mask)
  assert np.isfinite(out[0]) and np.isnan(out[1])  # under jit: NaN, never a wrong number
  err, _ = checkify.checkify(jax.jit(losses.sequence_logps), errors=checkify.user_checks)(
    logits, labels, mask
  )
  with pytest.raises(Exception, match="outside the vocabulary"):
    err.throw()


def test_padding_rows_atoms_are_not_checked():
  pc, pr, rc, rr = _random_logps(8, n=3)
  w = np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]])  # row 2 is padding, all-zero weights
  s = np.array([[0.0, 0.1], [0.0, 0.0], [np.nan, 0.0]])
  valid = np.array([True, True, False])
  loss, _ = losses.robust_dpo_loss(pc, pr, rc, rr, _atoms(w, s), valid=valid)
  expected = (
    np_robust(
      *[a.astype(np.float64) for a in (pc, pr, rc, rr)],
      w,
      np.nan_to_num(s),
      beta=0.1,
      space="probability",
    )[:2].sum()
    / 2
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  with pytest.raises(ValueError, match="row 2"):
    losses.robust_dpo_loss(pc, pr, rc, rr, _atoms(w, s))
