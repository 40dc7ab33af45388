"""Checkpoints of a run: a state pytree plus JSON metadata, via orbax's `CheckpointManager`.

One checkpoint per global step (a monotonically increasing counter over the whole run, across
rounds and phases) holds three items:

* ``state``: any pytree of arrays (params, optimizer state, step counters, RNG keys, possibly
  sharded over a mesh), saved with ``StandardSave`` and restored into the shardings of a target;
* ``meta``: a JSON object (round, phase, step within the phase, data cursor, seeds, paths of phase
  outputs, anything JSON), saved with ``JsonSave``;
* ``fingerprint``: per-leaf checksums of the state (`fingerprint`) and a SHA-256 of ``meta``.

Saves are asynchronous by default (`Checkpointer.wait` blocks until they are committed). A state
holding a non-finite float is never saved (`NonFiniteError`). Only the last
`CheckpointConfig.keep` checkpoints are kept, plus the newest one that verified on restore: a run
that resumed from checkpoint S keeps S until it ends, whatever it saves after.

A restore verifies what it read: every leaf's checksum against the fingerprint, the metadata's
hash, and that every float in the state is finite. If the newest checkpoint cannot be read
(files truncated or missing) or fails verification (bytes corrupted inside the array data),
`Checkpointer.restore` warns with its step and falls back to the next older one. An interrupted
save never becomes visible, because orbax writes into a temporary directory and renames it on
commit (on GCS it writes a ``commit_success.txt`` marker instead).

Restore into an abstract target (``jax.ShapeDtypeStruct`` with shardings, e.g. from
``jax.eval_shape`` plus the mesh's shardings): the arrays are then created once, directly on their
shardings, with no template state in memory beside them.

Multi-host: every process must call `save`/`restore`/`wait` with the same arguments (each process
writes the shards it owns; process 0 writes the metadata and finalises). Directories may be local
or ``gs://bucket/path``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ssapo_jax import sharding as shd
from ssapo_jax.errors import CheckpointError, NonFiniteError
from ssapo_jax.fielddocs import document_fields

_STATE = "state"
_META = "meta"
_FINGERPRINT = "fingerprint"
CHECKPOINT_SUBDIR = "checkpoints"  # checkpoints live in <output_dir>/checkpoints


@document_fields
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When to save and how many checkpoints to keep."""

  save_every_steps: int = 100  # periodic save interval in global steps (phase ends always save)
  keep: int = 3  # number of most recent checkpoints kept on disk (>= 2 so a fallback exists)
  async_save: bool = True  # write in a background thread; training continues meanwhile

  def __post_init__(self):
    if self.save_every_steps < 1:
      raise ValueError(f"checkpoint.save_every_steps must be >= 1, got {self.save_every_steps}")
    if self.keep < 2:  # the newest checkpoint may be unreadable: keep one to fall back to
      raise ValueError(
        f"checkpoint.keep must be >= 2 (a fallback when the newest checkpoint "
        f"is unreadable), got {self.keep}"
      )


class Restored(NamedTuple):
  """What `Checkpointer.restore` returns."""

  step: int  # global step of the checkpoint that was read
  state: Any  # the state pytree, with the target's structure, dtypes and shardings
  metadata: dict[str, Any]  # the JSON metadata saved with it


class CheckpointCorrupt(CheckpointError):
  """A checkpoint whose contents fail verification (checksum, metadata hash, non-finite)."""


def abstract_like(target: Any) -> Any:
  """Maps arrays in `target` to ``jax.ShapeDtypeStruct`` keeping their shardings (restore target)."""

  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return ocp.utils.to_shape_dtype_struct(x)

  return jax.tree.map(leaf, target)


# -- fingerprints ----------------------------------------------------------------------------


def _words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32 words (one per element; two for 64-bit types)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size < 4:
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., size // 4]


