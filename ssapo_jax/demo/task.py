"""The demo's synthetic instruction-following task and its programmatic oracle.

The oracle plays the role of the paper's human labels (for the seed and the "all labels"
ceiling) and of its GPT-4 judge (for win rates). Prompts are short instructions over digits:

* ``sort: 7 2 9 4``     -> ``2 4 7 9``
* ``reverse: 7 2 9 4``  -> ``4 9 2 7``

Demonstrations for supervised fine-tuning are deliberately imperfect, as human
demonstrations are: a sort demonstration is ``k`` passes of bubble sort and a reverse
demonstration is ``k`` outer swaps of the two-pointer reversal, with ``k`` uniform from 0 (the
input copied) to the number of steps that finishes the job. A model trained on them samples
answers of varying quality, which leaves room between a mediocre SFT model and a good one.

Oracle score of a response, in [0, 1] (`oracle_score`)::

  score = clip(1 - d / n - 0.05 * max(0, m - n), 0, 1)

with ``d`` the token-level Levenshtein distance between the response and the correct answer,
``n`` the answer length and ``m`` the response length: 1 for the exact answer, partial credit
by edit distance, and an extra penalty per token of rambling beyond the answer length.
Win rates compare two responses per prompt by oracle score, ties counting half (AlpacaEval).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

OPERATIONS = ("sort", "reverse")
DIGITS = tuple(str(d) for d in range(10))
# Words of the demo vocabulary (the tokenizer adds special and role tokens before them).
VOCAB_WORDS = (*OPERATIONS, ":", *DIGITS)
RAMBLING_PENALTY = 0.05  # Score lost per response token beyond the answer length.

# The same split as the demo tokenizer's pre-tokenizer (tokenizers' `Whitespace`).
_TOKEN_RE = re.compile(r"\w+|[^\w\s]+")


def tokens(text: str) -> list[str]:
  """Splits text the way the demo tokenizer does: ``\\w+`` runs and punctuation runs."""
  return _TOKEN_RE.findall(text)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One instruction: an operation and its digit sequence."""

  op: str
  digits: tuple[int, ...]

  def __post_init__(self):
    if self.op not in OPERATIONS:
      raise ValueError(f"Problem.op must be one of {OPERATIONS}, got {self.op!r}")
    if not self.digits or any(not 0 <= d <= 9 for d in self.digits):
      raise ValueError(f"Problem.digits must be a non-empty tuple of digits 0-9, got {self.digits}")

  @property
  def prompt(self) -> str:
    """The instruction text, e.g. ``"sort: 7 2 9 4"``."""
    return f"{self.op}: " + " ".join(map(str, self.digits))

  @property
  def answer(self) -> tuple[int, ...]:
    """The correct answer as digits."""
    return tuple(sorted(self.digits)) if self.op == "sort" else tuple(reversed(self.digits))

  @property
  def answer_text(self) -> str:
    return " ".join(map(str, self.answer))

  @property
  def num_steps(self) -> int:
    """Algorithm steps that finish the job: bubble-sort passes or reversal swaps."""
    n = len(self.digits)
    return n - 1 if self.op == "sort" else n // 2


def parse_prompt(prompt: str) -> Problem:
  """Inverse of `Problem.prompt` (tolerates the tokenizer's spacing, ``"sort : 7 2"``).

  Raises:
    ValueError: the prompt is not ``<op>: <digits>``.
  """
  toks = tokens(prompt)
  if (
    len(toks) < 3
    or toks[0] not in OPERATIONS
    or toks[1] != ":"
    or not all(t in DIGITS for t in toks[2:])
  ):
    raise ValueError(
      f"prompt {prompt!r} is not a demo instruction; expected "
      f"'<op>: <digits>' with op in {OPERATIONS} and single digits"
    )
  return Problem(toks[0], tuple(int(t) for t in toks[2:]))


def sample_problem(
  rng: np.random.Generator,
  *,
  min_len: int = 4,
  max_len: int = 7,
  operations: Sequence[str] = OPERATIONS,
) -> Problem:
  """A random problem: uniform operation, length in [min_len, max_len], digits 0-9."""
  if not 1 <= min_len <= max_len:
    raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
  op = operations[int(rng.integers(len(operations)))]
  n = int(rng.integers(min_len, max_len + 1))
  return Problem(op, tuple(int(d) for d in rng.integers(0, 10, size=n)))


def partial_solution(problem: Problem, steps: int) -> tuple[int, ...]:
  """The answer after ``steps`` algorithm steps (bubble passes or outer swaps).

  ``steps >= problem.num_steps`` gives the correct answer, ``steps = 0`` the input.
  """
  xs = list(problem.digits)
  n = len(xs)
  if problem.op == "sort":
    for p in range(min(steps, n - 1)):
      for i in range(n - 1 - p):
        if xs[i] > xs[i + 1]:
          xs[i], xs[i + 1] = xs[i + 1], xs[i]
  else:
    for i in range(min(steps, n // 2)):
      xs[i], xs[n - 1 - i] = xs[n - 1 - i], xs[i]
  return tuple(xs)


def demonstration(problem: Problem, rng: np.random.Generator) -> str:
  """An imperfect demonstration: `partial_solution` after k ~ U{0..num_steps} steps."""
  k = int(rng.integers(0, problem.num_steps + 1))
  return " ".join(map(str, partial_solution(problem, k)))


def edit_distance(a: Sequence, b: Sequence) -> int:
  """Levenshtein distance between two sequences (unit insert/delete/substitute costs)."""
  prev = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    cur = [i] + [0] * len(b)
    for j, y in enumerate(b, 1):
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
    prev = cur
  return prev[-1]


def oracle_score(prompt: str, response: str) -> float:
  """Oracle score of ``response`` to ``prompt`` in [0, 1] (formula in the module docstring)."""
  answer = [str(d) for d in parse_prompt(prompt).answer]
  got = tokens(response)
  n, m = len(answer), len(got)
  score = 1.0 - edit_distance(got, answer) / n - RAMBLING_PENALTY * max(0, m - n)
  return float(min(1.0, max(0.0, score)))


def oracle_scores(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
  """`oracle_score` per (prompt, response) pair, ``[num]`` float64."""
  if len(prompts) != len(responses):
    raise ValueError(f"oracle_scores: {len(prompts)} prompts but {len(responses)} responses")
  return np.array([oracle_score(p, r) for p, r in zip(prompts, responses)], np.float64)


def win_rate(scores: Sequence[float], baseline_scores: Sequence[float]) -> float:
  """Fraction of prompts where ``scores`` beats ``baseline_scores``, ties counting half.

  Both are ``[num_prompts]`` oracle scores of two systems on the same prompts.
  """
  a = np.asarray(scores, np.float64)
  b = np.asarray(baseline_scores, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size == 0:
    raise ValueError(
      f"win_rate: scores {a.shape} and baseline_scores {b.shape} must be equal, "
      "non-empty 1-D shapes"
    )
  return float(np.mean((a > b) + 0.5 * (a == b)))


def oracle_prefers(prompt: str, first: str, second: str) -> int:
  """+1 if the oracle prefers ``first``, -1 if ``second``, 0 on a tie."""
  s1, s2 = oracle_score(prompt, first), oracle_score(prompt, second)
  return int(np.sign(s1 - s2))
