"""Parity of ssapo_jax/losses.py with TRL's own DPO loss code (``DPOTrainer._compute_loss``).

TRL's loss runs on a stand-in model whose forward returns the given token log-probs, so both
sides see the same tensors; loss, gradient with respect to every token log-prob and the
reward metrics agree to 1e-10 in float64. Skipped when trl is not installed (test extra).
"""

import collections
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssapo_jax import losses

torch = pytest.importorskip("torch")
trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

B, T = 6, 9
TOL = dict(rtol=1e-10, atol=1e-12)


class _Model(torch.nn.Module):
  def __init__(self, outputs):
    super().__init__()
    self.outputs = outputs

  def forward(self, **kwargs):
    del kwargs
    return self.outputs


class _Accelerator:
  device = torch.device("cpu")

  def gather_for_metrics(self, x):
    return x

  def gather(self, x):
    return x


def trl_loss(
  token_logps,
  completion_mask,
  ref_chosen,
  ref_rejected,
  *,
  token_log_sum_sq=None,
  beta=0.1,
  loss_type=("sigmoid",),
  loss_weights=None,
  label_smoothing=0.0,
  ld_alpha=None,
  f_divergence_type="reverse_kl",
  f_alpha_divergence_coef=0.5,
  use_weighting=False,
  discopop_tau=0.05,
  dtype=None,
):
  """(loss, d loss / d token_logps, metrics) from TRL 1.16's ``DPOTrainer._compute_loss``.

  ``token_logps`` ``[2B, T]`` are the per-token log-probs TRL's fused LM head would return
  (chosen rows then rejected rows); ``completion_mask`` is ``[2B, T + 1]`` (TRL shifts it).
  """
  dtype = dtype or torch.float64
  logps = torch.tensor(token_logps, dtype=dtype, requires_grad=True)
  n, t = logps.shape
  # The fused LM head gives 0 at positions whose label is -100 (outside the completion).
  shifted = torch.tensor(np.asarray(completion_mask)[:, 1:], dtype=dtype)
  outputs = types.SimpleNamespace(
    log_probs=logps * shifted,
    entropy=torch.zeros(n, t, dtype=dtype),
    mean_logits=torch.zeros(n, t, dtype=dtype),
    is_top1=torch.zeros(n, t, dtype=torch.bool),
    log_sum_sq_probs=(
      None if token_log_sum_sq is None else torch.tensor(token_log_sum_sq, dtype=dtype) * shifted
    ),
  )
  model = _Model(outputs)
  trainer = object.__new__(trl_dpo.DPOTrainer)  # only the attributes the loss reads
  trainer.__dict__.update(
    model=model,
    accelerator=_Accelerator(),
    aux_loss_enabled=False,
    ld_alpha=ld_alpha,
    precompute_ref_logps=True,
    f_divergence_type=f_divergence_type,
    f_alpha_divergence_coef=f_alpha_divergence_coef,
    loss_types=list(loss_type),
    loss_weights=list(loss_weights or [1.0] * len(loss_type)),
    beta=beta,
    label_smoothing=label_smoothing,
    use_weighting=use_weighting,
    args=types.SimpleNamespace(discopop_tau=discopop_tau),
    _metrics={"train": collections.defaultdict(list)},
    _total_train_tokens=0,
    _tp_size=1,
  )
  mask = torch.tensor(completion_mask, dtype=torch.long)
  inputs = {
    "input_ids": torch.zeros_like(mask),
    "attention_mask": torch.ones_like(mask),
    "completion_mask": mask,
    "ref_chosen_logps": torch.tensor(ref_chosen, dtype=dtype),
    "ref_rejected_logps": torch.tensor(ref_rejected, dtype=dtype),
  }
  loss = trainer._compute_loss(model, inputs, return_outputs=False)
  loss.backward()
  metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
  return loss.detach().double().item(), logps.grad.double().numpy(), metrics


def ours(
  token_logps,
  loss_mask,
  ref_chosen,
  ref_rejected,
  *,
  token_log_sum_sq=None,
  ld_alpha=None,
  use_weighting=False,
  **options,
):
  """(loss, d loss / d token_logps, metrics) through `pair_logps` and `dpo_loss`, as the step."""

  def f(tl):
    pairs = losses.pair_logps(
      tl, loss_mask, ld_alpha=ld_alpha, token_log_sum_sq=token_log_sum_sq if use_weighting else None
    )
    return losses.dpo_loss(
      pairs.chosen_logps,
      pairs.rejected_logps,
      ref_chosen,
      ref_rejected,
      weights=pairs.wpo_weights,
      chosen_lengths=pairs.chosen_lengths,
      rejected_lengths=pairs.rejected_lengths,
      chosen_nll=pairs.chosen_nll,
      **options,
    )

  with jax.enable_x64(True):
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(
      jnp.asarray(token_logps, jnp.float64)
    )
    return float(loss), np.asarray(grad), {k: np.asarray(v) for k, v in metrics.items()}


