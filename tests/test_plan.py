"""ssapo-plan: slice names, analytic flops, loop-scaled HLO bytes, and a small AOT plan for TPU."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssapo_jax import plan
from ssapo_jax import train as tr
from ssapo_jax.models import Llama, LlamaConfig
from ssapo_jax.models.presets import PRESETS, preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_slice_names_map_to_libtpu_topologies():
  assert plan.tpu_slice("v5p-32").topology == "v5:2x2x4"
  assert plan.tpu_slice("v5p-32").num_chips == 16  # v5p names count TensorCores, 2 per chip
  assert plan.tpu_slice("v4-8").num_chips == 4
  assert plan.tpu_slice("v4-128").wrap == (True, True, True)
  assert plan.tpu_slice("v5litepod-64").topology == "v5e:8x8"  # v5e names count chips
  assert plan.tpu_slice("v6e-256").num_chips == 256
  # Single chips (one device: the stand-ins for one GPU), on a host of one chip.
  assert plan.tpu_slice("v4-2").topology == "v4:1x1x1" and plan.tpu_slice("v4-2").num_chips == 1
  assert plan.tpu_slice("v5litepod-1").topology == "v5e:1x1"
  assert plan.tpu_slice("v5litepod-1").host_bounds == (1, 1, 1)
  assert plan.tpu_slice("v4-32").host_bounds == (2, 2, 1)
  for family, sizes in (
    ("v4", (2, 8, 16, 32, 64, 128)),
    ("v5p", (2, 8, 16, 32, 64, 128)),
    ("v5litepod", (1, 8, 16, 32, 64, 256)),
    ("v6e", (1, 8, 16, 32, 64, 256)),
  ):
    for size in sizes:
      s = plan.tpu_slice(f"{family}-{size}")
      assert s.num_chips == (size // 2 if family in ("v4", "v5p") else size)
  with pytest.raises(ValueError, match="unknown TPU slice 'v5p-33'.*v5p-32"):
    plan.tpu_slice("v5p-33")
  # GPU nodes of 8, as the CUDA plugin's mock topology <slices>x<nodes>x<GPUs per node>.
  assert plan.tpu_slice("h100-16").topology == "1x2x8" and plan.tpu_slice("h100-16").num_chips == 16
  assert plan.tpu_slice("h200-8").platform == "cuda" and plan.tpu_slice("v5p-8").platform == "tpu"
  assert plan.tpu_slice("h100-1").topology == "1x1x1" and plan.tpu_slice("h100-1").num_chips == 1
  config = plan.gpu_target_config(plan.CHIPS["h200"])
  assert "device_memory_size: 141000000000" in config
  assert "memory_bandwidth: 4800000000000" in config


def test_gpu_collectives_use_nvlink_inside_a_node_and_the_network_between():
  chip = plan.CHIPS["h100"]
  inside = plan.Collective("all-gather", tuple(range(8)), 1, 1e9, 7e9)
  across = plan.Collective("all-gather", tuple(range(16)), 1, 1e9, 15e9)
  assert plan.collective_seconds(inside, chip) == pytest.approx(7e9 / 450e9 + 7 * 1e-5)
  assert plan.collective_seconds(across, chip) == pytest.approx(15e9 / 50e9 + 15 * 1e-5)


@pytest.mark.parametrize(
  "name,published",
  [("mistral-7b", 7.24e9), ("llama3-8b", 8.03e9), ("llama3.2-1b", 1.24e9), ("llama3.2-3b", 3.21e9)],
)
def test_presets_have_the_published_parameter_counts(name, published):
  model = nnx.eval_shape(lambda: Llama(preset(name), rngs=nnx.Rngs(0)))
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert abs(total - published) / published < 0.005


def _counted_matmul_params(config):
  """Matrices of the abstract model, the input embedding left out (it is a lookup)."""
  params = nnx.state(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))), nnx.Param)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  # Matrices only: a stacked layer parameter has a leading [L] axis (its norm scales are [L, D]).
  stacked = lambda path: "layers" in jax.tree_util.keystr(path)
  total = sum(x.size for path, x in flat if x.ndim - stacked(path) >= 2)
  if not config.tie_word_embeddings:
    total -= config.vocab_size * config.hidden_size
  return total


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_train_flops_are_six_params_tokens_plus_attention(name):
  config = preset(name)
  t = tr.TrainConfig(global_batch_size=32, micro_batches=4)
  seq, chips = 2048, 16
  tokens = 2 * 32 * seq
  params = _counted_matmul_params(config)
  assert config.matmul_params() == params
  attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq * tokens  # PaLM
  per_chip = plan.train_step_flops(config, t, seq) / chips
  assert per_chip == pytest.approx((6 * params * tokens + attention) / chips, rel=1e-12)
  # The reference in the step adds one forward pass: 2 * params * tokens plus its attention.
  in_step = tr.TrainConfig(global_batch_size=32, micro_batches=4, reference="in_step")
  assert plan.train_step_flops(config, in_step, seq) == pytest.approx(
    (8 * params * tokens + attention * 4 / 3), rel=1e-12
  )


def test_hardware_flops_match_xla_on_cpu():
  # XLA's own count of a compiled step (one micro-batch, one vocabulary chunk, one layer in the
  # layer scan, no remat, so no loop body runs more than once and none is undercounted) agrees
  # with the analytic hardware flops: dots dominate.
  config = LlamaConfig(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    dtype="float32",
  )
  t = tr.TrainConfig(global_batch_size=8, micro_batches=1, remat="none", compute_dtype="float32")
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
  lowered, tokens = plan.lower_train_step(t, config, mesh, seq_len=64)
  assert tokens == 2 * 8 * 64
  xla = lowered.compile().cost_analysis()["flops"]
  analytic = plan.train_step_hardware_flops(config, t, 64)
  assert analytic == pytest.approx(xla, rel=0.1)


def test_hlo_bytes_scale_with_loop_trip_counts():
  x = jnp.ones((256, 256), jnp.float32)

  def loop(n):
    def f(x):
      return jax.lax.scan(lambda c, _: (jnp.tanh(c @ x), None), x, None, length=n)[0]

    return plan.hlo_cost(jax.jit(f).lower(x).compile().as_text())

  two, ten = loop(2), loop(10)
  assert two.unknown_loops == ten.unknown_loops == 0
  body = (ten.bytes_accessed - two.bytes_accessed) / 8
  # One iteration reads c and x and writes c @ x, then tanh reads and writes it (f32).
  assert body == pytest.approx(5 * 256 * 256 * 4, rel=0.1)


_WINDOWED_LOOP = """
%add_two (a: s32[]) -> s32[] {
  %a = s32[] parameter(0)
  %two = s32[] constant(2)
  ROOT %sum = s32[] add(%a, %two)
}

