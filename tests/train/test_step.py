"""Tests of ssapo_jax/train/step.py: the sharded step against an independent single-device reference.

The reference (`_reference_run`) is written here from the formulas, independently of the
code under test: token log-probs from the model's full logits with ``jax.nn.log_softmax``,
DPO / robust losses from the paper's formulas, gradient clipping, AdamW and the warm-up +
cosine schedule (checked against transformers) written out by hand, no gradient
accumulation, no sharding, no optax.
"""

import dataclasses
import math

import _multihost_worker as w
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssapo_jax import sharding as shd
from ssapo_jax import train as tr
from ssapo_jax.batch import make_preference_batch

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
# float32 throughout; sharded reductions reorder sums, so agreement is to rounding, amplified
# a little by three Adam steps.
LOSS_RTOL, PARAM_ATOL = 2e-5, 2e-5


def _mesh(shape):
  return shd.make_mesh(shd.MeshConfig(*shape), devices=jax.devices()[: math.prod(shape)])


# ----------------------------------------------------------------------------- reference


def _hf_style_lr(step, *, peak, num_steps, warmup_ratio):
  """transformers' get_cosine_schedule_with_warmup with ceil(warmup_ratio * steps) warm-up."""
  warmup = math.ceil(warmup_ratio * num_steps)
  if step < warmup:
    return peak * step / max(1, warmup)
  progress = (step - warmup) / max(1, num_steps - warmup)
  return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _ref_seq_logps(model, ids, mask, loss_mask):
  logits = model(ids, mask).astype(jnp.float32)  # [B, T, V]
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(tok * loss_mask[:, 1:], axis=-1)


def _ref_loss(params, graphdef, rest, b, cfg):
  model = nnx.merge(graphdef, params, rest)
  pc = _ref_seq_logps(model, b.chosen_ids, b.chosen_mask, b.chosen_loss_mask)
  pr = _ref_seq_logps(model, b.rejected_ids, b.rejected_mask, b.rejected_loss_mask)
  z = cfg.beta * ((pc - b.ref_chosen_logps) - (pr - b.ref_rejected_logps))
  if cfg.objective == "dpo":
    losses = -jax.nn.log_sigmoid(z)
  else:  # authors' weighted loss: sum_k s_ik * -log(max(sigmoid(z) - shift_ik, floor))
    p = jax.nn.sigmoid(z)[:, None]
    atom = jnp.where(
      b.atom_shifts == 0,
      -jax.nn.log_sigmoid(z)[:, None],
      -jnp.log(jnp.maximum(p - b.atom_shifts, cfg.robust_floor)),
    )
    losses = jnp.sum(b.atom_weights * atom, axis=-1)
  return jnp.mean(b.weights * losses)


def _reference_run(cfg, batches, *, num_train_steps=4):
  model = w.tiny_model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: _ref_loss(p, graphdef, rest, b, cfg)))
  m = jax.tree.map(jnp.zeros_like, params)
  v = jax.tree.map(jnp.zeros_like, params)
  losses = []
  for t, b in enumerate(batches):
    loss, g = grad_fn(params, jax.tree.map(jnp.asarray, b))
    losses.append(float(loss))
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    g = jax.tree.map(lambda x: x * jnp.minimum(1.0, cfg.max_grad_norm / norm), g)
    lr = _hf_style_lr(
      t, peak=cfg.learning_rate, num_steps=num_train_steps, warmup_ratio=cfg.warmup_ratio
    )
    m = jax.tree.map(lambda m_, g_: cfg.adam_b1 * m_ + (1 - cfg.adam_b1) * g_, m, g)
    v = jax.tree.map(lambda v_, g_: cfg.adam_b2 * v_ + (1 - cfg.adam_b2) * g_**2, v, g)
    c1, c2 = 1 - cfg.adam_b1 ** (t + 1), 1 - cfg.adam_b2 ** (t + 1)

    def update(p, m_, v_):
      u = (m_ / c1) / (jnp.sqrt(v_ / c2) + cfg.adam_eps)
      decay = cfg.weight_decay * p if p.ndim >= 2 else 0.0
      return p - lr * (u + decay)

    params = jax.tree.map(update, params, m, v)
  return losses, params


@pytest.fixture(scope="module")
def batches():
  return [w.make_batch(i) for i in range(w.NUM_STEPS)]


@pytest.fixture(scope="module")
def reference(batches):
  return {obj: _reference_run(w.train_config(objective=obj), batches) for obj in ("dpo", "robust")}


