"""Bad inputs a newcomer meets, one table: each row is a command, the exit status it
must give, the words its message must hold (and must not), and whether the error is found
before the run starts, in which case nothing may have been written.

The commands run in-process (`ssapo_jax.cli.main`, `ssapo_jax.plan.main`) on a tiny model and
data (`ssapo_jax.testing`); the training pipeline is replaced by a stand-in, so a row that gets
past the pre-run checks shows what the command line does around a run (the lock, config
history, run.log, Ctrl-C) without training. Real runs are in tests/pipeline/test_run.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest

from ssapo_jax import cli, runrecord
from ssapo_jax.runlock import LOCK_FILENAME, read_owner
from ssapo_jax.testing import write_tiny_model, write_tiny_preferences

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A tiny model (HF format, tokenizer) and 200 preference rows: inputs that pass the checks."""
  root = tmp_path_factory.mktemp("world")
  write_tiny_model(str(root / "model"))
  write_tiny_preferences(str(root / "prefs.jsonl"), 200)
  return root


@dataclasses.dataclass
class Env:
  """What a row's command sees: the shared world, its own scratch directory and output_dir."""

  world: pathlib.Path
  tmp: pathlib.Path

  @property
  def out(self) -> pathlib.Path:
    return self.tmp / "run"

  def inputs(self, *changes: str) -> list[str]:
    """The good inputs, with ``key=value`` changes in place of the same key's."""
    args = {
      "model.path": self.world / "model",
      "data.source": self.world / "prefs.jsonl",
      "output_dir": self.out,
    }
    args.update(change.split("=", 1) for change in changes)
    return [f"{key}={value}" for key, value in args.items()]

  def model_with(self, **config) -> str:
    """A copy of the tiny model whose config.json has ``config`` changed (weights as before)."""
    model = self.tmp / "model"
    shutil.copytree(self.world / "model", model)
    data = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**data, **config}))
    return f"model.path={model}"


def _lock(env: Env, **owner) -> None:
  os.makedirs(env.out, exist_ok=True)
  (env.out / LOCK_FILENAME).write_text(
    json.dumps({"host": socket.gethostname(), "acquired": 0.0, **owner})
  )


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _finished_run(env: Env) -> None:
  """A run directory whose config.yaml is tiny_cpu's and whose newest checkpoint says the last
  round (2) is done, as `pipeline.run` leaves it."""
  import jax.numpy as jnp

  from ssapo_jax import config as cfg_lib
  from ssapo_jax.checkpoint import CheckpointConfig, Checkpointer, checkpoint_dir
  from ssapo_jax.experiment import load_experiment

  config = load_experiment(TINY, env.inputs())
  version = runrecord.check_config(cfg_lib.to_dict(config), str(env.out), allow_change=False)
  runrecord.write_config(version, cfg_lib.dump_yaml(config))
  with Checkpointer(checkpoint_dir(str(env.out)), config=CheckpointConfig(async_save=False)) as c:
    c.save(
      43, {"x": jnp.zeros(2)}, {"round": 2, "phase": "round_done", "global_step": 43}, force=True
    )


def _jsonl(env: Env, rows: list) -> str:
  path = env.tmp / "data.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return f"data.source={path}"


def _row(i: int) -> dict:
  return {"prompt": f"w{i % 40} w{i // 40}", "chosen": "w1 w2", "rejected": "w3"}


# What the stand-in pipeline does in a row that gets past the checks.
def _interrupt(config, **_):
  bar = runrecord.progress(total=8, desc="round 1: train")
  bar.update(3)
  raise KeyboardInterrupt


def _non_finite(config, **_):
  from ssapo_jax.errors import NonFiniteError

  raise NonFiniteError("round 1: non-finite loss for 3 consecutive steps at step 12")


def _completes(config, **_):
  runrecord.message("run complete (stand-in)")


