"""Tests for ssapo_jax/models/params.py: HF import/export round trips and strict errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from ssapo_jax.models import CheckpointError, Llama, LlamaConfig, load_hf, logical_axes, save_hf
from ssapo_jax.models.params import read_config
from ssapo_jax.testing.hf_torch import save_tiny_hf


def _inputs():
  rng = np.random.RandomState(1)
  ids = rng.randint(3, 128, (2, 9))
  mask = np.ones((2, 9), np.int64)
  mask[1, :3] = 0
  ids[mask == 0] = 0
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  return ids, mask, pos


def _torch_logits(hf, ids, mask, pos):
  with torch.no_grad():
    return (
      hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
      .logits.float()
      .numpy()
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("qwen2")
  hf = save_tiny_hf(path, "qwen2_sliding", tie_word_embeddings=False)
  return path, hf


@pytest.mark.parametrize("family", ["llama_mqa_tied_bias", "mistral"])
def test_round_trip_through_transformers(tmp_path, family):
  src = tmp_path / "src"
  hf = save_tiny_hf(src, family)
  model = load_hf(src)
  out = tmp_path / "out"
  save_hf(model, out, shard_size=20_000)  # forces several shards and an index file
  files = sorted(os.listdir(out))
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  hf2 = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  for k, v in hf.state_dict().items():
    torch.testing.assert_close(hf2.state_dict()[k], v, rtol=0, atol=0)
  ids, mask, pos = _inputs()
  np.testing.assert_array_equal(
    _torch_logits(hf2, ids, mask, pos), _torch_logits(hf, ids, mask, pos)
  )
  # And back into JAX: identical parameters.
  again = load_hf(out)
  for a, b in zip(
    jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_bfloat16_single_file_with_tokenizer(tmp_path, checkpoint):
  from ssapo_jax.models.tokenizer import build_word_tokenizer

  path, hf = checkpoint
  tok = build_word_tokenizer(tmp_path / "tok", ["hello", "world"])
  model = load_hf(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  out = tmp_path / "out"
  save_hf(model, out, tokenizer=tok)
  assert os.path.exists(out / "model.safetensors")
  assert not os.path.exists(out / "model.safetensors.index.json")
  assert transformers.AutoTokenizer.from_pretrained(out).eos_token == tok.eos_token
  hf2 = transformers.AutoModelForCausalLM.from_pretrained(
    out, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  ids, mask, pos = _inputs()
  ref = _torch_logits(hf, ids, mask, pos)
  got = _torch_logits(hf2, ids, mask, pos)
  assert np.abs(got - ref)[mask > 0].max() < 0.1  # bf16 rounding of the weights only
  assert json.load(open(out / "config.json"))["model_type"] == "qwen2"


def test_load_with_shardings_places_each_tensor(checkpoint):
  path, _ = checkpoint
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = {"embed": "fsdp", "mlp": "tensor", "vocab": "tensor", "q_heads": "tensor"}
  config = LlamaConfig.from_hf(read_config(path))
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  axes = logical_axes(nnx.state(abstract, nnx.Param))
  shardings = jax.tree.map(
    lambda names: jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*(rules.get(n) for n in names))
    ),
    axes,
    is_leaf=lambda x: isinstance(x, tuple),
  )
  model = load_hf(path, shardings=shardings)
  gate = model.layers.mlp.gate_proj[...]
  assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  ref = load_hf(path)
  ids, mask, _ = _inputs()
  np.testing.assert_allclose(
    np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))),
    np.asarray(ref(jnp.asarray(ids), jnp.asarray(mask))),
    atol=1e-5,
  )


def test_load_on_mesh_never_holds_a_full_tensor(checkpoint, tmp_path, monkeypatch):
  """8 devices: each device gets only its block, read from the file slice it covers."""
  from ssapo_jax import sharding as shd
  from ssapo_jax.models import params as params_lib

  path, hf = checkpoint
  mesh = shd.make_mesh(shd.MeshConfig(fsdp=4, tensor=2))
  reads = []
  original = params_lib._BlockReader.__call__
  monkeypatch.setattr(
    params_lib._BlockReader,
    "__call__",
    lambda self, index: (
      reads.append((self.shape, original(self, index).shape)) or original(self, index)
    ),
  )
  monkeypatch.setattr(params_lib.jax, "device_put", None)  # no whole-tensor placement path
  model = load_hf(path, mesh=mesh)
  monkeypatch.undo()
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  sharded = 0
  for p, var in flat:
    x = var.get_value()
    if x.sharding.is_fully_replicated:
      continue
    sharded += 1
    assert len(x.addressable_shards) == 8
    for shard in x.addressable_shards:
      assert shard.data.size < x.size, (p, shard.data.shape, x.shape)
  assert sharded >= 10  # every matrix (the norm scales and biases replicate)
  full_reads = [(full, got) for full, got in reads if full == got and len(full) > 1]
  assert all(np.prod(full) < 4096 for full, _ in full_reads), full_reads  # only small ones whole
  # Values equal the checkpoint's, bitwise, after a streamed save from the shards.
  out = tmp_path / "out"
  save_hf(model, out)
  saved = load_file(out / "model.safetensors")
  source = load_file(path / "model.safetensors")
  assert saved.keys() == source.keys()
  for name, value in source.items():
    np.testing.assert_array_equal(saved[name], value, err_msg=name)


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _rewrite(path, fn):
  tensors = load_file(path / "model.safetensors")
  fn(tensors)
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path, checkpoint):
  bad = _copy(checkpoint[0], tmp_path / "bad")
  _rewrite(bad, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError, match=r"missing tensors: \['model.layers.1.mlp.up_proj"):
    load_hf(bad)


def test_extra_tensor_is_named(tmp_path, checkpoint):
  bad = _copy(checkpoint[0], tmp_path / "bad")
  _rewrite(bad, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match="unexpected tensors: .*mlp.extra.weight"):
    load_hf(bad)


def test_wrong_shape_is_named(tmp_path, checkpoint):
  bad = _copy(checkpoint[0], tmp_path / "bad")
  _rewrite(
    bad,
    lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}),
  )
  with pytest.raises(
    CheckpointError, match=r"k_proj.weight: expected \(32, 64\), found \(64, 64\)"
  ):
    load_hf(bad)


def test_unknown_model_type(tmp_path, checkpoint):
  bad = _copy(checkpoint[0], tmp_path / "bad")
  cfg = json.load(open(bad / "config.json"))
  cfg["model_type"] = "gpt_neox"
  json.dump(cfg, open(bad / "config.json", "w"))
  with pytest.raises(CheckpointError, match="unsupported model_type 'gpt_neox'"):
    load_hf(bad)


def test_corrupted_safetensors(tmp_path, checkpoint):
  bad = _copy(checkpoint[0], tmp_path / "bad")
  data = open(bad / "model.safetensors", "rb").read()
  open(bad / "model.safetensors", "wb").write(data[: len(data) // 2])  # truncated
  with pytest.raises(CheckpointError, match="model.safetensors"):
    load_hf(bad)
  open(bad / "model.safetensors", "wb").write(b"\x00garbage" * 10)
  with pytest.raises(CheckpointError, match="cannot read safetensors file"):
    load_hf(bad)


def test_missing_weights_and_config(tmp_path, checkpoint):
  bad = _copy(checkpoint[0], tmp_path / "bad")
  os.remove(bad / "model.safetensors")
  with pytest.raises(CheckpointError, match="no \\*.safetensors"):
    load_hf(bad)
  with pytest.raises(CheckpointError, match="no config.json"):
    load_hf(tmp_path)
