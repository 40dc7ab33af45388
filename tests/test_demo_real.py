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
