"""Tests for ssapo_jax/rundir.py: atomic phase outputs and the local mirror of a remote run."""

import json
import os

import numpy as np
import pytest
from etils import epath

from ssapo_jax import rundir


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  """Maps gs://bucket/... onto a local directory (same epath API as GCS)."""
  root = tmp_path / "bucket"

  def remote_path(path):
    assert path.startswith("gs://bucket")
    return epath.Path(str(root) + path[len("gs://bucket") :])

  monkeypatch.setattr(rundir, "_remote_path", remote_path)
  return root


def test_atomic_writers_leave_no_temporary_files(tmp_path):
  rundir.atomic_json(str(tmp_path / "a.json"), {"x": 1})
  rundir.atomic_npz(str(tmp_path / "b.npz"), y=np.arange(3))
  assert sorted(os.listdir(tmp_path)) == ["a.json", "b.npz"]
  assert json.load(open(tmp_path / "a.json")) == {"x": 1}
  np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["y"], [0, 1, 2])


def test_local_directories_are_used_as_they_are(tmp_path):
  assert rundir.local_workdir(str(tmp_path)) == str(tmp_path)
  assert not rundir.is_remote(str(tmp_path)) and rundir.is_remote("gs://b/run")
  rundir.push(str(tmp_path), str(tmp_path), "anything")  # no-op for local runs


def test_push_then_pull_mirrors_phase_outputs(tmp_path, fake_bucket):
  out = "gs://bucket/run"
  work = rundir.local_workdir(out)
  assert work != out and not rundir.is_remote(work)
  work = str(tmp_path / "work")  # keep the test inside tmp_path
  os.makedirs(os.path.join(work, "round_1", "pairs"))
  rundir.atomic_json(os.path.join(work, "round_1", "summary.json"), {"round": 1})
  rundir.atomic_npz(os.path.join(work, "round_1", "generations.npz"), tokens=np.ones((2, 3)))
  with open(os.path.join(work, "round_1", "pairs", "card.json"), "w") as f:
    f.write("{}")
  with open(os.path.join(work, "round_1", "x.tmp0"), "w") as f:
    f.write("partial")  # an unfinished write is never copied
  rundir.push(out, work, "round_1")
  copied = sorted(str(p.relative_to(fake_bucket)) for p in fake_bucket.rglob("*") if p.is_file())
  assert copied == [
    "run/round_1/generations.npz",
    "run/round_1/pairs/card.json",
    "run/round_1/summary.json",
  ]
  # Checkpoints and metrics live only remotely and are not mirrored down.
  (fake_bucket / "run" / "checkpoints" / "3").mkdir(parents=True)
  (fake_bucket / "run" / "checkpoints" / "3" / "state").write_text("orbax")
  (fake_bucket / "run" / "metrics.jsonl").write_text("{}\n")
  fresh = str(tmp_path / "fresh")
  rundir.pull(out, fresh)
  pulled = sorted(
    os.path.relpath(os.path.join(d, f), fresh) for d, _, names in os.walk(fresh) for f in names
  )
  assert pulled == ["round_1/generations.npz", "round_1/pairs/card.json", "round_1/summary.json"]
  np.testing.assert_array_equal(
    np.load(os.path.join(fresh, "round_1", "generations.npz"))["tokens"], np.ones((2, 3))
  )


def test_a_remote_run_starts_from_an_empty_mirror(tmp_path, monkeypatch, fake_bucket):
  # A mirror left by an earlier run of the same gs:// path (killed, or the remote directory
  # deleted since) must not be trusted: the cached phases would reuse its samples.
  monkeypatch.setattr(rundir.tempfile, "gettempdir", lambda: str(tmp_path))
  out = "gs://bucket/run"
  work = rundir.local_workdir(out)
  assert work.startswith(str(tmp_path)) and work.endswith("-p0")  # one mirror per process
  os.makedirs(os.path.join(work, "round_1"))
  rundir.atomic_npz(os.path.join(work, "round_1", "generations.npz"), tokens=np.zeros((2, 3)))
  rundir.atomic_json(os.path.join(work, "split_manifest.json"), {"stale": True})
  os.makedirs(os.path.join(work, "jax_cache"))
  for name in ("run.log", "compile_stats-p0.json", os.path.join("jax_cache", "entry")):
    with open(os.path.join(work, name), "w") as f:
      f.write("this machine's own")
  rd = rundir.RunDir.open(out)
  assert rd.workdir == work
  assert sorted(os.listdir(work)) == ["compile_stats-p0.json", "jax_cache", "run.log"]
  assert os.listdir(os.path.join(work, "jax_cache")) == ["entry"]
  # What the remote directory holds comes back with the resume's pull, and only that.
  (fake_bucket / "run" / "round_0").mkdir(parents=True)
  (fake_bucket / "run" / "round_0" / "summary.json").write_text('{"round": 0}')
  rd.pull()
  assert sorted(os.listdir(work)) == [
    "compile_stats-p0.json",
    "jax_cache",
    "round_0",
    "run.log",
  ]


def test_a_local_run_directory_is_never_cleared(tmp_path):
  (tmp_path / "round_0").mkdir()
  (tmp_path / "round_0" / "summary.json").write_text("{}")
  rd = rundir.RunDir.open(str(tmp_path))
  assert rd.workdir == str(tmp_path) and os.listdir(tmp_path / "round_0") == ["summary.json"]
