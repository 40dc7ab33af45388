"""The exclusive lock on a run's output directory: one run writes a directory at a time.

The lock is the file ``<output_dir>/run.lock`` holding its owner as JSON (``host``, ``pid``,
``start_time`` of the process, ``acquired`` wall time). It is taken before the run writes anything
and removed when the run ends, however it ends short of SIGKILL.

* A second run on the same directory fails with `RunLockedError` (exit status 4) naming the owner.
* A lock whose owner is dead (same host, no process with that pid and start time) is stale: the
  next run takes it over and says so. A kill -9 leaves such a lock behind.
* A lock owned by another host cannot be checked from here; ``ssapo-train --force-unlock``
  takes it (in the pre-run checks and ``--check`` too, saying whose lock it was) after the user
  has made sure that run is gone. A live run on this host keeps its lock even then.
* On a local filesystem the lock file is also held with ``flock`` while the run lives, so two
  runs starting at the same instant cannot both take over a stale lock.
* On Cloud Storage (``gs://``) every change of the lock object is conditional on its generation
  (`_GcsObject`): it is created only if absent (``ifGenerationMatch=0``), a stale lock is
  replaced only if it is still the generation that was read, and a run deletes only the
  generation it wrote. Of two runs racing for one directory exactly one gets the lock. Other
  object stores get a check-then-write (best effort).

Multi-host runs take the lock on process 0 only (`run_lock` with ``process_index``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from typing import Callable, Iterator

from ssapo_jax.errors import RunDirError

LOCK_FILENAME = "run.lock"


class RunLockedError(RunDirError):
  """Another live run holds the output directory's lock."""


