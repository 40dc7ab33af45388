"""The run directory: atomic writes of phase outputs and the local mirror of a remote run.

Phase outputs (samples, annotations, datasets, exports) are written with local file APIs. When
``output_dir`` is remote (``gs://``), every host writes them to a local mirror (`local_workdir`),
process 0 copies each finished phase up (`push`), and a resumed run copies them down (`pull`).
Checkpoints (orbax) and metrics write to the remote directory directly. `RunDir` bundles these
for one run; the pipeline's cached phases push their own outputs through it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from ssapo_jax.storage import is_remote  # also re-exported: the run directory's test


def atomic_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp{jax.process_index()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def atomic_npz(path: str, **arrays) -> None:
  tmp = f"{path}.tmp{jax.process_index()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def local_workdir(output_dir: str) -> str:
  """Where phase outputs are written: the output directory, or a local mirror of a remote one
  (one per process, so that processes sharing a machine never clear each other's)."""
  if not is_remote(output_dir):
    return output_dir
  digest = hashlib.sha1(output_dir.encode()).hexdigest()[:12]
  return os.path.join(tempfile.gettempdir(), "ssapo_jax", f"{digest}-p{jax.process_index()}")


# Written to the remote directory directly (orbax, the metrics logger), never mirrored.
_NOT_MIRRORED = ("checkpoints", "tensorboard", "metrics.jsonl", "config.yaml", "cache")
# What a mirror holds that is this machine's own, not a copy of the remote directory: the run
# log, the compile counters and the default compilation cache (ssapo_jax.compilation).
_LOCAL_ONLY = ("run.log", "jax_cache")
_LOCAL_ONLY_PREFIXES = ("compile_stats-",)


def clear_mirror(workdir: str) -> list[str]:
  """Deletes the phase outputs of a remote run's local mirror; returns the names removed.

  A mirror left by an earlier run (killed, finished, or of a remote directory since deleted) is
  no evidence of what the remote directory holds now, and the cached phases would trust it. So a
  run starts from an empty mirror and a resume pulls what the remote directory has.
  """
  removed = []
  if not os.path.isdir(workdir):
    return removed
  for name in sorted(os.listdir(workdir)):
    if name in _LOCAL_ONLY or name.startswith(_LOCAL_ONLY_PREFIXES):
      continue
    path = os.path.join(workdir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
    removed.append(name)
  return removed


def _remote_path(path: str):
  from etils import epath  # gs://, s3://, … through the backends etils has installed

  return epath.Path(path)


def pull(output_dir: str, workdir: str) -> None:
  """Copies a remote run's phase outputs into the local mirror (for a resumed run)."""
  remote = _remote_path(output_dir)
  if not remote.exists():
    return
  pending = [p for p in remote.iterdir() if p.name not in _NOT_MIRRORED]
  while pending:
    src = pending.pop()
    if src.is_dir():
      pending.extend(src.iterdir())
      continue
    dst = os.path.join(workdir, str(src.relative_to(remote)))
    if not os.path.exists(dst):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      with open(dst + ".part", "wb") as f:
        f.write(src.read_bytes())
      os.replace(dst + ".part", dst)


def push(output_dir: str, workdir: str, rel: str) -> None:
  """Copies ``workdir/rel`` (a file or a tree) to a remote output directory (process 0 only)."""
  if not is_remote(output_dir) or jax.process_index() != 0:
    return
  local = os.path.join(workdir, rel)
  files = (
    [local]
    if os.path.isfile(local)
    else [os.path.join(d, f) for d, _, names in os.walk(local) for f in names]
  )
  for path in files:
    if ".tmp" in os.path.basename(path):
      continue
    dst = _remote_path(output_dir) / os.path.relpath(path, workdir)
    if dst.exists():
      continue  # already copied: phase outputs are deterministic and written once
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(open(path, "rb").read())


@dataclasses.dataclass(frozen=True)
class RunDir:
  """One run's output directory and its local working copy.

  Attributes:
    output_dir: where the run's outputs live (a local path or ``gs://…``).
    workdir: where phase outputs are written with local file APIs: ``output_dir`` itself, or
      the local mirror of a remote one (`local_workdir`).
  """

  output_dir: str
  workdir: str

  @classmethod
  def open(cls, output_dir: str) -> "RunDir":
    """The run directory of ``output_dir``, its working copy created (for a remote directory,
    an empty mirror: `clear_mirror`; `pull` brings a resumed run's outputs down)."""
    workdir = local_workdir(output_dir)
    if is_remote(output_dir):
      clear_mirror(workdir)
    os.makedirs(workdir, exist_ok=True)
    return cls(output_dir, workdir)

  @property
  def remote(self) -> bool:
    return is_remote(self.output_dir)

  def path(self, *parts: str) -> str:
    """A path inside the working copy."""
    return os.path.join(self.workdir, *parts)

  def round_dir(self, t: int) -> str:
    """``round_<t>/`` in the working copy (created)."""
    path = self.path(f"round_{t}")
    os.makedirs(path, exist_ok=True)
    return path

  def push(self, rel: str) -> None:
    """Copies ``rel`` (a file or a tree of the working copy) up to a remote output directory."""
    push(self.output_dir, self.workdir, rel)

  def pull(self) -> None:
    """Copies a remote run's phase outputs into the working copy (a resumed run)."""
    if self.remote:
      pull(self.output_dir, self.workdir)
