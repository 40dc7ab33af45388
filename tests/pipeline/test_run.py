"""End-to-end SSAPO rounds on a tiny random model (ssapo_jax/pipeline/ through `ssapo-train`).

Every run is a real subprocess of ``launch/train.py``, so kill-and-resume uses a real SIGKILL.
Tolerances: a resumed run must equal the uninterrupted one bitwise (same device count, CPU);
the 8-device (2, 2, 2) mesh must match the single-device losses to 1e-4 relative.
"""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from pipeline_runs import command as _cmd
from pipeline_runs import env as _env
from pipeline_runs import final_params as _final_params
from pipeline_runs import losses as _losses
from pipeline_runs import write_config, write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return write_world(str(tmp_path_factory.mktemp("world")))


def _config(world, out, tmp_path) -> str:
  return write_config(world, out, str(tmp_path))


def _run(config, *overrides, devices=8):
  proc = subprocess.run(
    _cmd(config, *overrides), env=_env(devices), capture_output=True, text=True, timeout=1200
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("runs")
  out = str(tmp / "full")
  _run(_config(world, out, str(tmp)))
  return out


def test_two_rounds_write_every_artifact(uninterrupted):
  out = uninterrupted
  with open(os.path.join(out, "split_manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["counts"]["seed"] == 32 and [len(p) for p in manifest["pool_rows"]] == [32, 32]
  records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  train = [r for r in records if "loss" in r]
  for key in (
    "round",
    "step",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "learning_rate",
    "tokens_per_second",
    "nonfinite/total",
  ):
    assert all(key in r for r in train), key
  assert {r["round"] for r in train} == {0, 1, 2}
  steps = [r["step"] for r in records]
  assert steps == sorted(steps)
  assert all(np.isfinite(r["loss"]) and r["tokens_per_second"] > 0 for r in train)
  assert os.listdir(os.path.join(out, "tensorboard"))
  import datasets

  for t in range(3):
    rdir = os.path.join(out, f"round_{t}")
    summary = json.load(open(os.path.join(rdir, "summary.json")))
    assert summary["round"] == t and summary["num_pairs"] > 0
    evals = json.load(open(os.path.join(rdir, "eval_generations.json")))
    assert len(evals) == 8
    assert all(
      set(e) >= {"instruction", "output", "generator"} and isinstance(e["output"], str)
      for e in evals
    )
    train_set = datasets.load_from_disk(os.path.join(rdir, "train_set", "data"))
    assert {"ref_chosen_logps", "ref_rejected_logps", "atom_weights", "atom_shifts"} <= set(
      train_set.column_names
    )
    weights = np.asarray(train_set["atom_weights"])
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
    assert os.path.isfile(os.path.join(rdir, "policy", "config.json"))
  for t in (1, 2):
    rdir = os.path.join(out, f"round_{t}")
    pairs = datasets.load_from_disk(os.path.join(rdir, "pairs", "data"))
    assert len(pairs) > 0 and all(m > 0 for m in pairs["margin"])
    assert all(len(r) == 2 for r in pairs["responses"])
    card = json.load(open(os.path.join(rdir, "pairs", "card.json")))
    assert card["round"] == t
    follower = json.load(open(os.path.join(rdir, "follower.json")))
    # The follower spends its whole budget (exact solver): (1/N) Σ s|shift| = ε.
    assert follower["dro/budget_spent"] == pytest.approx(0.05, rel=1e-4)
    assert follower["dro/objective"] >= follower["dro/center_objective"]
    assert os.listdir(os.path.join(rdir, "follower_refresh"))


def test_final_policy_loads_in_transformers(uninterrupted):
  import torch
  import transformers

  out = uninterrupted
  model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "final_policy"))
  tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "final_policy"))
  ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
  with torch.no_grad():
    assert torch.isfinite(model(ids).logits).all()
  ours = _final_params(out)
  theirs = {k: v.numpy() for k, v in model.state_dict().items()}
  for name, value in ours.items():
    np.testing.assert_array_equal(value, theirs[name])


