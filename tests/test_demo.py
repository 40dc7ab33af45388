"""End-to-end test of the embedded demo at a reduced size (world building and arms)."""

import json
import os

import numpy as np
import pytest

from ssapo_jax.demo import task
from ssapo_jax.demo import world as world_lib

SMALL_WORLD = world_lib.WorldConfig(
  sft_steps=150, pool_prompts=600, num_eval_prompts=64, sample_batch_size=128
)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo") / "world"
  return world_lib.build_world(str(root), SMALL_WORLD, progress=False)


def test_world_files_load_through_the_library(small_world):
  from ssapo_jax.data import load_preferences, load_prompts
  from ssapo_jax.models import tokenizer as tk
  from ssapo_jax.models.params import load_hf

  w = small_world
  model = load_hf(w.model_path)
  tok = tk.load_tokenizer(w.model_path)
  assert model.config.vocab_size == len(tok) == w.stats["vocab_size"]
  assert model.config.eos_token_ids == (tok.eos_token_id,)
  pairs = load_preferences(w.pool_path, verbose=False)
  assert len(pairs) == w.stats["pool_pairs"] > 0
  assert pairs[0].prompt[-1]["role"] == "user"
  prompts = load_prompts(w.eval_prompts_path, verbose=False)
  assert len(prompts) == SMALL_WORLD.num_eval_prompts
  # Held-out prompts never appear in the pool.
  pool_prompts = {
    r["prompt"] for r in world_lib.read_jsonl(os.path.join(w.root, "pool_prompts.jsonl"))
  }
  assert not pool_prompts & {p.prompt[-1]["content"] for p in prompts}


def test_world_labels_and_baseline_agree_with_the_oracle(small_world):
  w = small_world
  for row in world_lib.read_jsonl(w.pool_path)[:200]:
    sc = task.oracle_score(row["prompt"], row["chosen"])
    sr = task.oracle_score(row["prompt"], row["rejected"])
    assert sc == row["chosen_score"] > sr == row["rejected_score"]
  with open(w.sft_eval_path) as f:
    baseline = json.load(f)
  assert {"instruction", "output", "generator"} <= set(baseline[0])
  scores = task.oracle_scores([r["instruction"] for r in baseline], [r["output"] for r in baseline])
  np.testing.assert_allclose(scores, [r["score"] for r in baseline])
  s = w.stats
  assert s["sft_nll_last"] < 0.6 * s["sft_nll_first"]  # SFT learned something
  for name in ("demonstrations", "sft_greedy", "sft_samples"):
    assert 0.0 <= s[name]["exact"] <= 1.0 and 0.0 <= s[name]["mean_score"] <= 1.0
  assert s["sft_greedy"]["mean_score"] > 0.2  # better than noise; room left below 1.0
  assert s["sft_greedy"]["exact"] < 0.9


def test_tiny_cpu_config_runs_on_the_demo_world(small_world, tmp_path, monkeypatch, capsys):
  """The documented order: the demo writes runs/demo/world/, then configs/tiny_cpu.yaml reads it."""
  from ssapo_jax import cli

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  os.makedirs(tmp_path / "runs" / "demo")
  os.symlink(small_world.root, tmp_path / "runs" / "demo" / "world")
  monkeypatch.chdir(tmp_path)
  assert cli.main([os.path.join(repo, "configs", "tiny_cpu.yaml"), "--check"]) == 0, (
    capsys.readouterr().err
  )
  assert "--check: OK" in capsys.readouterr().out


def test_world_is_cached(small_world):
  again = world_lib.build_world(small_world.root, SMALL_WORLD, progress=False, log=lambda *_: None)
  assert again.stats == small_world.stats
  changed = world_lib.load_world(small_world.root, world_lib.WorldConfig(sft_steps=151))
  assert changed is None


@pytest.mark.slow  # about 2.5 minutes; the pipeline it drives is covered by tests/pipeline
def test_smoke_demo_runs_arms_through_the_real_pipeline(tmp_path):
  """`ssapo-demo --smoke`: every artifact exists, numbers in range, runs made by ssapo-train."""
  from ssapo_jax.demo import arms, cli
  from ssapo_jax.experiment import load_experiment

  out = tmp_path / "demo"
  assert cli.main(["--smoke", "--out", str(out)]) == 0
  with open(out / "results.json") as f:
    results = json.load(f)
  assert (out / "win_rates.png").stat().st_size > 1000
  assert results["mode"] == "smoke" and results["elapsed_seconds"] > 0
  assert set(results["arms"]) == set(arms.SMOKE.arms)
  for name, arm in results["arms"].items():
    (run_dir,) = arm["run_dirs"]
    # Made by ssapo-train: resolved config, split manifest, checkpoints, metrics, HF policies.
    cfg = load_experiment(os.path.join(run_dir, "config.yaml"))
    assert cfg.model.path == os.path.join(str(out), "world", "sft_model")
    for sub in ("split_manifest.json", "metrics.jsonl", "checkpoints", "final_policy/config.json"):
      assert os.path.exists(os.path.join(run_dir, sub)), sub
    rounds = arm["runs"]["seed_0"]
    expected_rounds = arms.SMOKE.num_rounds + 1 if name == "ssapo" else 1
    assert [m["round"] for m in rounds] == list(range(expected_rounds))
    for m in rounds:
      assert 0.0 <= m["win_rate"] <= 1.0 and 0.0 <= m["mean_score"] <= 1.0
      assert m["num_prompts"] == arms.SMOKE.world.num_eval_prompts
      # Re-score one round's generations independently of arms.score_run.
      with open(os.path.join(run_dir, f"round_{m['round']}", "eval_generations.json")) as f:
        gens = json.load(f)
      scores = task.oracle_scores([g["instruction"] for g in gens], [g["output"] for g in gens])
      np.testing.assert_allclose(scores.mean(), m["mean_score"])
    if name == "ssapo":
      assert 0.0 <= rounds[1]["agreement"] <= 1.0 and rounds[1]["num_pairs"] > 0
      assert cfg.dro.epsilon == arms.SMOKE.epsilon and cfg.train.objective == "robust"
  # Seed-only DPO trained on 1/30 of the pool, the ceiling on all of it.
  seed_rounds = results["arms"]["seed_dpo"]["runs"]["seed_0"]
  all_rounds = results["arms"]["all_labels"]["runs"]["seed_0"]
  assert seed_rounds[0]["num_train_pairs"] == round(results["world"]["pool_pairs"] / 30)
  assert all_rounds[0]["num_train_pairs"] == results["world"]["pool_pairs"]
