"""Checkpoints of a run: a state pytree plus JSON metadata, via orbax's `CheckpointManager`.

One checkpoint per global step (a monotonically increasing counter over the whole run, across
rounds and phases) holds two items:

* ``state``: any pytree of arrays (params, optimizer state, step counters, RNG keys, possibly
  sharded over a mesh), saved with ``StandardSave`` and restored into the shardings of a target;
* ``meta``: a JSON object (round, phase, step within the phase, data cursor, seeds, paths of phase
  outputs, anything JSON), saved with ``JsonSave``.

Saves are asynchronous by default (`Checkpointer.wait` blocks until they are committed). Only the
last `CheckpointConfig.keep` checkpoints are kept. If the newest checkpoint cannot be read (files
truncated or missing), `Checkpointer.restore` warns and falls back to the previous one; an
interrupted save never becomes visible, because orbax writes into a temporary directory and
renames it on commit (on GCS it writes a ``commit_success.txt`` marker instead).

Multi-host: every process must call `save`/`restore`/`wait` with the same arguments (each process
writes the shards it owns; process 0 writes the metadata and finalises). Directories may be local
or ``gs://bucket/path``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Mapping, NamedTuple

import jax
import orbax.checkpoint as ocp

_STATE = "state"
_META = "meta"
CHECKPOINT_SUBDIR = "checkpoints"  # checkpoints live in <output_dir>/checkpoints


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When to save and how many checkpoints to keep."""

  save_every_steps: int = 100  # periodic save interval in global steps (phase ends always save)
  keep: int = 3  # number of most recent checkpoints kept on disk (>= 2 so a fallback exists)
  async_save: bool = True  # write in a background thread; training continues meanwhile

  def __post_init__(self):
    if self.save_every_steps < 1:
      raise ValueError(f"checkpoint.save_every_steps must be >= 1, got {self.save_every_steps}")
    if self.keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {self.keep}")


class Restored(NamedTuple):
  """What `Checkpointer.restore` returns."""

  step: int  # global step of the checkpoint that was read
  state: Any  # the state pytree, with the target's structure, dtypes and shardings
  metadata: dict[str, Any]  # the JSON metadata saved with it


def abstract_like(target: Any) -> Any:
  """Maps arrays in `target` to ``jax.ShapeDtypeStruct`` keeping their shardings (restore target)."""

  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return ocp.utils.to_shape_dtype_struct(x)

  return jax.tree.map(leaf, target)


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

  def __init__(self, directory: str | os.PathLike, *, config: CheckpointConfig = CheckpointConfig()):
    self.directory = os.fspath(directory)
    self.config = config
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1,  # the interval is applied by `should_save`, so phase ends can force
        max_to_keep=config.keep,
        enable_async_checkpointing=config.async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(_STATE, _META))

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

  def save(self, step: int, state: Any, metadata: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Saves `state` and `metadata` as checkpoint `step` (asynchronously if configured).

    Args:
      step: global step, >= 0; later saves must use larger steps.
      state: pytree of arrays (``jax.Array``, numpy arrays, scalars, typed PRNG keys).
      metadata: JSON-serialisable mapping (round, phase, data cursor, ...).
      force: save even off the periodic interval (phase ends, final state).

    Returns:
      True if a save was started, False if skipped by the interval.

    A step at or below existing checkpoints means the run was resumed from an older checkpoint
    (after a corrupted one was skipped); those newer checkpoints are stale and are deleted first.
    """
    if step < 0:
      raise ValueError(f"checkpoint step must be >= 0, got {step}")
    if not force and not self.should_save(step):
      return False
    self._manager.wait_until_finished()
    stale = [s for s in self.all_steps() if s >= step]
    if stale:
      warnings.warn(f"checkpoint directory {self.directory}: deleting checkpoints {stale}, "
                    f"which are newer than the step {step} being saved (left over from a run "
                    f"resumed at an earlier step)", stacklevel=2)
      for s in stale:
        self._manager.delete(s)
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _META: ocp.args.JsonSave(_jsonable(metadata or {})),
    })
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
    restored = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
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
      RuntimeError: with ``step=None``, when no checkpoint can be read.

    With ``step=None`` a checkpoint that fails to read (truncated or missing files, bad JSON)
    triggers a `warnings.warn` and the next older one is tried.
    """
    abstract = abstract_like(target)
    if step is not None:
      return self._restore_step(self._resolve_step(step), abstract)
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
            stacklevel=2)
        continue
      return restored
    raise RuntimeError(f"no readable checkpoint in {self.directory}: " + "; ".join(failures))

  def _resolve_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available: {steps}")
    return step

  def _restore_step(self, step: int, abstract: Any) -> Restored:
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(abstract),
        _META: ocp.args.JsonRestore(),
    }))
    metadata = restored[_META]
    if not isinstance(metadata, dict):
      raise ValueError(f"metadata of checkpoint {step} is {type(metadata).__name__}, not a JSON object")
    return Restored(step=step, state=restored[_STATE], metadata=metadata)


def _jsonable(metadata: Mapping[str, Any]) -> dict[str, Any]:
  """Plain-JSON copy of `metadata` (numpy/JAX scalars become Python numbers).

  Checked here, synchronously, because an asynchronous save would only fail in its background
  thread.
  """

  def convert(obj):
    if hasattr(obj, "shape") and hasattr(obj, "dtype") and getattr(obj, "size", 2) == 1:
      return obj.reshape(()).item() if hasattr(obj, "reshape") else obj.item()
    if isinstance(obj, (tuple, set, frozenset)):
      return list(obj)
    raise TypeError(f"checkpoint metadata holds {type(obj).__name__} {obj!r}, which is not JSON "
                    "serialisable; store arrays in the state pytree instead")

  return json.loads(json.dumps(dict(metadata), default=convert))


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