def _assert_params_close(actual, expected, atol=PARAM_ATOL):
  a, e = jax.tree.leaves(actual), jax.tree.leaves(expected)
  assert len(a) == len(e)
  for x, y in zip(a, e):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


# ----------------------------------------------------------------------------- schedule


def test_schedule_matches_transformers():
  import torch
  from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

  for name, hf in (
    ("cosine", get_cosine_schedule_with_warmup),
    ("linear", get_linear_schedule_with_warmup),
  ):
    cfg = tr.TrainConfig(learning_rate=1e-3, warmup_ratio=0.1, schedule=name)
    num_steps = 25
    sched = tr.make_schedule(cfg, num_steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    lr_sched = hf(opt, num_warmup_steps=math.ceil(0.1 * num_steps), num_training_steps=num_steps)
    expected = []
    for _ in range(num_steps):
      expected.append(opt.param_groups[0]["lr"])
      opt.step()
      lr_sched.step()
    got = [float(sched(i)) for i in range(num_steps)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12, err_msg=name)


def test_train_config_validation():
  with pytest.raises(
    ValueError, match="train.schedule must be one of 'cosine', 'linear', 'constant'; got 'step'"
  ):
    tr.TrainConfig(schedule="step")
  with pytest.raises(ValueError, match="not divisible by train.micro_batches"):
    tr.TrainConfig(global_batch_size=10, micro_batches=4)
  with pytest.raises(ValueError, match="train.warmup_ratio"):
    tr.TrainConfig(warmup_ratio=1.5)
  with pytest.raises(ValueError, match="train.loss_type"):
    tr.TrainConfig(loss_type="nope")
  with pytest.raises(ValueError, match="train.learning_rate"):
    tr.TrainConfig(learning_rate=0.0)


# ----------------------------------------------------------------------------- sharded = reference


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_dpo_with_weights_and_accumulation_matches_reference(shape, reference):
  """Per-example weights, clipping, weight decay, and gradient accumulation: 2 micro-batches
  of 4 against the reference's one batch of 8."""
  model = w.tiny_model()
  losses, state = w.run_steps(
    _mesh(shape), w.train_config(objective="dpo", micro_batches=2), model=model
  )
  ref_losses, ref_params = reference["dpo"]
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
  _assert_params_close(state.params, ref_params)
  assert int(state.step) == w.NUM_STEPS
  # The donated state never aliased the model's own arrays (on one device a plain
  # device_put would): the model still holds its initial weights.
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.tree.map(np.asarray, nnx.state(model, nnx.Param)),
    jax.tree.map(np.asarray, nnx.state(w.tiny_model(), nnx.Param)),
  )


@pytest.mark.parametrize("shape", [(2, 2, 2)])
def test_sharded_robust_matches_reference(shape, reference):
  """Follower atoms carried in the batch (authors' probability-space loss)."""
  losses, state = w.run_steps(_mesh(shape), w.train_config(objective="robust", micro_batches=1))
  ref_losses, ref_params = reference["robust"]
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
  _assert_params_close(state.params, ref_params)


