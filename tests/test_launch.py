"""Tests for the ssapo-train CLI (ssapo_jax/cli.py, launch/train.py) and the launch scripts."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from ssapo_jax import cli
from ssapo_jax.checkpoint import Checkpointer, checkpoint_dir
from ssapo_jax.errors import ConfigError
from ssapo_jax.experiment import load_experiment
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


@pytest.fixture
def fake_rounds(monkeypatch):
  """Stands in for the pipeline's `run` and records how the CLI calls it."""
  calls = []

  def run(config, *, resume, config_change=None, preflight=None):
    calls.append((config, resume, config_change))

  from ssapo_jax.pipeline import run as pipeline

  monkeypatch.setattr(pipeline, "run", run)
  return calls


def _inputs(world):
  return [f"model.path={world / 'model'}", f"data.source={world / 'prefs.jsonl'}"]


def test_config_errors_are_one_line_with_exit_status_2(capsys):
  cases = [
    ([TINY, "dro_typo.x=1"], "unknown config key `dro_typo`"),
    ([TINY, "train.learning_rate=fast"], "bad value for `train.learning_rate`: expected float"),
    ([TINY, "train.beta=0.1", "train.beta=0.2"], "overridden twice"),
    ([TINY, "output_dir=a", "--output-dir", "b"], "`output_dir` is overridden twice"),
    ([TINY, "rounds.num_rounds=5"], "needs one prompt pool per round"),
    (["no/such/file.yaml"], "config file not found: no/such/file.yaml"),
  ]
  for argv, fragment in cases:
    assert cli.main(argv) == ConfigError.exit_code == 2, argv
    first, err = capsys.readouterr().err.split("\n", 1)
    assert first.startswith("ssapo-train: checking the config and inputs")  # before the imports
    assert err.startswith("ssapo-train: error: ") and fragment in err, (argv, err)
    assert "Traceback" not in err and err.count("\n") == 1


def test_unknown_key_message_lists_valid_keys(capsys):
  assert cli.main([TINY, "trian.beta=1"]) == 2
  err = capsys.readouterr().err
  assert "Did you mean `train`?" in err and "Valid keys at the top level: model, output_dir" in err


def _error(capsys) -> str:
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if "error:" in line]
  assert len(errors) == 1 and errors[0].startswith("ssapo-train: error: "), err
  assert "Traceback" not in err and err.endswith(errors[0] + "\n"), err
  return errors[0]


def test_model_and_tokenizer_problems_exit_5(tmp_path, world, fake_rounds, capsys):
  out = f"output_dir={tmp_path / 'run'}"
  data = f"data.source={world / 'prefs.jsonl'}"
  assert cli.main([TINY, "model.path=/definitely/not/here", data, out]) == 5
  assert "model.path='/definitely/not/here' is not a directory" in _error(capsys)
  model = tmp_path / "model"
  shutil.copytree(world / "model", model)
  weights = model / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:1000])  # truncated
  assert cli.main([TINY, f"model.path={model}", data, out]) == 5
  assert "cannot read safetensors file" in _error(capsys)
  weights.unlink()
  assert cli.main([TINY, f"model.path={model}", data, out]) == 5
  assert "no *.safetensors weights" in _error(capsys)
  shutil.copy(world / "model" / "model.safetensors", weights)
  (model / "tokenizer.json").unlink()
  (model / "tokenizer_config.json").unlink()
  assert cli.main([TINY, f"model.path={model}", data, out]) == 5
  assert "no usable tokenizer" in _error(capsys)
  (model / "config.json").unlink()
  assert cli.main([TINY, f"model.path={model}", data, out]) == 5
  assert "no config.json" in _error(capsys)
  assert not fake_rounds and not (tmp_path / "run").exists()  # nothing was written


def test_data_problems_exit_3_before_anything_is_written(tmp_path, world, fake_rounds, capsys):
  out = tmp_path / "run"
  model = f"model.path={world / 'model'}"
  for source in ("data.source", "data.prompt_source", "data.eval_source"):
    sources = {"data.source": world / "prefs.jsonl", source: tmp_path / "missing.jsonl"}
    argv = [TINY, model, f"output_dir={out}", *(f"{k}={v}" for k, v in sources.items())]
    assert cli.main(argv) == 3
    err = _error(capsys)
    assert f"{source}: {tmp_path / 'missing.jsonl'}: no such file or directory" in err
  assert (
    cli.main(
      [
        TINY,
        model,
        f"data.source={world / 'prefs.jsonl'}",
        f"output_dir={out}",
        "data.chosen_column=good",
      ]
    )
    == 3
  )
  err = _error(capsys)
  assert "no column 'good'" in err and "['prompt', 'chosen', 'rejected']" in err
  assert "set data.chosen_column=<column>" in err
  assert (
    cli.main(
      [
        TINY,
        model,
        f"data.source={world / 'prefs.jsonl'}",
        f"output_dir={out}",
        "data.pool_sizes=[150, 150]",
      ]
    )
    == 3
  )
  assert "do not fit the data" in _error(capsys)
  assert not fake_rounds and not out.exists()


