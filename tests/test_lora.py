"""LoRA/QLoRA adapters (ssapo_jax/lora.py) on a tiny random Llama.

References: the base model's own logits (zero-initialised adapters must give them bitwise),
``transformers`` on the merged export, and ``peft.PeftModel.from_pretrained`` on the base with
the PEFT export (1e-4). QLoRA tolerances are measured on this model (see each test). The
adapted model runs as the train step runs it: adapters applied per layer inside the layer scan
(`lora.layer_transform`); the merged tree (`lora.apply_adapters`) is what export and sampling
use, and the two agree.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ssapo_jax import lora as lora_lib
from ssapo_jax.models import Llama, LlamaConfig, save_hf, split_params

CONFIG = LlamaConfig(
  vocab_size=97,
  hidden_size=32,
  intermediate_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  dtype="float32",
  param_dtype="float32",
  max_position_embeddings=128,
)
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0)
IDS = jax.random.randint(jax.random.key(5), (2, 12), 1, CONFIG.vocab_size)
MASK = jnp.ones_like(IDS)


def _model():
  return Llama(CONFIG, rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, rest):
  return nnx.merge(graphdef, params, rest)(IDS, MASK)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _scan_logits(graphdef, params, rest, adapters, lora=LORA, scales=None):
  """Logits with the adapters (and dequantisation) applied per layer inside the scan."""
  transform = lora_lib.layer_transform(adapters, lora, scales=scales, dtype="float32")
  return nnx.merge(graphdef, params, rest)(IDS, MASK, layer_transform=transform)


def _train(steps=8):
  """A few Adam steps of an LM loss on the adapters only; returns (parts, adapters, losses)."""
  graphdef, params, rest = split_params(_model())
  adapters = lora_lib.init_adapters(CONFIG, params, LORA, jax.random.key(1))
  opt = optax.adam(1e-2)
  opt_state = opt.init(adapters)

  def loss_fn(adapters):
    transform = lora_lib.layer_transform(adapters, LORA, dtype="float32")
    model = nnx.merge(graphdef, params, rest)
    return -jnp.mean(model.token_logps(IDS, MASK, layer_transform=transform))

  @jax.jit
  def step(adapters, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(adapters, updates), opt_state, loss

  losses = []
  for _ in range(steps):
    adapters, opt_state, loss = step(adapters, opt_state)
    losses.append(float(loss))
  return (graphdef, params, rest), adapters, losses


def test_zero_initialised_adapters_give_the_base_logits_exactly():
  graphdef, params, rest = split_params(_model())
  adapters = lora_lib.init_adapters(CONFIG, params, LORA, jax.random.key(1))
  assert set(adapters) == {f"layers.attn.{p}_proj" for p in "qkvo"} | {
    f"layers.mlp.{p}_proj" for p in ("gate", "up", "down")
  }
  a, b = adapters["layers.attn.o_proj"]["lora_a"], adapters["layers.attn.o_proj"]["lora_b"]
  assert a.shape == (2, 4, 32) and b.shape == (2, 32, 4) and not np.any(b) and np.any(a)
  base = _logits(graphdef, params, rest)
  adapted = _logits(graphdef, lora_lib.apply_adapters(CONFIG, params, adapters, LORA), rest)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))
  in_scan = _scan_logits(graphdef, params, rest, adapters)
  np.testing.assert_array_equal(np.asarray(in_scan), np.asarray(base))


def test_adapters_in_the_layer_scan_equal_the_merged_tree():
  """Trained adapters applied per layer inside the scan (the step) give the logits of the
  adapted parameter tree (export and sampling), to float32 rounding."""
  (graphdef, params, rest), adapters, _ = _train()
  merged = _logits(graphdef, lora_lib.apply_adapters(CONFIG, params, adapters, LORA), rest)
  in_scan = _scan_logits(graphdef, params, rest, adapters)
  assert np.abs(np.asarray(merged) - np.asarray(_logits(graphdef, params, rest))).max() > 1e-2
  np.testing.assert_allclose(np.asarray(in_scan), np.asarray(merged), atol=1e-6, rtol=1e-6)
  # The unrolled layer loop (model.scan_layers false) applies them per layer too.
  unrolled = nnx.graphdef(Llama(dataclasses.replace(CONFIG, scan_layers=False), rngs=nnx.Rngs(0)))
  in_loop = _scan_logits(unrolled, params, rest, adapters)
  np.testing.assert_allclose(np.asarray(in_loop), np.asarray(merged), atol=1e-6, rtol=1e-6)


def test_gradient_reaches_only_the_adapters_and_the_loss_falls():
  (graphdef, params, rest), adapters, losses = _train()
  assert losses[-1] < losses[0] - 0.05, losses

  # The gradient reaches every adapter through the layer scan...
  def loss_of(params, adapters):
    transform = lora_lib.layer_transform(adapters, LORA, dtype="float32")
    model = nnx.merge(graphdef, params, rest)
    return -jnp.mean(model.token_logps(IDS, MASK, layer_transform=transform))

  g_adapters = jax.grad(loss_of, argnums=1)(params, adapters)
  assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(g_adapters))
  # ... and the trained tree is the adapters alone, with a delta only on the target matrices.
  adapted = lora_lib._pure(lora_lib.apply_adapters(CONFIG, params, adapters, LORA))
  base = lora_lib._pure(params)
  changed = {k for k in base if not np.array_equal(np.asarray(adapted[k]), np.asarray(base[k]))}
  assert changed == set(adapters)


def test_targets_regex_selects_matrices_and_names_bad_matches():
  _, params, _ = split_params(_model())
  only_qv = lora_lib.LoraConfig(rank=2, alpha=2.0, targets=r"layers\.attn\.(q|v)_proj")
  assert set(lora_lib.init_adapters(CONFIG, params, only_qv, jax.random.key(0))) == {
    "layers.attn.q_proj",
    "layers.attn.v_proj",
  }
  with pytest.raises(ValueError, match=r"matches \['embedding'\], which are not layer weight"):
    lora_lib.target_kinds(CONFIG, params, lora_lib.LoraConfig(targets="embedding"))
  with pytest.raises(ValueError, match="matches no parameter; the layer matrices are"):
    lora_lib.target_kinds(CONFIG, params, lora_lib.LoraConfig(targets="q_proj"))


def test_merged_export_and_peft_adapters_give_our_logits(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import transformers

  (graphdef, params, rest), adapters, _ = _train()
  ours = np.asarray(_scan_logits(graphdef, params, rest, adapters))
  base_model = nnx.merge(graphdef, params, rest)
  save_hf(base_model, tmp_path / "base")
  lora_lib.save_merged(base_model, adapters, LORA, tmp_path / "merged")
  lora_lib.save_peft(
    CONFIG, params, adapters, LORA, tmp_path / "adapter", base_model=str(tmp_path / "base")
  )
  assert json.load(open(tmp_path / "adapter" / "adapter_config.json"))["r"] == 4
  ids = torch.tensor(np.asarray(IDS))
  with torch.no_grad():
    merged = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "merged", dtype=torch.float32
    )
    np.testing.assert_allclose(merged(ids).logits.numpy(), ours, atol=1e-4, rtol=1e-4)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    base_logits = base(ids).logits.numpy()
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    peft_logits = peft_model(ids).logits.numpy()
  np.testing.assert_allclose(peft_logits, ours, atol=1e-4, rtol=1e-4)
  assert np.abs(peft_logits - base_logits).max() > 1e-2  # the adapters change the logits
  from ssapo_jax.models import load_hf

  reloaded = load_hf(tmp_path / "merged")
  np.testing.assert_allclose(np.asarray(reloaded(IDS, MASK)), ours, atol=1e-5)


@pytest.mark.parametrize("base_dtype, tolerance", [("int8", 0.005), ("nf4", 0.07)])
def test_qlora_base_logits_within_documented_tolerance(base_dtype, tolerance):
  """Max |logit difference| of the quantised base against the float base on this model (logits
  of std 0.11): measured 0.0020 for int8 (absmax per output feature) and 0.038 for nf4 (blocks
  of the last axis); the documented tolerances are 0.005 and 0.07. Zero adapters add nothing to
  the dequantised base, in the scan or on the merged tree."""
  graphdef, params, rest = split_params(_model())
  q_lora = lora_lib.LoraConfig(rank=4, alpha=8.0, base_dtype=base_dtype)
  codes, scales = jax.jit(lambda p: lora_lib.quantize_base(CONFIG, p, q_lora))(params)
  assert set(scales) == set(lora_lib.target_kinds(CONFIG, params, q_lora))
  flat_codes, flat = lora_lib._pure(codes), lora_lib._pure(params)
  for path in scales:  # int8: one byte per value; nf4: two codes per byte
    w = flat[path]
    want = w.shape if base_dtype == "int8" else (*w.shape[:-1], w.shape[-1] // 2)
    assert flat_codes[path].shape == want and flat_codes[path].dtype.itemsize == 1
  base = np.asarray(_logits(graphdef, params, rest))
  q_logits = np.asarray(_scan_logits(graphdef, codes, rest, None, q_lora, scales))
  err = np.abs(q_logits - base).max()
  assert 0 < err < tolerance, err
  merged = lora_lib.apply_adapters(CONFIG, codes, None, q_lora, scales=scales)
  np.testing.assert_allclose(
    np.asarray(_logits(graphdef, merged, rest)), q_logits, atol=1e-6, rtol=1e-6
  )
  adapters = lora_lib.init_adapters(CONFIG, params, q_lora, jax.random.key(1))
  with_zero = _scan_logits(graphdef, codes, rest, adapters, q_lora, scales)
  np.testing.assert_array_equal(np.asarray(with_zero), q_logits)
  # Independent check of the dequantisation: within half a quantisation step of each value.
  w = np.asarray(flat["layers.mlp.up_proj"])  # [L, D, F]
  dq = np.asarray(
    lora_lib.dequantize(flat_codes["layers.mlp.up_proj"], scales["layers.mlp.up_proj"], jnp.float32)
  )
  if base_dtype == "int8":
    step = np.abs(w).max(axis=1, keepdims=True) / 127  # per output feature
    assert np.all(np.abs(dq - w) <= step / 2 + 1e-7)
  else:
    gaps = np.diff(lora_lib.NF4_LEVELS).max()
    blocks = np.abs(w.reshape(*w.shape[:-1], -1, 64)).max(axis=-1, keepdims=True)
    assert np.all(np.abs(dq - w).reshape(blocks.shape[:-1] + (64,)) <= blocks * gaps / 2 + 1e-7)


# The micro-batched variant is slow (another compile of the sharded step, about 20 s of CPU).
@pytest.mark.parametrize(
  "micro_batches, base_dtype",
  [(1, "compute"), pytest.param(2, "compute", marks=pytest.mark.slow), (1, "int8"), (1, "nf4")],
)
def test_train_state_with_lora_trains_only_adapters_on_a_sharded_mesh(micro_batches, base_dtype):
  """`create_train_state` with ``train.lora``: params and Adam moments are the adapters only,
  the base stays bitwise frozen (QLoRA: as int8/nf4 codes, sharded by the matrices' logical
  axes), the step-0 policy is the base (log-ratios 0: loss log 2 · mean w with the in-step
  reference = base with adapters off), and the loss falls."""
  import math
  import sys

  sys.path.insert(0, os.path.dirname(__file__))
  import _multihost_worker as w

  from ssapo_jax import sharding as shd
  from ssapo_jax import train as tr

  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2), devices=jax.devices()[:8])
  cfg = w.train_config(
    micro_batches=micro_batches,
    reference="in_step",
    learning_rate=5e-2,
    lora=lora_lib.LoraConfig(rank=2, alpha=4.0, base_dtype=base_dtype),
  )
  model = w.tiny_model()
  state = tr.create_train_state(model, cfg, mesh, num_train_steps=6)
  adapter_paths = set(state.params)
  assert adapter_paths == set(lora_lib.target_kinds(model.config, split_params(model)[1], cfg.lora))
  adapter_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
  moment_shapes = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert moment_shapes == sorted(adapter_shapes * 2)  # Adam mu and nu of the adapters only
  base_before = jax.tree.map(np.asarray, state.base)
  codes = lora_lib._pure(state.base)["layers.mlp.up_proj"]
  assert codes.dtype == {"compute": jnp.float32, "int8": jnp.int8, "nf4": jnp.uint8}[base_dtype]
  assert not codes.sharding.is_fully_replicated  # [L, D, F]: F over the tensor axis
  assert (state.base_scales is None) == (base_dtype == "compute")
  abstract = tr.create_train_state(model, cfg, mesh, num_train_steps=6, abstract=True)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  step = tr.make_train_step(cfg, mesh, state)
  batch = w.make_batch(0)
  losses = []
  for _ in range(5):
    state, metrics = step(state, shd.global_batch(mesh, batch))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses[0], math.log(2) * batch.weights.mean(), rtol=1e-5)
  assert losses[-1] < losses[0] - 1e-3, losses
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.base), base_before)
  assert any(np.any(np.asarray(p["lora_b"])) for p in state.params.values())
  merged = tr.merge_params(state)  # the policy: base + adapters
  ids, mask = batch.chosen_ids[:2], batch.chosen_mask[:2]
  base = lora_lib.apply_adapters(model.config, state.base, None, cfg.lora, scales=state.base_scales)
  base_logits = nnx.merge(state.graphdef, base, state.rest)(ids, mask)
  assert np.abs(np.asarray(merged(ids, mask)) - np.asarray(base_logits)).max() > 1e-4


@pytest.mark.parametrize("base_dtype", ["compute", "nf4"])
def test_lora_checkpoint_holds_adapters_only_and_refuses_another_base(tmp_path, base_dtype):
  """`train.checkpoint_state` drops the frozen base (the checkpoint holds the adapters, their
  Adam moments and the counters); `train.resume_state` puts the rebuilt base back (bitwise the
  trained state) and refuses a base whose fingerprint differs, naming both fingerprints."""
  import sys

  sys.path.insert(0, os.path.dirname(__file__))
  import _multihost_worker as w

  from ssapo_jax import sharding as shd
  from ssapo_jax import train as tr
  from ssapo_jax.checkpoint import Checkpointer
  from ssapo_jax.errors import CheckpointError

  mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2), devices=jax.devices()[:8])
  cfg = w.train_config(lora=lora_lib.LoraConfig(rank=2, alpha=4.0, base_dtype=base_dtype))
  build = functools.partial(tr.create_train_state, config=cfg, mesh=mesh, num_train_steps=4)
  state = build(w.tiny_model())
  state, _ = tr.make_train_step(cfg, mesh, state)(state, shd.global_batch(mesh, w.make_batch(0)))
  saved_base = tr.base_fingerprint(state)
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(1, tr.checkpoint_state(state), {"base_fingerprint": saved_base}, force=True)
    ckpt.wait()
    target = tr.checkpoint_state(build(w.tiny_model(), abstract=True))
    restored = ckpt.restore(target)
  saved = jax.tree.leaves(restored.state)
  # Arrays: the adapters and their two Adam moments; the rest are scalar counters.
  adapter_sizes = sorted(x.size for x in jax.tree.leaves(state.params))
  assert sorted(x.size for x in saved if x.ndim) == sorted(adapter_sizes * 3)
  assert not any(np.asarray(x).dtype in (np.int8, np.uint8) for x in saved)  # no codes
  resumed = tr.resume_state(
    build(w.tiny_model()), restored.state, saved_base=saved_base, base_source="the tiny model"
  )
  assert jax.tree.structure(resumed) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(state))
  other = build(w.tiny_model(seed=1))
  with pytest.raises(CheckpointError) as error:
    tr.resume_state(other, restored.state, saved_base=saved_base, base_source="another model")
  assert saved_base in str(error.value) and tr.base_fingerprint(other) in str(error.value)
  assert "another model" in str(error.value)
