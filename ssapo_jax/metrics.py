"""Metrics logging: JSON lines in ``<output_dir>/metrics.jsonl`` plus TensorBoard event files.

One JSON object per `MetricsLogger.log` call::

  {"step": 120, "round": 1, "phase": "train", "loss": 0.61, "rewards/chosen": 0.12, ...,
   "learning_rate": 3e-07, "tokens_per_second": 5120.0, "skipped_nonfinite": 0, "time": 1714...}

Numbers from numpy/JAX (0-d or single-element arrays) become Python ints/floats; non-finite floats
are written as ``null`` so every line is strict JSON. The same numeric values go to TensorBoard as
scalars tagged by their names (TRL's ``rewards/chosen`` etc. group naturally) in
``<output_dir>/tensorboard``. Only one process writes (process 0 by default), so multi-host runs
can call `log` everywhere.

On resume, pass ``resume_step``: lines with a larger step (logged after the checkpoint the run
resumed from) are dropped from the JSONL and TensorBoard purges its events past that step, so the
logs read like those of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np

from ssapo_jax.pipeline.rundir import is_remote

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"


def to_json_value(value: Any, *, name: str = "value") -> Any:
  """Converts a metric value to a JSON-safe Python value.

  Python/numpy/JAX scalars and single-element arrays become int or float (bool becomes int);
  NaN and infinities become None; strings pass through.

  Raises:
    ValueError: for arrays with more than one element or unsupported types, naming `name`.
  """
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, (bool, np.bool_)):
    return int(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    value = float(value)
    return value if math.isfinite(value) else None
  if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy or jax array
    array = np.asarray(value)
    if array.size != 1:
      raise ValueError(f"metric {name!r} must be a scalar, got an array of shape {array.shape}")
    return to_json_value(array.reshape(()).item(), name=name)
  raise ValueError(f"metric {name!r} has unsupported type {type(value).__name__}: {value!r}")


class MetricsLogger:
  """Appends metric records to ``metrics.jsonl`` and TensorBoard (``tensorboardX``).

  Args:
    output_dir: the run directory (local path, or ``gs://...``: the JSONL is then rewritten on each
      flush and TensorBoard needs tensorboardX's GCS support).
    enabled: whether this process writes; default ``jax.process_index() == 0``.
    tensorboard: also write TensorBoard event files.
    resume_step: when resuming from a checkpoint at this step, drop records logged after it.
  """

  def __init__(self, output_dir: str | os.PathLike, *, enabled: bool | None = None,
               tensorboard: bool = True, resume_step: int | None = None):
    if enabled is None:
      import jax
      enabled = jax.process_index() == 0
    self.enabled = bool(enabled)
    self.output_dir = os.fspath(output_dir)
    self.path = os.path.join(self.output_dir, METRICS_FILENAME)
    self._remote = is_remote(self.output_dir)
    self._remote_lines: list[str] = []
    self._file = None
    self._tb = None
    self._tensorboard = tensorboard
    if self.enabled:
      self._open(resume_step)

  def _open(self, resume_step: int | None) -> None:
    kept = self._read_existing(resume_step)
    if self._remote:
      self._remote_lines = kept
    else:
      os.makedirs(self.output_dir, exist_ok=True)
      if resume_step is not None:
        with open(self.path, "w") as f:
          f.writelines(kept)
      self._file = open(self.path, "a")
    if self._tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(
          os.path.join(self.output_dir, TENSORBOARD_SUBDIR),
          purge_step=None if resume_step is None else resume_step + 1,
          # Event files are named by the second they were opened; a unique suffix keeps a quick
          # restart from overwriting the previous file.
          filename_suffix=f".{os.getpid()}.{time.time_ns()}")

  def rewind(self, step: int) -> None:
    """Drops the records logged after ``step``, as ``resume_step=step`` would have.

    For a resume that falls back to an older checkpoint than the one the logger was opened for
    (the newest failed verification): the steps after ``step`` are about to be run again.
    """
    if not self.enabled:
      return
    self._close_files()
    self._open(step)

  def _close_files(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def _read_existing(self, resume_step: int | None) -> list[str]:
    """Existing JSONL lines, keeping only those with ``step <= resume_step`` when it is given."""
    from etils import epath
    path = epath.Path(self.path)
    if not path.exists():
      return []
    lines = [line + "\n" for line in path.read_text().splitlines() if line.strip()]
    if resume_step is None:
      return lines
    return [line for line in lines if json.loads(line).get("step", -1) <= resume_step]

  def log(self, step: int, metrics: Mapping[str, Any], **context: Any) -> dict[str, Any] | None:
    """Writes one record ``{"step", **context, **metrics, "time"}``; returns it (None if disabled).

    Args:
      step: global step (the TensorBoard x-axis).
      metrics: name -> scalar (Python, numpy or JAX); numeric values also go to TensorBoard.
      **context: extra JSON fields such as ``round=1, phase="train"`` (not sent to TensorBoard).
    """
    if not self.enabled:
      return None
    record: dict[str, Any] = {"step": int(step)}
    for key, value in context.items():
      record[key] = to_json_value(value, name=key)
    for key, value in metrics.items():
      if key in record:
        raise ValueError(f"metric {key!r} clashes with a context field of the same name")
      record[key] = to_json_value(value, name=key)
    record["time"] = time.time()
    line = json.dumps(record, allow_nan=False) + "\n"
    if self._remote:
      self._remote_lines.append(line)
    else:
      self._file.write(line)
      self._file.flush()
    if self._tb is not None:
      for key, value in metrics.items():
        if isinstance(value, str) or value is None:
          continue
        self._tb.add_scalar(key, float(np.asarray(value).reshape(())), global_step=int(step))
    return record

  def flush(self) -> None:
    """Pushes buffered records to storage."""
    if not self.enabled:
      return
    if self._remote:
      from etils import epath
      epath.Path(self.path).write_text("".join(self._remote_lines))
    elif self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files; further `log` calls are errors."""
    if not self.enabled:
      return
    self._close_files()
    self.enabled = False

  def __enter__(self) -> "MetricsLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads ``<output_dir>/metrics.jsonl`` back as a list of records."""
  from etils import epath
  path = epath.Path(os.fspath(output_dir)) / METRICS_FILENAME
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