@dataclasses.dataclass
class Case:
  name: str
  argv: Callable[[Env], list[str]]  # the command's arguments
  exit: int
  words: tuple[str, ...]  # each must be in the output (stderr and stdout)
  absent: tuple[str, ...] = ()  # none may be
  pre_run: bool = True  # found before the run starts: nothing written
  setup: Callable[[Env], None] | None = None
  run: Callable | None = None  # the stand-in pipeline; None = must not be reached
  log: tuple[str, ...] = ()  # each must be in <output_dir>/run.log
  prog: str = "ssapo-train"
  after: Callable[[Env], None] | None = None  # further checks


def _lock_kept(env: Env) -> None:
  assert read_owner(str(env.out)).pid in (123, os.getppid())


def _lock_taken_and_released(env: Env) -> None:
  assert not (env.out / LOCK_FILENAME).exists()


def _nothing_recorded_then_original_config_runs(env: Env) -> None:
  assert sorted(p.name for p in env.out.glob("config*.yaml")) == ["config.yaml"]
  assert not (env.out / "metrics.jsonl").exists()
  # The config that trained the policy is still the run's config: it is not refused.
  assert cli.main([TINY, *env.inputs(), "--check"]) == 0


CASES = [
  # -- config: too few distinct samples, checkpoint retention (exit 2) ------------------------
  Case(
    "num_samples_1",
    lambda e: [TINY, *e.inputs(), "sampling.num_samples=1"],
    2,
    ("sampling.num_samples=1", "at least 2 samples per prompt"),
  ),
  Case(
    "greedy_sampling",
    lambda e: [TINY, *e.inputs(), "sampling.temperature=0"],
    2,
    ("sampling.temperature=0 is greedy", "identical"),
  ),
  Case(
    "plan_num_samples_1",
    lambda e: [TINY, "sampling.num_samples=1", "--topology", "v4-8"],
    2,
    ("sampling.num_samples=1",),
    prog="ssapo-plan",
  ),
  Case(
    "keep_1",
    lambda e: [TINY, *e.inputs(), "checkpoint.keep=1"],
    2,
    ("checkpoint.keep must be >= 2",),
  ),
  # -- data (exit 3) ----------------------------------------------------------------------------
  Case(
    "empty_data_dir",
    lambda e: [TINY, *e.inputs(f"data.source={e.tmp / 'empty'}")],
    3,
    ("data.source", "empty directory (no data files)"),
    absent=("Traceback",),
    setup=lambda e: (e.tmp / "empty").mkdir(),
  ),
  Case(
    "empty_data_file",
    lambda e: [TINY, *e.inputs(f"data.source={e.tmp / 'e.jsonl'}")],
    3,
    ("data.source", "empty file"),
    setup=lambda e: (e.tmp / "e.jsonl").write_text(""),
  ),
  Case(
    "unreadable_data_dir",
    lambda e: [TINY, *e.inputs(f"data.source={e.tmp / 'odd'}")],
    3,
    ("data.source", "not a dataset directory"),
    setup=lambda e: ((e.tmp / "odd").mkdir(), (e.tmp / "odd" / "x.bin").write_bytes(b"\0")),
  ),
  Case(
    "data_source_not_a_path_nor_a_name",  # refused by the hub client before any network
    lambda e: [TINY, *e.inputs("data.source=no such dataset")],
    3,
    ("data.source", "could not load it as a dataset name"),
    absent=("Traceback",),
  ),
  Case(
    "bad_row_is_0_based",
    lambda e: [TINY, *e.inputs(_jsonl(e, [_row(0), _row(1), {"prompt": "w1"}]))],
    3,
    ("row 2 (0-based)", "'chosen'", "missing_field"),
  ),
  # -- model (exit 5): config.json against the weights' shapes, without loading -----------------
  Case(
    "config_json_layers",
    lambda e: [TINY, *e.inputs(e.model_with(num_hidden_layers=3))],
    5,
    ("do not match config.json", "num_hidden_layers=3", "model.layers.2"),
  ),
  Case(
    "config_json_width",
    lambda e: [TINY, *e.inputs(e.model_with(intermediate_size=96))],
    5,
    ("tensor shapes do not match config.json", "expected (96, 32), found (64, 32)"),
  ),
  # -- output directory and lock (exit 4) -----------------------------------------------------
  Case(
    "output_dir_is_a_file",
    lambda e: [TINY, *e.inputs(f"output_dir={e.tmp / 'f'}")],
    4,
    ("is a file, not a directory",),
    absent=("not writable",),
    setup=lambda e: (e.tmp / "f").write_text("x"),
  ),
  Case(
    "output_dir_below_a_file",
    lambda e: [TINY, *e.inputs(f"output_dir={e.tmp / 'f' / 'run'}")],
    4,
    ("cannot be created", "is a file"),
    setup=lambda e: (e.tmp / "f").write_text("x"),
  ),
  Case(
    "foreign_lock",
    lambda e: [TINY, *e.inputs()],
    4,
    ("pid 123 on host another-host", "rerun with --force-unlock"),
    setup=lambda e: _lock(e, pid=123, host="another-host"),
    after=_lock_kept,
  ),
  Case(
    "foreign_lock_force_check",
    lambda e: [TINY, *e.inputs(), "--force-unlock", "--check"],
    0,
    (
      ("would start by --force-unlock: taking over the lock of pid 123 on host another-host"),
      "--check: OK",
    ),
    setup=lambda e: _lock(e, pid=123, host="another-host"),
    after=_lock_kept,
  ),
  Case(
    "foreign_lock_force_run",
    lambda e: [TINY, *e.inputs(), "--force-unlock"],
    0,
    ("--force-unlock: taking over the lock of pid 123 on host another-host",),
    setup=lambda e: _lock(e, pid=123, host="another-host"),
    pre_run=False,
    run=_completes,
    log=("--force-unlock: taking over the lock of pid 123",),
    after=_lock_taken_and_released,
  ),
  Case(
    "live_lock_here",
    lambda e: [TINY, *e.inputs()],
    4,
    (f"pid {os.getppid()} on host", "still running on this host", f"kill {os.getppid()}"),
    absent=("--force-unlock",),
    setup=lambda e: _lock(e, pid=os.getppid()),
    after=_lock_kept,
  ),
  Case(
    "live_lock_here_forced",
    lambda e: [TINY, *e.inputs(), "--force-unlock"],
    4,
    ("still running on this host, so --force-unlock does not take its lock",),
    absent=("rerun with --force-unlock",),
    setup=lambda e: _lock(e, pid=os.getppid()),
    after=_lock_kept,
  ),
  Case(
    "live_lock_here_forced_check",
    lambda e: [TINY, *e.inputs(), "--force-unlock", "--check"],
    4,
    ("does not take its lock",),
    setup=lambda e: _lock(e, pid=os.getppid()),
    after=_lock_kept,
  ),
  Case(
    "stale_lock_check",
    lambda e: [TINY, *e.inputs(), "--check"],
    0,
    ("would start by taking over the stale lock of pid", "no longer running"),
    setup=lambda e: _lock(e, pid=_dead_pid()),
  ),
  # -- config history ---------------------------------------------------------------------------
  Case(
    "config_change_on_finished_run",
    lambda e: [TINY, *e.inputs(), "rounds.num_eval_prompts=4", "--allow-config-change"],
    0,
    ("run already complete, nothing ran", "rounds.num_eval_prompts: 16 -> 4", "was not recorded"),
    absent=("recorded as config.1.yaml",),
    setup=_finished_run,
    after=_nothing_recorded_then_original_config_runs,
  ),
  # -- data hygiene and --check's numbers ----------------------------------------------------
  Case(
    "duplicate_prompts_check",
    lambda e: [TINY, *e.inputs(_jsonl(e, [_row(i % 200) for i in range(250)])), "--check"],
    0,
    (
      "250 rows, 200 kept, skipped 50 (duplicate_prompt=50)",
      "at most global step 43 (the 3 round-end checkpoints",
    ),
  ),
  Case(
    "prompt_source_overlaps_seed",  # prompt_source = the pairs' own prompts: the seed's go
    lambda e: [TINY, *e.inputs(), f"data.prompt_source={e.world / 'prefs.jsonl'}", "--check"],
    0,
    (
      "data.prompt_source: 64 more left out: their prompt is in the labelled seed",
      "round 1: 64 prompts",
    ),
  ),
  Case(
    "datasets_bars_hidden",
    lambda e: [TINY, *e.inputs(_jsonl(e, [_row(i) for i in range(200)])), "--check"],
    0,
    ("ssapo-train: checking the config and inputs",),
    absent=("Generating train split",),
  ),
  Case(
    "datasets_bars_verbose",  # the row above could not fail if the bars never showed
    lambda e: [TINY, *e.inputs(_jsonl(e, [_row(i) for i in range(200)])), "--check", "--verbose"],
    0,
    ("Generating train split",),
  ),
  # -- what ends a run: Ctrl-C, an error ------------------------------------------------------
  Case(
    "ctrl_c",
    lambda e: [TINY, *e.inputs()],
    130,
    ("[ssapo] interrupted at round 1: train 3/8; rerun the same command to resume",),
    absent=("Traceback", "KeyboardInterrupt"),
    pre_run=False,
    run=_interrupt,
    log=("interrupted at round 1: train 3/8; rerun the same command to resume",),
    after=_lock_taken_and_released,
  ),
  Case(
    "error_in_run",
    lambda e: [TINY, *e.inputs()],
    6,
    ("ssapo-train: error: round 1: non-finite loss",),
    absent=("Traceback",),
    pre_run=False,
    run=_non_finite,
    log=("error: round 1: non-finite loss for 3 consecutive steps at step 12",),
    after=_lock_taken_and_released,
  ),
]


