"""Tests for the ssapo-train CLI (ssapo_jax/cli.py, launch/train.py) and the launch scripts."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest
import yaml

from ssapo_jax import cli
from ssapo_jax.checkpoint import Checkpointer, checkpoint_dir
from ssapo_jax.experiment import load_experiment

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


@pytest.fixture
def model_dir(tmp_path):
  path = tmp_path / "model"
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  return path


@pytest.fixture
def fake_rounds(monkeypatch):
  """Stands in for the pipeline's `run` and records how the CLI calls it."""
  calls = []
  from ssapo_jax.pipeline import run as pipeline
  monkeypatch.setattr(pipeline, "run", lambda config, *, resume: calls.append((config, resume)))
  return calls


def test_config_errors_are_one_line_with_exit_status_2(capsys):
  cases = [
      ([TINY, "dro_typo.x=1"], "unknown config key `dro_typo`"),
      ([TINY, "train.learning_rate=fast"], "bad value for `train.learning_rate`: expected float"),
      ([TINY, "train.beta=0.1", "train.beta=0.2"], "overridden twice"),
      ([TINY, "output_dir=a", "--output-dir", "b"], "`output_dir` is overridden twice"),
      ([TINY, "rounds.num_rounds=5"], "needs one prompt pool per round"),
      (["no/such/file.yaml"], "config file not found: no/such/file.yaml"),
      ([TINY, "model.path=/definitely/not/here"], "model.path='/definitely/not/here' is not a directory"),
  ]
  for argv, fragment in cases:
    assert cli.main(argv) == cli.EXIT_CONFIG_ERROR, argv
    err = capsys.readouterr().err
    assert err.startswith("ssapo-train: error: ") and fragment in err, (argv, err)
    assert "Traceback" not in err


def test_unknown_key_message_lists_valid_keys(capsys):
  assert cli.main([TINY, "trian.beta=1"]) == 2
  err = capsys.readouterr().err
  assert "Did you mean `train`?" in err and "Valid keys at the top level: model, output_dir" in err