def test_remat_and_in_step_reference_agree():
  """remat='full' changes nothing numerically; an in-step frozen reference equals the same
  reference log-probs precomputed with compute_logps."""
  mesh = _mesh((2, 2, 2))
  cfg = w.train_config(micro_batches=1, remat="full", reference="in_step")
  state = tr.create_train_state(w.tiny_model(), cfg, mesh, num_train_steps=4)
  assert state.ref_params is not None
  logps_fn = tr.make_compute_logps(mesh, state.graphdef, state.params, state.rest)
  batch = w.make_batch(0)
  ref_c, ref_r = tr.cached_pair_logps(
    logps_fn, state.ref_params, mesh, [batch], batch_size=w.GLOBAL_BATCH
  )
  pre_batch = batch.replace(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
  step = tr.make_train_step(cfg, mesh, state)
  _, m_in = step(state, shd.global_batch(mesh, batch))  # the batch's own ref logps are ignored
  pre_cfg = w.train_config(micro_batches=1, remat="none")
  pre_state = tr.create_train_state(w.tiny_model(), pre_cfg, mesh, num_train_steps=4)
  _, m_pre = tr.make_train_step(pre_cfg, mesh, pre_state)(
    pre_state, shd.global_batch(mesh, pre_batch)
  )
  np.testing.assert_allclose(float(m_in["loss"]), float(m_pre["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m_in["grad_norm"]), float(m_pre["grad_norm"]), rtol=1e-4)
  # At step 0 the policy is the reference: every log-ratio is 0, so the loss is log 2 * mean(w).
  np.testing.assert_allclose(float(m_in["loss"]), math.log(2) * batch.weights.mean(), rtol=1e-5)


def test_bf16_compute_keeps_float32_master_weights(reference):
  mesh = _mesh((2, 2, 2))
  cfg = w.train_config(compute_dtype="bfloat16", micro_batches=2)
  losses, state = w.run_steps(mesh, cfg, num_steps=2)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert all(
    x.dtype == jnp.float32
    for x in jax.tree.leaves(state.opt_state)
    if jnp.issubdtype(x.dtype, jnp.floating)
  )
  np.testing.assert_allclose(losses, reference["dpo"][0][:2], rtol=5e-2)
  assert tr.merge_params(state).config.dtype == "bfloat16"


# ----------------------------------------------------------------------------- non-finite


def test_nonfinite_step_is_skipped_and_counted():
  mesh = _mesh((2, 2, 2))
  cfg = w.train_config(max_nonfinite_steps=2)
  state = tr.create_train_state(w.tiny_model(), cfg, mesh, num_train_steps=4)
  step = tr.make_train_step(cfg, mesh, state)
  state, _ = step(state, shd.global_batch(mesh, w.make_batch(0)))
  before = jax.tree.map(np.asarray, (state.step, state.params, state.opt_state))
  bad = w.make_batch(1)
  bad.ref_chosen_logps[3] = np.nan
  state, metrics = step(state, shd.global_batch(mesh, bad))  # the old state is donated
  after = jax.tree.map(np.asarray, (state.step, state.params, state.opt_state))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  assert float(metrics["nonfinite/skipped"]) == 1 and float(metrics["nonfinite/total"]) == 1
  assert not np.isfinite(float(metrics["loss"]))
  tr.check_finite_progress(metrics, cfg)  # one skip is tolerated
  state, metrics = step(state, shd.global_batch(mesh, bad))
  with pytest.raises(tr.NonFiniteError, match="2 consecutive"):
    tr.check_finite_progress(metrics, cfg)
  state, metrics = step(state, shd.global_batch(mesh, w.make_batch(2)))
  assert float(metrics["nonfinite/skipped"]) == 0 and float(metrics["nonfinite/consecutive"]) == 0
  assert float(metrics["nonfinite/total"]) == 2 and int(state.step) == 2
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


# ----------------------------------------------------------------------------- learning


def _rule_pairs(rng, n, *, vocab=64, prompt_len=4, resp_len=6):
  """Prompts of random tokens; chosen responses use the low half of the vocabulary,
  rejected responses the high half."""
  seq = prompt_len + resp_len
  prompt = rng.integers(1, vocab, (n, prompt_len))
  low = rng.integers(1, vocab // 2, (n, resp_len))
  high = rng.integers(vocab // 2, vocab, (n, resp_len))
  mask = np.ones((n, seq), np.int32)
  loss_mask = np.zeros((n, seq), np.int32)
  loss_mask[:, prompt_len:] = 1
  return make_preference_batch(
    np.concatenate([prompt, low], 1),
    mask,
    loss_mask,
    np.concatenate([prompt, high], 1),
    mask,
    loss_mask,
  )


def test_loss_decreases_and_generalises_on_a_preference_rule():
  mesh = _mesh((2, 2, 2))
  rng = np.random.default_rng(0)
  train_pairs, held_out = _rule_pairs(rng, 64), _rule_pairs(rng, 32)
  cfg = tr.TrainConfig(
    learning_rate=1e-2,
    warmup_ratio=0.1,
    global_batch_size=16,
    micro_batches=2,
    epochs=5,
    compute_dtype="float32",
    beta=0.5,
    remat="none",
  )
  steps = cfg.epochs * (64 // cfg.global_batch_size)
  state = tr.create_train_state(w.tiny_model(), cfg, mesh, num_train_steps=steps)
  logps_fn = tr.make_compute_logps(mesh, state.graphdef, state.params, state.rest)

  def chunks(b):
    return [jax.tree.map(lambda x: x[i : i + 16], b) for i in range(0, b.batch_size, 16)]

  def with_ref(b):
    c, r = tr.cached_pair_logps(logps_fn, state.params, mesh, chunks(b), batch_size=16)
    return b.replace(ref_chosen_logps=c, ref_rejected_logps=r)

  train_pairs, held_out = with_ref(train_pairs), with_ref(held_out)
  step = tr.make_train_step(cfg, mesh, state)
  losses = []
  for _ in range(cfg.epochs):
    for b in chunks(train_pairs):
      state, m = step(state, shd.global_batch(mesh, b))
      losses.append(float(m["loss"]))
  assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
  assert np.mean(losses[-4:]) < 0.3, losses

  # Held-out pairs: the implicit reward now prefers the chosen response.
  def margins(b):
    c = tr.compute_logps(
      logps_fn,
      state.params,
      mesh,
      [(x.chosen_ids, x.chosen_mask, x.chosen_loss_mask) for x in chunks(b)],
      batch_size=16,
    )
    r = tr.compute_logps(
      logps_fn,
      state.params,
      mesh,
      [(x.rejected_ids, x.rejected_mask, x.rejected_loss_mask) for x in chunks(b)],
      batch_size=16,
    )
    return (c - b.ref_chosen_logps) - (r - b.ref_rejected_logps)

  assert (margins(held_out) > 0).mean() >= 0.9


# ----------------------------------------------------------------------------- multi-host


# Slow: the default suite's two-process round (tests/pipeline/test_multihost.py) runs this step
# on two processes end to end.
@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
  """2 processes x 4 CPU devices (gloo collectives, local coordinator), each loading only its
  rows of every global batch, give the single-process losses and log-probs."""
  results = w.run_two_processes(str(tmp_path))

  mesh = _mesh(w.MESH_SHAPE)
  losses, state = w.run_steps(mesh, w.train_config())
  logps_fn = tr.make_compute_logps(mesh, state.graphdef, state.params, state.rest)
  seqs = [
    (b.chosen_ids, b.chosen_mask, b.chosen_loss_mask) for b in (w.make_batch(10), w.make_batch(11))
  ]
  logps = tr.compute_logps(logps_fn, state.params, mesh, seqs, batch_size=w.GLOBAL_BATCH)

  assert [r["process_count"] for r in results] == [2, 2]
  assert [r["devices"] for r in results] == [8, 8]
  rows = [slice(*r["rows"]) for r in results]
  assert rows[0].stop - rows[0].start == rows[1].stop - rows[1].start == w.GLOBAL_BATCH // 2
  for r, row in zip(results, rows):
    np.testing.assert_allclose(r["losses"], losses, rtol=LOSS_RTOL)
    expected = np.concatenate([logps[:8][row], logps[8:][row]])
    np.testing.assert_allclose(r["logps"], expected, rtol=1e-5)


# ----------------------------------------------------------------------------- exact losses


def _step_loss_and_gradient(cfg, batch, mesh):
  """The step's logged loss and its gradient, read off one AdamW step.

  With ``learning_rate = adam_eps = 1e8`` (constant, no clipping or decay) the first Adam
  update is ``lr * g / (|g| + eps) = g (1 + O(|g| / 1e8))``, so the parameter change is ``−g``.
  """
  cfg = dataclasses.replace(
    cfg,
    learning_rate=1e8,
    adam_eps=1e8,
    warmup_ratio=0.0,
    schedule="constant",
    max_grad_norm=0.0,
    weight_decay=0.0,
  )
  state = tr.create_train_state(w.tiny_model(), cfg, mesh, num_train_steps=1)
  before = jax.tree.map(np.asarray, state.params)
  step = tr.make_train_step(cfg, mesh, state)
  state, metrics = step(state, shd.global_batch(mesh, batch))
  grads = jax.tree.map(lambda old, new: old - np.asarray(new), before, state.params)
  return float(metrics["loss"]), grads


def _reference_gradient(batch, loss_and_cotangents):
  """Loss and parameter gradient of a float64 numpy loss of the sequence log-probs.

  The log-probs come from the model's full logits (`_ref_seq_logps`); ``loss_and_cotangents``
  maps float64 ``(pc, pr)`` to ``(loss, dL/dpc, dL/dpr)``, and the cotangents are pulled back
  to the parameters through the model's VJP.
  """
  model = w.tiny_model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  b = jax.tree.map(jnp.asarray, batch)

  def seq_logps(p):
    m = nnx.merge(graphdef, p, rest)
    return (
      _ref_seq_logps(m, b.chosen_ids, b.chosen_mask, b.chosen_loss_mask),
      _ref_seq_logps(m, b.rejected_ids, b.rejected_mask, b.rejected_loss_mask),
    )

  (pc, pr), vjp = jax.vjp(seq_logps, params)
  loss, dpc, dpr = loss_and_cotangents(np.asarray(pc, np.float64), np.asarray(pr, np.float64))
  (grads,) = vjp((jnp.asarray(dpc, jnp.float32), jnp.asarray(dpr, jnp.float32)))
  return loss, grads


def _assert_gradients_close(actual, expected):
  scale = max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(expected))
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-4, atol=2e-5 * scale)


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_ipo_train_step_matches_numpy_ipo():
  """loss_type=ipo trains on per-token log-ratios: the lengths come from the loss masks."""
  batch = w.make_batch(3)
  cfg = w.train_config(loss_type="ipo", beta=0.1)
  mesh = _mesh((2, 2, 2))
  loss, grads = _step_loss_and_gradient(cfg, batch, mesh)

  lc = batch.chosen_loss_mask[:, 1:].sum(-1).astype(np.float64)
  lr = batch.rejected_loss_mask[:, 1:].sum(-1).astype(np.float64)
  wts = batch.weights.astype(np.float64)
  rc, rr = batch.ref_chosen_logps.astype(np.float64), batch.ref_rejected_logps.astype(np.float64)

  def ipo(pc, pr):
    h = (pc - rc) / lc - (pr - rr) / lr - 1 / (2 * 0.1)
    n = len(pc)
    return np.sum(wts * h**2) / n, 2 * wts * h / lc / n, -2 * wts * h / lr / n

  expected_loss, expected_grads = _reference_gradient(batch, ipo)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  _assert_gradients_close(grads, expected_grads)


def test_padded_partial_batch_equals_the_unpadded_batch():
  """A partial batch padded with weight-0, valid-0 copies (as the loader pads it) gives the
  loss and gradient of the unpadded smaller batch: the mean over the real rows only."""
  real = 5
  full = w.make_batch(4)
  small = jax.tree.map(lambda x: x[:real], full)
  idx = np.concatenate([np.arange(real), np.arange(w.GLOBAL_BATCH - real)])
  padded = jax.tree.map(lambda x: x[idx], full)
  pad = np.arange(w.GLOBAL_BATCH) >= real
  padded = padded.replace(
    weights=np.where(pad, 0.0, padded.weights).astype(np.float32), valid=(~pad).astype(np.float32)
  )
  cfg = w.train_config(beta=0.2)
  loss_pad, grads_pad = _step_loss_and_gradient(cfg, padded, _mesh((2, 2, 2)))
  loss_small, grads_small = _step_loss_and_gradient(
    dataclasses.replace(cfg, global_batch_size=real, micro_batches=1), small, _mesh((1, 1, 1))
  )

  wts = small.weights.astype(np.float64)
  rc, rr = small.ref_chosen_logps.astype(np.float64), small.ref_rejected_logps.astype(np.float64)

  def dpo(pc, pr):
    z = 0.2 * ((pc - rc) - (pr - rr))
    d = -0.2 * wts * _np_sigmoid(-z) / real
    return np.sum(wts * np.logaddexp(0.0, -z)) / real, d, -d

  expected_loss, expected_grads = _reference_gradient(small, dpo)
  np.testing.assert_allclose([loss_pad, loss_small], expected_loss, rtol=1e-5)
  _assert_gradients_close(grads_pad, expected_grads)
  _assert_gradients_close(grads_small, expected_grads)


def test_loss_option_validation():
  with pytest.raises(ValueError, match="micro_batches=1"):
    tr.TrainConfig(loss_type="aot", global_batch_size=8, micro_batches=2)
  with pytest.raises(ValueError, match="reference=in_step"):
    tr.TrainConfig(ld_alpha=0.5)
  with pytest.raises(ValueError, match="ld_alpha must be in"):
    tr.TrainConfig(ld_alpha=1.5, reference="in_step")
  with pytest.raises(ValueError, match="f_divergence_type"):
    tr.TrainConfig(loss_type="apo_zero", f_divergence_type="js_divergence")
  with pytest.raises(ValueError, match="loss_weights"):
    tr.TrainConfig(loss_type=("sigmoid", "sft"), loss_weights=(1.0,))
  with pytest.raises(ValueError, match="use_weighting"):
    tr.TrainConfig(loss_type="aot", use_weighting=True)
  with pytest.raises(ValueError, match="train.loss_type"):
    tr.TrainConfig(loss_type=("sigmoid", "nope"))
  cfg = tr.TrainConfig(
    loss_type=("sigmoid", "sft"),
    loss_weights=(1.0, 0.5),
    rpo_alpha=0.1,
    f_divergence_type="js_divergence",
  )
  assert cfg.loss_type == ("sigmoid", "sft")


def test_train_config_loss_options_from_yaml_overrides():
  from ssapo_jax import config as cfg_mod

  cfg = cfg_mod.from_dict(
    tr.TrainConfig,
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1, 0.2], "f_divergence_type": "forward_kl"},
  )
  assert cfg.loss_type == ("sigmoid", "sft") and cfg.loss_weights == (1.0, 0.2)
  with pytest.raises(cfg_mod.ConfigError, match="f_divergence_type"):
    cfg_mod.from_dict(tr.TrainConfig, {"f_divergence_type": "kl"})


@pytest.mark.parametrize(
  "options",
  [
    dict(
      loss_type=("sigmoid", "sft"),
      loss_weights=(1.0, 0.5),
      ld_alpha=0.5,
      reference="in_step",
      use_weighting=True,
    ),
    dict(objective="robust", rpo_alpha=0.3, reference_free=True, use_weighting=True),
  ],
)
def test_step_with_token_level_options_matches_losses_module(options):
  """LD-DPO, WPO, sft and rpo_alpha in the step equal `pair_logps` + the loss functions on
  the model's token log-probs (one device, one micro-batch, no padding)."""
  from ssapo_jax import losses

  batch = w.make_batch(5)
  cfg = w.train_config(**options)
  mesh = _mesh((2, 2, 2))
  loss, _ = _step_loss_and_gradient(cfg, batch, mesh)
  model = w.tiny_model()
  b = jax.tree.map(jnp.asarray, batch)
  ids = jnp.concatenate([b.chosen_ids, b.rejected_ids])
  mask = jnp.concatenate([b.chosen_mask, b.rejected_mask])
  loss_mask = jnp.concatenate([b.chosen_loss_mask, b.rejected_loss_mask])
  tok, lss = model.token_logps(ids, mask, log_sum_sq=True)
  pairs = losses.pair_logps(tok, loss_mask[:, 1:], ld_alpha=cfg.ld_alpha, token_log_sum_sq=lss)
  ref = (
    (pairs.chosen_logps, pairs.rejected_logps)
    if cfg.reference == "in_step"
    else (b.ref_chosen_logps, b.ref_rejected_logps)
  )
  common = dict(
    weights=b.weights * pairs.wpo_weights,
    chosen_lengths=pairs.chosen_lengths,
    chosen_nll=pairs.chosen_nll,
    rpo_alpha=cfg.rpo_alpha,
    reference_free=cfg.reference_free,
    beta=cfg.beta,
  )
  if cfg.objective == "robust":
    atoms = losses.LossAtoms(
      b.atom_weights, b.atom_shifts, space=cfg.robust_space, margin_scale=cfg.beta
    )
    expected, _ = losses.robust_dpo_loss(
      pairs.chosen_logps, pairs.rejected_logps, *ref, atoms, space=cfg.robust_space, **common
    )
  else:
    expected, _ = losses.dpo_loss(
      pairs.chosen_logps,
      pairs.rejected_logps,
      *ref,
      loss_type=cfg.loss_type,
      loss_weights=cfg.loss_weights,
      rejected_lengths=pairs.rejected_lengths,
      **common,
    )
  np.testing.assert_allclose(loss, float(expected), rtol=2e-5)


def test_splash_attention_runs_in_shard_map_inside_the_jitted_step_and_scoring():
  """make_train_step / make_compute_logps trace under the mesh, so the splash kernel is
  shard_map'd over the batch axes instead of being handed whole, unsharded arrays."""
  from ssapo_jax.batch import make_preference_batch
  from ssapo_jax.models import Llama, LlamaConfig

  cfg = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    attention="splash",
  )
  mesh = _mesh((1, 8, 1))
  t = tr.TrainConfig(global_batch_size=8, micro_batches=1, compute_dtype="float32")
  state = tr.create_train_state(Llama(cfg, rngs=nnx.Rngs(0)), t, mesh, num_train_steps=4)
  ids = np.random.default_rng(0).integers(3, 128, (8, 128)).astype(np.int32)
  ones = np.ones_like(ids)
  batch = make_preference_batch(ids, ones, ones, ids, ones, ones)
  step_text = tr.make_train_step(t, mesh, state).lower(state, batch).as_text()
  assert "sdy.manual_computation" in step_text
  logps_fn = tr.make_compute_logps(mesh, state.graphdef, state.params, state.rest)
  score_text = jax.jit(logps_fn).lower(state.params, ids, ones, ones).as_text()
  assert "sdy.manual_computation" in score_text