def _snapshot(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, world, tmp_path, monkeypatch, capsys):
  import datasets

  from ssapo_jax import plan
  from ssapo_jax.pipeline import run as pipeline

  def unreachable(config, **_):
    raise AssertionError(f"{case.name}: the run started")

  monkeypatch.setattr(pipeline, "run", case.run or unreachable)
  # Bars on, as for a user (another test module may have turned them off for the session).
  datasets.enable_progress_bars()
  env = Env(world, tmp_path)
  if case.setup is not None:
    case.setup(env)
  argv = case.argv(env)  # may write the row's inputs
  before = _snapshot(tmp_path)
  try:
    main = cli.main if case.prog == "ssapo-train" else plan.main
    status = main(argv)
  finally:
    datasets.disable_progress_bars()
  captured = capsys.readouterr()
  output = captured.err + captured.out
  assert status == case.exit, output
  for words in case.words:
    assert words in output, (words, output)
  for words in case.absent:
    assert words not in output, (words, output)
  if case.prog == "ssapo-train" and case.exit not in (0, 130):
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("ssapo-train: error: "), captured.err
  if case.pre_run:
    assert _snapshot(tmp_path) == before, "files were written before the run started"
  if case.log:
    log = (env.out / "run.log").read_text()
    for words in case.log:
      assert words in log, (words, log)
  if case.after is not None:
    case.after(env)