def _kill_when(config, ready, *, timeout=400):
  """Starts a run and SIGKILLs it as soon as ``ready()`` is true; returns whether it was killed."""
  proc = subprocess.Popen(
    _cmd(config),
    env=_env(8),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  deadline = time.time() + timeout
  try:
    while proc.poll() is None and time.time() < deadline:
      if ready():
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
      time.sleep(0.02)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  return False


def _has_train_checkpoint(out, round_index):
  ckpt = os.path.join(out, "checkpoints")
  if not os.path.isdir(ckpt):
    return False
  for step in os.listdir(ckpt):
    if not step.isdigit():  # an asynchronous save still in its temporary directory
      continue
    meta = os.path.join(ckpt, step, "meta", "metadata")
    try:
      with open(meta) as f:
        m = json.load(f)
    except (OSError, ValueError):
      continue
    if m.get("round") == round_index and m.get("phase") == "train":
      return True
  return False


KILL_POINTS = {
  "during_round1_training": lambda out: _has_train_checkpoint(out, 1),
  "during_annotation": lambda out: os.path.exists(os.path.join(out, "round_1", "generations.npz")),
  "between_rounds": lambda out: os.path.exists(os.path.join(out, "round_0", "summary.json")),
}


def _newest_checkpoint(out) -> str:
  ckpt = os.path.join(out, "checkpoints")
  return os.path.join(ckpt, str(max(int(s) for s in os.listdir(ckpt) if s.isdigit())))


def _corrupt_array_data(step_dir: str) -> None:
  """Rewrites two rows of the policy's ``lm_head`` inside a checkpoint's array store: finite,
  decodable values with every file and the metadata intact, so only the checkpoint's
  fingerprint can tell.

  Written through tensorstore rather than by overwriting bytes of a file: much of a checkpoint's
  OCDBT data is never read by a restore (overwriting the middle 200 bytes of each of a pipeline
  checkpoint's 11 data files in turn changed the restored state for one of them), so bytes
  overwritten at a fixed offset may leave the restored state untouched, and resuming from it
  is then right.
  """
  import tensorstore as ts

  spec = {
    "driver": "zarr",
    "kvstore": {
      "driver": "ocdbt",
      "base": f"file://{step_dir}/state",
      "path": "params.lm_head.value/",
    },
  }
  array = ts.open(spec).result()
  rows = array[1:3].read().result()
  array[1:3].write(rows * 1.5 + 0.25).result()
  assert not np.array_equal(ts.open(spec).result()[1:3].read().result(), rows)


@pytest.mark.parametrize(
  "point",
  [
    # Slow (over 2 minutes): the corrupted-bytes fallback itself is tested in the default suite
    # by tests/test_checkpoint.py; this runs it through a killed and relaunched `ssapo-train`.
    pytest.param("during_round1_training_corrupted", marks=pytest.mark.slow),
    pytest.param("during_round1_training", marks=pytest.mark.slow),
    pytest.param("during_annotation", marks=pytest.mark.slow),
    pytest.param("between_rounds", marks=pytest.mark.slow),
  ],
)
def test_sigkill_and_resume_gives_identical_parameters(world, uninterrupted, tmp_path, point):
  """Killed anywhere, the rerun finishes bitwise equal to an uninterrupted run; with the newest
  checkpoint's array data corrupted too, it falls back to the previous checkpoint first."""
  out = str(tmp_path / point)
  config = _config(world, out, str(tmp_path))
  kill_point = KILL_POINTS[point.removesuffix("_corrupted")]
  assert _kill_when(config, lambda: kill_point(out)), "the run ended before the kill point"
  assert not os.path.exists(os.path.join(out, "final_policy"))
  assert os.path.exists(os.path.join(out, "run.lock"))  # left behind by the SIGKILL
  if point.endswith("_corrupted"):
    newest = _newest_checkpoint(out)
    _corrupt_array_data(newest)
  proc = _run(config)  # resumes by default
  assert "taking over the stale lock" in proc.stderr
  if point.endswith("_corrupted"):
    step = os.path.basename(newest)
    assert f"checkpoint {step} in" in proc.stderr
    mismatch = proc.stderr[proc.stderr.index("checksum mismatch in") :].splitlines()[0]
    assert "lm_head" in mismatch, mismatch
    assert "falling back to step" in proc.stderr
  log = open(os.path.join(out, "run.log")).read()
  assert "resuming from checkpoint step" in log and "run complete" in log
  assert "round 2 train:" in log and "final policy: " in log
  assert not os.path.exists(os.path.join(out, "run.lock"))
  full = uninterrupted
  expected, got = _final_params(full), _final_params(out)
  assert expected.keys() == got.keys()
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
  assert _losses(out) == _losses(full)


# Slow (about 3 minutes): the two-process test in test_multihost.py runs the pipeline sharded
# over 8 devices in the default suite.
@pytest.mark.slow
def test_sharded_mesh_matches_single_device(world, tmp_path):
  single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
  # Sampling uses the same keys on both meshes; float noise in the logits could only change a
  # sample at an exact tie of the sampling thresholds.
  overrides = ("rounds.num_rounds=1", "rounds.follower_refresh_steps=null")
  _run(_config(world, single, str(tmp_path)), *overrides, "mesh.fsdp=1", devices=1)
  _run(
    _config(world, sharded, str(tmp_path)),
    *overrides,
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.tensor=2",
    devices=8,
  )
  a, b = _losses(single), _losses(sharded)
  assert [s for s, _ in a] == [s for s, _ in b] and len(a) >= 6
  np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=1e-4)