def _case(seed, *, ld=False):
  """Token log-probs ``[2B, T]``, our loss mask ``[2B, T]``, TRL's completion mask, ref log-probs."""
  rng = np.random.default_rng(seed)
  token_logps = -rng.exponential(0.8, (2 * B, T))
  lengths = rng.integers(1, T, 2 * B)
  loss_mask = (np.arange(T)[None, :] >= T - lengths[:, None]).astype(np.int32)
  completion = np.concatenate([np.zeros((2 * B, 1), np.int32), loss_mask], axis=1)
  plain = (token_logps * loss_mask).sum(-1)
  noise = rng.normal(0, 1.5, 2 * B)
  ref = plain + noise
  if ld:  # TRL precomputes the reference with the same LD weighting
    ref = np.asarray(
      losses.pair_logps(jnp.asarray(token_logps), loss_mask, ld_alpha=ld).chosen_logps
    )
    ref = (
      np.concatenate(
        [
          ref,
          np.asarray(
            losses.pair_logps(jnp.asarray(token_logps), loss_mask, ld_alpha=ld).rejected_logps
          ),
        ]
      )
      + noise
    )
  # log Σ_v p_v² <= log p_label is not required; a random value below 0 exercises WPO.
  log_sum_sq = token_logps - rng.uniform(0.0, 1.0, (2 * B, T))
  return token_logps, loss_mask, completion, ref[:B], ref[B:], log_sum_sq


METRICS = (
  "rewards/chosen",
  "rewards/rejected",
  "rewards/margins",
  "logps/chosen",
  "logps/rejected",
)


def _compare(trl_out, our_out, *, metrics=True, tol=TOL):
  (trl_l, trl_g, trl_m), (our_l, our_g, our_m) = trl_out, our_out
  np.testing.assert_allclose(our_l, trl_l, **tol)
  np.testing.assert_allclose(our_g, trl_g, **tol)
  if metrics:
    for name in METRICS:
      np.testing.assert_allclose(our_m[name], trl_m[name], **tol, err_msg=name)
    # TRL averages the accuracies in float32.
    np.testing.assert_allclose(our_m["rewards/accuracies"], trl_m["rewards/accuracies"], rtol=1e-7)


# bco_pair and exo_pair follow their papers, not TRL 1.16 (see test_losses.py's numpy tests).
TRL_TYPES = sorted(set(losses.LOSS_TYPES) - {"bco_pair", "exo_pair"})


@pytest.mark.parametrize("loss_type", TRL_TYPES)
@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
def test_every_loss_type_matches_trl(loss_type, beta):
  tl, mask, completion, rc, rr, _ = _case(hash((loss_type, beta)) % 1000)
  _compare(
    trl_loss(tl, completion, rc, rr, beta=beta, loss_type=(loss_type,)),
    ours(tl, mask, rc, rr, beta=beta, loss_type=loss_type),
  )


@pytest.mark.parametrize("loss_type,eps", [("robust", 0.1), ("aot", 0.3), ("aot_unpaired", 0.1)])
def test_label_smoothing_matches_trl(loss_type, eps):
  # TRL 1.16's sigmoid ignores label_smoothing; ours is conservative DPO (test_losses.py).
  tl, mask, completion, rc, rr, _ = _case(3)
  _compare(
    trl_loss(tl, completion, rc, rr, loss_type=(loss_type,), label_smoothing=eps),
    ours(tl, mask, rc, rr, loss_type=loss_type, label_smoothing=eps),
  )


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence"])
@pytest.mark.parametrize("loss_type", sorted(losses.F_DIVERGENCE_LOSS_TYPES - {"exo_pair"}))
def test_f_divergence_matches_trl(divergence, loss_type):
  tl, mask, completion, rc, rr, _ = _case(4)
  _compare(
    trl_loss(tl, completion, rc, rr, loss_type=(loss_type,), f_divergence_type=divergence),
    ours(tl, mask, rc, rr, loss_type=loss_type, f_divergence_type=divergence),
  )