def test_debug_adds_the_traceback(tmp_path, world, capsys):
  argv = [
    TINY,
    f"model.path={world / 'model'}",
    f"data.source={tmp_path / 'missing.jsonl'}",
    f"output_dir={tmp_path / 'run'}",
  ]
  assert cli.main(argv) == 3
  assert "Traceback" not in capsys.readouterr().err
  assert cli.main([*argv, "--debug"]) == 3
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err and "DataError" in err
  assert err.rstrip().endswith("missing.jsonl: no such file or directory")


def test_gcs_output_dir_needs_gcsfs(world, capsys):
  try:
    import gcsfs  # noqa: F401

    pytest.skip("gcsfs is installed; the missing-package message cannot be triggered")
  except ImportError:
    pass
  assert cli.main([TINY, *_inputs(world), "output_dir=gs://bucket/run"]) == 4
  assert "needs the gcsfs package" in capsys.readouterr().err


def test_print_config_shows_the_resolved_yaml(capsys):
  assert cli.main([TINY, "train.beta=0.25", "--num-processes", "1", "--print-config"]) == 0
  printed = yaml.safe_load(capsys.readouterr().out)
  assert printed["train"]["beta"] == 0.25 and printed["mesh"]["num_processes"] == 1
  assert printed["output_dir"] == "runs/tiny_cpu"


def test_run_records_config_and_resumes_by_default(tmp_path, world, fake_rounds, capsys):
  out = tmp_path / "run"
  argv = [TINY, *_inputs(world), "--output-dir", str(out), "rounds.num_eval_prompts=4"]
  assert cli.main(argv) == 0
  config, resume, change = fake_rounds[-1]
  assert resume is False and config.output_dir == str(out) and config.rounds.num_eval_prompts == 4
  assert change is None
  assert load_experiment(out / "config.yaml") == config
  assert not (out / "run.lock").exists()  # released when the run ended
  # --resume without a checkpoint is an error.
  assert cli.main([*argv, "--resume"]) == 2
  assert "no checkpoint in" in capsys.readouterr().err
  # Once the run has a checkpoint, resuming is the default; --no-resume starts afresh.
  with Checkpointer(checkpoint_dir(out)) as ckpt:
    ckpt.save(3, {"x": np.zeros(2)}, {"round": 0, "phase": "train", "global_step": 3}, force=True)
  assert cli.main(argv) == 0 and fake_rounds[-1][1] is True
  assert cli.main([*argv, "--no-resume"]) == 0 and fake_rounds[-1][1] is False
  # A changed config is refused with the difference, before anything is written ...
  recorded = (out / "config.yaml").read_text()
  calls = len(fake_rounds)
  assert cli.main([*argv[:-1], "rounds.num_eval_prompts=8"]) == 4
  err = _error(capsys)
  assert "rounds.num_eval_prompts: 4 -> 8" in err and "--allow-config-change" in err
  assert len(fake_rounds) == calls and (out / "config.yaml").read_text() == recorded
  # ... and kept as a new version when allowed.
  assert cli.main([*argv[:-1], "rounds.num_eval_prompts=8", "--allow-config-change"]) == 0
  assert fake_rounds[-1][0].rounds.num_eval_prompts == 8
  assert fake_rounds[-1][2] == {
    "config_version": 1,
    "config_file": "config.1.yaml",
    "changed": "rounds.num_eval_prompts: 4 -> 8",
  }
  assert (out / "config.yaml").read_text() == recorded
  assert load_experiment(out / "config.1.yaml") == fake_rounds[-1][0]
  assert "recorded as config.1.yaml" in capsys.readouterr().err


def test_locked_output_dir_exits_4(tmp_path, world, fake_rounds, capsys):
  from ssapo_jax.runlock import RunLock

  out = tmp_path / "run"
  with RunLock(str(out)):
    assert cli.main([TINY, *_inputs(world), f"output_dir={out}"]) == 4
    err = _error(capsys)
    assert f"pid {os.getpid()}" in err or "locked by another run" in err
  assert not fake_rounds