@pytest.mark.slow  # about 4 minutes: a full run with an embedding pass over every prompt
def test_farthest_point_seed_uses_sft_prompt_embeddings(world, tmp_path):
  """prepare_data's batched, left-padded embeddings + FPS equal a one-prompt-at-a-time reference."""
  import jax.numpy as jnp

  from ssapo_jax.data import load_preferences
  from ssapo_jax.experiment import load_experiment
  from ssapo_jax.models import load_hf
  from ssapo_jax.models.tokenizer import chat_prompt_ids, load_tokenizer
  from ssapo_jax.pipeline.runtime import prepare_data

  config = load_experiment(
    _config(world, str(tmp_path / "fps"), str(tmp_path)),
    ["data.seed_method=farthest_point", "data.seed_size=5", "sampling.batch_size=8"],
  )
  tokenizer = load_tokenizer(config.model.path)
  sft = load_hf(config.model.path)
  from ssapo_jax.sharding import make_mesh

  data = prepare_data(
    config, str(tmp_path), sft=sft, tokenizer=tokenizer, mesh=make_mesh(config.mesh)
  )
  pairs = load_preferences(config.data.source)
  # Reference embeddings: each prompt alone, unpadded, last position of the final hidden states.
  emb = np.stack(
    [
      np.asarray(sft.hidden_states(jnp.asarray([ids]), jnp.ones((1, len(ids)), int))[0, -1])
      for ids in (chat_prompt_ids(tokenizer, p.prompt) for p in pairs)
    ]
  )
  unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  order = np.random.default_rng(config.data.split_seed).permutation(len(pairs))
  chosen = [int(order[0])]
  dist_sum = np.zeros(len(pairs))
  while len(chosen) < 5:
    dist_sum += 1.0 - unit @ unit[chosen[-1]]
    candidates = np.where(np.isin(np.arange(len(pairs)), chosen), -np.inf, dist_sum)
    chosen.append(int(np.argmax(candidates)))
  assert sorted(p.row for p in data.seed_pairs) == sorted(pairs[i].row for i in chosen)
  manifest = json.load(open(os.path.join(tmp_path, "split_manifest.json")))
  assert manifest["settings"]["method"] == "farthest_point"


