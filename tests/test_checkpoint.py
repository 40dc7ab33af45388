"""Tests for ssapo_jax/checkpoint.py on an 8-device CPU mesh."""

from __future__ import annotations

import os
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ssapo_jax import checkpoint as ckpt_lib
from ssapo_jax.checkpoint import (
  CheckpointConfig,
  Checkpointer,
  abstract_like,
  checkpoint_dir,
  fingerprint,
  has_checkpoint,
)
from ssapo_jax.errors import CheckpointError, NonFiniteError


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
      "b": jax.device_put(
        np.full((6,), offset, np.float32).astype(jnp.bfloat16), NamedSharding(mesh, P())
      ),
    },
    "opt": {
      "mu": jax.device_put(w * 0.5, NamedSharding(mesh, P(None, "tensor"))),
      "count": jnp.asarray(int(offset), jnp.int32),
    },
    "key": jax.random.fold_in(jax.random.key(42), int(offset)),
  }


def _assert_same(restored, expected):
  for path, (a, b) in zip(
    jax.tree_util.tree_leaves_with_path(restored),
    zip(jax.tree.leaves(restored), jax.tree.leaves(expected)),
  ):
    if jnp.issubdtype(b.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    assert a.dtype == b.dtype, path
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path[0]))


def _steps_on_disk(directory) -> list[int]:
  return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


def test_round_trip_values_shardings_and_metadata(tmp_path, mesh):
  state = _state(mesh, 3.0)
  meta = {
    "round": 2,
    "phase": "train",
    "phase_step": 7,
    "cursor": {"epoch": 1, "index": 96},
    "seed": 42,
    "outputs": ["gen.jsonl"],
    "lr": 3e-7,
  }
  directory = checkpoint_dir(tmp_path)
  assert not has_checkpoint(directory)
  with Checkpointer(directory, config=CheckpointConfig(save_every_steps=5)) as ckpt:
    assert ckpt.save(10, state, meta)
    ckpt.wait()
    assert has_checkpoint(directory)
    # Restore into an abstract target whose shardings differ from the saved ones.
    target = abstract_like(state)
    target["params"]["w"] = jax.ShapeDtypeStruct(
      (8, 8), jnp.float32, sharding=NamedSharding(mesh, P("tensor", None))
    )
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
  elif how == "overwrite_data":
    # 200 bytes overwritten inside the largest array-data file: same size, still decodable
    # by the storage layer in general, so only the fingerprint can tell.
    data = max(
      (p for p in files if p.parent.name == "d" and "state" in p.parts),
      key=lambda p: p.stat().st_size,
    )
    raw = bytearray(data.read_bytes())
    start = len(raw) // 2
    raw[start : start + 200] = bytes((b + 101) % 256 for b in raw[start : start + 200])
    data.write_bytes(bytes(raw))
  elif how == "bad_json":
    (step_dir / "meta" / "metadata").write_text("{not json")
  else:
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncate_data", "delete_metadata", "bad_json", "overwrite_data"])
def test_corrupted_latest_falls_back_to_previous(tmp_path, mesh, how):
  directory = tmp_path / "ckpt"
  with Checkpointer(directory, config=CheckpointConfig(save_every_steps=1, keep=3)) as ckpt:
    for s in (1, 2):
      ckpt.save(s, _state(mesh, float(s)), {"step": s})
    ckpt.wait()
  _corrupt(directory / "2", how)
  with Checkpointer(directory, config=CheckpointConfig(save_every_steps=1, keep=3)) as ckpt:
    with pytest.warns(
      UserWarning, match=r"checkpoint 2 .* could not be restored.*falling back to step 1"
    ):
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
      with pytest.raises(CheckpointError, match="no readable checkpoint"):
        ckpt.restore(_state(mesh, 0.0))
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 5"):
      ckpt.restore(_state(mesh, 0.0), step=5)


def test_metadata_numpy_scalars_and_non_json(tmp_path, mesh):
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(
      1,
      {"x": np.zeros(2)},
      {"cursor": np.int64(7), "loss": jnp.float32(0.5), "pair": (1, 2)},
      force=True,
    )
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