@pytest.mark.parametrize("alpha", [0.5, 1.5, 1.0])
def test_alpha_divergence_matches_trl_in_float32(alpha):
  # TRL 1.16 has no float64 clamp for the α-divergence (a KeyError), so compare in float32;
  # the float64 formula is checked against numpy below.
  tl, mask, completion, rc, rr, _ = _case(5)
  _compare(
    trl_loss(
      tl,
      completion,
      rc,
      rr,
      f_divergence_type="alpha_divergence",
      f_alpha_divergence_coef=alpha,
      dtype=torch.float32,
    ),
    ours(
      tl.astype(np.float32),
      mask,
      rc.astype(np.float32),
      rr.astype(np.float32),
      f_divergence_type="alpha_divergence",
      f_alpha_divergence_coef=alpha,
    ),
    metrics=False,
    tol=dict(rtol=2e-5, atol=1e-7),
  )


def test_alpha_divergence_matches_numpy_float64():
  rng = np.random.default_rng(6)
  pc, pr, rc, rr = (rng.normal(-20, 3, B) for _ in range(4))
  alpha, beta = 0.3, 0.1

  def score(lr):
    return (np.exp((alpha - 1) * lr) - 1) / (alpha - 1)

  expected = np.mean(np.logaddexp(0.0, -beta * (score(pc - rc) - score(pr - rr))))
  with jax.enable_x64(True):
    loss, _ = losses.dpo_loss(
      pc, pr, rc, rr, beta=beta, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=alpha
    )
    np.testing.assert_allclose(float(loss), expected, **TOL)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sft"])
def test_ld_alpha_matches_trl(ld_alpha, loss_type):
  tl, mask, completion, rc, rr, _ = _case(7, ld=ld_alpha)
  _compare(
    trl_loss(tl, completion, rc, rr, loss_type=(loss_type,), ld_alpha=ld_alpha),
    ours(tl, mask, rc, rr, loss_type=loss_type, ld_alpha=ld_alpha),
  )


# TRL 1.16's hinge with use_weighting fails in autograd (an in-place product on relu's output).
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust", "apo_down", "discopop"])
def test_wpo_weighting_matches_trl(loss_type):
  tl, mask, completion, rc, rr, lss = _case(8)
  _compare(
    trl_loss(
      tl, completion, rc, rr, loss_type=(loss_type,), use_weighting=True, token_log_sum_sq=lss
    ),
    ours(tl, mask, rc, rr, loss_type=loss_type, use_weighting=True, token_log_sum_sq=lss),
  )


@pytest.mark.parametrize(
  "combo,weights",
  [
    (("sigmoid", "sft"), None),
    (("sigmoid", "ipo", "sft"), (0.8, 0.2, 1.0)),
    (("apo_zero", "nca_pair", "aot"), (0.5, 2.0, 0.25)),
  ],
)
def test_loss_weight_combinations_match_trl(combo, weights):
  tl, mask, completion, rc, rr, _ = _case(9)
  _compare(
    trl_loss(tl, completion, rc, rr, loss_type=combo, loss_weights=weights),
    ours(tl, mask, rc, rr, loss_type=combo, loss_weights=weights),
  )


def test_rpo_alpha_is_trl_sigmoid_plus_weighted_sft():
  tl, mask, completion, rc, rr, _ = _case(10)
  _compare(
    trl_loss(tl, completion, rc, rr, loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.7)),
    ours(tl, mask, rc, rr, rpo_alpha=0.7),
  )


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero"])
def test_reference_free_is_trl_with_zero_reference(loss_type):
  tl, mask, completion, rc, rr, _ = _case(11)
  zeros = np.zeros(B)
  _compare(
    trl_loss(tl, completion, zeros, zeros, loss_type=(loss_type,)),
    ours(tl, mask, rc, rr, loss_type=loss_type, reference_free=True),
  )


def test_discopop_tau_matches_trl():
  tl, mask, completion, rc, rr, _ = _case(12)
  _compare(
    trl_loss(tl, completion, rc, rr, loss_type=("discopop",), discopop_tau=0.3, beta=0.5),
    ours(tl, mask, rc, rr, loss_type="discopop", discopop_tau=0.3, beta=0.5),
  )


def test_trl_divergences_on_exo_and_bco_are_documented():
  """TRL 1.16 drops bco_pair's reward shift and takes exo_pair's log ε in float32 (docstrings)."""
  tl, mask, completion, rc, rr, _ = _case(13)
  trl_bco = trl_loss(tl, completion, rc, rr, loss_type=("bco_pair",))[0]
  our_bco = ours(tl, mask, rc, rr, loss_type="bco_pair")[0]
  assert abs(trl_bco - our_bco) > 1e-6
  trl_exo = trl_loss(tl, completion, rc, rr, loss_type=("exo_pair",), label_smoothing=1e-3)[0]
  our_exo = ours(tl, mask, rc, rr, loss_type="exo_pair", label_smoothing=1e-3)[0]
  assert 0 < abs(trl_exo - our_exo) < 1e-6 * abs(our_exo)
  assert math.isfinite(our_exo)
