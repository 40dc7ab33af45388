"""The persistent compilation cache of a run and a count of the programs it compiled.

`CompilationConfig` is the ``compilation`` section of the experiment config. `enable_cache`
points JAX's persistent cache at ``compilation.cache_dir`` (default ``<local run dir>/jax_cache``:
the run directory, or its local mirror when ``output_dir`` is remote, so the cache is always a
local disk), so a resumed run, or the next round, loads its programs instead of compiling them.

Programs whose compilation takes less than ``min_compile_time_secs`` (default 1.0 s, JAX's
own default) are not written: loading them would save little and every entry costs disk. The
7B train step takes minutes, the tiny model's a second or two, so both are cached.

`stats` reports what this process compiled: ``compile/programs`` (executables built or loaded,
counted from JAX's ``backend_compile`` events), ``compile/cache_hits`` and
``compile/cache_misses`` (persistent-cache reads) and, per program kind recorded with
`record_program` (the train step and the scorer call it when they trace a new shape), the
shapes, e.g. ``{"train_step": [[16, 2048], [32, 2048]]}``. Every phase of a run logs what it
compiled (`compile_delta`: ``compile_programs``, ``compile_cache_hits``,
``compile_cache_misses`` and ``compile_shapes`` in its ``metrics.jsonl`` record and its summary
line, `ssapo_jax.pipeline.hosts.PhaseClock`) and the run's last record the totals; `enable_cache`
also has each process write it to ``<local run dir>/compile_stats-p<process>.json`` when it
exits (a resumed run overwrites its predecessor's: the file describes the last process).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import threading

import jax

_lock = threading.Lock()
_counts = {"programs": 0, "cache_hits": 0, "cache_misses": 0}
_shapes: dict[str, list[tuple[int, ...]]] = {}
_by_kind: dict[str, dict[str, int]] = {}
_pending: list[str] = []  # the kind recorded since the last compile finished (at most one)
_listening = False


def _count_kind(key: str) -> None:
  kind = _pending[0] if _pending else "other"
  entry = _by_kind.setdefault(kind, {"programs": 0, "cache_hits": 0, "cache_misses": 0})
  entry[key] += 1


@dataclasses.dataclass(frozen=True)
class CompilationConfig:
  """Where compiled programs are cached between runs."""

  cache: bool = True  # use JAX's persistent compilation cache
  cache_dir: str | None = None  # None = <output_dir or its local mirror>/jax_cache (local path)
  min_compile_time_secs: float = 1.0  # only programs that took at least this long are cached

  def __post_init__(self):
    if not self.min_compile_time_secs >= 0:
      raise ValueError(
        f"compilation.min_compile_time_secs must be >= 0, got {self.min_compile_time_secs}"
      )
    if self.cache_dir is not None and "://" in self.cache_dir:
      raise ValueError(f"compilation.cache_dir must be a local directory, got {self.cache_dir!r}")


def _on_event(event: str, **_):
  key = {
    "/jax/compilation_cache/cache_hits": "cache_hits",
    "/jax/compilation_cache/cache_misses": "cache_misses",
  }.get(event)
  if key:
    with _lock:
      _counts[key] += 1
      _count_kind(key)


def _on_duration(event: str, duration: float, **_):
  # JAX traces a function (where `record_program` runs), then looks it up in the persistent
  # cache and compiles or loads it; this event ends that, so the recorded kind ends here too.
  if event == "/jax/core/compile/backend_compile_duration":
    with _lock:
      _counts["programs"] += 1
      _count_kind("programs")
      _pending.clear()


def start_counting() -> None:
  """Registers the JAX monitoring listeners (once per process); `enable_cache` calls it."""
  global _listening
  with _lock:
    if _listening:
      return
    _listening = True
  jax.monitoring.register_event_listener(_on_event)
  jax.monitoring.register_event_duration_secs_listener(_on_duration)


def record_program(kind: str, shape) -> None:
  """Notes that a program of ``kind`` was traced for ``shape`` (call it at trace time)."""
  with _lock:
    _shapes.setdefault(kind, []).append(tuple(int(d) for d in shape))
    _pending[:] = [kind]


def stats() -> dict:
  """``{"compile/programs", "compile/cache_hits", "compile/cache_misses": int,
  "compile/shapes": {kind: [shape, ...]}, "compile/by_kind": {kind: {"programs",
  "cache_hits", "cache_misses"}}}`` for this process so far. ``by_kind`` attributes each
  compile to the kind `record_program` named while tracing it (``"other"`` for programs that
  record none: small helpers, checkpoint restore)."""
  with _lock:
    out = {f"compile/{k}": v for k, v in _counts.items()}
    out["compile/shapes"] = {k: [list(s) for s in v] for k, v in _shapes.items()}
    out["compile/by_kind"] = {k: dict(v) for k, v in _by_kind.items()}
  return out


def compile_delta(before: dict, after: dict) -> dict:
  """What a stretch of work compiled: `stats` ``after`` minus `stats` ``before`` (the counts
  subtracted; ``compile/shapes`` holds, per kind, the shapes recorded in between; no
  ``compile/by_kind``)."""
  out = {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, int)}
  old = before.get("compile/shapes", {})
  shapes = {k: v[len(old.get(k, [])) :] for k, v in after["compile/shapes"].items()}
  out["compile/shapes"] = {k: v for k, v in shapes.items() if v}
  return out


def format_shapes(shapes: dict) -> str:
  """``{"train_step": [[16, 64], [32, 64]], "score": [[8, 64]]}`` as
  ``"train_step 16x64 32x64; score 8x64"`` (distinct shapes, sorted; "" for none)."""
  return "; ".join(
    f"{kind} " + " ".join("x".join(map(str, s)) for s in sorted({tuple(s) for s in v}))
    for kind, v in sorted(shapes.items())
    if v
  )


def write_stats(path: str) -> None:
  """Writes `stats` as JSON to ``path`` (atomically)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(stats(), f)
  os.replace(tmp, path)


def reset_stats() -> None:
  with _lock:
    for k in _counts:
      _counts[k] = 0
    _shapes.clear()
    _by_kind.clear()
    _pending.clear()


def cache_dir_for(config: CompilationConfig, local_run_dir: str) -> str:
  """The cache directory of a run: ``config.cache_dir`` or ``<local_run_dir>/jax_cache``."""
  return config.cache_dir or os.path.join(local_run_dir, "jax_cache")


def enable_cache(config: CompilationConfig, local_run_dir: str) -> str | None:
  """Turns on the persistent cache for this process (and the compile counter); returns its
  directory, or None with ``config.cache`` off. Call it before the run's first compile; a
  cache JAX already decided against (a compile ran with none set) is re-checked."""
  start_counting()
  stats_path = os.path.join(local_run_dir, f"compile_stats-p{jax.process_index()}.json")
  atexit.register(write_stats, stats_path)
  if not config.cache:
    return None
  path = os.path.abspath(cache_dir_for(config, local_run_dir))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", config.min_compile_time_secs)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  try:  # JAX decides once per process whether the cache is used; make it decide again.
    from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel

    if compilation_cache._cache_checked:  # pylint: disable=protected-access
      compilation_cache.reset_cache()
  except (ImportError, AttributeError):
    pass
  return path
