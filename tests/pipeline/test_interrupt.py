"""Ctrl-C during a real `ssapo-train` run: one line, in run.log too, and a rerun
resumes. tests/test_bad_inputs.py covers the same handling in-process, in the default suite."""

import os
import signal
import subprocess
import time

import pytest
from pipeline_runs import command, env, write_config, write_world


@pytest.mark.slow  # a tiny run interrupted, then resumed to its end: about 2 minutes
def test_ctrl_c_ends_with_one_line_and_the_rerun_resumes(tmp_path):
  world = write_world(str(tmp_path / "world"))
  out = str(tmp_path / "run")
  config = write_config(world, out, str(tmp_path))
  proc = subprocess.Popen(
    command(config),
    env=env(8),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    # As from an interactive shell: a suite started in the background (`pytest &`) hands its
    # children SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  checkpoints = os.path.join(out, "checkpoints")
  deadline = time.time() + 600
  # Interrupt inside round 1's training, after its first checkpoint (save_every_steps 2).
  while time.time() < deadline and proc.poll() is None:
    if (
      os.path.isdir(os.path.join(out, "round_1", "train_set"))
      and len([s for s in os.listdir(checkpoints) if s.isdigit()]) >= 2
    ):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before the interrupt point"
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if "interrupted at" in line]
  # Where: the open bar (round 1 training, counted even with TQDM_DISABLE), or the phase after
  # round 1's latest summary line when the signal came between phases.
  assert len(lines) == 1 and lines[0].startswith("[ssapo] interrupted at "), stderr[-3000:]
  assert "round 1" in lines[0], lines[0]
  assert lines[0].endswith("; rerun the same command to resume")
  with open(os.path.join(out, "run.log")) as f:
    assert lines[0].removeprefix("[ssapo] ") in f.read()
  assert not os.path.exists(os.path.join(out, "run.lock"))
  rerun = subprocess.run(
    command(config), env=env(8), capture_output=True, text=True, timeout=1200, check=False
  )
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resuming" in rerun.stderr and "run complete" in rerun.stderr