def _mix(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection that spreads every input bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _shard_digest(x: jax.Array, offset: jax.Array, strides: jax.Array):
  """``(uint32[2] partial checksum, bool finite)`` of one shard of a leaf.

  The checksum of a leaf is a wrapping uint32 sum, over its words, of a hash of (word, global
  position); ``offset`` ``[ndim]`` is the shard's start and ``strides`` ``[ndim]`` the leaf's
  row-major strides, both in the leaf's words. Sums of shards add up to the leaf's sum exactly,
  so the checksum does not depend on the sharding; two seeds give 64 bits.
  """
  w = _words(x)
  position = jnp.zeros(w.shape, jnp.uint32)
  for axis in range(w.ndim):
    position = (
      position
      + (jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) + offset[axis]) * strides[axis]
    )
  sums = [
    jnp.sum(_mix(_mix(w ^ jnp.uint32(seed)) + position * jnp.uint32(0x9E3779B9)), dtype=jnp.uint32)
    for seed in (0x243F6A88, 0x85A308D3)
  ]
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.asarray(True)
  return jnp.stack(sums), finite


# Runs on one device per shard: no collectives (many small cross-device programs in flight can
# starve XLA:CPU's rendezvous), one compiled program per shard shape and dtype.
_shard_digest_jit = jax.jit(_shard_digest)


def _leaf_parts(x: jax.Array) -> list:
  """This process's shard digests of leaf ``x`` (each replicated shard once)."""
  words_shape = jax.eval_shape(_words, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape
  strides = np.ones(len(words_shape), np.uint64)
  for axis in reversed(range(len(words_shape) - 1)):
    strides[axis] = strides[axis + 1] * words_shape[axis + 1]
  strides = (strides % (1 << 32)).astype(np.uint32)
  parts = []
  for shard in x.addressable_shards:
    if shard.replica_id != 0:
      continue
    starts = [sl.start or 0 for sl in shard.index] + [0] * (len(words_shape) - x.ndim)
    parts.append(_shard_digest_jit(shard.data, np.asarray(starts, np.uint32), strides))
  return parts


def fingerprint(state: Any) -> list[dict[str, Any]]:
  """Per-leaf ``{"path", "shape", "dtype", "checksum", "finite"}`` of a state pytree.

  ``checksum`` is 16 hex digits computed on device from the leaf's bits (equal bits give equal
  checksums on any mesh); ``finite`` is False when a float leaf holds NaN or an infinity. One
  pass over each process's shards, cheap beside writing them; multi-host runs add one small
  all-gather.
  """
  paths_leaves = jax.tree_util.tree_leaves_with_path(state)
  leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in paths_leaves]
  # Per-shard digests live on this process's devices: one transfer at the end.
  parts = shd.to_host([_leaf_parts(x) for x in leaves])
  local = np.zeros((len(leaves), 3), np.uint32)  # per leaf: two sums, number of non-finite parts
  for i, leaf_parts in enumerate(parts):
    for sums, finite in leaf_parts:
      local[i, :2] += np.asarray(sums, np.uint32)  # wraps, like the device sums
      local[i, 2] += np.uint32(not finite)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    local = np.asarray(multihost_utils.process_allgather(local)).sum(axis=0, dtype=np.uint32)
  out = []
  for (path, _), x, row in zip(paths_leaves, leaves, local):
    out.append(
      {
        "path": jax.tree_util.keystr(path),
        "shape": list(x.shape),
        "dtype": str(x.dtype),
        "checksum": f"{int(row[0]):08x}{int(row[1]):08x}",
        "finite": bool(row[2] == 0),
      }
    )
  return out


def params_fingerprint(params: Any) -> str:
  """A short hex key of a parameter pytree: `fingerprint`'s per-leaf paths, shapes,
  dtypes and bit checksums (computed on device; equal bits give equal keys on any mesh)."""
  h = hashlib.sha256()
  for leaf in fingerprint(params):
    h.update(f"{leaf['path']}:{leaf['shape']}:{leaf['dtype']}:{leaf['checksum']}".encode())
  return h.hexdigest()[:16]


