"""Tests for ssapo_jax/runlock.py: the exclusive lock on a run's output directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from ssapo_jax.errors import RunDirError
from ssapo_jax.runlock import (
  LOCK_FILENAME,
  LockOwner,
  RunLock,
  RunLockedError,
  read_owner,
  run_lock,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = """
import sys, time
from ssapo_jax.runlock import RunLock
with RunLock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(120)
"""


def _write_lock(out, **owner):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, LOCK_FILENAME), "w") as f:
    json.dump({"host": socket.gethostname(), "acquired": 0.0, **owner}, f)


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_acquire_records_the_owner_and_release_removes_it(tmp_path):
  out = str(tmp_path / "run")
  with RunLock(out) as lock:
    owner = read_owner(out)
    assert owner == lock.owner
    assert (owner.host, owner.pid) == (socket.gethostname(), os.getpid())
    with pytest.raises(RunLockedError) as e:  # a second holder, even in the same process
      RunLock(out).acquire()
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(e.value)
    # A live run on this host: the flag would not help, so the message does not suggest it.
    assert "still running on this host" in str(e.value) and isinstance(e.value, RunDirError)
    assert "--force-unlock" not in str(e.value)
    with pytest.raises(RunLockedError, match="--force-unlock does not take its lock"):
      RunLock(out, force=True).acquire()
    assert read_owner(out) == lock.owner
    assert e.value.exit_code == 4
  assert not os.path.exists(os.path.join(out, LOCK_FILENAME))
  with RunLock(out):  # free again
    pass


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path):
  out = str(tmp_path / "run")
  dead = _dead_pid()
  _write_lock(out, pid=dead)
  messages = []
  with RunLock(out, log=messages.append):
    assert read_owner(out).pid == os.getpid()
  assert len(messages) == 1 and f"stale lock of pid {dead}" in messages[0]


def test_live_owner_without_flock_and_other_hosts_are_refused_unless_forced(tmp_path):
  out = str(tmp_path / "run")
  _write_lock(out, pid=os.getppid())  # alive, same host, no flock held
  with pytest.raises(RunLockedError, match=f"pid {os.getppid()}") as e:
    RunLock(out).acquire()
  assert "--force-unlock" not in str(e.value)
  with pytest.raises(RunLockedError, match="still running on this host, so --force-unlock"):
    RunLock(out, force=True).acquire()
  _write_lock(out, pid=123, host="another-host")
  with pytest.raises(RunLockedError, match="pid 123 on host another-host") as e:
    RunLock(out).acquire()
  assert "rerun with --force-unlock" in str(e.value)
  messages = []
  with RunLock(out, force=True, log=messages.append):
    assert read_owner(out).host == socket.gethostname()
  assert "--force-unlock" in messages[0] and "another-host" in messages[0]


def test_reused_pid_with_another_start_time_is_stale(tmp_path):
  out = str(tmp_path / "run")
  me = LockOwner.this_process()
  if me.start_time is None:
    pytest.skip("no /proc start times on this platform")
  _write_lock(out, pid=os.getppid(), start_time=me.start_time - 12345.0)
  messages = []
  with RunLock(out, log=messages.append):
    pass
  assert "stale lock" in messages[0]


def test_only_process_zero_locks(tmp_path):
  out = str(tmp_path / "run")
  with run_lock(out, process_index=1) as lock:
    assert lock is None and not os.path.exists(os.path.join(out, LOCK_FILENAME))
  with run_lock(out, process_index=0) as lock:
    assert read_owner(out) == lock.owner


def test_lock_held_by_another_process_then_killed(tmp_path):
  """A live holder refuses others; after SIGKILL its lock is stale and taken over."""
  out = str(tmp_path / "run")
  env = dict(os.environ, PYTHONPATH=REPO)
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLDER, out], stdout=subprocess.PIPE, text=True, env=env
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError, match=f"pid {holder.pid} on host"):
      RunLock(out).acquire()
  finally:
    holder.kill()
    holder.wait()
  messages = []
  with RunLock(out, log=messages.append):
    pass
  assert f"stale lock of pid {holder.pid}" in messages[0]
