"""Tests for ssapo_jax/pipeline/hosts.py (single process here; the two-process behaviour is in
test_multihost.py and the worker's ``check_run`` task)."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssapo_jax import compilation, runrecord
from ssapo_jax.pipeline import hosts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cached_npz_computes_once_then_reads(tmp_path):
  path = str(tmp_path / "x.npz")
  calls = []

  def compute():
    calls.append(1)
    return {"a": np.arange(3), "b": np.ones((2, 2), np.float32)}

  save = lambda p, r: np.savez(p, **r)
  first = hosts.cached_npz(path, compute, save=save)
  second = hosts.cached_npz(path, compute, save=save)
  assert len(calls) == 1
  for k in first:
    np.testing.assert_array_equal(first[k], second[k])
    assert first[k].dtype == second[k].dtype


def test_phase_clock_logs_and_prints(capsys):
  class Logger:
    records = []

    def log(self, step, metrics, **context):
      self.records.append((step, dict(metrics), context))

  logger = Logger()
  with runrecord.run_log(None):
    clock = hosts.PhaseClock()
    compilation.start_counting()

    def phase_program(x):
      compilation.record_program("phase_program", x.shape)
      return jnp.cos(x) * 2.5 - 0.75  # a program no other test compiles

    jax.jit(phase_program)(np.ones((5, 6), np.float32))
    metrics = clock.report(
      logger,
      7,
      "generate",
      1,
      chips=8,
      new_tokens=800,
      padding_fraction=0.25,
      pairs=10,
      sequences=40,
    )
  step, logged, context = logger.records[0]
  shapes = "phase_program 5x6"  # what this phase traced; nothing before the clock started
  assert (step, context) == (7, {"round": 1, "phase": "generate", "compile_shapes": shapes})
  assert logged["compile_programs"] >= 1
  assert logged["compile_cache_hits"] + logged["compile_cache_misses"] <= logged["compile_programs"]
  assert logged == metrics
  assert metrics["tokens_per_second_per_chip"] == pytest.approx(800 / metrics["wall_seconds"] / 8)
  assert metrics["pairs_per_second"] == pytest.approx(10 / metrics["wall_seconds"])
  assert metrics["sequences_per_second"] == pytest.approx(40 / metrics["wall_seconds"])
  line = capsys.readouterr().err.strip()
  assert line.startswith("[ssapo] round 1 generate:") and "padding 25.0%" in line
  assert "10 pairs, " in line and "40 sequences scored, " in line
  assert f"compiled {logged['compile_programs']} programs (" in line and line.endswith(shapes)


def test_code_fingerprint_is_stable_hex():
  a, b = hosts.code_fingerprint(), hosts.code_fingerprint()
  assert a == b and len(a) == 64 and int(a, 16) >= 0


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize(
  "texts,expect_error", [(("same", "same"), False), (("a: 1", "a: 2"), True)]
)
def test_process_with_another_config_refuses_to_start(tmp_path, texts, expect_error):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        os.path.join(REPO, "tests", "_multihost_worker.py"),
        "--task",
        "check_run",
        "--config_text",
        texts[i],
        "--process_id",
        str(i),
        "--num_processes",
        "2",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--out",
        str(tmp_path / f"p{i}.json"),
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  for p in procs:
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out.decode(errors="replace")[-3000:]
  errors = [json.loads((tmp_path / f"p{i}.json").read_text())["error"] for i in range(2)]
  if expect_error:
    for e in errors:
      assert "refusing to start: process(es) [1] resolved a different config" in e
  else:
    assert errors == [None, None]