def test_check_prints_the_plan_and_writes_nothing(tmp_path, world, fake_rounds, capsys):
  out = tmp_path / "run"
  assert cli.main([TINY, *_inputs(world), f"output_dir={out}", "--check"]) == 0
  printed = capsys.readouterr().out
  # tiny_cpu.yaml: seed 64 pairs, pools [64, 64], batch 8, seed_epochs 3, round_epochs 1,
  # 4 samples, max_length 128; 200 rows leave 8 for evaluation (num_eval_prompts 16).
  assert "data.source" in printed and "200 rows, 200 kept, skipped 0 (none)" in printed
  assert "mesh: 8 devices as data=1 fsdp=8 tensor=1" in printed
  assert "at most 2048 tokens per step" in printed
  assert "round 0: 64 labelled pairs, 3 epoch(s), 24 steps" in printed
  assert "round 1: 64 prompts x 4 samples, at most 64 pairs, 1 epoch(s), at most 8 steps" in printed
  assert (
    "total: at most 40 optimizer steps, so at most global step 43 (the 3 round-end "
    "checkpoints take one global step each); 8 eval prompts per round"
  ) in printed
  assert "--check: OK (would start a new run)" in printed
  assert not fake_rounds and not out.exists()
  assert cli.main([TINY, *_inputs(world), f"output_dir={out}", "--check", "mesh.tensor=3"]) == 2
  assert "mesh:" in _error(capsys)


def test_launch_train_py_subprocess_gives_clean_error(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, str(REPO / "launch" / "train.py"), TINY, "dro_typo=1"],
    capture_output=True,
    text=True,
    env=env,
    cwd=tmp_path,
    timeout=120,
  )
  assert result.returncode == 2, result.stderr
  assert "unknown config key `dro_typo`" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------
# Shell launchers, dry-run.
# --------------------------------------------------------------------------------------------


def _dry_run(script: str, *args: str, comments: list | None = None) -> list[list[str]]:
  """The commands a dry run prints, split into words; its comment lines go to ``comments``."""
  result = subprocess.run(
    ["bash", str(REPO / "launch" / script), "--dry-run", *args],
    capture_output=True,
    text=True,
    timeout=120,
    check=True,
  )
  lines = [line for line in result.stdout.splitlines() if line.strip()]
  if comments is not None:
    comments.extend(line for line in lines if line.startswith("#"))
  return [shlex.split(line) for line in lines if not line.startswith("#")]