def _meta_hash(metadata: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


def _verify(step: int, state: Any, metadata: dict, saved: Mapping[str, Any] | None) -> None:
  """Raises `CheckpointCorrupt` unless ``state``/``metadata`` match the saved fingerprint."""
  now = fingerprint(state)
  bad = [leaf["path"] for leaf in now if not leaf["finite"]]
  if bad:
    raise CheckpointCorrupt(
      f"checkpoint {step}: non-finite values in {', '.join(bad[:5])}"
      + (f" and {len(bad) - 5} more leaves" if len(bad) > 5 else "")
    )
  if saved is None:
    warnings.warn(
      f"checkpoint {step} has no fingerprint (written before checkpoints were "
      "verified); restored without checking its checksums",
      stacklevel=3,
    )
    return
  if saved.get("metadata_sha256") != _meta_hash(metadata):
    raise CheckpointCorrupt(f"checkpoint {step}: metadata does not match its checksum")
  expected = {leaf["path"]: leaf for leaf in saved["leaves"]}
  if set(expected) != {leaf["path"] for leaf in now}:
    raise CheckpointCorrupt(
      f"checkpoint {step}: the restored state's leaves differ from the saved ones"
    )
  # A leaf restored into another dtype (orbax casts to the target's) cannot be compared bitwise.
  mismatched = [
    leaf["path"]
    for leaf in now
    if leaf["dtype"] == expected[leaf["path"]]["dtype"]
    and leaf["checksum"] != expected[leaf["path"]]["checksum"]
  ]
  if mismatched:
    raise CheckpointCorrupt(
      f"checkpoint {step}: checksum mismatch in {', '.join(mismatched[:5])}"
      + (f" and {len(mismatched) - 5} more leaves" if len(mismatched) > 5 else "")
    )


@dataclasses.dataclass
class _KeepVerified:
  """Orbax preservation policy: keeps the checkpoint steps in ``steps`` (the verified one)."""

  steps: set = dataclasses.field(default_factory=set)

  def should_preserve(self, checkpoints, *, context):
    return [c.step in self.steps for c in checkpoints]


class Checkpointer:
  """Saves and restores ``(state pytree, JSON metadata)`` at global steps in one directory.

  Example::

    ckpt = Checkpointer(f"{output_dir}/checkpoints", config=CheckpointConfig(save_every_steps=50))
    if ckpt.latest_step() is not None:
      step, state, meta = ckpt.restore(state)      # target gives structure and shardings
    ...
    ckpt.save(step, state, {"round": 1, "phase": "train", "phase_step": k})       # every N steps
    ckpt.save(step, state, {"round": 1, "phase": "annotated"}, force=True)       # phase end
    ckpt.wait()
  """

  def __init__(
    self, directory: str | os.PathLike, *, config: CheckpointConfig = CheckpointConfig()
  ):
    self.directory = os.fspath(directory)
    self.config = config
    self._verified = _KeepVerified()  # the newest step that verified on restore, never rotated
    keep = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=1,  # the interval is applied by `should_save`, so phase ends can force
      preservation_policy=keep.AnyPreservationPolicy([keep.LatestN(config.keep), self._verified]),
      enable_async_checkpointing=config.async_save,
      create=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=(_STATE, _META, _FINGERPRINT)
    )

  # -- queries --------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed checkpoint steps, ascending (incomplete saves are not listed)."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or None when the directory has no checkpoint."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def should_save(self, step: int) -> bool:
    """True on the periodic interval (``step % save_every_steps == 0``)."""
    return step % self.config.save_every_steps == 0

  # -- save -----------------------------------------------------------------------------------

  def save(
    self, step: int, state: Any, metadata: Mapping[str, Any] | None = None, *, force: bool = False
  ) -> bool:
    """Saves `state` and `metadata` as checkpoint `step` (asynchronously if configured).

    Args:
      step: global step, >= 0; later saves must use larger steps.
      state: pytree of arrays (``jax.Array``, numpy arrays, scalars, typed PRNG keys).
      metadata: JSON-serialisable mapping (round, phase, data cursor, ...).
      force: save even off the periodic interval (phase ends, final state).

    Returns:
      True if a save was started, False if skipped by the interval.

    Raises:
      NonFiniteError: a float leaf of `state` holds NaN or an infinity (nothing is written).

    A step at or below existing checkpoints means the run was resumed from an older checkpoint
    (after a corrupted one was skipped); those newer checkpoints are stale and are deleted first.
    """
    if step < 0:
      raise ValueError(f"checkpoint step must be >= 0, got {step}")
    if not force and not self.should_save(step):
      return False
    leaves = fingerprint(state)  # before the (asynchronous) save: the caller may donate `state`
    bad = [leaf["path"] for leaf in leaves if not leaf["finite"]]
    if bad:
      raise NonFiniteError(
        f"refusing to save checkpoint {step}: non-finite values in "
        f"{', '.join(bad[:5])}; the train state is corrupted (restart from "
        "the last checkpoint)"
      )
    metadata = _jsonable(metadata or {})
    self._manager.wait_until_finished()
    stale = [s for s in self.all_steps() if s >= step]
    if stale:
      warnings.warn(
        f"checkpoint directory {self.directory}: deleting checkpoints {stale}, "
        f"which are newer than the step {step} being saved (left over from a run "
        f"resumed at an earlier step)",
        stacklevel=2,
      )
      for s in stale:
        self._manager.delete(s)
    args = ocp.args.Composite(
      **{
        _STATE: ocp.args.StandardSave(state),
        _META: ocp.args.JsonSave(metadata),
        _FINGERPRINT: ocp.args.JsonSave(
          {"version": 1, "leaves": leaves, "metadata_sha256": _meta_hash(metadata)}
        ),
      }
    )
    return bool(self._manager.save(step, args=args, force=True))

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- restore --------------------------------------------------------------------------------

  def restore_metadata(self, step: int | None = None) -> dict[str, Any]:
    """Reads only the JSON metadata of `step` (default: latest); no fallback."""
    step = self._resolve_step(step)
    restored = self._manager.restore(
      step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
    )
    return dict(restored[_META])

  def restore(self, target: Any, step: int | None = None) -> Restored:
    """Restores the state into the structure, dtypes and shardings of `target`.

    Args:
      target: a pytree like the saved state: concrete arrays or ``jax.ShapeDtypeStruct`` with
        ``sharding`` set (e.g. from ``jax.eval_shape`` plus the mesh shardings); restored arrays
        are placed with those shardings, so a sharded state restores sharded.
      step: a specific step, or None for the newest readable one.

    Returns:
      `Restored(step, state, metadata)`.

    Raises:
      FileNotFoundError: no checkpoint exists (or `step` is not a committed checkpoint).
      CheckpointError: with ``step=None``, when no checkpoint can be read and verified;
        `CheckpointCorrupt` when the given `step` fails verification.

    With ``step=None`` a checkpoint that fails to read (truncated or missing files, bad JSON) or to
    verify (checksums, metadata hash, non-finite values) triggers a `warnings.warn` naming its
    step, and the next older one is tried. The checkpoint returned is kept by rotation until a
    newer one verifies.
    """
    abstract = abstract_like(target)
    if step is not None:
      restored = self._restore_step(self._resolve_step(step), abstract)
      self._verified.steps = {restored.step}
      return restored
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failures = []
    for candidate in reversed(steps):
      try:
        restored = self._restore_step(candidate, abstract)
      except Exception as e:  # orbax/tensorstore raise many types for unreadable files.
        failures.append(f"step {candidate}: {type(e).__name__}: {_short(e)}")
        older = [s for s in steps if s < candidate]
        warnings.warn(
          f"checkpoint {candidate} in {self.directory} could not be restored "
          f"({type(e).__name__}: {_short(e)}); "
          + (f"falling back to step {older[-1]}" if older else "no older checkpoint left"),
          stacklevel=2,
        )
        continue
      self._verified.steps = {restored.step}
      return restored
    raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(failures))

  def _resolve_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(
        f"no checkpoint for step {step} in {self.directory}; available: {steps}"
      )
    return step

  def _restore_step(self, step: int, abstract: Any) -> Restored:
    items = {_STATE: ocp.args.StandardRestore(abstract), _META: ocp.args.JsonRestore()}
    from etils import epath

    has_fingerprint = (epath.Path(self.directory) / str(step) / _FINGERPRINT).exists()
    if has_fingerprint:
      items[_FINGERPRINT] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    metadata = restored[_META]
    if not isinstance(metadata, dict):
      raise ValueError(
        f"metadata of checkpoint {step} is {type(metadata).__name__}, not a JSON object"
      )
    _verify(step, restored[_STATE], metadata, restored[_FINGERPRINT] if has_fingerprint else None)
    return Restored(step=step, state=restored[_STATE], metadata=metadata)


