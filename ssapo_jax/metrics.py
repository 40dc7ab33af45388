"""Metrics logging: `MetricsLogger` writes each record to its sinks (`MetricsSink`): JSON lines
in ``<output_dir>/metrics.jsonl`` and TensorBoard event files by default.

One JSON object per `MetricsLogger.log` call::

  {"step": 120, "round": 1, "phase": "train", "loss": 0.61, "rewards/chosen": 0.12, ...,
   "learning_rate": 3e-07, "tokens_per_second": 5120.0, "skipped_nonfinite": 0, "time": 1714...}

Numbers from numpy/JAX (0-d or single-element arrays) become Python ints/floats; non-finite floats
are written as ``null`` so every line is strict JSON. The same numeric values go to TensorBoard as
scalars tagged by their names (TRL's ``rewards/chosen`` etc. group naturally) in
``<output_dir>/tensorboard``, and to Weights & Biases when ``metrics.wandb`` is set
(`WandbSink`). Only one process writes (process 0 by default), so multi-host runs
can call `log` everywhere.

On resume, pass ``resume_step``: lines with a larger step (logged after the checkpoint the run
resumed from) are dropped from the JSONL and TensorBoard purges its events past that step, so the
logs read like those of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import uuid
from typing import Any, Literal, Mapping, Optional, Protocol, Sequence

import numpy as np

from ssapo_jax.config import check_choices
from ssapo_jax.rundir import is_remote

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tensorboard"
WANDB_ID_FILENAME = "wandb_run_id"  # the W&B run of this run directory (a resume continues it)


@dataclasses.dataclass(frozen=True)
class WandbConfig:
  """A Weights & Biases run for the metrics (needs the ``wandb`` extra)."""

  project: str  # W&B project
  entity: Optional[str] = None  # W&B team or user; None = the logged-in user's default
  name: Optional[str] = None  # display name of the run; None = W&B's generated name
  # online: stream to the server; offline: local files only (``wandb sync`` uploads them later)
  mode: Literal["online", "offline", "disabled"] = "online"

  def __post_init__(self):
    check_choices(self, "metrics.wandb")
    if not self.project:
      raise ValueError("metrics.wandb.project must name a W&B project, got ''")


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
  """Where metrics go besides ``metrics.jsonl`` and ``tensorboard/``."""

  wandb: Optional[WandbConfig] = None  # W&B run {project, entity, name, mode}; None = no W&B


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


class MetricsSink(Protocol):
  """Where metric records go. `MetricsLogger` owns the records; a sink only stores them.

  ``open(resume_step)`` (re)opens the sink; with a ``resume_step`` the sink drops whatever it
  holds past that step (a resumed run reruns those steps). ``write`` gets the whole record and
  its numeric metrics (``scalars``, the values to plot).
  """

  def open(self, resume_step: int | None) -> None: ...

  def write(self, record: Mapping[str, Any], scalars: Mapping[str, float]) -> None: ...

  def flush(self) -> None: ...

  def close(self) -> None: ...


class JsonlSink:
  """``<output_dir>/metrics.jsonl``: one strict-JSON record per line (rewritten whole on each
  flush when the directory is remote)."""

  def __init__(self, output_dir: str):
    self.output_dir = output_dir
    self.path = os.path.join(output_dir, METRICS_FILENAME)
    self._remote = is_remote(output_dir)
    self._remote_lines: list[str] = []
    self._file = None

  def _existing(self, resume_step: int | None) -> list[str]:
    """Existing lines, keeping only those with ``step <= resume_step`` when it is given."""
    from etils import epath
    path = epath.Path(self.path)
    if not path.exists():
      return []
    lines = [line + "\n" for line in path.read_text().splitlines() if line.strip()]
    if resume_step is None:
      return lines
    return [line for line in lines if json.loads(line).get("step", -1) <= resume_step]

  def open(self, resume_step: int | None) -> None:
    kept = self._existing(resume_step)
    if self._remote:
      self._remote_lines = kept
      return
    os.makedirs(self.output_dir, exist_ok=True)
    if resume_step is not None:
      with open(self.path, "w") as f:
        f.writelines(kept)
    self._file = open(self.path, "a")

  def write(self, record: Mapping[str, Any], scalars: Mapping[str, float]) -> None:
    line = json.dumps(record, allow_nan=False) + "\n"
    if self._remote:
      self._remote_lines.append(line)
    else:
      self._file.write(line)
      self._file.flush()

  def flush(self) -> None:
    if self._remote:
      from etils import epath
      epath.Path(self.path).write_text("".join(self._remote_lines))
    elif self._file is not None:
      self._file.flush()

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None


class TensorBoardSink:
  """TensorBoard event files in ``<output_dir>/tensorboard`` (``tensorboardX``): each numeric
  metric as a scalar tagged by its name (TRL's ``rewards/chosen`` etc. group naturally)."""

  def __init__(self, output_dir: str):
    self.logdir = os.path.join(output_dir, TENSORBOARD_SUBDIR)
    self._writer = None

  def open(self, resume_step: int | None) -> None:
    from tensorboardX import SummaryWriter
    self._writer = SummaryWriter(
        self.logdir, purge_step=None if resume_step is None else resume_step + 1,
        # Event files are named by the second they were opened; a unique suffix keeps a quick
        # restart from overwriting the previous file.
        filename_suffix=f".{os.getpid()}.{time.time_ns()}")

  def write(self, record: Mapping[str, Any], scalars: Mapping[str, float]) -> None:
    for key, value in scalars.items():
      self._writer.add_scalar(key, value, global_step=int(record["step"]))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


class WandbSink:
  """A Weights & Biases run (``wandb`` is imported when the sink opens, so only process 0
  needs it).

  The run's id is kept in ``<output_dir>/wandb_run_id``: a resumed run continues the same W&B
  run. A fresh start (``resume_step < 0``) makes a new run and id. Every metric is plotted against
  the ``step`` metric (the global step, TRL's ``step_metric`` scheme) rather than W&B's own
  monotonic ``_step``, so the steps a resumed run repeats are logged again instead of dropped;
  W&B keeps the points logged past the checkpoint (its history cannot be cut).

  Args:
    output_dir: the run directory (holds the id file; local or remote).
    config: the W&B settings.
    local_dir: where W&B writes its local files (``<local_dir>/wandb/``); default ``output_dir``.
    run_config: the run's resolved config, recorded as the W&B run's config.
  """

  def __init__(self, output_dir: str, config: WandbConfig, *, local_dir: str | None = None,
               run_config: Mapping[str, Any] | None = None):
    self.output_dir, self.config = output_dir, config
    self.local_dir = local_dir or output_dir
    self.run_config = dict(run_config) if run_config is not None else None
    self.run = None

  @property
  def id_path(self) -> str:
    return os.path.join(self.output_dir, WANDB_ID_FILENAME)

  def _run_id(self, resume_step: int | None) -> str:
    """The kept id, or a new one (kept) for a fresh start or a first open."""
    from etils import epath
    path = epath.Path(self.id_path)
    if not (resume_step is not None and resume_step < 0) and path.exists():
      return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id

  def open(self, resume_step: int | None) -> None:
    try:
      import wandb
    except ImportError as e:
      raise ImportError("metrics.wandb needs the wandb package: pip install 'ssapo-jax[wandb]'"
                        ) from e
    os.makedirs(self.local_dir, exist_ok=True)
    c = self.config
    self.run = wandb.init(project=c.project, entity=c.entity, name=c.name, mode=c.mode,
                          id=self._run_id(resume_step), resume="allow", dir=self.local_dir,
                          config=self.run_config, reinit="create_new")
    self.run.define_metric("step")
    self.run.define_metric("*", step_metric="step")

  def write(self, record: Mapping[str, Any], scalars: Mapping[str, float]) -> None:
    if scalars:
      self.run.log({"step": int(record["step"]), **scalars})

  def flush(self) -> None:
    pass  # W&B streams records from its own process

  def close(self) -> None:
    if self.run is not None:
      self.run.finish()
      self.run = None


def metric_sinks(output_dir: str, config: MetricsConfig | None = None, *,
                 tensorboard: bool = True, local_dir: str | None = None,
                 run_config: Mapping[str, Any] | None = None) -> list[MetricsSink]:
  """The sinks of a run: `JsonlSink`, `TensorBoardSink` and, with ``config.wandb``, `WandbSink`
  (``local_dir`` and ``run_config`` as there)."""
  sinks: list[MetricsSink] = [JsonlSink(output_dir)]
  if tensorboard:
    sinks.append(TensorBoardSink(output_dir))
  if config is not None and config.wandb is not None:
    sinks.append(WandbSink(output_dir, config.wandb, local_dir=local_dir, run_config=run_config))
  return sinks


class MetricsLogger:
  """Writes metric records to a list of `MetricsSink`s: ``metrics.jsonl`` and TensorBoard by
  default.

  Args:
    output_dir: the run directory (local path, or ``gs://...``: the JSONL is then rewritten on each
      flush and TensorBoard needs tensorboardX's GCS support).
    enabled: whether this process writes; default ``jax.process_index() == 0``.
    tensorboard: also write TensorBoard event files (with the default sinks).
    resume_step: when resuming from a checkpoint at this step, drop records logged after it.
    sinks: the sinks to write to instead of the default `JsonlSink` (and `TensorBoardSink`).
  """

  def __init__(self, output_dir: str | os.PathLike, *, enabled: bool | None = None,
               tensorboard: bool = True, resume_step: int | None = None,
               sinks: Sequence[MetricsSink] | None = None):
    if enabled is None:
      import jax
      enabled = jax.process_index() == 0
    self.enabled = bool(enabled)
    self.output_dir = os.fspath(output_dir)
    self.path = os.path.join(self.output_dir, METRICS_FILENAME)
    if sinks is None:
      sinks = metric_sinks(self.output_dir, tensorboard=tensorboard)
    self.sinks = list(sinks)
    if self.enabled:
      for sink in self.sinks:
        sink.open(resume_step)

  def rewind(self, step: int) -> None:
    """Drops the records logged after ``step``, as ``resume_step=step`` would have.

    For a resume that falls back to an older checkpoint than the one the logger was opened for
    (the newest failed verification): the steps after ``step`` are about to be run again.
    """
    if not self.enabled:
      return
    for sink in self.sinks:
      sink.close()
      sink.open(step)

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
    scalars = {k: float(np.asarray(v).reshape(())) for k, v in metrics.items()
               if not (isinstance(v, str) or v is None)}
    for sink in self.sinks:
      sink.write(record, scalars)
    return record

  def flush(self) -> None:
    """Pushes buffered records to storage."""
    if self.enabled:
      for sink in self.sinks:
        sink.flush()

  def close(self) -> None:
    """Flushes and closes the sinks; further `log` calls are errors."""
    if not self.enabled:
      return
    for sink in self.sinks:
      sink.close()
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