def test_gpu_node_dry_run_and_flags_are_valid_xla_flags():
  [cmd] = _dry_run("gpu_node.sh", "--gpus", "0,1", TINY, "train.beta=0.2", "system=a b", "--resume")
  assert cmd[0] == "env"
  python = cmd.index("-m") - 1
  env = dict(word.split("=", 1) for word in cmd[1:python])
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"]
  assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["PYTHONPATH"].startswith(str(REPO))
  tail = cmd[cmd.index("-m") :]
  assert tail == ["-m", "ssapo_jax.cli", TINY, "train.beta=0.2", "system=a b", "--resume"]
  # XLA rejects unknown flags at start-up; the CPU client parses the GPU debug options too.
  check = subprocess.run(
    [sys.executable, "-c", "import jax; jax.numpy.ones(2).block_until_ready()"],
    env=dict(os.environ, XLA_FLAGS=env["XLA_FLAGS"], JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert check.returncode == 0, check.stderr[-2000:]


def test_gpu_node_without_config_prints_usage():
  result = subprocess.run(
    ["bash", str(REPO / "launch" / "gpu_node.sh")], capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 2 and "Usage: launch/gpu_node.sh" in result.stderr


TPU_ARGS = [
  "--name",
  "ssapo-v4",
  "--zone",
  "us-central2-b",
  "--accelerator-type",
  "v4-32",
  "--project",
  "my-proj",
  "--output-dir",
  "gs://bucket/runs/zephyr",
]


def test_tpu_pod_dry_run_commands():
  lines = _dry_run(
    "tpu_pod.sh",
    *TPU_ARGS,
    "--spot",
    "--stage",
    "gs://bucket/models/zephyr=/tmp/zephyr",
    TINY,
    "model.path=/tmp/zephyr",
    "dro.epsilon=0.05",
  )
  describe, create = (lines[0][: lines[0].index("||")], lines[0][lines[0].index("||") + 1 :])
  where = ["--zone=us-central2-b", "--project=my-proj"]
  assert describe == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "describe",
    "ssapo-v4",
    *where,
    ">/dev/null",
    "2>&1",
  ]
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ssapo-v4"]
  assert {"--accelerator-type=v4-32", "--spot", *where} <= set(create)
  ssh = [l for l in lines if l[4:5] == ["ssh"]]
  assert all("--worker=all" in l and set(where) <= set(l) for l in ssh)
  remote = [next(w for w in l if w.startswith("--command="))[len("--command=") :] for l in ssh]
  install, stage, train = remote
  assert "pip install" in install and "[tpu]" in install and "gcsfs" in install
  assert "gcloud storage cp -r gs://bucket/models/zephyr/* /tmp/zephyr/" in stage
  train_words = shlex.split(train.replace("$HOME", "HOME"))
  assert train_words[:2] == ["cd", "HOME/ssapo_jax_src"]
  run = train_words[train_words.index("&&") + 1 :]
  assert run == [
    "HOME/ssapo_venv/bin/python",
    "-m",
    "ssapo_jax.cli",
    "configs/tiny_cpu.yaml",
    "model.path=/tmp/zephyr",
    "dro.epsilon=0.05",
    "--output-dir=gs://bucket/runs/zephyr",
  ]
  scp = [l for l in lines if l[4:5] == ["scp"]]
  assert scp and all("--worker=all" in l for l in scp)


@pytest.mark.parametrize(
  "config, accelerator, line",
  [
    (
      "configs/zephyr_7b_ultrafeedback.yaml",
      "v4-32",
      (
        "# mesh on v4-32 (16 devices, 4 hosts x 4): data=1 fsdp=16 tensor=1; parameters and "
        "optimizer state in 16 shards across hosts, batches in 16 shards across hosts"
      ),
    ),
    (
      "configs/llama3_8b_instruct_ultrafeedback.yaml",
      "v5p-64",
      (
        "# mesh on v5p-64 (32 devices, 8 hosts x 4): data=1 fsdp=32 tensor=1; parameters and "
        "optimizer state in 32 shards across hosts, batches in 32 shards across hosts"
      ),
    ),
  ],
)
def test_tpu_pod_dry_run_shows_the_shipped_configs_mesh(config, accelerator, line):
  """The paper configs' ``fsdp: -1`` on a pod: every parameter split over all chips, across the
  hosts (what tests/pipeline/test_multihost.py runs as the (1, 8, 1) mesh on 2 processes)."""
  args = [*TPU_ARGS, config]
  args[args.index("--accelerator-type") + 1] = accelerator
  comments = []
  _dry_run("tpu_pod.sh", *args, comments=comments)
  assert comments == [line]
  # An explicit mesh that does not fit the slice stops before anything runs.
  result = subprocess.run(
    ["bash", str(REPO / "launch" / "tpu_pod.sh"), "--dry-run", *args, "mesh.fsdp=8", "mesh.data=1"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2 and not result.stdout
  assert "make data*fsdp*tensor =" in result.stderr


def test_tpu_slice_devices_and_hosts():
  from ssapo_jax.pipeline.hosts import tpu_slice

  assert tpu_slice("v3-32") == (32, 4)  # cores are devices, 8 per host
  assert tpu_slice("v4-8") == (4, 1) and tpu_slice("v5p-128") == (64, 16)  # one device per chip
  assert tpu_slice("v5litepod-8") == (8, 1) and tpu_slice("v6e-64") == (64, 16)
  with pytest.raises(ValueError, match="expected e.g. v4-32"):
    tpu_slice("tpu7x-32")


def test_tpu_pod_skip_install_detach_and_argument_errors():
  lines = _dry_run("tpu_pod.sh", *TPU_ARGS, "--skip-install", "--detach", TINY)
  assert not any(l[4:5] == ["scp"] for l in lines)
  train = lines[-1][-1]
  assert "nohup" in train and train.endswith("> $HOME/ssapo_train.log 2>&1 &")
  for args, message in [
    (TPU_ARGS[:-2] + ["--output-dir", "/local/dir", TINY], "must be a gs:// path"),
    (TPU_ARGS[2:] + [TINY], "--name is required"),
    (TPU_ARGS, "missing CONFIG"),
    (TPU_ARGS + ["--stage", "gs://b/x=relative", TINY], "--stage expects"),
  ]:
    result = subprocess.run(
      ["bash", str(REPO / "launch" / "tpu_pod.sh"), "--dry-run", *args],
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