def test_bad_data_row_is_a_one_line_error(world, tmp_path):
  rows = [json.loads(line) for line in open(os.path.join(world, "prefs.jsonl"))][:40]
  rows[17]["rejected"] = rows[17]["chosen"]  # chosen identical to rejected
  bad = tmp_path / "bad.jsonl"
  bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = str(tmp_path / "bad_run")
  proc = subprocess.run(
    _cmd(_config(world, out, str(tmp_path)), f"data.source={bad}"),
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 3
  assert "Traceback" not in proc.stderr
  error = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert len(error) == 1 and str(bad) in error[0] and "row 17" in error[0]
  assert "'rejected'" in error[0] or "'chosen'" in error[0]
  assert not os.path.exists(out)  # inputs are checked before anything is written


# --------------------------------------------------------------------------------------------
# Run integrity through real `ssapo-train` processes: lock, config record, --check, exit codes.
# --------------------------------------------------------------------------------------------


def _error_line(proc) -> str:
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1 and errors[0].startswith("ssapo-train: error: "), proc.stderr[-3000:]
  return errors[0]


def test_second_run_on_a_locked_directory_exits_4(world, tmp_path):
  out = str(tmp_path / "locked")
  config = _config(world, out, str(tmp_path))
  first = subprocess.Popen(
    _cmd(config),
    env=_env(8),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  try:
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(out, "run.lock")) and time.time() < deadline:
      assert first.poll() is None, "the first run ended before taking the lock"
      time.sleep(0.05)
    second = subprocess.run(_cmd(config), env=_env(1), capture_output=True, text=True, timeout=300)
    assert second.returncode == 4
    line = _error_line(second)
    assert f"is locked by another run: pid {first.pid} on host" in line
    assert "still running on this host" in line and "--force-unlock" not in line
    assert first.poll() is None  # the first run goes on
  finally:
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
  with open(os.path.join(out, "metrics.jsonl")) as f:  # only the first run wrote records
    steps = [json.loads(line)["step"] for line in f]
  assert steps == sorted(set(steps))


def test_finished_run_config_record_and_check(world, uninterrupted, tmp_path):
  """A finished run: rerun does nothing; a changed config is refused, then kept as a version."""
  import shutil

  out = str(tmp_path / "done")
  shutil.copytree(uninterrupted, out)
  config = _config(world, out, str(tmp_path))
  recorded = open(os.path.join(out, "config.yaml")).read()
  proc = _run(config)
  assert "run already complete, nothing to do" in proc.stderr
  changed = subprocess.run(
    _cmd(config, "rounds.log_every_steps=2"),
    env=_env(8),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert changed.returncode == 4
  line = _error_line(changed)
  assert "rounds.log_every_steps: 1 -> 2" in line and "--allow-config-change" in line
  assert open(os.path.join(out, "config.yaml")).read() == recorded
  assert not os.path.exists(os.path.join(out, "config.1.yaml"))
  # Allowed on a finished run, the change would train nothing: it is not recorded, so the
  # history keeps saying which config trained the policy.
  metrics = open(os.path.join(out, "metrics.jsonl")).read()
  proc = _run(config, "rounds.log_every_steps=2", "--allow-config-change")
  assert "run already complete, nothing ran" in proc.stderr and "not recorded" in proc.stderr
  assert "recorded as config.1.yaml" not in proc.stderr
  assert open(os.path.join(out, "config.yaml")).read() == recorded
  assert not os.path.exists(os.path.join(out, "config.1.yaml"))
  assert open(os.path.join(out, "metrics.jsonl")).read() == metrics
  proc = _run(config)  # the config that trained it is still the run's
  assert "run already complete, nothing to do" in proc.stderr
  log = open(os.path.join(out, "run.log")).read()
  assert log.count("run already complete, nothing to do") == 2


def test_check_and_exit_codes_of_real_processes(world, tmp_path):
  out = str(tmp_path / "check")
  config = _config(world, out, str(tmp_path))
  histogram = str(tmp_path / "lengths.json")
  proc = _run(config, "--check", "--length-histogram", histogram, devices=8)
  # The seed's 64 sequences (32 pairs), binned by data.bucket_size, and the expected padding.
  with open(histogram) as f:
    written = json.load(f)
  assert written["num_sequences"] == 64 and sum(written["counts"]) == 64
  assert "lengths: 64 seed sequences" in proc.stdout
  assert "expected padding of the train batches: padded " in proc.stdout
  # 200 rows: seed 32, pools [32, 32], batch 8, 1 epoch; 2 samples; max_length 64.
  assert "round 0: 32 labelled pairs, 1 epoch(s), 4 steps" in proc.stdout
  assert (
    "round 2: 32 prompts x 2 samples, at most 32 pairs, 1 epoch(s), at most 4 steps" in proc.stdout
  )
  assert "at most 1024 tokens per step" in proc.stdout and "mesh: 8 devices" in proc.stdout
  assert not os.path.exists(out)
  import shutil

  model = str(tmp_path / "model")
  shutil.copytree(os.path.join(world, "model"), model)
  weights = os.path.join(model, "model.safetensors")
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) // 2)
  cases = [
    (["rounds.num_rounds=7"], 2, "needs one prompt pool per round"),
    ([f"data.source={tmp_path / 'nope.jsonl'}"], 3, "data.source: "),
    ([f"model.path={model}"], 5, "cannot read safetensors file"),
  ]
  for overrides, code, fragment in cases:
    proc = subprocess.run(
      _cmd(config, *overrides, "--check"), env=_env(1), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == code, (overrides, proc.stderr[-2000:])
    assert fragment in _error_line(proc)
  assert not os.path.exists(out)


def test_non_finite_training_exits_6(world, tmp_path):
  out = str(tmp_path / "nan")
  config = _config(world, out, str(tmp_path))
  proc = subprocess.run(
    _cmd(
      config,
      "rounds.num_rounds=0",
      "train.learning_rate=1e30",
      "train.max_nonfinite_steps=1",
      "train.max_grad_norm=0",
    ),
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 6, proc.stderr[-3000:]
  line = _error_line(proc)
  assert "consecutive train steps had a non-finite" in line and "corrupted inputs" in line
  assert not os.path.exists(os.path.join(out, "run.lock"))  # released on the way out