# --------------------------------------------------------------------------------------------
# Verification: fingerprints, corrupted bytes, non-finite states, rotation.
# --------------------------------------------------------------------------------------------


def _numpy_checksum(words: np.ndarray) -> str:
  """Independent numpy reference of `checkpoint._leaf_digest` on uint32 words (row-major)."""

  def mix(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))

  flat = words.reshape(-1).astype(np.uint32)
  position = np.arange(flat.size, dtype=np.uint32)
  with np.errstate(over="ignore"):
    sums = [
      int(
        np.sum(mix(mix(flat ^ np.uint32(seed)) + position * np.uint32(0x9E3779B9)), dtype=np.uint32)
      )
      for seed in (0x243F6A88, 0x85A308D3)
    ]
  return "".join(f"{s:08x}" for s in sums)


def test_fingerprint_matches_numpy_reference_on_any_sharding(mesh):
  rng = np.random.default_rng(0)
  w = rng.standard_normal((8, 16)).astype(np.float32)
  b = rng.standard_normal((6,)).astype(jnp.bfloat16)
  expected = {
    "['w']": _numpy_checksum(w.view(np.uint32)),
    "['b']": _numpy_checksum(b.view(np.uint16).astype(np.uint32)),
  }
  for spec in (P(), P("fsdp", "tensor"), P("tensor", "fsdp")):
    state = {"w": jax.device_put(w, NamedSharding(mesh, spec)), "b": jnp.asarray(b)}
    got = {leaf["path"]: leaf["checksum"] for leaf in fingerprint(state)}
    assert got == expected, spec
  flipped = w.copy()
  flipped.view(np.uint32)[3, 5] ^= 1  # one bit of one element
  assert fingerprint({"w": flipped})[0]["checksum"] != expected["['w']"]
  leaves = fingerprint({"w": w, "bad": np.array([1.0, np.nan], np.float32), "n": np.arange(3)})
  assert [(leaf["path"], leaf["finite"]) for leaf in leaves] == [
    ("['bad']", False),
    ("['n']", True),
    ("['w']", True),
  ]


def _random_state(mesh, seed: int):
  """A state of incompressible random floats (like real parameters and Adam moments)."""
  rng = np.random.default_rng(seed)
  return {
    "params": jax.device_put(
      rng.standard_normal((64, 64)).astype(np.float32), NamedSharding(mesh, P("fsdp", "tensor"))
    ),
    "mu": jnp.asarray(rng.standard_normal((64,)).astype(np.float32)),
    "count": jnp.asarray(seed, jnp.int32),
  }


def test_tampered_fingerprint_or_metadata_falls_back(tmp_path, mesh):
  directory = tmp_path / "ckpt"
  with Checkpointer(directory, config=CheckpointConfig(keep=3)) as ckpt:
    for s in (1, 2, 3):
      ckpt.save(s, _random_state(mesh, s), {"step": s}, force=True)
  fp = directory / "3" / "fingerprint" / "metadata"
  text = fp.read_text()
  record = __import__("json").loads(text)
  record["leaves"][0]["checksum"] = "0" * 16
  fp.write_text(__import__("json").dumps(record))
  (directory / "2" / "meta" / "metadata").write_text('{"step": 20}')  # valid JSON, wrong content
  with Checkpointer(directory, config=CheckpointConfig(keep=3)) as ckpt:
    with pytest.warns(UserWarning) as caught:
      step, restored, meta = ckpt.restore(abstract_like(_random_state(mesh, 0)))
    messages = [str(w.message) for w in caught]
    assert any("checkpoint 3" in m and "checksum mismatch in ['count']" in m for m in messages)
    assert any("checkpoint 2" in m and "metadata does not match" in m for m in messages)
    assert (step, meta) == (1, {"step": 1})
    _assert_same(restored, _random_state(mesh, 1))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
      ckpt.restore(abstract_like(_random_state(mesh, 0)), step=3)


