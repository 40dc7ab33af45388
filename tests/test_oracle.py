"""Tests for ssapo_jax.demo.task: the synthetic task, imperfect demonstrations and the oracle."""

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssapo_jax.demo import task


def _reference_edit_distance(a, b):
  """Textbook recursive Levenshtein distance (memoised), independent of the DP in task.py."""
  a, b = tuple(a), tuple(b)

  @functools.lru_cache(maxsize=None)
  def d(i, j):
    if i == 0:
      return j
    if j == 0:
      return i
    return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

  return d(len(a), len(b))


def test_edit_distance_known_cases():
  assert task.edit_distance("kitten", "sitting") == 3
  assert task.edit_distance("", "abc") == 3
  assert task.edit_distance("flaw", "lawn") == 2
  assert task.edit_distance(["1", "2"], ["1", "2"]) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=7), st.lists(st.integers(0, 3), max_size=7))
def test_edit_distance_matches_recursive_reference(a, b):
  assert task.edit_distance(a, b) == _reference_edit_distance(a, b)


def test_prompt_roundtrip_and_answers():
  p = task.Problem("sort", (7, 2, 9, 4))
  assert p.prompt == "sort: 7 2 9 4"
  assert p.answer_text == "2 4 7 9"
  assert task.parse_prompt("sort : 7 2 9 4") == p  # the tokenizer's decoded spacing
  r = task.parse_prompt("reverse: 7 2 9 4")
  assert r.answer_text == "4 9 2 7"
  for bad in ("sort 7 2", "add: 1 2", "sort: 12 3", "sort:"):
    with pytest.raises(ValueError, match="not a demo instruction"):
      task.parse_prompt(bad)


def test_bubble_sort_passes_wikipedia_example():
  p = task.Problem("sort", (5, 1, 4, 2, 8))
  assert task.partial_solution(p, 0) == (5, 1, 4, 2, 8)
  assert task.partial_solution(p, 1) == (1, 4, 2, 5, 8)  # Wikipedia's "first pass"
  assert task.partial_solution(p, 2) == (1, 2, 4, 5, 8)
  assert task.partial_solution(p, p.num_steps) == (1, 2, 4, 5, 8)


def test_reverse_swaps():
  p = task.Problem("reverse", (1, 2, 3, 4, 5))
  assert task.partial_solution(p, 0) == (1, 2, 3, 4, 5)
  assert task.partial_solution(p, 1) == (5, 2, 3, 4, 1)
  assert task.partial_solution(p, p.num_steps) == (5, 4, 3, 2, 1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=2, max_size=7), st.integers(0, 6))
def test_bubble_pass_invariant(digits, k):
  """After k passes the last k positions hold the k largest digits in order (numpy reference)."""
  p = task.Problem("sort", tuple(digits))
  out = np.array(task.partial_solution(p, k))
  k = min(k, len(digits) - 1)
  ref = np.sort(digits)
  assert sorted(out.tolist()) == ref.tolist()
  if k:
    np.testing.assert_array_equal(out[len(digits) - k :], ref[len(digits) - k :])


def test_demonstrations_are_imperfect_but_valid():
  rng = np.random.default_rng(0)
  scores = []
  for _ in range(400):
    p = task.sample_problem(rng)
    demo = task.demonstration(p, rng)
    assert sorted(map(int, demo.split())) == sorted(p.digits)  # a permutation of the input
    scores.append(task.oracle_score(p.prompt, demo))
  scores = np.array(scores)
  assert 0.3 < (scores == 1.0).mean() < 0.7  # room between mediocre and good
  assert scores.min() < 0.5


def test_oracle_score_known_cases():
  prompt = "sort: 7 2 9 4"
  assert task.oracle_score(prompt, "2 4 7 9") == 1.0
  assert task.oracle_score(prompt, "2 4 9 7") == pytest.approx(0.5)  # 2 substitutions
  assert task.oracle_score(prompt, "2 4 7") == pytest.approx(0.75)  # 1 deletion
  assert task.oracle_score(prompt, "2 4 7 9 9 9") == pytest.approx(1 - 2 / 4 - 0.05 * 2)
  assert task.oracle_score(prompt, "") == 0.0
  assert task.oracle_score(prompt, "sort sort sort sort sort sort") == 0.0
  assert task.oracle_score("reverse: 1 2 3", "3 2 1") == 1.0
  assert task.oracle_prefers(prompt, "2 4 7 9", "2 4 9 7") == 1
  assert task.oracle_prefers(prompt, "2 4 9 7", "2 4 9 7") == 0
  np.testing.assert_allclose(task.oracle_scores([prompt, prompt], ["2 4 7 9", "2 4 7"]), [1, 0.75])


def test_win_rate_ties_count_half():
  assert task.win_rate([1.0, 0.5, 0.2], [0.5, 0.5, 0.3]) == pytest.approx((1 + 0.5 + 0) / 3)
  assert task.win_rate([0.1, 0.1], [0.1, 0.1]) == 0.5
  with pytest.raises(ValueError, match="win_rate"):
    task.win_rate([1.0], [1.0, 0.0])