def test_model_dir_without_config_json(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert cli.main([TINY, f"model.path={tmp_path / 'empty'}"]) == 2
  assert "has no config.json" in capsys.readouterr().err


def test_gcs_output_dir_needs_gcsfs(model_dir, capsys):
  try:
    import gcsfs  # noqa: F401
    pytest.skip("gcsfs is installed; the missing-package message cannot be triggered")
  except ImportError:
    pass
  assert cli.main([TINY, f"model.path={model_dir}", "output_dir=gs://bucket/run"]) == 2
  assert "needs the gcsfs package" in capsys.readouterr().err


def test_print_config_shows_the_resolved_yaml(capsys):
  assert cli.main([TINY, "train.beta=0.25", "--num-processes", "1", "--print-config"]) == 0
  printed = yaml.safe_load(capsys.readouterr().out)
  assert printed["train"]["beta"] == 0.25 and printed["mesh"]["num_processes"] == 1
  assert printed["output_dir"] == "runs/tiny_cpu"


def test_run_saves_resolved_config_and_resumes_by_default(tmp_path, model_dir, fake_rounds, capsys):
  out = tmp_path / "run"
  argv = [TINY, f"model.path={model_dir}", "--output-dir", str(out), "rounds.num_eval_prompts=4"]
  assert cli.main(argv) == 0
  config, resume = fake_rounds[-1]
  assert resume is False and config.output_dir == str(out) and config.rounds.num_eval_prompts == 4
  assert load_experiment(out / "config.yaml") == config
  # --resume without a checkpoint is an error.
  assert cli.main([*argv, "--resume"]) == 2
  assert "no checkpoint in" in capsys.readouterr().err
  # Once the run has a checkpoint, resuming is the default; --no-resume starts afresh.
  with Checkpointer(checkpoint_dir(out)) as ckpt:
    ckpt.save(3, {"x": __import__("numpy").zeros(2)}, {"round": 0}, force=True)
  assert cli.main(argv) == 0 and fake_rounds[-1][1] is True
  assert cli.main([*argv, "--no-resume"]) == 0 and fake_rounds[-1][1] is False
  # Resuming with a changed config warns, naming the changed keys.
  assert cli.main([*argv[:-1], "rounds.num_eval_prompts=8"]) == 0
  assert "differs from" in capsys.readouterr().err
  assert fake_rounds[-1][0].rounds.num_eval_prompts == 8


def test_launch_train_py_subprocess_gives_clean_error(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), TINY,
                           "dro_typo=1"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
  assert result.returncode == 2, result.stderr
  assert "unknown config key `dro_typo`" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------
# Shell launchers, dry-run.
# --------------------------------------------------------------------------------------------


def _dry_run(script: str, *args: str) -> list[list[str]]:
  result = subprocess.run(["bash", str(REPO / "launch" / script), "--dry-run", *args],
                          capture_output=True, text=True, timeout=60, check=True)
  return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def test_gpu_node_dry_run_and_flags_are_valid_xla_flags():
  [cmd] = _dry_run("gpu_node.sh", "--gpus", "0,1", TINY, "train.beta=0.2", "system=a b",
                   "--resume")
  assert cmd[0] == "env"
  python = cmd.index("-m") - 1
  env = dict(word.split("=", 1) for word in cmd[1:python])
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"]
  assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["PYTHONPATH"].startswith(str(REPO))
  tail = cmd[cmd.index("-m"):]
  assert tail == ["-m", "ssapo_jax.cli", TINY, "train.beta=0.2", "system=a b", "--resume"]
  # XLA rejects unknown flags at start-up; the CPU client parses the GPU debug options too.
  check = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(2).block_until_ready()"],
                         env=dict(os.environ, XLA_FLAGS=env["XLA_FLAGS"], JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=120)
  assert check.returncode == 0, check.stderr[-2000:]


def test_gpu_node_without_config_prints_usage():
  result = subprocess.run(["bash", str(REPO / "launch" / "gpu_node.sh")], capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 2 and "Usage: launch/gpu_node.sh" in result.stderr


TPU_ARGS = ["--name", "ssapo-v4", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
            "--project", "my-proj", "--output-dir", "gs://bucket/runs/zephyr"]


def test_tpu_pod_dry_run_commands():
  lines = _dry_run("tpu_pod.sh", *TPU_ARGS, "--spot", "--stage",
                   "gs://bucket/models/zephyr=/tmp/zephyr", TINY, "model.path=/tmp/zephyr",
                   "dro_epsilon_example=0.05")
  describe, create = (lines[0][:lines[0].index("||")], lines[0][lines[0].index("||") + 1:])
  where = ["--zone=us-central2-b", "--project=my-proj"]
  assert describe == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "ssapo-v4", *where,
                      ">/dev/null", "2>&1"]
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ssapo-v4"]
  assert {"--accelerator-type=v4-32", "--spot", *where} <= set(create)
  ssh = [l for l in lines if l[4:5] == ["ssh"]]
  assert all("--worker=all" in l and set(where) <= set(l) for l in ssh)
  remote = [next(w for w in l if w.startswith("--command="))[len("--command="):] for l in ssh]
  install, stage, train = remote
  assert "pip install" in install and "[tpu]" in install and "gcsfs" in install
  assert "gcloud storage cp -r gs://bucket/models/zephyr/* /tmp/zephyr/" in stage
  train_words = shlex.split(train.replace("$HOME", "HOME"))
  assert train_words[:2] == ["cd", "HOME/ssapo_jax_src"]
  run = train_words[train_words.index("&&") + 1:]
  assert run == ["HOME/ssapo_venv/bin/python", "-m", "ssapo_jax.cli", "configs/tiny_cpu.yaml",
                 "model.path=/tmp/zephyr", "dro_epsilon_example=0.05",
                 "--output-dir=gs://bucket/runs/zephyr"]
  scp = [l for l in lines if l[4:5] == ["scp"]]
  assert scp and all("--worker=all" in l for l in scp)


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
    result = subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh"), "--dry-run", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