def _jsonable(metadata: Mapping[str, Any]) -> dict[str, Any]:
  """Plain-JSON copy of `metadata` (numpy/JAX scalars become Python numbers).

  Checked here, synchronously, because an asynchronous save would only fail in its background
  thread.
  """

  def convert(obj):
    if hasattr(obj, "shape") and hasattr(obj, "dtype") and getattr(obj, "size", 2) == 1:
      return shd.to_host(obj).reshape(()).item()
    if isinstance(obj, (tuple, set, frozenset)):
      return list(obj)
    raise TypeError(
      f"checkpoint metadata holds {type(obj).__name__} {obj!r}, which is not JSON "
      "serialisable; store arrays in the state pytree instead"
    )

  return json.loads(json.dumps(dict(metadata), default=convert))


class NoCheckpoints:
  """Stands in for `Checkpointer` where the processes do not share a directory: saves nothing
  and has no steps, so a relaunch resumes from the finished phases only."""

  directory = None

  def all_steps(self) -> list[int]:
    return []

  def save(self, *args, **kwargs) -> bool:
    return False

  def wait(self) -> None:
    pass

  def close(self) -> None:
    pass


def open_checkpointer(
  output_dir: str, *, shared: bool, config: CheckpointConfig = CheckpointConfig()
) -> Checkpointer | NoCheckpoints:
  """The run's `Checkpointer` in ``<output_dir>/checkpoints``, or `NoCheckpoints` (with a
  warning) when ``shared`` is False: orbax needs one directory every process sees."""
  if shared:
    return Checkpointer(checkpoint_dir(output_dir), config=config)
  warnings.warn(
    f"{output_dir} is a separate directory on each host: no checkpoints (orbax "
    "needs one directory all processes see); a relaunch resumes from the finished "
    "phases on process 0",
    stacklevel=2,
  )
  return NoCheckpoints()


def checkpoint_dir(output_dir: str | os.PathLike) -> str:
  """The checkpoint directory of a run: ``<output_dir>/checkpoints``."""
  return os.path.join(os.fspath(output_dir), CHECKPOINT_SUBDIR)


def has_checkpoint(directory: str | os.PathLike) -> bool:
  """True if `directory` holds at least one committed checkpoint step (creates nothing)."""
  from etils import epath

  path = epath.Path(directory)
  if not path.exists():
    return False
  # Orbax names committed steps by their integer; in-progress saves carry a temporary suffix.
  # On GCS (no atomic rename) a step counts once its commit_success.txt marker exists.
  for child in path.iterdir():
    if child.name.isdigit() and child.is_dir():
      if not os.fspath(path).startswith("gs://") or (child / "commit_success.txt").exists():
        return True
  return False


def _short(error: Exception, limit: int = 300) -> str:
  text = " ".join(str(error).split())
  return text if len(text) <= limit else text[:limit] + "..."
