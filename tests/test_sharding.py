"""Tests of ssapo_jax.sharding: mesh construction, partition rules, global batches."""

import math

import _multihost_worker as w
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ssapo_jax import sharding as shd
from ssapo_jax import train as tr
from ssapo_jax.models import Llama, logical_axes


def test_mesh_shape_resolution_and_errors():
  assert shd.resolve_mesh_shape(shd.MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
  assert shd.resolve_mesh_shape(shd.MeshConfig(data=-1, fsdp=1, tensor=1), 8) == (8, 1, 1)
  assert shd.resolve_mesh_shape(shd.MeshConfig(), 8) == (1, 8, 1)  # default: all FSDP
  with pytest.raises(ValueError, match="has 6 devices but 8 are available"):
    shd.resolve_mesh_shape(shd.MeshConfig(data=3, fsdp=2, tensor=1), 8)
  with pytest.raises(ValueError, match="multiply to 3, which does not divide the 8"):
    shd.resolve_mesh_shape(shd.MeshConfig(data=3, fsdp=-1), 8)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    shd.MeshConfig(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="mesh.tensor must be a positive int"):
    shd.MeshConfig(tensor=0)
  with pytest.raises(ValueError, match="needs mesh.coordinator_address"):
    shd.MeshConfig(num_processes=2, process_id=0)
  with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
    shd.MeshConfig(num_processes=2, process_id=2, coordinator_address="h:1")


def test_make_mesh_uses_all_devices_with_named_axes():
  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=-1, tensor=2))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  with pytest.raises(ValueError, match="8 are available"):
    shd.make_mesh(shd.MeshConfig(data=4, fsdp=4, tensor=1))
  assert not shd.initialize_distributed(shd.MeshConfig())  # one process: nothing to start


def test_rules_table_names_each_model_axis_once():
  names = [name for name, _ in shd.LOGICAL_AXIS_RULES]
  assert len(names) == len(set(names))
  model_axes = {
    a
    for ax in jax.tree.leaves(logical_axes(w.tiny_model()), is_leaf=lambda x: isinstance(x, tuple))
    for a in ax
  }
  assert model_axes <= set(names), model_axes - set(names)
  mesh_axes = set()
  for _, axes in shd.LOGICAL_AXIS_RULES:
    mesh_axes.update((axes,) if isinstance(axes, str) else (axes or ()))
  assert mesh_axes <= set(shd.MESH_AXES)


def test_logical_to_spec_drops_non_dividing_and_repeated_axes():
  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
  assert shd.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  assert shd.logical_to_spec(("embed", "mlp"), (63, 128), mesh) == P(None, "tensor")
  assert shd.logical_to_spec(("batch", None), (8, 5), mesh) == P(("data", "fsdp"), None)
  assert shd.logical_to_spec(("batch",), (6,), mesh) == P("data")  # 6 % 4 != 0: fsdp dropped
  assert shd.logical_to_spec(("norm",), (64,), mesh) == P(None)
  # The same mesh axis is never used twice in one spec.
  assert shd.logical_to_spec(("mlp", "vocab"), (8, 8), mesh) == P("tensor", None)
  with pytest.raises(ValueError, match="no partition rule"):
    shd.logical_to_spec(("heads",), (8,), mesh)
  with pytest.raises(ValueError, match="do not match array shape"):
    shd.logical_to_spec(("embed",), (8, 8), mesh)
  one = shd.make_mesh(shd.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
  assert shd.logical_to_spec(("embed", "mlp"), (64, 128), one) == P(None, None)


def test_large_params_and_adam_state_really_are_sharded():
  """A model large enough for the rules: every matrix is split, and each device holds
  1/(fsdp*tensor) of it (checked on the actual per-device shards)."""
  cfg = w.tiny_model_config(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32
  )
  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  shardings = tr.param_shardings(params, mesh)
  shd.assert_params_sufficiently_sharded(params, shardings, max_replicated=0.0, min_size=1024)
  assert shd.replicated_fraction(params, shardings) < 0.01
  # Negative check: with every rule mapped to None, the guard fails and names the offenders.
  no_rules = tuple((name, None) for name, _ in shd.LOGICAL_AXIS_RULES)
  replicated = shd.logical_shardings(params, logical_axes(params), mesh, rules=no_rules)
  with pytest.raises(ValueError, match="embedding"):
    shd.assert_params_sufficiently_sharded(params, replicated, min_size=1024)

  tc = tr.TrainConfig(global_batch_size=8, compute_dtype="float32", remat="none")
  state = tr.create_train_state(Llama(cfg, rngs=nnx.Rngs(0)), tc, mesh, num_train_steps=10)
  q = state.params["layers"]["attn"]["q_proj"][
    ...
  ]  # [L, D, N, H] (layers, embed, q_heads, head_dim)
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert {s.data.shape for s in q.addressable_shards} == {(cfg.num_layers, 64, 2, 32)}
  for leaf in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state):
    if leaf.size >= 1024:
      shard_size = math.prod(leaf.addressable_shards[0].data.shape)
      assert shard_size * 4 == leaf.size, (leaf.shape, leaf.sharding)


