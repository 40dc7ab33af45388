"""The run's optional outputs: `ProfileHook` around a step loop (fast), and, slow (a minute or
more each: one in-process round 0 of 4 steps on a tiny model):

* ``train.profile_steps`` writes a jax.profiler trace of that window in ``output_dir/profile/``,
  and nothing is written when it is off;
* ``metrics.wandb`` (offline) gets the run's train metrics with the steps of ``metrics.jsonl``.
"""

import glob
import json
import os

import pytest

from ssapo_jax.testing import write_tiny_model, write_tiny_preferences

CONFIG = """\
output_dir: {out}
seed: 0
model: {{path: {world}/model}}
data: {{source: {world}/prefs.jsonl, max_length: 64, max_prompt_length: 32, bucket_size: 16,
        seed_size: 32, pool_sizes: []}}
train: {{beta: 0.1, learning_rate: 1.0e-3, global_batch_size: 8,
         compute_dtype: float32, remat: none}}
dro: {{epsilon: 0}}
rounds: {{num_rounds: 0}}
checkpoint: {{save_every_steps: 100}}
"""


def _trace_files(log_dir) -> list[str]:
  return glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.xplane.pb"))


@pytest.mark.parametrize("window, traced", [((2, 3), (2, 3)), ((4, 9), (4, 5)), (None, None)])
def test_profile_hook_traces_its_window_of_global_steps(tmp_path, window, traced):
  """Steps 1..5 of a loop: the trace covers the window (cut at the round's end), once; no
  window, no hook and no files."""
  import jax
  import jax.numpy as jnp

  from ssapo_jax.pipeline.leader import ProfileHook, StepContext

  @jax.jit
  def profiled_step_fn(x):
    return jnp.sin(x) @ x

  ctx = StepContext(t=0, done=0, num_steps=5, global_step=0, state=jnp.eye(8), batches=None)
  hooks = [ProfileHook(str(tmp_path / "profile"), window)] if window else []
  active = []
  for _ in range(5):
    for hook in hooks:
      hook.before_step(ctx)
    ctx.state = profiled_step_fn(ctx.state)
    ctx.done, ctx.global_step = ctx.done + 1, ctx.global_step + 1
    active.append(any(h.active for h in hooks))
    for hook in hooks:
      hook.after_step(ctx)
  for hook in hooks:
    hook.end(ctx)
  if window is None:
    assert not os.path.exists(tmp_path / "profile")
    return
  # Tracing while steps traced[0]..traced[1] ran, and stopped after.
  assert active == [traced[0] <= s <= traced[1] for s in range(1, 6)]
  assert not hooks[0].active
  traces = _trace_files(tmp_path / "profile")
  assert len(traces) == 1 and b"profiled_step_fn" in open(traces[0], "rb").read()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("world")
  write_tiny_model(str(root / "model"))
  write_tiny_preferences(str(root / "prefs.jsonl"), 40)
  return root


def _run(tmp_path, world, name: str, *overrides: str):
  from ssapo_jax.experiment import load_experiment
  from ssapo_jax.pipeline import run as pipeline
  from ssapo_jax.runrecord import run_log
  path = tmp_path / f"{name}.yaml"
  path.write_text(CONFIG.format(out=tmp_path / name, world=world))
  config = load_experiment(path, overrides)
  with run_log(str(tmp_path / name / "log")):
    pipeline.run(config, resume=False)
  return config.output_dir, open(tmp_path / name / "log" / "run.log").read()


@pytest.mark.slow
def test_profile_steps_write_a_trace_of_the_window(tmp_path, world):
  out, log = _run(tmp_path, world, "profiled", "train.profile_steps=[2,3]")
  traces = _trace_files(os.path.join(out, "profile"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
  assert f"profiler trace of steps 2..3 written to {out}/profile" in log
  # The trace holds the train step's device work (its jitted program's name is in the trace).
  assert b"train_step" in open(traces[0], "rb").read()


@pytest.mark.slow
def test_no_profile_by_default_and_wandb_offline_gets_the_jsonl_metrics(tmp_path, world,
                                                                        monkeypatch):
  pytest.importorskip("wandb")
  from test_metrics import _wandb_history
  monkeypatch.setenv("WANDB_SILENT", "true")
  out, log = _run(tmp_path, world, "plain", "metrics.wandb.project=ssapo-test",
                  "metrics.wandb.mode=offline")
  assert not os.path.exists(os.path.join(out, "profile")) and "profiler" not in log
  with open(os.path.join(out, "metrics.jsonl")) as f:
    train = [r for r in map(json.loads, f) if "loss" in r]
  runs = _wandb_history(tmp_path / "plain")
  run_id = open(os.path.join(out, "wandb_run_id")).read().strip()
  assert [r for r, _ in runs] == [run_id]
  rows = [row for row in runs[0][1] if "loss" in row]
  assert [row["step"] for row in rows] == [r["step"] for r in train] == [1, 2, 3, 4]
  for row, record in zip(rows, train):
    assert row["loss"] == pytest.approx(record["loss"], rel=1e-7)
    assert row["rewards/margins"] == pytest.approx(record["rewards/margins"], rel=1e-7)
