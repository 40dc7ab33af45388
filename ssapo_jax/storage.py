"""Remote (object storage) paths: which paths are remote, and this host's copy of a remote folder.

A run reads its model and tokenizer with local file APIs (safetensors' memory map, transformers).
``model.path`` / ``model.tokenizer_path`` may still name a ``gs://`` folder: `local_copy` copies it
once to this host's temporary directory and every loader reads the copy. On a pod each host copies
for itself, so no shared filesystem is needed.

Remote I/O goes through etils' ``epath`` (``gs://`` through gcsfs), which honours the standard
endpoint settings (``STORAGE_EMULATOR_HOST`` for a local emulator).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

_MANIFEST = ".ssapo_remote_manifest.json"


def is_remote(path: str | os.PathLike) -> bool:
  """True for URLs such as ``gs://bucket/dir`` (anything with a scheme)."""
  return "://" in os.fspath(path)


def _listing(remote) -> dict[str, int]:
  """``{relative path: size in bytes}`` of every object under the remote folder ``remote``."""
  out, pending = {}, [remote]
  while pending:
    folder = pending.pop()
    for child in folder.iterdir():
      if child.is_dir():
        pending.append(child)
      else:
        out[str(child.relative_to(remote))] = child.stat().length
  return out


def local_copy(path: str | os.PathLike) -> str:
  """``path`` itself when local; for a remote folder, this host's copy of it (made once).

  The copy lives under the system temporary directory, named after the URL. It is reused while
  the remote folder holds the same files with the same sizes, and replaced otherwise. Processes
  on one host that copy at the same time each write a private folder and rename it into place;
  the first rename wins and the others use that copy.

  Raises:
    FileNotFoundError: the remote folder does not exist or is empty.
  """
  path = os.fspath(path)
  if not is_remote(path):
    return path
  from etils import epath  # pylint: disable=import-outside-toplevel

  remote = epath.Path(path)
  if not remote.is_dir():
    raise FileNotFoundError(f"{path} is not a folder in object storage")
  listing = _listing(remote)
  if not listing:
    raise FileNotFoundError(f"{path} holds no files")
  root = os.path.join(
    tempfile.gettempdir(),
    "ssapo_jax",
    "remote",
    hashlib.sha1(path.rstrip("/").encode()).hexdigest()[:16],
  )
  manifest = os.path.join(root, _MANIFEST)
  try:
    with open(manifest) as f:
      if json.load(f) == listing:
        return root
  except (OSError, ValueError):
    pass
  tmp = f"{root}.part{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  for rel in listing:
    dst = os.path.join(tmp, rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "wb") as f:
      f.write((remote / rel).read_bytes())
  with open(os.path.join(tmp, _MANIFEST), "w") as f:
    json.dump(listing, f)
  stale = f"{root}.stale{os.getpid()}"
  if os.path.isdir(root):  # an outdated copy: set aside, then replace
    try:
      os.replace(root, stale)
    except OSError:
      pass
  try:
    os.replace(tmp, root)
  except OSError:  # another process of this host put its (equal) copy in place first
    shutil.rmtree(tmp, ignore_errors=True)
  shutil.rmtree(stale, ignore_errors=True)
  return root
