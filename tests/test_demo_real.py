"""The real-model study (``ssapo-demo --real``): the IFEval-style judge against hand-scored
responses (default suite) and the whole study at its tiny size (slow)."""

import json
import os

import numpy as np
import pytest

from ssapo_jax.demo import ifeval

P = 'Write about cats. Include the word "blue". Answer in at most 10 words.'


@pytest.mark.parametrize(
  "response,score",
  [
    ("Blue cats are rare.", 1.0),  # both met, case-insensitive
    ("Cats are lovely animals that sleep all day in the sun.", 0.0),  # 11 words, no "blue"
    ("My cat has blue eyes and sleeps all day long in sun.", 0.5),  # 12 words
    ("bluebird cats", 0.5),  # "bluebird" is not "blue"
    ("", 0.0),
  ],
)
def test_judge_scores_hand_checked_responses(response, score):
  assert ifeval.judge_score(P, response) == pytest.approx(score)


def test_judge_other_constraints_and_length_penalty():
  p = (
    "Write about coffee. Write everything in lower case. End your answer with the word "
    '"warm". Answer with exactly 2 bullet points, each line starting with "- ".'
  )
  assert ifeval.judge_score(p, "- coffee is dark\n- and it is warm") == 1.0
  assert ifeval.judge_score(p, "- Coffee is dark\n- and it is warm") == pytest.approx(2 / 3)
  assert ifeval.judge_score(p, "- coffee\n- is\n- warm") == pytest.approx(2 / 3)
  long = "word " * 79 + "warm"  # 80 words, no bullets: 2/3 met, 20 words over the free 60
  assert ifeval.judge_score(p, long) == pytest.approx(2 / 3 - 20 * ifeval.LENGTH_PENALTY)
  q = 'Write about rivers. Do not use the word "water". Use at most 2 sentences.'
  assert ifeval.judge_score(q, "Rivers flow. They are long.") == 1.0
  assert ifeval.judge_score(q, "Rivers carry water. They flow. They end.") == 0.0
  assert ifeval.judge_prefers(q, "Rivers flow.", "Rivers carry water. A. B.") == 1
  with pytest.raises(ValueError, match="no recognisable constraint"):
    ifeval.judge_score("Write about rivers.", "ok")


def test_sampled_prompts_parse_back_and_are_consistent():
  rng = np.random.default_rng(0)
  kinds_seen = set()
  for _ in range(300):
    p = ifeval.sample_prompt(rng)
    cs = ifeval.constraints(p)
    kinds = [k for k, _ in cs]
    assert 1 <= len(cs) <= 3 and len(set(kinds)) == len(kinds), p
    assert not {"max_words", "min_words"} <= set(kinds)
    assert not {"include", "forbid"} <= set(kinds)
    kinds_seen |= set(kinds)
  assert kinds_seen == set(ifeval._PATTERNS)


def test_arm_schedule_runs_the_first_arm_on_every_seed():
  from ssapo_jax.demo.real import arm_schedule

  arms = ("self_eps0", "ssapo", "seed_dpo", "all_labels")
  assert arm_schedule(arms, 3, 2) == [
    (0, "self_eps0"),
    (0, "ssapo"),
    (0, "seed_dpo"),
    (0, "all_labels"),
    (1, "self_eps0"),
    (1, "ssapo"),
    (1, "seed_dpo"),
    (1, "all_labels"),
    (2, "self_eps0"),
  ]
  assert arm_schedule(arms[:2], 2, 2) == [
    (0, "self_eps0"),
    (0, "ssapo"),
    (1, "self_eps0"),
    (1, "ssapo"),
  ]


def test_seed_size_is_the_modes_count_or_a_thirtieth_of_the_pool():
  from ssapo_jax.demo import real

  assert real._demo_mode(real.TINY, 11).seed_size == 2  # 11 / 30 rounds to 0: at least 2
  assert real._demo_mode(real.TINY, 300).seed_size == 10
  assert real._demo_mode(real.STUDY, 20).seed_size == 8
  with pytest.raises(ValueError, match="a seed of 8 pairs"):
    real._demo_mode(real.STUDY, 8)


def test_markdown_tables_give_mean_std_and_each_seed():
  from ssapo_jax.demo.real import format_markdown

  def run(score, win, agreement=None):
    return [{"mean_score": score, "win_rate": win, "agreement": agreement}]

  doc = {
    "world": {"sft_greedy_score": 0.5},
    "arms": {
      "self_eps0": {
        "label": "(b) eps0",
        "runs": {"seed_0": run(0.6, 0.5, 0.75), "seed_1": run(0.4, 0.25, 0.25)},
      },
      "all_labels": {"label": "(d) all", "runs": {"seed_0": run(0.7, 1.0)}},
    },
    "agreement": {"before": [0.5, 0.7], "after": [0.75, 0.25]},
  }
  md = format_markdown(doc).splitlines()
  # population std of (0.6, 0.4) is 0.1; of (75%, 25%) 25%
  assert md[3] == (
    "| (b) eps0 | 2 | 0.500 ± 0.100 (0.600, 0.400) | 37.5% ± 12.5% (50.0%, 25.0%) "
    "| 50.0% ± 25.0% (75.0%, 25.0%) |"
  )
  assert md[4] == "| (d) all | 1 | 0.700 ± 0.000 | 100.0% ± 0.0% | n/a |"
  assert md[-2].endswith("| 60.0% ± 10.0% (50.0%, 70.0%) |")


@pytest.mark.slow
def test_real_study_tiny(tmp_path):
  """The whole study at its smallest size: world, four arms through ssapo-train, both tables."""
  pytest.importorskip("gguf")
  from ssapo_jax.demo import real
  from ssapo_jax.errors import CheckpointError
  from ssapo_jax.models import gguf as gguf_import

  try:
    gguf_import.smollm2_path()
  except CheckpointError as e:
    pytest.skip(str(e))
  doc = real.run_real(str(tmp_path / "study"), real.TINY)
  assert set(doc["arms"]) == {"seed_dpo", "self_eps0", "ssapo", "all_labels"}
  for name, arm in doc["arms"].items():
    last = arm["runs"]["seed_0"][-1]
    assert 0 <= last["mean_score"] <= 1 and 0 <= last["win_rate"] <= 1
    assert last["num_prompts"] == real.TINY.num_eval_prompts
    assert last["round"] == (1 if name in ("self_eps0", "ssapo") else 0)
  assert len(doc["agreement"]["after"]) == len(doc["agreement"]["before"]) == 1
  saved = json.load(open(tmp_path / "study" / "results.json"))
  assert saved["world"]["pool_pairs"] == doc["world"]["pool_pairs"] > 0
  md = open(tmp_path / "study" / "results.md").read()
  assert "after seed DPO" in md and "(d) DPO on all pool labels" in md
  assert os.path.isfile(tmp_path / "study" / "world" / "sft_model" / "tokenizer.json")
