"""What a run directory records about itself: every config it ran with, and ``run.log``.

**Config versions.** ``config.yaml`` is the resolved config a run started with; it is never
overwritten. A resumed run whose resolved config differs is refused with the difference
(`ConfigChangedError`, exit status 4) unless the user allows the change
(``--allow-config-change``); the new config is then written beside the old ones as
``config.1.yaml``, ``config.2.yaml``, … and the run logs to ``metrics.jsonl`` the step at which
it took effect.

**run.log.** The one-line messages a run prints (resume point, data and per-phase summaries,
the end-of-run summary) go to stderr and, with a timestamp, to ``<output_dir>/run.log``; each
`progress` bar stays on screen when it ends and leaves its final state in ``run.log``, and
``ssapo-train`` adds the error or interruption that ended a run (`log_only`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import weakref
from typing import Any, Iterator

import yaml
from tqdm.auto import tqdm

from ssapo_jax.config import CONFIG_FILENAME
from ssapo_jax.errors import RunDirError

RUN_LOG_FILENAME = "run.log"
_VERSION = re.compile(r"^config(?:\.(\d+))?\.yaml$")

# Messages (stderr and run.log), progress bars' final states and errors (run.log only: the
# command line prints errors itself).
LOGGER = logging.getLogger("ssapo_jax.run")
_BARS = logging.getLogger("ssapo_jax.progress")
_FILE_ONLY = logging.getLogger("ssapo_jax.run_file")
_ACTIVE = 0  # open `run_log` contexts (on every process, logging or not)


class ConfigChangedError(RunDirError):
  """A resumed run's resolved config differs from the one its output directory recorded."""


@dataclasses.dataclass(frozen=True)
class ConfigVersion:
  """Where a run's current config is recorded and what changed from the previous version."""

  version: int  # 0 = config.yaml, n = config.<n>.yaml
  path: str
  changes: tuple[str, ...] = ()  # "key: old -> new" against the previous version; () if new/equal
  written: bool = False  # False when the directory already held exactly this config


def _dir(output_dir: str):
  from etils import epath  # local and gs:// alike

  return epath.Path(output_dir)


def config_versions(output_dir: str) -> list[tuple[int, str]]:
  """``[(version, path), ...]`` of the configs recorded in ``output_dir``, oldest first."""
  directory = _dir(output_dir)
  if not directory.exists():
    return []
  found = []
  for child in directory.iterdir():
    match = _VERSION.match(child.name)
    if match:
      found.append((int(match.group(1) or 0), os.fspath(child)))
  return sorted(found)


def version_filename(version: int) -> str:
  return CONFIG_FILENAME if version == 0 else f"config.{version}.yaml"


# Where a run lives and how its processes find each other, not what it computes: a run moved to
# another directory, or relaunched with another coordinator port, is the same run.
PLACEMENT_KEYS = frozenset(
  {"output_dir", "mesh.process_id", "mesh.coordinator_address", "mesh.local_device_ids"}
)


def config_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
  """``["key.sub: old -> new", ...]`` for every leaf value that differs (dicts compared by key)."""
  if isinstance(old, dict) and isinstance(new, dict):
    keys = list(dict.fromkeys([*old, *new]))
    return [
      change
      for key in keys
      for change in config_changes(old.get(key), new.get(key), f"{prefix}{key}.")
    ]
  if old == new:
    return []
  return [f"{prefix.rstrip('.')}: {_show(old)} -> {_show(new)}"]


def _show(value: Any) -> str:
  return (
    yaml.safe_dump(value, default_flow_style=True, width=1 << 16)
    .strip()
    .removesuffix("\n...")
    .removesuffix(" ...")
  )


def check_config(resolved: dict, output_dir: str, *, allow_change: bool) -> ConfigVersion:
  """Decides how ``resolved`` (a plain-data config) is recorded in ``output_dir``; writes nothing.

  Raises:
    ConfigChangedError: the latest recorded config differs and ``allow_change`` is False; the
      message lists every changed key on one line.
  """
  versions = config_versions(output_dir)
  if not versions:
    return ConfigVersion(0, os.fspath(_dir(output_dir) / CONFIG_FILENAME))
  latest, path = versions[-1]
  old = yaml.safe_load(_dir(path).read_text()) or {}
  changes = tuple(
    c for c in config_changes(old, resolved) if c.split(":", 1)[0] not in PLACEMENT_KEYS
  )
  if not changes:
    return ConfigVersion(latest, path, written=True)
  if not allow_change:
    raise ConfigChangedError(
      f"output_dir {output_dir} holds a run with another config ({os.path.basename(path)}); "
      f"changed: {'; '.join(changes)}. Rerun with --allow-config-change to continue it with "
      "the new config (recorded as a new version), or use another output_dir"
    )
  return ConfigVersion(
    latest + 1, os.fspath(_dir(output_dir) / version_filename(latest + 1)), changes
  )