%body (p: (s32[], f32[1024], f32[1024])) -> (s32[], f32[1024], f32[1024]) {
  %p = (s32[], f32[1024]{0}, f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[1024]{0} get-tuple-element(%p), index=1
  %acc = f32[1024]{0} get-tuple-element(%p), index=2
  %y = f32[1024]{0} negate(%x)
  %next = s32[] fusion(%i), kind=kLoop, calls=%add_two
  %scratch = f32[1024]{0:S(1)} copy(%x)
  %perm = f32[1024]{0} collective-permute(%x), source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  ROOT %t = (s32[], f32[1024]{0}, f32[1024]{0}) tuple(%next, %y, %perm)
}

%less (a: s32[], b: s32[]) -> pred[] {
  %a = s32[] parameter(0)
  %b = s32[] parameter(1)
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

%cond (q: (s32[], f32[1024], f32[1024])) -> pred[] {
  %q = (s32[], f32[1024]{0}, f32[1024]{0}) parameter(0)
  %c = s32[] constant(8)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %go = pred[] fusion(%j, %c), kind=kLoop, calls=%less
}

ENTRY %main (a: f32[1024]) -> f32[1024] {
  %a = f32[1024]{0} parameter(0)
  %z = s32[] constant(0)
  %init = (s32[], f32[1024]{0}, f32[1024]{0}) tuple(%z, %a, %a)
  %w = (s32[], f32[1024]{0}, f32[1024]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[1024]{0} get-tuple-element(%w), index=1
}
"""


def test_windowed_einsum_loop_counts_its_true_trip_count():
  # TPU HLO carries no known_trip_count, and an FSDP windowed-einsum loop steps its counter by
  # 2 (``i < 8``: 4 trips, not 8). The increment sits in a fusion, the compare in another.
  cost = plan.hlo_cost(_WINDOWED_LOOP)
  assert cost.unknown_loops == 0 and cost.loops == (("body", 4),)
  # Per trip: negate reads and writes 4 KiB; the permute reads 4 KiB and writes 4 KiB; the
  # copy to on-chip memory (S(1)) reads 4 KiB and writes nothing to HBM; the increment reads
  # and writes an s32 (4 + 4); the condition's fusion reads two s32 and writes a pred.
  body = 2 * 4096 + 2 * 4096 + 4096 + (4 + 4)
  assert cost.bytes_accessed == 4 * body + 5 * (4 + 4 + 1)  # the condition runs once more
  (permute,) = cost.collectives
  assert permute.kind == "collective-permute" and permute.count == 4
  assert permute.operand_bytes == permute.wire_bytes == 4 * 4096


def test_data_dependent_loop_is_unknown():
  # A bound read from the loop state's array (a sampler stopping at EOS) is not a trip count.
  hlo = _WINDOWED_LOOP.replace(
    "%c = s32[] constant(8)", "%c = s32[] reduce-precision(%j), exponent_bits=8, mantissa_bits=7"
  )
  cost = plan.hlo_cost(hlo, unknown_trip_count=3)
  assert cost.unknown_loops == 1 and cost.loops == (("body", None),)
  # The default trip count (3) scales the body; the condition now also reads and writes j.
  body = 2 * 4096 + 2 * 4096 + 4096 + (4 + 4)
  assert cost.bytes_accessed == 3 * body + 4 * ((4 + 4) + (4 + 4 + 1))


def test_parser_keeps_instructions_whose_attributes_span_lines():
  # The splash kernel's custom call carries a frontend attribute printed over three lines (as
  # libtpu 0.0.42.1 prints it): its last line starts with ``}}``, which once ended the
  # computation there. Brackets inside strings do not count.
  hlo = """
%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[256]{0} get-tuple-element(%p), index=1
  %k = f32[256]{0} custom-call(%x), custom_call_target="k", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 512, \\"note\\": \\"}{(\\"}"
}}, backend_config={"custom_call_config": {"body": "abc{("}}
  %y = f32[256]{0} negate(%k)
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[256]{0}) tuple(%n, %y)
}

