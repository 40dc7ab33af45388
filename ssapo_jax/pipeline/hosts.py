"""Multi-process plumbing of a run: artifact sharing, the start-up consistency check and the
per-phase throughput lines.

Phase artifacts (``generations.npz``, ``annotation.npz``, ``pairs/``, ``train_set/``,
``follower.json``, follower refreshes, ``eval_generations.json``, ``summary.json``, exported
policies) are read and written by process 0 only; every other process receives what it needs
by broadcast (`cached_npz`, `broadcast_npz`, `broadcast_json`). A run therefore behaves the
same whether ``output_dir`` is one filesystem all hosts share or a local directory on each host
(then only process 0's holds the phase outputs). What each process keeps on its own: its
per-process reference log-prob caches (``ref_logps-*-p<i>.npz``) and the shards of the orbax
checkpoints it writes. Results are gathered in a fixed order (by global row index), so every
process holds bitwise the same values.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

import ssapo_jax
from ssapo_jax import compilation
from ssapo_jax.runrecord import message


def is_process0() -> bool:
  """True on process 0, the process that writes shared files."""
  return jax.process_index() == 0


def _multihost():
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return multihost_utils


def broadcast_bytes(data: bytes | None) -> bytes:
  """Process 0's ``data`` on every process (the others pass None)."""
  if jax.process_count() == 1:
    return data
  mh = _multihost()
  size = int(np.asarray(mh.broadcast_one_to_all(np.int64(len(data) if is_process0() else 0))))
  buf = np.frombuffer(data, np.uint8) if is_process0() else np.zeros(size, np.uint8)
  return np.asarray(mh.broadcast_one_to_all(buf), np.uint8).tobytes()


def broadcast_json(obj: Any) -> Any:
  """Process 0's JSON-serialisable ``obj`` on every process."""
  if jax.process_count() == 1:
    return obj
  return json.loads(broadcast_bytes(json.dumps(obj).encode() if is_process0() else None))