def write_config(version: ConfigVersion, text: str) -> None:
  """Writes a new config version (never replaces an existing file)."""
  if version.written:
    return
  path = _dir(version.path)
  if path.exists():
    raise RunDirError(f"{version.path} exists already; config records are never overwritten")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.rename(path)


# ------------------------------------------------------------------------------- run.log


@contextlib.contextmanager
def run_log(log_dir: str | None, *, enabled: bool = True) -> Iterator[None]:
  """Routes `message` to stderr and appends it, and progress bars' final states, to run.log.

  Args:
    log_dir: local directory of ``run.log`` (None: stderr only).
    enabled: False on processes other than 0 of a multi-host run: they stay silent.
  """
  global _ACTIVE
  handlers = []
  _ACTIVE += 1
  if enabled:
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("[ssapo] %(message)s"))
    LOGGER.addHandler(stderr)
    handlers.append((LOGGER, stderr))
    if log_dir is not None:
      os.makedirs(log_dir, exist_ok=True)
      file = logging.FileHandler(os.path.join(log_dir, RUN_LOG_FILENAME), encoding="utf-8")
      file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
      for logger in (LOGGER, _BARS, _FILE_ONLY):
        logger.addHandler(file)
        handlers.append((logger, file))
  for logger in (LOGGER, _BARS, _FILE_ONLY):
    logger.setLevel(logging.INFO)
    logger.propagate = False
  try:
    yield
  finally:
    _ACTIVE -= 1
    for logger, handler in handlers:
      logger.removeHandler(handler)
    for handler in {h for _, h in handlers}:
      handler.close()


_LAST: list[str] = []  # the latest `message`, for `position` when no progress bar is open


def message(text: str) -> None:
  """One line for the user: stderr and run.log (inside `run_log`), else nowhere."""
  _LAST[:] = [text]
  LOGGER.info(text)


def say(text: str) -> None:
  """A library summary line (data counts): `message` inside `run_log` (silent on processes
  other than 0), else printed (stdout)."""
  if _ACTIVE:
    message(text)
  else:
    print(text)


def log_only(text: str) -> None:
  """A line for run.log alone (inside `run_log`): what the command line already printed."""
  _FILE_ONLY.info(text)


def position() -> str | None:
  """Where the run is: its open progress bars (``round 1: train 12/40``), innermost last, or
  else the phase after the latest message (``the phase after "round 1 follower: …"``); None
  before any."""
  from tqdm import tqdm as std_tqdm  # every enabled tqdm bar registers itself here

  shown = [b for b in list(std_tqdm._instances) if not getattr(b, "disable", False)]
  bars = sorted(shown, key=lambda b: abs(getattr(b, "pos", 0)))
  bars += [b for b in list(_OPEN) if b.disable]  # ours, hidden: desc and update count
  parts = []
  for bar in bars:
    desc = (getattr(bar, "label", None) or getattr(bar, "desc", "") or "").rstrip(": ")
    n = bar.done if bar.disable else bar.n
    total = getattr(bar, "total", None)
    parts.append(f"{desc} {n}/{total}".strip() if total else f"{desc} {n}".strip())
  if parts:
    return ", ".join(parts)
  if _LAST:
    latest = _LAST[0] if len(_LAST[0]) <= 80 else _LAST[0][:77] + "..."
    return f'the phase after "{latest}"'
  return None


_OPEN: "weakref.WeakSet[_Progress]" = weakref.WeakSet()  # `progress` bars not yet closed


class _Progress(tqdm):
  """A tqdm bar that stays when it ends and logs its final state to run.log; it counts its
  `update` steps even when disabled (``TQDM_DISABLE``), for `position`."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.label = kwargs.get("desc") or ""  # a disabled tqdm keeps no desc
    self.done = kwargs.get("initial", 0)
    _OPEN.add(self)

  def update(self, n=1):
    self.done += n
    return super().update(n)

  def close(self):
    _OPEN.discard(self)
    if not self.disable and not getattr(self, "_logged", False):
      self._logged = True
      _BARS.info(self.format_meter(**self.format_dict))
    super().close()


def progress(iterable=None, **kwargs) -> tqdm:
  """`tqdm` with ``leave=True`` whose final state goes to run.log (arguments as tqdm's)."""
  return _Progress(iterable, leave=True, **kwargs)
