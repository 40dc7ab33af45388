"""Verifiable-instruction prompts in the style of IFEval and their programmatic judge.

The real-model study (`ssapo_jax.demo.real`) uses this task: each prompt asks for a short text
on a topic and carries 1-3 checkable constraints, written as fixed English sentences so the
judge reads them back from the prompt text alone:

=========================  =========================================================
constraint                 sentence in the prompt
=========================  =========================================================
``max_words``              ``Answer in at most N words.``
``min_words``              ``Answer in at least N words.``
``max_sentences``          ``Use at most N sentences.``
``include``                ``Include the word "W".``
``forbid``                 ``Do not use the word "W".``
``lowercase``              ``Write everything in lower case.``
``ending``                 ``End your answer with the word "W".``
``bullets``                ``Answer with exactly N bullet points, each line starting with "- ".``
=========================  =========================================================

Judge score of a response, in [0, 1] (`judge_score`)::

  score = clip(met / total - 0.002 * max(0, words - 60), 0, 1)

the fraction of constraints met with a mild penalty of 0.002 per word beyond 60 words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

TOPICS = (
  "cats",
  "the ocean",
  "a rainy day",
  "coffee",
  "your favourite book",
  "the moon",
  "a city at night",
  "learning to cook",
  "winter",
  "friendship",
  "trains",
  "gardening",
  "the internet",
  "a forest walk",
  "music",
  "mountains",
  "a birthday party",
  "bicycles",
  "the history of bread",
  "space travel",
  "a quiet library",
  "the summer holidays",
  "robots",
  "honey bees",
  "a football match",
  "rivers",
  "breakfast",
  "old maps",
  "volcanoes",
  "chess",
)
WORDS = (
  "blue",
  "happy",
  "morning",
  "light",
  "water",
  "friend",
  "quiet",
  "green",
  "simple",
  "bright",
  "small",
  "warm",
)
LENGTH_FREE_WORDS = 60
LENGTH_PENALTY = 0.002

_WORD_RE = re.compile(r"[A-Za-z0-9']+")
_PATTERNS = {
  "max_words": re.compile(r"Answer in at most (\d+) words\."),
  "min_words": re.compile(r"Answer in at least (\d+) words\."),
  "max_sentences": re.compile(r"Use at most (\d+) sentences\."),
  "include": re.compile(r"Include the word \"(\w+)\"\."),
  "forbid": re.compile(r"Do not use the word \"(\w+)\"\."),
  "lowercase": re.compile(r"Write everything in lower case\.()"),
  "ending": re.compile(r"End your answer with the word \"(\w+)\"\."),
  "bullets": re.compile(
    r"Answer with exactly (\d+) bullet points, each line starting with \"- \"\."
  ),
}
# Families that may not share a prompt (contradictory or redundant pairs).
_EXCLUSIVE = ({"max_words", "min_words"}, {"include", "forbid"}, {"bullets", "max_sentences"})


def words(text: str) -> list[str]:
  return _WORD_RE.findall(text)


def _sentences(text: str) -> int:
  return len([s for s in re.split(r"[.!?]+", text) if s.strip()])


def constraint_sentence(kind: str, arg) -> str:
  """The prompt sentence of one constraint (the `_PATTERNS` templates)."""
  return {
    "max_words": f"Answer in at most {arg} words.",
    "min_words": f"Answer in at least {arg} words.",
    "max_sentences": f"Use at most {arg} sentences.",
    "include": f'Include the word "{arg}".',
    "forbid": f'Do not use the word "{arg}".',
    "lowercase": "Write everything in lower case.",
    "ending": f'End your answer with the word "{arg}".',
    "bullets": f'Answer with exactly {arg} bullet points, each line starting with "- ".',
  }[kind]


def sample_prompt(rng: np.random.Generator) -> str:
  """A topic and 1-3 compatible constraints, e.g. ``Write about coffee. Include the word
  "warm". Answer in at most 20 words.``"""
  n = int(rng.integers(1, 4))
  kinds: list[str] = []
  for kind in rng.permutation(list(_PATTERNS)):
    if len(kinds) == n:
      break
    if any(kind in group and set(kinds) & (group - {kind}) for group in _EXCLUSIVE):
      continue
    kinds.append(str(kind))
  used_words = set()
  parts = [f"Write about {TOPICS[int(rng.integers(len(TOPICS)))]}."]
  for kind in kinds:
    if kind in ("include", "forbid", "ending"):
      arg = str(rng.choice([w for w in WORDS if w not in used_words]))
      used_words.add(arg)
    elif kind == "max_words":
      arg = int(rng.choice([10, 15, 20, 30]))
    elif kind == "min_words":
      arg = int(rng.choice([10, 15, 20]))
    elif kind == "max_sentences":
      arg = int(rng.choice([1, 2, 3]))
    elif kind == "bullets":
      arg = int(rng.choice([2, 3]))
    else:
      arg = None
    parts.append(constraint_sentence(kind, arg))
  return " ".join(parts)


def constraints(prompt: str) -> list[tuple[str, str]]:
  """``(kind, argument)`` of every constraint in a prompt's text."""
  found = []
  for kind, pattern in _PATTERNS.items():
    found += [(kind, m.group(1)) for m in pattern.finditer(prompt)]
  return found


def constraint_met(kind: str, arg: str, response: str) -> bool:
  """Whether ``response`` satisfies one constraint."""
  ws = words(response)
  lower = [w.lower() for w in ws]
  if kind == "max_words":
    return 0 < len(ws) <= int(arg)
  if kind == "min_words":
    return len(ws) >= int(arg)
  if kind == "max_sentences":
    return 0 < _sentences(response) <= int(arg)
  if kind == "include":
    return arg.lower() in lower
  if kind == "forbid":
    return bool(ws) and arg.lower() not in lower
  if kind == "lowercase":
    return any(c.isalpha() for c in response) and response == response.lower()
  if kind == "ending":
    return bool(lower) and lower[-1] == arg.lower()
  if kind == "bullets":
    lines = [ln.strip() for ln in response.strip().splitlines() if ln.strip()]
    return sum(ln.startswith("- ") for ln in lines) == int(arg)
  raise ValueError(f"unknown constraint kind {kind!r}")


def judge_score(prompt: str, response: str) -> float:
  """Fraction of the prompt's constraints met, minus the mild length penalty (module doc)."""
  cs = constraints(prompt)
  if not cs:
    raise ValueError(f"prompt has no recognisable constraint: {prompt!r}")
  met = sum(constraint_met(k, a, response) for k, a in cs) / len(cs)
  penalty = LENGTH_PENALTY * max(0, len(words(response)) - LENGTH_FREE_WORDS)
  return float(np.clip(met - penalty, 0.0, 1.0))


def judge_scores(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
  return np.array([judge_score(p, r) for p, r in zip(prompts, responses)], np.float64)


def judge_prefers(prompt: str, first: str, second: str) -> int:
  """+1 if the judge scores ``first`` higher, -1 if lower, 0 on a tie."""
  a, b = judge_score(prompt, first), judge_score(prompt, second)
  return int(np.sign(a - b))