@dataclasses.dataclass(frozen=True)
class LockOwner:
  """Who holds a lock: host name, process id and that process's start time (pid reuse)."""

  host: str
  pid: int
  start_time: float | None = None  # seconds since boot (Linux /proc), else None
  acquired: float = 0.0  # wall time the lock was taken

  @classmethod
  def this_process(cls) -> "LockOwner":
    return cls(socket.gethostname(), os.getpid(), _start_time(os.getpid()), time.time())

  def describe(self) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.acquired))
    return f"pid {self.pid} on host {self.host} (since {when})"

  def is_alive(self) -> bool:
    """True unless this owner is provably gone (only checkable on this host)."""
    if self.host != socket.gethostname():
      return True
    try:
      os.kill(self.pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:  # exists, owned by another user
      return True
    started = _start_time(self.pid)
    return self.start_time is None or started is None or abs(started - self.start_time) < 1e-6


def _start_time(pid: int) -> float | None:
  """The process start time in clock ticks since boot (Linux), to tell a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      # Field 22; the command name (field 2) may hold spaces, so split after its ')'.
      return float(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def read_owner(output_dir: str) -> LockOwner | None:
  """The current owner recorded in ``<output_dir>/run.lock``, or None (no lock, unreadable)."""
  path = _path(output_dir)
  try:
    text = path.read_text()
  except (FileNotFoundError, OSError):
    return None
  return _parse(text)


def _parse(text: str) -> LockOwner | None:
  try:
    data = json.loads(text)
    return LockOwner(
      str(data["host"]), int(data["pid"]), data.get("start_time"), float(data.get("acquired", 0.0))
    )
  except (ValueError, KeyError, TypeError):
    return None


def _path(output_dir: str):
  from etils import epath  # local and gs:// alike

  return epath.Path(output_dir) / LOCK_FILENAME


class _GcsObject:
  """One Cloud Storage object changed only under generation preconditions (gcsfs' JSON API
  client, so ``STORAGE_EMULATOR_HOST`` and the usual credentials apply).

  Every write and delete names the generation it expects (0: the object must not exist); when
  another writer got there first the request fails with HTTP 412, raised as `FileExistsError`.
  """

  def __init__(self, url: str):
    import gcsfs  # pylint: disable=import-outside-toplevel

    self.fs = gcsfs.GCSFileSystem()
    self.bucket, self.key, _ = self.fs.split_path(url)

  def read(self) -> tuple[str, int] | None:
    """``(text, generation)`` of the current object, or None when there is none."""
    try:
      meta = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
      generation = int(meta["generation"])
      _, data = self.fs.call(
        "GET", "b/{}/o/{}", self.bucket, self.key, alt="media", generation=str(generation)
      )
    except FileNotFoundError:
      return None
    return data.decode(errors="replace"), generation

  def write(self, text: str, *, if_generation_match: int) -> int:
    """Writes ``text`` if the object's generation is ``if_generation_match``; returns the new
    generation. Raises `FileExistsError` otherwise."""
    # A multipart upload (metadata part, then the content): the upload type whose
    # preconditions every GCS implementation checks, the emulators included.
    body = (
      f"--==lock==\nContent-Type: application/json; charset=UTF-8\n\n"
      f"{json.dumps({'name': self.key})}\n--==lock==\nContent-Type: application/json\n\n"
      f"{text}\n--==lock==--"
    ).encode()
    meta = self.fs.call(
      "POST",
      f"{self.fs._location}/upload/storage/v1/b/{{}}/o",
      self.bucket,  # pylint: disable=protected-access
      uploadType="multipart",
      ifGenerationMatch=str(if_generation_match),
      headers={"Content-Type": 'multipart/related; boundary="==lock=="'},
      data=body,
      json_out=True,
    )
    return int(meta["generation"])

  def delete(self, *, if_generation_match: int) -> None:
    """Deletes the object if it is still generation ``if_generation_match``."""
    self.fs.call(
      "DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=str(if_generation_match)
    )


def locked_message(output_dir: str, owner: LockOwner, *, forced: bool = False) -> str:
  """Why ``owner``'s lock stops this run. ``--force-unlock`` is suggested only for a lock that
  cannot be checked from here (another host): a live run on this host keeps its lock."""
  here = owner.host == socket.gethostname()
  text = f"output_dir {output_dir} is locked by another run: {owner.describe()}"
  if here and forced:
    return (
      f"{text}, which is still running on this host, so --force-unlock does not take its "
      f"lock. Wait for it to finish, stop it (kill {owner.pid}), or use another output_dir"
    )
  if here:
    return (
      f"{text}, which is still running on this host. Wait for it to finish, stop it "
      f"(kill {owner.pid}), or use another output_dir"
    )
  return (
    f"{text}; its state cannot be checked from this host. Wait for it to finish, or use "
    f"another output_dir; if that run is gone (e.g. its host was lost), rerun with "
    f"--force-unlock"
  )


def check_owner(output_dir: str, owner: LockOwner | None, *, force: bool = False) -> str | None:
  """Decides whether a run may take a lock held by ``owner``; the one rule for the lock and for
  the pre-run checks.

  Returns None when there is no lock to take over (none, or this process's own), else what to
  say when it is taken over (a stale lock on this host; another host's lock with ``force``).

  Raises:
    RunLockedError: a live run on this host holds it (``force`` or not), or another host does
      and ``force`` is False.
  """
  me = LockOwner.this_process()
  if owner is None or (owner.host == me.host and owner.pid == me.pid):
    return None
  if owner.host == me.host:
    if owner.is_alive():
      raise RunLockedError(locked_message(output_dir, owner, forced=force))
    return f"taking over the stale lock of {owner.describe()}, which is no longer running"
  if not force:
    raise RunLockedError(locked_message(output_dir, owner))
  return f"--force-unlock: taking over the lock of {owner.describe()}"


class RunLock:
  """Holds ``<output_dir>/run.lock`` between `acquire` and `release` (or as a context manager).

  Args:
    output_dir: the run directory (created if missing); local or ``gs://``.
    force: take the lock whoever holds it (``--force-unlock``), with a message.
    log: where the take-over messages go (one line each).
  """

  def __init__(self, output_dir: str, *, force: bool = False, log: Callable[[str], None] = print):
    self.output_dir = os.fspath(output_dir)
    self.force = force
    self.log = log
    self.owner = LockOwner.this_process()
    self._fd: int | None = None
    self._generation: int | None = None  # of the gs:// lock object this run wrote
    self._held = False

  # -- local filesystem: the file plus flock ------------------------------------------------------

  def _acquire_local(self) -> None:
    import fcntl

    os.makedirs(self.output_dir, exist_ok=True)
    path = os.path.join(self.output_dir, LOCK_FILENAME)
    while True:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:  # a live process holds it (on this host or via the filesystem)
        owner = _parse(os.read(fd, 1 << 16).decode(errors="replace"))
        os.close(fd)
        if self.force and owner is not None and owner.host != self.owner.host:
          self.log(
            f"--force-unlock: removing the lock of {owner.describe()}; that process "
            "still holds it through the shared filesystem, so it may keep writing"
          )
          os.unlink(path)
          continue
        owner = owner or LockOwner(self.owner.host, -1)
        raise RunLockedError(locked_message(self.output_dir, owner, forced=self.force)) from None
      except OSError:  # no flock on this filesystem: fall back to the recorded owner
        os.close(fd)
        self._acquire_by_record()
        return
      # The previous holder may have unlinked the file between our open and flock: retry.
      try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      self._take_over(_parse(os.read(fd, 1 << 16).decode(errors="replace")))
      os.ftruncate(fd, 0)
      os.pwrite(fd, self._record().encode(), 0)
      os.fsync(fd)
      self._fd = fd
      return

  def _take_over(self, previous: LockOwner | None) -> None:
    """Checks a lock file that no live process holds; raises unless it may be taken."""
    said = check_owner(self.output_dir, previous, force=self.force)
    if said is not None:
      self.log(said)

  def _record(self) -> str:
    return json.dumps(dataclasses.asdict(self.owner))

  # -- Cloud Storage: generation preconditions ---------------------------------------------------

  def _acquire_gcs(self) -> None:
    obj = _GcsObject(str(_path(self.output_dir)))
    expected = 0  # create only if absent
    while True:
      try:
        self._generation = obj.write(self._record(), if_generation_match=expected)
        return
      except FileExistsError:
        if expected:  # another run replaced the stale lock between our read and write
          current = obj.read()
          raise RunLockedError(
            locked_message(
              self.output_dir, (_parse(current[0]) if current else None) or LockOwner("?", -1)
            )
          ) from None
      current = obj.read()
      if current is None:  # released in the meantime: try to create it again
        continue
      text, generation = current
      self._take_over(_parse(text))  # raises unless the lock is stale (or forced)
      expected = generation

  # -- other object stores (and filesystems without flock) -----------------------------------

  def _acquire_by_record(self) -> None:
    path = _path(self.output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
      self._take_over(read_owner(self.output_dir) or None)
    path.write_text(self._record())
    if read_owner(self.output_dir) != self.owner:  # another run wrote at the same moment
      raise RunLockedError(
        locked_message(self.output_dir, read_owner(self.output_dir) or LockOwner("?", -1))
      )

  # -- public ---------------------------------------------------------------------------------

  def acquire(self) -> "RunLock":
    """Takes the lock; raises `RunLockedError` (exit status 4) when a live run holds it."""
    if self._held:
      return self
    from ssapo_jax.storage import is_remote

    if self.output_dir.startswith("gs://"):
      self._acquire_gcs()
    elif is_remote(self.output_dir):
      self._acquire_by_record()
    else:
      self._acquire_local()
    self._held = True
    return self

  def release(self) -> None:
    """Removes the lock file if this process still owns it."""
    if not self._held:
      return
    self._held = False
    try:
      if self._generation is not None:  # only the generation this run wrote
        obj = _GcsObject(str(_path(self.output_dir)))
        current = obj.read()  # the read also spares stores that ignore the precondition
        if current is not None and current[1] == self._generation:
          obj.delete(if_generation_match=self._generation)
        self._generation = None
      elif read_owner(self.output_dir) == self.owner:
        _path(self.output_dir).unlink()
    except OSError:  # FileExistsError: no longer ours (forced unlock); FileNotFoundError: gone
      pass
    if self._fd is not None:
      os.close(self._fd)  # drops the flock
      self._fd = None

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def run_lock(
  output_dir: str,
  *,
  process_index: int = 0,
  force: bool = False,
  log: Callable[[str], None] = print,
) -> Iterator[RunLock | None]:
  """The run's lock on process 0; other processes of a multi-host run take none."""
  if process_index != 0:
    yield None
    return
  with RunLock(output_dir, force=force, log=log) as lock:
    yield lock