def test_non_finite_state_is_never_saved_and_never_restored(tmp_path, mesh):
  directory = tmp_path / "ckpt"
  state = _random_state(mesh, 1)
  with Checkpointer(directory) as ckpt:
    ckpt.save(1, state, {"step": 1}, force=True)
    poisoned = dict(state, mu=state["mu"].at[3].set(jnp.nan))
    with pytest.raises(
      NonFiniteError, match=r"refusing to save checkpoint 2: non-finite .*\['mu'\]"
    ):
      ckpt.save(2, poisoned, {"step": 2}, force=True)
    ckpt.wait()  # step 1's asynchronous save
    assert ckpt.all_steps() == [1]
    # A checkpoint written without the guard (e.g. by an older version) is refused on restore.
    ckpt._manager.save(
      2,
      args=__import__("orbax.checkpoint").checkpoint.args.Composite(
        state=ckpt_lib.ocp.args.StandardSave(poisoned), meta=ckpt_lib.ocp.args.JsonSave({"step": 2})
      ),
    )
    ckpt.wait()
    with pytest.warns(
      UserWarning, match=r"checkpoint 2 .*non-finite values in \['mu'\].*falling back to step 1"
    ):
      assert ckpt.restore(abstract_like(state)).step == 1


def test_rotation_keeps_the_checkpoint_that_verified(tmp_path, mesh):
  directory = tmp_path / "ckpt"
  config = CheckpointConfig(keep=2)
  with Checkpointer(directory, config=config) as ckpt:
    for s in (1, 2, 3):
      ckpt.save(s, _random_state(mesh, s), {"step": s}, force=True)
  assert _steps_on_disk(directory) == [2, 3]
  _corrupt(directory / "3", "overwrite_data")
  with Checkpointer(directory, config=config) as ckpt:
    with pytest.warns(
      UserWarning,
      match=r"checkpoint 3 .*(checksum mismatch|non-finite values) in \[.params.\].*falling back to step 2",
    ):
      assert ckpt.restore(abstract_like(_random_state(mesh, 0))).step == 2
    with pytest.warns(UserWarning, match=r"deleting checkpoints \[3\]"):
      ckpt.save(3, _random_state(mesh, 30), {"step": 3}, force=True)
    for s in (4, 5, 6):
      ckpt.save(s, _random_state(mesh, s), {"step": s}, force=True)
    ckpt.wait()
    # The last two, plus step 2: the newest checkpoint known good, until one newer verifies.
    assert ckpt.all_steps() == [2, 5, 6] == _steps_on_disk(directory)
  with Checkpointer(directory, config=config) as ckpt:
    assert ckpt.restore(abstract_like(_random_state(mesh, 0))).step == 6
    ckpt.save(7, _random_state(mesh, 7), {"step": 7}, force=True)
    ckpt.save(8, _random_state(mesh, 8), {"step": 8}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7, 8]


def test_abstract_restore_equals_materialised_restore(tmp_path, mesh):
  """Issue 13: restoring into the abstract train state (no arrays) gives bitwise today's restore."""
  from ssapo_jax import sharding as shd
  from ssapo_jax import train as tr
  from ssapo_jax.models import load_hf
  from ssapo_jax.testing import write_tiny_model

  model = load_hf(write_tiny_model(str(tmp_path / "model")))
  mesh3 = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
  config = tr.TrainConfig(global_batch_size=8, param_dtype="float32")
  state = tr.create_train_state(model, config, mesh3, num_train_steps=10)
  # A state that differs from a fresh one everywhere: moments, counters.
  bump = lambda x: x + 0.25 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3  # noqa: E731
  state = state.replace(
    params=jax.tree.map(lambda x: x * 1.5, state.params),
    opt_state=jax.tree.map(bump, state.opt_state),
    step=state.step + 7,
  )
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(7, state, {"round": 0}, force=True)
    ckpt.wait()
    template = tr.create_train_state(model, config, mesh3, num_train_steps=10)  # today's target
    abstract = tr.create_train_state(model, config, mesh3, num_train_steps=10, abstract=True)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    today = ckpt.restore(template).state
    new = ckpt.restore(abstract).state
  _assert_same(new, today)
  _assert_same(new, state)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(today)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