def test_global_batch_and_host_rows_single_process():
  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
  batch = w.make_batch(0)
  assert shd.host_batch_rows(mesh, 8) == slice(0, 8)
  g = shd.global_batch(mesh, batch)
  assert g.chosen_ids.sharding == NamedSharding(mesh, P(("data", "fsdp"), None))
  assert g.weights.sharding.spec == P(("data", "fsdp"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), g, batch)
  # Each device holds 2 consecutive rows.
  assert {s.data.shape for s in g.chosen_ids.addressable_shards} == {(2, w.SEQ_LEN)}
  with pytest.raises(ValueError, match="not divisible by data\\*fsdp = 4"):
    shd.global_batch(mesh, jax.tree.map(lambda x: x[:6], batch))


def test_put_global_and_to_host_single_process():
  """Host values are placed; an array already on its sharding is returned as is, one on another
  sharding is moved on the devices; `to_host` reads every leaf whole (pytrees, scalars)."""
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=8, tensor=1))
  x = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
  rows, cols = NamedSharding(mesh, P("fsdp", None)), shd.replicated(mesh)
  a = shd.put_global(x, rows)
  assert a.sharding == rows and {s.data.shape for s in a.addressable_shards} == {(8, 4)}
  assert shd.put_global(a, rows) is a
  tree = shd.shard_params({"a": a, "b": x, "c": a}, {"a": rows, "b": rows, "c": cols})
  assert tree["a"] is a and tree["c"].sharding.is_fully_replicated
  host = shd.to_host({"tree": tree, "scalar": 3, "key": jax.numpy.float32(2.5)})
  for k in "abc":
    np.testing.assert_array_equal(host["tree"][k], x)
  assert host["scalar"] == 3 and host["key"] == np.float32(2.5)


def test_parameters_split_across_two_processes(tmp_path):
  """Mesh (1, 8, 1) over 2 processes x 4 devices: every weight matrix is split across the
  processes. Placing, re-placing (no fetch), resharding, reading back and building a train
  state from global parameters all work and give the host values."""
  results = w.run_two_processes(str(tmp_path), "--task", "place", "--mesh", "1,8,1")
  mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=8, tensor=1))
  params = nnx.split(w.tiny_model(3), nnx.Param, ...)[1]
  sharded = [
    not s.is_fully_replicated
    for s in jax.tree.leaves(
      tr.param_shardings(params, mesh), is_leaf=lambda s: isinstance(s, NamedSharding)
    )
  ]
  assert sum(sharded) >= 4  # every weight matrix; only the norm scales stay whole
  for r in results:
    assert (r["split"], r["leaves"]) == (sum(sharded), len(sharded))
    assert r["same_objects"] and r["resharded"]
    np.testing.assert_allclose(r["sums"], r["expected"], rtol=1e-6)
    np.testing.assert_allclose(r["state_sums"], r["expected"], rtol=1e-6)
  assert results[0]["sums"] == results[1]["sums"]