def broadcast_npz(arrays: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
  """Process 0's dict of numpy arrays on every process (shapes and dtypes included)."""
  if jax.process_count() == 1:
    return arrays
  data = None
  if is_process0():
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
  with np.load(io.BytesIO(broadcast_bytes(data))) as f:
    return dict(f)


def barrier(name: str) -> None:
  """Waits until every process reaches ``name`` (no-op with one process)."""
  if jax.process_count() > 1:
    _multihost().sync_global_devices(name)


def shared_directory(path: str) -> bool:
  """True if every process sees the files process 0 writes in ``path`` (one shared filesystem),
  False for per-host local directories."""
  if jax.process_count() == 1:
    return True
  import uuid  # pylint: disable=import-outside-toplevel

  probe = os.path.join(
    path, f".shared-probe-{broadcast_json(uuid.uuid4().hex if is_process0() else None)}"
  )
  if is_process0():
    with open(probe, "w"):
      pass
  barrier("ssapo-shared-probe-written")
  seen = np.asarray(_multihost().process_allgather(np.int32(os.path.exists(probe))))
  barrier("ssapo-shared-probe-read")
  if is_process0():
    os.remove(probe)
  return bool(seen.all())


def read_npz(path: str) -> dict[str, np.ndarray]:
  """Process 0's copy of the npz file ``path``, on every process."""
  found = None
  if is_process0():
    with np.load(path) as f:
      found = dict(f)
  return broadcast_npz(found)


def cached_npz(
  path: str,
  compute: Callable[[], dict[str, np.ndarray]],
  *,
  save: Callable[[str, dict[str, np.ndarray]], None],
) -> dict[str, np.ndarray]:
  """Process 0's ``path`` if it exists (broadcast to all), else ``compute()`` on every process
  (each doing its share) and saved by process 0 with ``save(path, result)``."""
  found = None
  if is_process0() and os.path.exists(path):
    with np.load(path) as f:
      found = dict(f)
  if broadcast_json(found is not None):
    return broadcast_npz(found)
  result = compute()
  if is_process0():
    save(path, result)
  return result


def code_fingerprint() -> str:
  """sha256 of the package version and every ``ssapo_jax`` source file (the code version)."""
  root = os.path.dirname(os.path.abspath(ssapo_jax.__file__))
  h = hashlib.sha256(ssapo_jax.__version__.encode())
  for folder, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
          h.update(f.read())
  return h.hexdigest()


def check_same_run(resolved_config: str) -> None:
  """Refuses to start unless every process has process 0's resolved config and code.

  Args:
    resolved_config: this process's resolved config as text, without the per-process fields
      (``mesh.process_id``, ``mesh.local_device_ids``).

  Raises:
    RuntimeError: on every process, naming the processes that differ.
  """
  if jax.process_count() == 1:
    return
  config_digest = hashlib.sha256(resolved_config.encode()).digest()
  code_digest = bytes.fromhex(code_fingerprint())
  mine = np.frombuffer(config_digest + code_digest, np.uint8)
  every = np.asarray(_multihost().process_allgather(mine))  # [processes, 64]
  bad_config = [p for p in range(every.shape[0]) if (every[p, :32] != every[0, :32]).any()]
  bad_code = [p for p in range(every.shape[0]) if (every[p, 32:] != every[0, 32:]).any()]
  if bad_config or bad_code:
    what = []
    if bad_config:
      what.append(
        f"process(es) {bad_config} resolved a different config than process 0 "
        f"(config hash {every[bad_config[0], :4].tobytes().hex()}… vs "
        f"{every[0, :4].tobytes().hex()}…)"
      )
    if bad_code:
      what.append(f"process(es) {bad_code} run a different ssapo_jax code version than process 0")
    raise RuntimeError(
      "refusing to start: " + "; ".join(what) + ". Launch every process with "
      "the same command, config file and code (only mesh.process_id differs)."
    )


class PhaseClock:
  """Times one phase and reports it: a ``metrics.jsonl`` record and one printed line.

  Example::

    clock = PhaseClock()
    ...                                   # the phase's work
    clock.report(rt.logger, step, "generate", t, chips=8, new_tokens=..., padding_fraction=...)
  """

  def __init__(self):
    self.start = time.perf_counter()
    self.compiled = compilation.stats()  # the phase's compiles are what it adds to this

  def report(
    self,
    logger,
    step: int,
    phase: str,
    round_index: int,
    *,
    chips: int,
    new_tokens: int | None = None,
    padding_fraction: float | None = None,
    pairs: int | None = None,
    sequences: int | None = None,
  ) -> dict[str, float]:
    """Logs ``wall_seconds`` and, where given, ``new_tokens``/``tokens_per_second_per_chip``,
    ``pairs``/``pairs_per_second`` (preference pairs handled, or trained),
    ``sequences``/``sequences_per_second`` (prompt + response sequences scored, each under
    each model) and ``padding_fraction``; prints the summary line on process 0. Returns the
    metrics.

    The phase's compiles (`compilation.compile_delta` since the clock started) come too:
    ``compile_programs``, ``compile_cache_hits``, ``compile_cache_misses`` and, as the string
    field ``compile_shapes`` of the record (``"train_step 16x64 32x64; score_packed 8x64"``),
    the shapes of the programs traced; the line says ``compiled 3 programs (2 from the
    cache): ...``."""
    seconds = time.perf_counter() - self.start
    metrics: dict[str, float] = {"wall_seconds": seconds}
    line = [f"round {round_index} {phase}: {seconds:.1f} s"]
    compiled = compilation.compile_delta(self.compiled, compilation.stats())
    shapes = compilation.format_shapes(compiled.pop("compile/shapes"))
    metrics.update({k.replace("/", "_"): v for k, v in compiled.items()})
    if new_tokens is not None:
      rate = new_tokens / max(seconds, 1e-9) / chips
      metrics.update(new_tokens=new_tokens, tokens_per_second_per_chip=rate)
      line.append(f"{new_tokens:,} new tokens, {rate:,.1f} tokens/s/chip")
    if pairs is not None:
      metrics.update(pairs=pairs, pairs_per_second=pairs / max(seconds, 1e-9))
      line.append(f"{pairs:,} pairs, {metrics['pairs_per_second']:,.1f} pairs/s")
    if sequences is not None:
      metrics.update(sequences=sequences, sequences_per_second=sequences / max(seconds, 1e-9))
      line.append(
        f"{sequences:,} sequences scored, {metrics['sequences_per_second']:,.1f} sequences/s"
      )
    if padding_fraction is not None:
      metrics["padding_fraction"] = padding_fraction
      line.append(f"padding {padding_fraction:.1%}")
    if metrics["compile_programs"]:
      line.append(
        f"compiled {metrics['compile_programs']} programs "
        f"({metrics['compile_cache_hits']} from the cache)" + (f": {shapes}" if shapes else "")
      )
    if logger is not None:
      logger.log(step, metrics, round=round_index, phase=phase, compile_shapes=shapes)
    if is_process0():
      message(", ".join(line))
    return metrics


# ----------------------------------------------------------------------------- TPU slices


def tpu_slice(accelerator_type: str) -> tuple[int, int]:
  """``(JAX devices, hosts)`` of a Cloud TPU slice named as ``gcloud`` names it.

  v2/v3 names count cores, each a JAX device, 8 per host; v4/v5p names count TensorCores, two
  per chip and one JAX device per chip, 4 chips per host; v5e (``v5litepod``) and v6e names
  count chips, 4 per host in multi-host slices (up to 8 on one host).

  Raises:
    ValueError: for a name of another form.
  """
  match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator_type)
  if not match:
    raise ValueError(
      f"--accelerator-type {accelerator_type!r}: expected e.g. v4-32, v5p-64, "
      "v5litepod-16 or v6e-16"
    )
  family, n = match.group(1), int(match.group(2))
  if family in ("v2", "v3"):
    return n, max(n // 8, 1)
  if family in ("v4", "v5p"):
    return n // 2, max(n // 8, 1)
  return n, 1 if n <= 8 else n // 4


def pod_mesh_summary(config, accelerator_type: str) -> str:
  """One line: the ``(data, fsdp, tensor)`` mesh ``config`` gets on a TPU slice, and what it
  splits across hosts.

  Raises:
    ValueError: if the configured mesh does not fit the slice's devices.
  """
  from ssapo_jax.sharding import resolve_mesh_shape  # pylint: disable=import-outside-toplevel

  devices, hosts = tpu_slice(accelerator_type)
  data, fsdp, tensor = resolve_mesh_shape(config.mesh, devices)
  per_host = devices // hosts
  # Devices are laid out host by host, tensor fastest: an axis block wider than one host's
  # devices crosses hosts.
  params_across = hosts > 1 and fsdp * tensor > per_host
  batch_across = hosts > 1 and data * fsdp > 1 and (data * fsdp * tensor > per_host)
  return (
    f"mesh on {accelerator_type} ({devices} devices, {hosts} hosts x {per_host}): "
    f"data={data} fsdp={fsdp} tensor={tensor}; parameters and optimizer state in "
    f"{fsdp * tensor} shards{' across hosts' if params_across else ''}, batches in "
    f"{data * fsdp} shards{' across hosts' if batch_across else ''}"
  )


def main(argv=None) -> int:
  """``python -m ssapo_jax.pipeline.hosts ACCELERATOR_TYPE CONFIG [key=value ...]``: prints
  `pod_mesh_summary` (``launch/tpu_pod.sh --dry-run``); exit status 2 if the mesh does not
  fit."""
  from ssapo_jax.experiment import load_experiment  # pylint: disable=import-outside-toplevel

  args = sys.argv[1:] if argv is None else argv
  accelerator, config_path, overrides = args[0], args[1], [a for a in args[2:] if "=" in a]
  try:
    config = load_experiment(config_path, overrides)
  except ValueError as e:  # ConfigError: an unknown key, a bad value
    print(f"{config_path}: {e}", file=sys.stderr)
    return 2
  try:
    print(pod_mesh_summary(config, accelerator))
  except ValueError as e:
    print(f"mesh: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
