"""Tests for ssapo_jax/checkpoint.py on an 8-device CPU mesh."""

from __future__ import annotations

import os
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ssapo_jax.checkpoint import (CheckpointConfig, Checkpointer, abstract_like, checkpoint_dir,
                                  has_checkpoint)


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 8, "conftest sets 8 CPU devices"
  return jax.make_mesh((4, 2), ("fsdp", "tensor"))


def _state(mesh, offset: float):
  """A train-state-like pytree: sharded and replicated arrays, mixed dtypes, a typed PRNG key."""
  w = np.arange(64, dtype=np.float32).reshape(8, 8) + offset
  return {
      "params": {
          "w": jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor"))),
          "b": jax.device_put(np.full((6,), offset, np.float32).astype(jnp.bfloat16),
                              NamedSharding(mesh, P())),
      },
      "opt": {"mu": jax.device_put(w * 0.5, NamedSharding(mesh, P(None, "tensor"))),
              "count": jnp.asarray(int(offset), jnp.int32)},
      "key": jax.random.fold_in(jax.random.key(42), int(offset)),
  }


def _assert_same(restored, expected):
  for path, (a, b) in zip(jax.tree_util.tree_leaves_with_path(restored),
                          zip(jax.tree.leaves(restored), jax.tree.leaves(expected))):
    if jnp.issubdtype(b.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    assert a.dtype == b.dtype, path
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path[0]))


def _steps_on_disk(directory) -> list[int]:
  return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


def test_round_trip_values_shardings_and_metadata(tmp_path, mesh):
  state = _state(mesh, 3.0)
  meta = {"round": 2, "phase": "train", "phase_step": 7, "cursor": {"epoch": 1, "index": 96},
          "seed": 42, "outputs": ["gen.jsonl"], "lr": 3e-7}
  directory = checkpoint_dir(tmp_path)
  assert not has_checkpoint(directory)
  with Checkpointer(directory, config=CheckpointConfig(save_every_steps=5)) as ckpt:
    assert ckpt.save(10, state, meta)
    ckpt.wait()
    assert has_checkpoint(directory)
    # Restore into an abstract target whose shardings differ from the saved ones.
    target = abstract_like(state)
    target["params"]["w"] = jax.ShapeDtypeStruct((8, 8), jnp.float32,
                                                 sharding=NamedSharding(mesh, P("tensor", None)))
    step, restored, restored_meta = ckpt.restore(target)
  assert step == 10 and restored_meta == meta
  _assert_same(restored, state)
  assert restored["params"]["w"].sharding.spec == P("tensor", None)
  assert restored["opt"]["mu"].sharding == state["opt"]["mu"].sharding
  assert restored["params"]["b"].dtype == jnp.bfloat16
  # A fresh manager (a new process after a restart) sees the same checkpoint.
  with Checkpointer(directory) as again:
    assert again.latest_step() == 10
    assert again.restore_metadata() == meta


def test_interval_force_and_keep_last_n(tmp_path, mesh):
  directory = tmp_path / "ckpt"
  with Checkpointer(directory, config=CheckpointConfig(save_every_steps=4, keep=2)) as ckpt:
    saved = [s for s in range(1, 13) if ckpt.save(s, _state(mesh, float(s)), {"step": s})]
    assert ckpt.save(13, _state(mesh, 13.0), {"step": 13}, force=True)  # a phase end
    ckpt.wait()
    assert saved == [4, 8, 12]
    assert ckpt.all_steps() == [12, 13] == _steps_on_disk(directory)
    step, restored, meta = ckpt.restore(_state(mesh, 0.0), step=12)
  assert (step, meta) == (12, {"step": 12})
  _assert_same(restored, _state(mesh, 12.0))


def _corrupt(step_dir: pathlib.Path, how: str):
  files = sorted(p for p in step_dir.rglob("*") if p.is_file())
  if how == "truncate_data":
    # Array data of the state item (OCDBT data files); truncating breaks every array read.
    data = [p for p in files if p.parent.name == "d" and "state" in p.parts]
    assert data, files
    for p in data:
      p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])
  elif how == "delete_metadata":
    for p in files:
      if p.name in ("_METADATA", "manifest.ocdbt"):
        p.unlink()
  elif how == "bad_json":
    (step_dir / "meta" / "metadata").write_text("{not json")
  else:
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncate_data", "delete_metadata", "bad_json"])
def test_corrupted_latest_falls_back_to_previous(tmp_path, mesh, how):
  directory = tmp_path / "ckpt"
  with Checkpointer(directory, config=CheckpointConfig(save_every_steps=1, keep=3)) as ckpt:
    for s in (1, 2):
      ckpt.save(s, _state(mesh, float(s)), {"step": s})
    ckpt.wait()
  _corrupt(directory / "2", how)
  with Checkpointer(directory, config=CheckpointConfig(save_every_steps=1, keep=3)) as ckpt:
    with pytest.warns(UserWarning, match=r"checkpoint 2 .* could not be restored.*falling back to step 1"):
      step, restored, meta = ckpt.restore(abstract_like(_state(mesh, 0.0)))
    assert (step, meta) == (1, {"step": 1})
    _assert_same(restored, _state(mesh, 1.0))
    # The resumed run reaches step 2 again: the stale, corrupted step 2 is replaced.
    with pytest.warns(UserWarning, match=r"deleting checkpoints \[2\]"):
      ckpt.save(2, _state(mesh, 20.0), {"step": 2, "again": True})
    ckpt.wait()
    step, restored, meta = ckpt.restore(_state(mesh, 0.0))
  assert (step, meta) == (2, {"step": 2, "again": True})
  _assert_same(restored, _state(mesh, 20.0))


def test_incomplete_save_is_invisible_and_all_corrupt_raises(tmp_path, mesh):
  directory = tmp_path / "ckpt"
  with Checkpointer(directory, config=CheckpointConfig(save_every_steps=1)) as ckpt:
    ckpt.save(1, _state(mesh, 1.0), {"step": 1})
    ckpt.wait()
  # A save killed mid-write leaves orbax's temporary directory behind, never a bare step dir.
  (directory / "2.orbax-checkpoint-tmp-123").mkdir()
  with Checkpointer(directory) as ckpt:
    assert ckpt.all_steps() == [1]
    assert ckpt.restore(_state(mesh, 0.0)).step == 1
  _corrupt(directory / "1", "truncate_data")
  with Checkpointer(directory) as ckpt:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      with pytest.raises(RuntimeError, match="no readable checkpoint"):
        ckpt.restore(_state(mesh, 0.0))
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 5"):
      ckpt.restore(_state(mesh, 0.0), step=5)


def test_metadata_numpy_scalars_and_non_json(tmp_path, mesh):
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(1, {"x": np.zeros(2)}, {"cursor": np.int64(7), "loss": jnp.float32(0.5),
                                      "pair": (1, 2)}, force=True)
    ckpt.wait()
    assert ckpt.restore_metadata(1) == {"cursor": 7, "loss": 0.5, "pair": [1, 2]}
    with pytest.raises(TypeError, match="not JSON serialisable"):
      ckpt.save(2, {"x": np.zeros(2)}, {"bad": np.zeros(3)}, force=True)


def test_empty_directory_and_bad_config(tmp_path):
  with Checkpointer(tmp_path / "empty") as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
      ckpt.restore({"x": jnp.zeros(2)})
  assert not has_checkpoint(tmp_path / "does-not-exist")
  with pytest.raises(ValueError, match="save_every_steps must be >= 1"):
    CheckpointConfig(save_every_steps=0)
