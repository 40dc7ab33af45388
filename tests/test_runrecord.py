"""Tests for ssapo_jax/runrecord.py: config versions that are never overwritten, and run.log."""

from __future__ import annotations

import os

import pytest
import yaml

from ssapo_jax.errors import RunDirError
from ssapo_jax.runrecord import (
  ConfigChangedError,
  check_config,
  config_changes,
  config_versions,
  message,
  progress,
  run_log,
  write_config,
)

CONFIG = {
  "output_dir": "runs/x",
  "train": {"beta": 0.1, "epochs": 1},
  "data": {"pool_sizes": [4, 4]},
}


def _record(out, resolved, *, allow_change=False):
  version = check_config(resolved, str(out), allow_change=allow_change)
  write_config(version, yaml.safe_dump(resolved))
  return version


def test_changes_are_listed_per_leaf():
  new = {**CONFIG, "train": {"beta": 0.2, "epochs": 1}, "data": {"pool_sizes": [4, 8]}, "seed": 3}
  assert config_changes(CONFIG, new) == [
    "train.beta: 0.1 -> 0.2",
    "data.pool_sizes: [4, 4] -> [4, 8]",
    "seed: null -> 3",
  ]
  assert config_changes(CONFIG, CONFIG) == []


def test_versions_are_never_overwritten(tmp_path):
  out = tmp_path / "run"
  first = _record(out, CONFIG)
  assert (first.version, os.path.basename(first.path), first.written) == (0, "config.yaml", False)
  same = _record(out, CONFIG)
  assert (same.version, same.written, same.changes) == (0, True, ())
  changed = {**CONFIG, "train": {"beta": 0.2, "epochs": 1}}
  with pytest.raises(ConfigChangedError) as e:
    _record(out, changed)
  text = str(e.value)
  assert "\n" not in text and "train.beta: 0.1 -> 0.2" in text and "--allow-config-change" in text
  assert e.value.exit_code == 4
  second = _record(out, changed, allow_change=True)
  assert (second.version, os.path.basename(second.path)) == (1, "config.1.yaml")
  assert second.changes == ("train.beta: 0.1 -> 0.2",)
  third = _record(out, CONFIG, allow_change=True)  # compared with the latest version
  assert os.path.basename(third.path) == "config.2.yaml"
  assert [os.path.basename(p) for _, p in config_versions(str(out))] == [
    "config.yaml",
    "config.1.yaml",
    "config.2.yaml",
  ]
  assert yaml.safe_load(open(out / "config.yaml")) == CONFIG  # the original record is intact
  assert yaml.safe_load(open(out / "config.1.yaml")) == changed
  with pytest.raises(RunDirError, match="never overwritten"):
    write_config(second, "x: 1\n")


def test_moved_or_relaunched_run_is_the_same_run(tmp_path):
  """The output directory and the processes' addresses place a run; they are not a change."""
  out = tmp_path / "run"
  placed = {**CONFIG, "mesh": {"process_id": 0, "coordinator_address": "10.0.0.1:1234", "fsdp": 8}}
  _record(out, placed)
  moved = {
    **placed,
    "output_dir": "elsewhere",
    "mesh": {"process_id": 1, "coordinator_address": "10.0.0.2:999", "fsdp": 8},
  }
  assert _record(out, moved).changes == ()
  with pytest.raises(ConfigChangedError, match="mesh.fsdp: 8 -> 4"):
    _record(out, {**moved, "mesh": {**moved["mesh"], "fsdp": 4}})


def test_run_log_keeps_messages_and_final_progress_states(tmp_path, capsys):
  with run_log(str(tmp_path)):
    message("resuming from checkpoint step 7 (round 1, phase train)")
    for _ in progress(range(5), desc="round 1: train", disable=False):
      pass
    bar = progress(total=3, desc="score", disable=False)
    bar.update(2)
    bar.close()
  message("after the run: nowhere")
  lines = open(tmp_path / "run.log").read().splitlines()
  assert len(lines) == 3
  assert lines[0].endswith("resuming from checkpoint step 7 (round 1, phase train)")
  assert "round 1: train: 100%" in lines[1] and "5/5" in lines[1]
  assert "score:" in lines[2] and "2/3" in lines[2]
  err = capsys.readouterr().err
  assert "[ssapo] resuming from checkpoint step 7" in err and "nowhere" not in err
  assert "5/5" in err  # the bar stays on screen (leave=True)


def test_run_log_disabled_on_other_processes(tmp_path, capsys):
  with run_log(str(tmp_path / "p1"), enabled=False):
    message("hidden")
  assert not os.path.exists(tmp_path / "p1" / "run.log") and "hidden" not in capsys.readouterr().err


def test_position_names_the_open_bar_else_the_phase_after_the_latest_message(tmp_path):
  """What `ssapo-train` says after "interrupted at" (Ctrl-C)."""
  from ssapo_jax import runrecord

  with runrecord.run_log(str(tmp_path)):
    runrecord.message("round 1 follower: 1.0 s, 64 pairs")
    assert runrecord.position() == 'the phase after "round 1 follower: 1.0 s, 64 pairs"'
    bar = runrecord.progress(total=8, desc="round 1: train")
    bar.update(3)
    assert runrecord.position() == "round 1: train 3/8"
    bar.close()
    assert runrecord.position().startswith("the phase after")
    hidden = runrecord.progress(total=4, desc="round 2: train", disable=True)  # TQDM_DISABLE
    hidden.update(1)
    assert runrecord.position() == "round 2: train 1/4"
    hidden.close()
