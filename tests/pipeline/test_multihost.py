"""SSAPO rounds across processes: 2 processes x 4 simulated CPU devices on localhost against one
process with 8 devices and the same mesh (ssapo_jax/pipeline/ through `ssapo-train`).

Each process is the same ``launch/train.py`` command plus ``mesh.num_processes=2
mesh.process_id=i mesh.coordinator_address=127.0.0.1:PORT``. Tolerances: samples, pairs and
follower atoms equal (atoms to 1e-6), losses to 1e-4 relative, exported policy to 1e-5.

The mesh matrix ``(data, fsdp, tensor)``; process 0 holds devices 0-3, so what each mesh splits
across the two processes is:

* ``(1, 8, 1)`` -- the shipped configs' shape: parameters, optimizer state and batches (default
  suite, and the kill/relaunch tests);
* ``(1, 4, 2)`` -- parameters and optimizer state (FSDP) and batches; tensor parallelism within
  a process;
* ``(8, 1, 1)`` -- the batch only (every process holds whole parameters);
* ``(2, 4, 1)`` and ``(2, 2, 2)`` -- mixes: the batch over ``data``, within-process FSDP/tensor.
"""

import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from pipeline_runs import command as _cmd
from pipeline_runs import env as _env
from pipeline_runs import final_params as _final_params
from pipeline_runs import losses as _losses
from pipeline_runs import write_config, write_world

from ssapo_jax.data import load_round