%cond (q: (s32[], f32[256])) -> pred[] {
  %q = (s32[], f32[256]{0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %c = s32[] constant(5)
  ROOT %lt = pred[] compare(%j, %c), direction=LT
}

ENTRY %main (a: f32[256]) -> f32[256] {
  %a = f32[256]{0} parameter(0)
  %z = s32[] constant(0)
  %init = (s32[], f32[256]{0}) tuple(%z, %a)
  %w = (s32[], f32[256]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[256]{0} get-tuple-element(%w), index=1
}
"""
  comps, entry = plan.parse_hlo(hlo)
  assert entry == "main"
  assert [i.op for i in comps["body"]] == [
    "parameter",
    "get-tuple-element",
    "get-tuple-element",
    "custom-call",
    "negate",
    "constant",
    "add",
    "tuple",
  ]
  cost = plan.hlo_cost(hlo)
  assert cost.loops == (("body", 5),)
  # Per trip: the custom call and the negate each read and write 1 KiB; the add 4 + 4 + 4;
  # the compare 4 + 4 + 1 (once more at the exit).
  assert cost.bytes_accessed == 5 * (4 * 1024 + 12 + 9) + 9


def test_hlo_bytes_of_a_stacked_weight_sliced_in_a_nested_fusion():
  # A scanned layer's weight: the [L, D, F] stack enters a fusion whose inner fusion slices out
  # one layer (as TPU HLO fuses it); only that [D, F] slice is read, not the whole stack.
  hlo = """
%slice_layer (w: f32[4,64,32], i: s32[]) -> f32[64,32] {
  %w = f32[4,64,32]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,64,32]{2,1,0} dynamic-slice(%w, %i, %z, %z), dynamic_slice_sizes={1,64,32}
  ROOT %sq = f32[64,32]{1,0} bitcast(%ds)
}

%matmul (x: f32[8,64], w: f32[4,64,32], i: s32[]) -> f32[8,32] {
  %x = f32[8,64]{1,0} parameter(0)
  %w = f32[4,64,32]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %layer = f32[64,32]{1,0} fusion(%w, %i), kind=kLoop, calls=%slice_layer
  ROOT %d = f32[8,32]{1,0} dot(%x, %layer), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: f32[8,64], w: f32[4,64,32], i: s32[]) -> f32[8,32] {
  %x = f32[8,64]{1,0} parameter(0)
  %w = f32[4,64,32]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  ROOT %f = f32[8,32]{1,0} fusion(%x, %w, %i), kind=kOutput, calls=%matmul
}
"""
  # Reads x (8*64), one layer (64*32) and i; writes the [8, 32] result.
  assert plan.hlo_cost(hlo).bytes_accessed == 4 * (8 * 64 + 64 * 32 + 1 + 8 * 32)


def test_plan_without_libtpu_says_how_to_install(monkeypatch, capsys):
  monkeypatch.setattr(plan, "libtpu_available", lambda: False)
  status = plan.main(
    [
      os.path.join(REPO, "configs", "zephyr_7b_ultrafeedback.yaml"),
      "--arch",
      "mistral-7b",
      "--topology",
      "v5p-32",
    ]
  )
  assert status == 2
  err = capsys.readouterr().err
  assert "libtpu is not installed" in err and 'pip install -e ".[tpu]"' in err


def test_plan_rejects_bad_input(capsys):
  config = os.path.join(REPO, "configs", "zephyr_7b_ultrafeedback.yaml")
  assert plan.main([config, "--topology", "v5p-33"]) == 2
  assert "unknown TPU slice 'v5p-33'" in capsys.readouterr().err
  assert plan.main([config, "--topology", "v5p-32"]) == 2  # no checkpoint and no --arch
  assert "pass --arch" in capsys.readouterr().err


def _tiny_model_dir(tmp_path):
  d = tmp_path / "model"
  d.mkdir()
  (d / "config.json").write_text(
    json.dumps(
      dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
      )
    )
  )
  return d


@pytest.mark.slow
@pytest.mark.skipif(
  not plan.libtpu_available(), reason='libtpu is not installed (pip install -e ".[tpu]")'
)
def test_plan_compiles_a_small_config_for_v5litepod_8(tmp_path, monkeypatch, capsys):
  model = _tiny_model_dir(tmp_path)
  out = tmp_path / "plan.json"
  # A chip with 1 MiB of HBM: the programs compile and measure, and the plan reports the misfit.
  small = dataclasses.replace(plan.CHIPS["v5e"], name="tiny TPU", hbm_bytes=1024**2)
  monkeypatch.setitem(plan.CHIPS, "v5e", small)
  status = plan.main(
    [
      os.path.join(REPO, "configs", "tiny_cpu.yaml"),
      f"model.path={model}",
      "--topology",
      "v5litepod-8",
      "--json",
      str(out),
    ]
  )
  captured = capsys.readouterr()
  report = json.loads(out.read_text())
  assert report["num_chips"] == 8 and report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert set(report["programs"]) == {"train_step", "score_logps", "generate"}
  for name, p in report["programs"].items():
    assert p["hbm_total_bytes"] > 0 and p["hbm_capacity_bytes"] == 1024**2
    assert p["fits"] == (p["hbm_total_bytes"] <= 1024**2)
    assert p["compile_seconds"] > 0 and p["compile_cpu_seconds"] > 0
    assert p["flops"] > 0 and 0 < p["mfu_palm"] <= p["mfu_palm_overlap"] <= 1
    assert p["flops_causal"] <= p["flops"]
    # Only the sampler's decode loop has no trip count (it stops at EOS): max_new_tokens.
    assert p["unknown_loops"] == (name == "generate")
    assert p["step_seconds_overlap"] <= p["step_seconds"]
    assert name in captured.out
  train = report["programs"]["train_step"]
  cfg = LlamaConfig.from_hf(json.loads((model / "config.json").read_text()))
  tokens = 2 * 8 * 128  # tiny_cpu.yaml: global batch 8, max_length 128
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 128 * tokens
  assert train["flops"] == pytest.approx(
    (6 * _counted_matmul_params(cfg) * tokens + attention) / 8, rel=1e-9
  )
  misfits = [n for n, p in report["programs"].items() if not p["fits"]]
  assert status == (1 if misfits else 0)
  for name in misfits:
    assert f"{name} does not fit v5litepod-8" in captured.err
  assert [(f["round_index"], f["phase"]) for f in report["phases"]] == [
    (0, "follower"),
    (0, "training"),
    (1, "sampling"),
    (1, "scoring"),
    (1, "follower"),
    (1, "training"),
  ]


@pytest.mark.slow
@pytest.mark.skipif(
  not plan.libtpu_available(), reason='libtpu is not installed (pip install -e ".[tpu]")'
)
def test_splash_compiles_to_the_mosaic_kernel_for_a_tpu_topology():
  """The plan's attention is the TPU kernel (one Mosaic custom call per direction), not the
  interpret-mode emulation, whose loops would be planned instead of the kernel."""
  from ssapo_jax import sharding as shd
  from ssapo_jax.models import attention as attn

  devices = plan.topology_devices(plan.tpu_slice("v5litepod-8"))
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(1, 8, 1), shd.MESH_AXES)
  shape = jax.ShapeDtypeStruct(
    (8, 512, 4, 128), jnp.bfloat16, sharding=jax.NamedSharding(mesh, jax.P(("data", "fsdp")))
  )
  mask = jax.ShapeDtypeStruct(
    (8, 512), jnp.int32, sharding=jax.NamedSharding(mesh, jax.P(("data", "fsdp")))
  )

  def loss(q, k, v, kv_mask):
    return attn.splash_attention(q, k, v, kv_mask, None).astype(jnp.float32).sum()

  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape, mask).compile()
  text = hlo.as_text()
  assert text.count("tpu_custom_call") >= 2  # forward and backward kernels
  assert " while(" not in text


def test_package_imports_without_optional_data_dependencies():
  # A GPU image may lack these; the model, train step, sampler, plan and the accelerator
  # benchmark must import without them.
  code = "\n".join(
    [
      "import sys, importlib.util",
      "for m in ('jaxopt', 'datasets', 'tensorflow_datasets', 'grain', 'tensorboardX'):",
      "  sys.modules[m] = None",
      "import ssapo_jax, ssapo_jax.train, ssapo_jax.sampling, ssapo_jax.models, ssapo_jax.plan",
      f"spec = importlib.util.spec_from_file_location('acc', {os.path.join(REPO, 'benchmarks', 'accelerator.py')!r})",
      "module = importlib.util.module_from_spec(spec)",
      "sys.modules['acc'] = module  # dataclasses resolve annotations through sys.modules",
      "spec.loader.exec_module(module)",
      "print('ok')",
    ]
  )
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith("ok")


@pytest.mark.slow
def test_accelerator_small_runs_on_cpu(tmp_path):
  out = tmp_path / "accelerator.json"
  env = dict(os.environ, PYTHONPATH=REPO)
  run = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "benchmarks", "accelerator.py"),
      "--small",
      "--json",
      str(out),
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=1200,
  )
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["small"] and "accelerator check" in run.stdout
  att = report["attention"]
  assert max(att["max_rel_error"].values()) < 0.05  # bf16 kernels agree with the xla path
  assert report["train_step"]["loss_finite"] and report["train_step"]["tokens_per_s"] > 0
  assert report["sampler"]["tokens_per_s"] > 0
  cap = report["capacity"]
  assert cap["largest"] == "tiny-64" and [m["fits"] for m in cap["models"]] == [True, False]
  assert math.isfinite(report["train_step"]["mfu"])
  assert np.isfinite(report["peak_flops"])


def test_loop_free_bytes_match_xla_cost_analysis():
  # Without loops XLA's own count is exact: the parser must agree within 5%.
  def f(a, b, c):
    h = jnp.tanh(a @ b) * 2.0 + jnp.exp(a[:, :256]).sum()
    return jax.nn.softmax(h @ c, axis=-1), h.mean(axis=0)

  args = (jnp.ones((128, 512)), jnp.ones((512, 256)), jnp.ones((256, 64)))
  compiled = jax.jit(f).lower(*args).compile()
  cost = plan.hlo_cost(compiled.as_text())
  assert cost.loops == () and cost.on_chip_bytes == 0
  assert cost.bytes_accessed == pytest.approx(compiled.cost_analysis()["bytes accessed"], rel=0.05)


def test_fsdp_collectives_match_a_hand_computed_volume():
  # FSDP over 8 devices: the forward all-gathers the [512, 256] f32 weight from its [64, 256]
  # shards; the weight gradient is reduced over the 8 devices (CPU XLA: an all-reduce of the
  # whole [512, 256] gradient, then each keeps its shard).
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((8,), ("fsdp",), devices=jax.devices()[:8])
  rows = NamedSharding(mesh, P("fsdp", None))
  w = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=rows)
  x = jax.ShapeDtypeStruct((64, 512), jnp.float32, sharding=rows)
  grad = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)), out_shardings=rows)
  cost = plan.hlo_cost(grad.lower(w, x).compile().as_text())
  by_kind = {c.kind: c for c in cost.collectives}
  shard, full = 64 * 256 * 4, 512 * 256 * 4
  gather = by_kind["all-gather"]
  assert gather.group == tuple(range(8)) and gather.count == 1
  assert gather.operand_bytes == shard and gather.wire_bytes == 7 * shard  # 7 shards received
  reduce = by_kind.get("all-reduce") or by_kind["reduce-scatter"]
  if reduce.kind == "all-reduce":  # a reduce-scatter then an all-gather, ring volume 2 (n-1)/n
    assert reduce.wire_bytes == 2 * 7 / 8 * full
  else:
    assert reduce.wire_bytes == 7 / 8 * full
  # Over a 2 x 4 chip grid without wrap-around the 8-chip ring drives one lane per dimension:
  # 2 links of 45 GB/s per direction, plus 7 ring steps of 1 us latency.
  chip = plan.Chip("test", 1e12, 2**30, 1e12, link_bandwidth=4.5e10, links=4)
  coords = [(i % 2, i // 2) for i in range(8)]
  seconds = plan.collective_seconds(gather, chip, coords, wrap=(False, False))
  assert seconds == pytest.approx(7 * shard / (2 * 4.5e10) + 7 * 1e-6, rel=1e-12)
  # Wrapped 4-chip dimension: its ring closes, so it drives both directions (3 lanes in all).
  assert plan._ring_lanes(tuple(range(8)), coords, (False, True)) == 3
  assert plan._ring_lanes((0, 2, 4, 6), coords, (False, True)) == 2  # the whole wrapped column
  assert plan._ring_lanes((0, 1), coords, (True, True)) == 1  # 2 chips share one link


_OOM = (
  "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
  "temporaries (20.15G) exceeds available HBM (15.75G)."
)  # libtpu 0.0.42.1, verbatim


def test_out_of_memory_compile_becomes_a_row():
  assert plan.parse_out_of_memory(_OOM) == (int(20.15 * 2**30), int(15.75 * 2**30))
  assert plan.parse_out_of_memory("INVALID_ARGUMENT: bad shapes") is None

  class Lowered:
    def compile(self):
      raise RuntimeError(_OOM)

  chip = plan.CHIPS["v5e"]
  p = plan.compile_program("train_step", lambda: (Lowered(), 1024), chip, 8, 8e12, 1e13)
  assert not p.fits and p.requested_bytes == int(20.15 * 2**30)
  assert p.total_bytes == p.requested_bytes and p.capacity_bytes == chip.hbm_bytes
  report = p.to_json()
  assert report["fits"] is False and report["error"].startswith("RESOURCE_EXHAUSTED")
  assert "NO" in plan.format_table([p])

  class Broken:
    def compile(self):
      raise RuntimeError("INTERNAL: something else")

  with pytest.raises(RuntimeError, match="something else"):  # only OOM is a result
    plan.compile_program("train_step", lambda: (Broken(), 1), chip, 8, 1.0, 1.0)


def _zephyr():
  return plan.load_experiment(os.path.join(REPO, "configs", "zephyr_7b_ultrafeedback.yaml"))


def test_phase_residency_is_what_the_run_holds():
  from ssapo_jax.pipeline import residency

  exp = _zephyr()  # annotation reference SFT, train reference previous, float32 master weights
  n, shards = 7_241_732_096, 16
  master = n * 4 / shards
  seed = {p.name: p for p in residency.phases(exp, num_params=n, shards=shards, round_index=0)}
  assert list(seed) == ["follower", "training"]
  later = {p.name: p for p in residency.phases(exp, num_params=n, shards=shards, round_index=2)}
  assert list(later) == ["sampling", "scoring", "follower", "training"]
  assert [p.program for p in later.values()] == [
    "generate",
    "score_logps",
    "score_logps",
    "train_step",
  ]
  # Round 2 holds the SFT model (the judge) and pi_1 (policy, reference); no optimizer moments.
  assert [h.name for h in later["sampling"].held] == [
    "SFT model (master, float32)",
    "policy pi_1 (master, float32)",
  ]
  assert later["sampling"].hbm_bytes == 2 * master and later["sampling"].host_bytes == 0
  # Scoring the SFT judge, the follower's pi_1 reference: the other model beside the program.
  assert later["scoring"].hbm_bytes == master and later["follower"].hbm_bytes == master
  assert later["training"].hbm_bytes == 2 * master
  assert all("moment" not in h.name for p in later.values() for h in p.held)
  assert seed["follower"].hbm_bytes == 0 and seed["training"].hbm_bytes == master
  # The previous policy as judge keeps pi_{t-2} too, and the run drops exactly what it says.
  prev = dataclasses.replace(
    exp, rounds=dataclasses.replace(exp.rounds, annotation_reference="previous")
  )
  assert residency.models_held(prev.rounds, 2) == (-1, 1, 0)
  assert residency.models_held(exp.rounds, 2) == (-1, 1)
  assert residency.phases(prev, num_params=n, shards=shards)[0].hbm_bytes == 2 * master  # t=1
  assert (
    residency.phases(prev, num_params=n, shards=shards, round_index=2)[0].hbm_bytes == 3 * master
  )
  assert residency.resident_bytes(later["sampling"], 10 * 2**30) == 10 * 2**30 + 2 * master
  # With LoRA no held model is trained in place: the run loads and holds them frozen in the
  # compute dtype (bfloat16 here), as the merged LoRA policies are.
  from ssapo_jax.lora import LoraConfig

  lora = dataclasses.replace(exp, model=dataclasses.replace(exp.model, lora=LoraConfig()))
  assert residency.held_dtype(lora) == "bfloat16" and residency.held_dtype(exp) == "float32"
  frozen = residency.phases(lora, num_params=n, shards=shards, round_index=2)
  assert [h.name for h in frozen[0].held] == [
    "SFT model (frozen, bfloat16)",
    "policy pi_1 (frozen, bfloat16)",
  ]
  assert frozen[-1].hbm_bytes == 2 * n * 2 / shards


def _fake_plan(name, step_seconds, compile_seconds, total_bytes=2**30):
  return plan.ProgramPlan(
    name=name,
    tokens=1,
    argument_bytes=total_bytes,
    temp_bytes=0,
    output_bytes=0,
    alias_bytes=0,
    code_bytes=0,
    capacity_bytes=95 * 2**30,
    compile_seconds=compile_seconds,
    compile_cpu_seconds=compile_seconds / 2,
    flops=1.0,
    flops_causal=1.0,
    hardware_flops=step_seconds * 1e12,
    bytes_accessed=0.0,
    on_chip_bytes=0.0,
    wire_bytes=0.0,
    collective_count=0.0,
    comm_seconds=step_seconds / 2,
    unknown_loops=0,
    peak_flops=1e12,
    hbm_bandwidth=1e12,
  )


def test_run_estimate_counts_every_call_of_the_paper_run():
  packed = _zephyr()
  assert packed.data.packing  # the paper configs pack
  exp = dataclasses.replace(packed, data=dataclasses.replace(packed.data, packing=False))
  plans = [
    _fake_plan("train_step", 1.0, 180),
    _fake_plan("score_logps", 0.1, 30),
    _fake_plan("generate", 2.0, 60),
  ]
  phases, shapes = plan.run_estimate(exp, plans, 16)
  calls = {(p.round_index, p.phase): p.calls for p in phases}
  # Seed: 2,000 pairs, 3 epochs at 32 pairs per step; reference log-probs of 4,000 sequences
  # at 16 rows per call (max(micro-batch 8, 16 batch shards)).
  assert calls[0, "training"] == 63 * 3 and calls[0, "follower"] == 250
  # Round 1: 8,000 prompts at 64 per sampler call; 16,000 samples scored twice; 8,000 pairs.
  assert calls[1, "sampling"] == 125 and calls[1, "scoring"] == 2 * 1000
  assert calls[1, "follower"] == 1000 and calls[1, "training"] == 250
  assert calls[3, "sampling"] == math.ceil(30000 / 64) and calls[3, "training"] == 938
  by = {(p.round_index, p.phase): p for p in phases}
  assert by[1, "sampling"].seconds == 125 * 3.0  # 2 s roofline + 1 s of collectives, serial
  assert by[1, "sampling"].seconds_overlap == 125 * 2.0
  # Shapes: 1024 / 64 prompt buckets; 2048 / 64 sequence buckets, the train step per round too.
  assert shapes["shapes"]["generate"]["count"] == 16
  assert shapes["shapes"]["train_step"]["count"] == 32 * 4
  assert shapes["compile_seconds"] == (16 * 60 + 32 * 30 + 128 * 180) / 2  # CPU seconds
  assert "total" in plan.format_run(phases, shapes)
  # Packed: the row ladders. Train: 32 pairs in 4 micro-batches of 8, rows a multiple of
  # 16 / gcd(16, 4) = 4: row_buckets(8, 4) = (4, 8, 12, 16), per round. Scoring: 16 rows per
  # call, row_buckets(16, 16) = (16, 32).
  packed_phases, shapes = plan.run_estimate(packed, plans, 16)
  packed_calls = {(p.round_index, p.phase): p.calls for p in packed_phases}
  # A packed scoring call holds 2 x 16 sequences: half the padded calls; the rest unchanged.
  assert packed_calls[0, "follower"] == 125 and packed_calls[1, "scoring"] == 2 * 500
  assert packed_calls[1, "follower"] == 500 and packed_calls[1, "training"] == 250
  assert shapes["shapes"]["train_step"]["count"] == 4 * 4
  assert shapes["shapes"]["score_logps"]["count"] == 2
  assert shapes["shapes"]["generate"]["count"] == 16


def _xla_scaled_bytes(text: str) -> float:
  """Bytes accessed of a compiled module counted without the plan's parser: XLA's own cost
  analysis of each loop body (the body made the module's entry, parsed by XLA), scaled by its
  trip count. XLA counts on-chip (S(1)) arrays too."""
  import jaxlib._hlo as xla_hlo
  from jax._src.lib import _jax

  client = jax.devices("cpu")[0].client
  lines = text.splitlines()

  def cost(entry):
    out = []
    for line in lines:
      if line.startswith("HloModule"):
        line = line.split(",")[0]  # the entry layout is the old entry's
      line = line.removeprefix("ENTRY ")
      m = plan._COMPUTATION.match(line)
      out.append("ENTRY " + line if m and m.group(2) == entry else line)
    module = xla_hlo.hlo_module_from_text("\n".join(out))
    return _jax.hlo_module_cost_analysis(client, module).get("bytes accessed", 0.0)

  comps, entry = plan.parse_hlo(text)
  memo = {}

  def total(comp):  # XLA counts each nested body once: replace that by trips x its total
    if comp not in memo:
      t = cost(comp)
      for i in comps[comp]:
        if i.op == "while":
          trips = plan.loop_trip_count(comps, comp, i)
          body = plan._attr_computations(i.attrs, "body")[0]
          cond = plan._attr_computations(i.attrs, "condition")[0]
          t += trips * total(body) - cost(body) + trips * cost(cond)
      memo[comp] = t
    return memo[comp]

  return total(entry)


@pytest.mark.slow
@pytest.mark.skipif(
  not plan.libtpu_available(), reason='libtpu is not installed (pip install -e ".[tpu]")'
)
def test_splash_layer_body_is_parsed_whole_and_bytes_match_xla():
  """A scanned splash decoder layer compiled for TPU: every instruction of every computation is
  parsed (XLA's own parser is the reference), the layer loop counts its layers, and the byte
  total agrees with XLA's per-body cost analysis scaled by the trip counts."""
  import jaxlib._hlo as xla_hlo

  from ssapo_jax import sharding as shd

  config = LlamaConfig(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_layers=3,
    num_heads=2,
    num_kv_heads=1,
    head_dim=128,
    dtype="bfloat16",
    param_dtype="float32",
    remat="full",
    attention="splash",
  )
  t = tr.TrainConfig(global_batch_size=16, micro_batches=2, compute_dtype="bfloat16", remat="full")
  devices = plan.topology_devices(plan.tpu_slice("v5litepod-8"))
  mesh = jax.sharding.Mesh(np.asarray(devices).reshape(1, 8, 1), shd.MESH_AXES)
  lowered, _ = plan.lower_train_step(t, config, mesh, seq_len=512)
  text = lowered.compile().as_text()
  comps, _ = plan.parse_hlo(text)
  xla = {c.name: len(c.instructions()) for c in xla_hlo.hlo_module_from_text(text).computations()}
  # XLA's parser adds an ``async_wrapped`` computation around each async op it reads back;
  # every computation of the text has the same instructions in both.
  assert {c: len(v) for c, v in comps.items()} == {
    c: n for c, n in xla.items() if not c.startswith("async_wrapped")
  }
  cost = plan.hlo_cost(text)
  assert cost.unknown_loops == 0
  trips = dict(cost.loops)
  assert t.micro_batches in trips.values() and config.num_layers in trips.values()
  splash = {
    b
    for b, instrs in comps.items()
    if any(i.op == "custom-call" and "tpu_custom_call" in i.attrs for i in instrs)
  }
  assert splash
  for b in splash:  # instructions follow the kernel's call (once the computation's cut-off)
    assert [i.op for i in comps[b]][-1] != "custom-call"

  def reaches(comp, seen=()):
    called = {
      c
      for i in comps[comp]
      for key in ("calls", "to_apply", "body")
      for c in plan._attr_computations(i.attrs, key)
    }
    return bool(called & splash) or any(reaches(c, seen + (comp,)) for c in called if c not in seen)

  layers = [b for b, n in cost.loops if n == config.num_layers]
  assert any(b in splash or reaches(b) for b in layers)  # the scanned layer calls the kernel
  ours = cost.bytes_accessed + cost.on_chip_bytes
  assert ours == pytest.approx(_xla_scaled_bytes(text), rel=0.10)


@pytest.mark.slow
@pytest.mark.skipif(
  not plan.libtpu_available(), reason='libtpu is not installed (pip install -e ".[tpu]")'
)
def test_eight_b_train_step_does_not_fit_v5litepod_8(tmp_path, capsys):
  """The 8B train step (float32 master weights and Adam moments) needs more than a 16 GiB v5e
  chip: XLA's RESOURCE_EXHAUSTED becomes a row, the JSON is written and the scoring pass is
  still planned."""
  out = tmp_path / "plan.json"
  status = plan.main(
    [
      os.path.join(REPO, "configs", "llama3_8b_instruct_ultrafeedback.yaml"),
      "--arch",
      "llama3-8b",
      "--topology",
      "v5litepod-8",
      "--programs",
      "train_step,score_logps",
      "--json",
      str(out),
    ]
  )
  captured = capsys.readouterr()
  assert status == 1
  report = json.loads(out.read_text())
  train, score = report["programs"]["train_step"], report["programs"]["score_logps"]
  assert train["fits"] is False and "RESOURCE_EXHAUSTED" in train["error"]
  assert train["requested_bytes"] > 0 and train["hbm_capacity_bytes"] == 16 * 2**30
  assert "train_step does not fit v5litepod-8" in captured.err
  assert "flops" in score and score["hbm_total_bytes"] > 0
  assert "score_logps" in captured.out


@pytest.mark.slow
@pytest.mark.skipif(
  not plan.cuda_plugin_available(),
  reason='the CUDA plugin is not installed (pip install -e ".[gpu-plan]")',
)
def test_plan_compiles_for_h100_nodes_without_a_gpu(tmp_path):
  model = _tiny_model_dir(tmp_path)
  out = tmp_path / "plan.json"
  run = subprocess.run(  # a fresh process: the plugin registers when JAX first discovers plugins
    [
      sys.executable,
      "-m",
      "ssapo_jax.plan",
      os.path.join(REPO, "configs", "tiny_cpu.yaml"),
      f"model.path={model}",
      "--topology",
      "h100-8",
      "--json",
      str(out),
    ],
    capture_output=True,
    text=True,
    env=dict(os.environ),
    timeout=1200,
    check=False,
  )
  assert run.returncode == 0, run.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["chip"] == "NVIDIA H100 SXM" and report["num_chips"] == 8
  for p in report["programs"].values():
    assert p["fits"] and p["hbm_total_bytes"] > 0 and p["bytes_accessed"] > 0


# ----------------------------------------------------------------------------- same programs


# `checkify.debug_check` (the atoms' checks inside the loss) numbers its error codes with a
# process-wide counter, so two traces of one program differ in those constants alone: the code
# fed to each check's `select(False, code, -1)` is masked.
_CHECK_CODE = re.compile(
  r"dense<\d+> : tensor<i32>(\n\s+%\S+ = stablehlo\.constant dense<-1> : "
  r"tensor<i32>\n\s+%\S+ = stablehlo\.select)"
)


def _fingerprint(lowered) -> str:
  """The lowered module's text without source locations or check codes (equal programs,
  equal text)."""
  return _CHECK_CODE.sub(r"dense<CODE> : tensor<i32>\1", lowered.as_text(debug_info=False))


def test_plan_lowers_exactly_the_run_programs():
  """The plan's train step, scoring pass and sampler are the run's own builders: the same
  lowered module as the run's (a real train state and batch, a real `Scorer` and `Sampler`)."""
  import _multihost_worker as w

  from ssapo_jax import sharding as shd
  from ssapo_jax.sampling import Sampler, SamplingConfig

  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
  cfg = w.train_config(objective="robust", micro_batches=2)
  model = w.tiny_model()
  state = tr.create_train_state(model, cfg, mesh, num_train_steps=7)
  run_step = tr.make_train_step(cfg, mesh, state)
  batch = w.make_batch(0)
  run_lowered = run_step.lower(state, shd.global_batch(mesh, batch))
  plan_lowered, _ = plan.lower_train_step(
    cfg,
    model.config,
    mesh,
    seq_len=batch.chosen_ids.shape[1],
    num_atoms=batch.atom_weights.shape[1],
    num_train_steps=7,
  )
  assert _fingerprint(plan_lowered) == _fingerprint(run_lowered)
  other, _ = plan.lower_train_step(
    cfg,
    model.config,
    mesh,
    seq_len=batch.chosen_ids.shape[1] + 8,
    num_atoms=batch.atom_weights.shape[1],
    num_train_steps=7,
  )
  assert _fingerprint(other) != _fingerprint(run_lowered)  # the comparison can fail

  experiment = plan.load_experiment(
    os.path.join(REPO, "configs", "tiny_cpu.yaml"),
    ["model.path=/nonexistent", "data.max_length=24", "data.max_prompt_length=8"],
  )
  scorer = tr.Scorer.for_experiment(experiment, mesh, 0)  # what the run scores with
  fn, params = scorer._split(model)  # pylint: disable=protected-access
  tok = shd.global_batch(mesh, np.ones((8, 32), np.int32))  # 24 tokens, bucketed to 32
  run_score = fn.lower(params, tok, tok, tok)
  plan_score, tokens = plan.lower_score_logps(experiment, model.config, mesh)
  assert tokens == 8 * 32
  assert _fingerprint(plan_score) == _fingerprint(run_score)
  other = tr.Scorer.for_experiment(experiment, mesh, 0)
  other.compute_dtype = "bfloat16"
  assert _fingerprint(other.lower(model, 24)) != _fingerprint(run_score)  # can fail

  s = SamplingConfig(max_new_tokens=4, batch_size=8, num_samples=2, temperature=1.0)
  sampler = Sampler(mesh, s, pad_token_id=0, eos_token_ids=(0,))
  assert _fingerprint(sampler.lower(model, 12)) == _fingerprint(
    plan.lower_generate(s, model.config, mesh, prompt_len=12)[0]
  )


def test_plan_lowers_the_packed_step_of_the_run_on_its_largest_shape(tmp_path):
  """data.packing: the plan's packed train step is the run's on the loader's top row bucket;
  the padding report reads a length histogram."""
  import _multihost_worker as w

  from ssapo_jax import sharding as shd
  from ssapo_jax.batch import length_histogram, pack_sequence_rows
  from ssapo_jax.data import LoaderCursor, PreferenceLoader, pairs_from_token_ids
  from ssapo_jax.experiment import load_experiment
  from ssapo_jax.train.scoring import PACKED_FIELDS

  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
  cfg = w.train_config(micro_batches=2)
  model = w.tiny_model()
  rng = np.random.default_rng(0)
  toks = lambda lo, hi: rng.integers(3, 64, rng.integers(lo, hi)).tolist()  # noqa: E731
  n = cfg.global_batch_size
  ds = pairs_from_token_ids(
    *([toks(20, 30) for _ in range(n)] for _ in range(3)),
    eos_id=2,
    max_length=64,
    max_prompt_length=32,
    add_eos=False,
    verbose=False,
  )
  loader = PreferenceLoader(
    ds,
    global_batch_size=n,
    packing=True,
    pack_length=64,
    micro_batches=2,
    row_multiple=tr.packed_row_multiple(mesh, cfg),
  )
  rows = plan.packed_train_rows(cfg, mesh)
  assert (rows, 64) == max(loader.packed_shapes())
  batch = loader.batch_at(LoaderCursor(0, 0))
  assert batch.ids.shape == (rows, 64)  # every sequence > 32 tokens: one per row, the top
  state = tr.create_train_state(model, cfg, mesh, num_train_steps=7)
  run_step = tr.make_train_step(cfg, mesh, state, packed=True)
  run_lowered = run_step.lower(state, shd.global_batch(mesh, batch))
  plan_lowered, tokens = plan.lower_train_step(
    cfg, model.config, mesh, seq_len=64, num_train_steps=7, packed_rows=rows
  )
  assert tokens == rows * 64
  assert _fingerprint(plan_lowered) == _fingerprint(run_lowered)

  # The scorer packs 2 x its batch size sequences per call on the same ladder: the plan
  # lowers the run's packed pass at the top (every sequence alone in a row).
  experiment = load_experiment(
    os.path.join(REPO, "configs", "tiny_cpu.yaml"),
    [
      "model.path=/nonexistent",
      "data.packing=true",
      "data.max_length=64",
      "data.max_prompt_length=32",
    ],
  )
  scorer = tr.Scorer.for_experiment(experiment, mesh, 0)
  seqs = 2 * scorer.batch_size
  packed = pack_sequence_rows(
    [np.full(20, 3)] * seqs,
    [np.full(20, 4)] * seqs,
    seq_len=64,
    max_sequences=seqs,
    row_multiple=shd.num_batch_shards(mesh),
  )
  assert packed["ids"].shape == scorer.largest_shape(64) == (seqs, 64)
  fn, params = scorer._packed_fn(model)  # pylint: disable=protected-access
  run_score = fn.lower(params, *shd.global_batch(mesh, tuple(packed[k] for k in PACKED_FIELDS)))
  plan_score, tokens = plan.lower_score_logps(experiment, model.config, mesh)
  assert tokens == seqs * 64
  assert _fingerprint(plan_score) == _fingerprint(run_score)

  path = tmp_path / "lengths.json"
  path.write_text(json.dumps(length_histogram([40, 50, 60, 100], 16)))
  experiment = load_experiment(
    os.path.join(REPO, "configs", "tiny_cpu.yaml"), ["model.path=/nonexistent", "data.packing=true"]
  )
  padding = plan.expected_batch_padding(experiment, str(path), mesh)
  assert padding["packing"] is True and padding["num_sequences"] == 4
  assert 0 <= padding["packed"] < 1 and 0 <= padding["padded"] < 1
  text = plan.format_padding(experiment, padding)
  assert "this run packed" in text and f"packed: {padding['packed']:.1%}" in text
