"""End-to-end test of the embedded demo at a reduced size (world building and arms)."""

import json
import os

import numpy as np
import pytest

from ssapo_jax.demo import task
from ssapo_jax.demo import world as world_lib

SMALL_WORLD = world_lib.WorldConfig(sft_steps=150, pool_prompts=600, num_eval_prompts=64,
                                    sample_batch_size=128)


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
  pool_prompts = {r["prompt"] for r in world_lib.read_jsonl(os.path.join(w.root, "pool_prompts.jsonl"))}
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


def test_world_is_cached(small_world):
  again = world_lib.build_world(small_world.root, SMALL_WORLD, progress=False, log=lambda *_: None)
  assert again.stats == small_world.stats
  changed = world_lib.load_world(small_world.root, world_lib.WorldConfig(sft_steps=151))
  assert changed is None