TIMEOUT = 60  # mesh.coordination_timeout_seconds of these runs (starved processes on a loaded
# machine miss heartbeats for tens of seconds)
RUN_TIMEOUT = 3600  # seconds a whole run may take: generous for shared, overloaded CI machines
FSDP = (1, 8, 1)  # the shipped configs' mesh (fsdp: -1) on 8 devices
MESHES = [pytest.param(FSDP, id="1-8-1")] + [
  pytest.param(m, id="-".join(map(str, m)), marks=pytest.mark.slow)
  for m in ((1, 4, 2), (8, 1, 1), (2, 4, 1), (2, 2, 2))
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return write_world(str(tmp_path_factory.mktemp("world")))


def _config(world, out, folder, mesh=FSDP) -> str:
  data, fsdp, tensor = mesh
  return write_config(
    world,
    out,
    str(folder),
    extra=(
      f"mesh: {{data: {data}, fsdp: {fsdp}, tensor: {tensor}, "
      f"coordination_timeout_seconds: {TIMEOUT}}}\n"
    ),
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(config, *overrides, cwds=(None, None), log_dir):
  """Starts both processes (4 devices each) with the same command, in ``cwds``."""
  port = _free_port()
  procs = []
  for i in range(2):
    with open(os.path.join(log_dir, f"p{i}.log"), "a") as log:
      procs.append(
        subprocess.Popen(
          _cmd(
            config,
            *overrides,
            "mesh.num_processes=2",
            f"mesh.process_id={i}",
            f"mesh.coordinator_address=127.0.0.1:{port}",
          ),
          env=_env(4),
          stdout=log,
          stderr=subprocess.STDOUT,
          cwd=cwds[i],
        )
      )
  return procs


def _log(log_dir, i) -> str:
  with open(os.path.join(log_dir, f"p{i}.log")) as f:
    return f.read()


def _finish(procs, log_dir, timeout=RUN_TIMEOUT):
  deadline = time.time() + timeout
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, p in enumerate(procs):
    assert p.returncode == 0, _log(log_dir, i)[-4000:]


def _npz(path):
  with np.load(path) as f:
    return dict(f)


class _OneProcessRuns:
  """The runs on one process with 8 devices, once per mesh: ``start(mesh)`` launches one in the
  background (to overlap with a two-process run), ``runs(mesh)`` waits for it and returns its
  output directory."""

  def __init__(self, world, tmp_path_factory):
    self.world, self.factory = world, tmp_path_factory
    self.started, self.done = {}, {}

  def start(self, mesh=FSDP) -> None:
    if mesh in self.started or mesh in self.done:
      return
    folder = self.factory.mktemp("one")
    out = str(folder / "run")
    config = _config(self.world, out, folder, mesh)
    log = open(folder / "log", "w")  # noqa: SIM115 (closed in __call__)
    proc = subprocess.Popen(_cmd(config), env=_env(8), stdout=log, stderr=subprocess.STDOUT)
    self.started[mesh] = (proc, out, log, time.perf_counter())

  def __call__(self, mesh=FSDP) -> str:
    if mesh not in self.done:
      self.start(mesh)
      proc, out, log, start = self.started.pop(mesh)
      try:
        proc.wait(timeout=RUN_TIMEOUT)
      finally:
        if proc.poll() is None:
          proc.kill()
        log.close()
      with open(log.name) as f:
        assert proc.returncode == 0, f.read()[-4000:]
      print(f"one process, mesh {mesh}: {time.perf_counter() - start:.1f} s")
      self.done[mesh] = out
    return self.done[mesh]


@pytest.fixture(scope="module")
def one_process_runs(world, tmp_path_factory):
  """`_OneProcessRuns` of the module."""
  return _OneProcessRuns(world, tmp_path_factory)


def _assert_same_run(out, ref):
  for t in (1, 2):
    a, b = (os.path.join(d, f"round_{t}") for d in (out, ref))
    for name in ("generations.npz", "annotation.npz"):
      x, y = _npz(os.path.join(a, name)), _npz(os.path.join(b, name))
      for k in ("tokens", "mask", "prompt_index", "chosen_row", "rejected_row"):
        if k in y:
          np.testing.assert_array_equal(x[k], y[k], err_msg=f"round {t} {name} {k}")
    pairs_a, pairs_b = (load_round(os.path.join(d, "pairs"))[0] for d in (a, b))
    assert pairs_a["chosen"] == pairs_b["chosen"] and pairs_a["rejected"] == pairs_b["rejected"]
    set_a, set_b = (load_round(os.path.join(d, "train_set"))[0] for d in (a, b))
    for k in ("atom_weights", "atom_shifts"):
      np.testing.assert_allclose(np.asarray(set_a[k]), np.asarray(set_b[k]), atol=1e-6)
  la, lb = _losses(out), _losses(ref)
  assert [s for s, _ in la] == [s for s, _ in lb]
  np.testing.assert_allclose([l for _, l in la], [l for _, l in lb], rtol=1e-4)
  pa, pb = _final_params(out), _final_params(ref)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_two_processes_with_refill_sample_what_one_process_samples_without(
  world, one_process_runs, tmp_path
):
  """``sampling.refill_batches=2`` on the shipped configs' mesh split over two processes (each
  holds half the parameters): a round's two prompt batches decode as one refill queue, and
  the run equals the one-process run without refill (samples, pairs, losses, parameters)."""
  ref = one_process_runs(FSDP)
  out = str(tmp_path / "run")
  config = _config(world, out, tmp_path, FSDP)
  _finish(_launch(config, "sampling.refill_batches=2", log_dir=tmp_path), tmp_path)
  with open(os.path.join(out, "metrics.jsonl")) as f:
    gen = [r for r in map(json.loads, f) if r.get("phase") == "generate" and r.get("round") == 1]
  # 32 prompts of one padded length in one call (16 per batch without refill).
  assert "sample 32x" in gen[0]["compile_shapes"], gen[0]["compile_shapes"]
  _assert_same_run(out, ref)


@pytest.mark.parametrize("mesh", MESHES)
def test_two_processes_equal_one_process(world, one_process_runs, tmp_path, mesh):
  ref = one_process_runs(mesh)  # first, alone: the two wall times below compare
  out = str(tmp_path / "run")
  config = _config(world, out, tmp_path, mesh)
  start = time.perf_counter()
  _finish(_launch(config, log_dir=tmp_path), tmp_path)
  print(f"two processes, mesh {mesh}: {time.perf_counter() - start:.1f} s")
  _assert_same_run(out, ref)
  # Throughput accounting: one record and one printed line per phase.
  with open(os.path.join(out, "metrics.jsonl")) as f:
    records = [r for r in map(json.loads, f) if "wall_seconds" in r]
  gen = [r for r in records if r["phase"] == "generate" and r["round"] == 1]
  assert len(gen) == 1 and gen[0]["new_tokens"] > 0 and 0 <= gen[0]["padding_fraction"] < 1
  assert gen[0]["tokens_per_second_per_chip"] > 0
  assert {r["phase"] for r in records} >= {"generate", "annotate", "follower", "evaluate"}
  log0 = _log(tmp_path, 0)
  assert "round 1 generate:" in log0 and "tokens/s/chip" in log0
  assert "round 1 generate:" not in _log(tmp_path, 1)  # only process 0 prints


@pytest.mark.slow
def test_two_processes_with_per_host_output_dirs(world, one_process_runs, tmp_path):
  """The same relative ``output_dir`` from two working directories: a local directory per
  host. Process 0's holds every phase output; process 1 received them by broadcast."""
  ref = one_process_runs()
  hosts = [tmp_path / f"host{i}" for i in range(2)]
  for h in hosts:
    h.mkdir()
  config = _config(world, "run", tmp_path)
  _finish(_launch(config, cwds=hosts, log_dir=tmp_path), tmp_path)
  _assert_same_run(str(hosts[0] / "run"), ref)
  assert not os.path.exists(hosts[1] / "run" / "round_1" / "generations.npz")
  assert "no checkpoints" in _log(tmp_path, 0)


def _has_train_checkpoint(out, round_index):
  ckpt = os.path.join(out, "checkpoints")
  for step in os.listdir(ckpt) if os.path.isdir(ckpt) else []:
    try:
      with open(os.path.join(ckpt, step, "meta", "metadata")) as f:
        meta = json.load(f)
    except (OSError, ValueError):
      continue
    if meta.get("round") == round_index and meta.get("phase") == "train":
      return True
  return False


def _kill_one_when(procs, ready, *, timeout=RUN_TIMEOUT):
  deadline = time.time() + timeout
  while not ready():
    assert time.time() < deadline, "the run never reached the kill point"
    assert all(p.poll() is None for p in procs), "a process exited before the kill point"
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  killed = time.time()
  procs[0].wait(timeout=TIMEOUT + 300)
  return procs[0].returncode, time.time() - killed


@pytest.mark.slow
@pytest.mark.parametrize("point", ["generate", "train"])
def test_killed_process_stops_the_other_and_relaunch_finishes(
  world, one_process_runs, tmp_path, point
):
  one_process_runs.start()  # the reference runs beside the two processes
  out = str(tmp_path / "run")
  config = _config(world, out, tmp_path)
  procs = _launch(config, log_dir=tmp_path)
  if point == "generate":  # round 1 has started, its samples are not saved yet
    ready = lambda: (
      os.path.isdir(os.path.join(out, "round_1"))
      and not os.path.exists(os.path.join(out, "round_1", "generations.npz"))
    )
  else:  # a round-1 training checkpoint exists, the round has not finished
    ready = lambda: _has_train_checkpoint(out, 1)
  code, waited = _kill_one_when(procs, ready)
  assert code != 0 and waited < TIMEOUT + 300, (code, waited)
  assert not os.path.exists(os.path.join(out, "final_policy"))
  _finish(_launch(config, log_dir=tmp_path), tmp_path)
  ref = one_process_runs()
  pa, pb = _final_params(out), _final_params(ref)
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], atol=1e-5, err_msg=k)