def test_the_run_keeps_each_prompt_in_one_of_seed_pools_and_held_out(world, tmp_path):
  """`prepare_data` with a prompt source and an eval source that overlap the pairs."""
  from ssapo_jax.data import prompt_key
  from ssapo_jax.experiment import load_experiment
  from ssapo_jax.pipeline.runtime import prepare_data

  env = Env(world, tmp_path)
  rows = [json.loads(line) for line in (world / "prefs.jsonl").read_text().splitlines()]
  evals = tmp_path / "evals.jsonl"  # 16 prompts of the pairs, as a held-out set
  evals.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[::12]))
  config = load_experiment(
    TINY,
    env.inputs(
      f"data.prompt_source={world / 'prefs.jsonl'}",
      f"data.eval_source={evals}",
      "data.pool_sizes=[48, 48]",
    ),
  )
  data = prepare_data(config, str(tmp_path), sft=None, tokenizer=None, mesh=None)
  parts = [data.seed_pairs, *data.pools, data.eval_prompts]
  keys = [{prompt_key(r.prompt) for r in part} for part in parts]
  assert [len(k) for k in keys] == [64, 48, 48, 16]  # 200 - 64 - 16 = 120 prompts for pools
  for i in range(len(keys)):
    for j in range(i + 1, len(keys)):
      assert not keys[i] & keys[j], (i, j)
