"""The demo's arms, each run through the real pipeline, and their oracle scoring.

Every arm is an `ssapo_jax.config.ExperimentConfig` loaded from ``configs/tiny_cpu.yaml`` with
dotted overrides (exactly what ``ssapo-train configs/tiny_cpu.yaml key=value ...`` builds) and
run with `ssapo_jax.rounds.run`. The arms:

* ``seed_dpo``    (a) DPO on the labelled seed only (round 0, no self-annotation);
* ``self_eps0``   (b) self-annotated DPO rounds with ε = 0 (the SPA-like ablation);
* ``ssapo``       (c) SSAPO rounds with ε > 0;
* ``all_labels``  (d) DPO on the whole pool with oracle labels (the "all labels" ceiling);
* ``ssapo_noisy`` (e) SSAPO with 25 % of the seed labels flipped (the paper's Table 5).

After a run, every round's ``eval_generations.json`` (greedy outputs on the held-out prompts)
is scored by the oracle against the SFT model's greedy outputs, and every self-annotated
round's pairs are compared with the oracle's preference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence

import numpy as np

from ssapo_jax.demo import report, task
from ssapo_jax.demo import world as world_lib

CONFIG_RELPATH = os.path.join("configs", "tiny_cpu.yaml")


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: its name, label, which seed file it trains on and its config overrides."""
  name: str
  label: str
  overrides: tuple[str, ...]
  self_annotated: bool       # rounds >= 1 self-annotate
  all_labels: bool = False   # train on the whole labelled pool
  flipped_seed: bool = False
  flat: bool = False         # one measurement (plotted as a horizontal line)
  color: str | None = None


@dataclasses.dataclass(frozen=True)
class DemoMode:
  """Sizes of one demo mode."""
  name: str
  world: world_lib.WorldConfig
  num_seeds: int
  num_rounds: int
  round_prompts: int         # unlabelled prompts per round
  epsilon: float
  arms: tuple[str, ...]
  overrides: tuple[str, ...] = ()  # extra config overrides for every arm


def make_arms(*, epsilon: float) -> dict[str, Arm]:
  """The five arms (see the module docstring)."""
  arms = [
      Arm("seed_dpo", "(a) DPO on seed only", ("dro.epsilon=0", "train.objective=dpo"),
          self_annotated=False, flat=True, color="tab:blue"),
      Arm("self_eps0", "(b) self-annotated DPO, ε=0", ("dro.epsilon=0", "train.objective=dpo"),
          self_annotated=True, color="tab:orange"),
      Arm("ssapo", f"(c) SSAPO, ε={epsilon:g}", (f"dro.epsilon={epsilon}", "train.objective=robust"),
          self_annotated=True, color="tab:green"),
      Arm("all_labels", "(d) DPO on all pool labels", ("dro.epsilon=0", "train.objective=dpo"),
          self_annotated=False, all_labels=True, flat=True, color="tab:red"),
      Arm("ssapo_noisy", f"(e) SSAPO ε={epsilon:g}, 25% seed flipped",
          (f"dro.epsilon={epsilon}", "train.objective=robust"), self_annotated=True,
          flipped_seed=True, color="tab:purple"),
  ]
  return {a.name: a for a in arms}


# ----------------------------------------------------------------------------- scoring


def _prompt_text(prompt) -> str:
  """The instruction text of a prompt given as text or as a message list."""
  if isinstance(prompt, str):
    return prompt
  users = [m["content"] for m in prompt if m["role"] == "user"]
  if not users:
    raise ValueError(f"prompt {prompt!r} has no user message")
  return users[-1]


def score_generations(path: str, sft_scores: dict[str, float]) -> dict:
  """Oracle scores of an AlpacaEval-format generations file against the SFT greedy baseline.

  Returns ``win_rate`` (ties half), ``mean_score``, ``exact`` and ``num_prompts``.
  """
  with open(path) as f:
    rows = json.load(f)
  if not rows:
    raise ValueError(f"{path}: no generations")
  prompts = [_prompt_text(r["instruction"]) for r in rows]
  missing = [p for p in prompts if p not in sft_scores]
  if missing:
    raise ValueError(f"{path}: {len(missing)} instructions are not among the demo's evaluation "
                     f"prompts, e.g. {missing[0]!r}")
  scores = task.oracle_scores(prompts, [r["output"] for r in rows])
  baseline = np.array([sft_scores[p] for p in prompts])
  return {"win_rate": task.win_rate(scores, baseline), "mean_score": float(scores.mean()),
          "exact": float(np.mean(scores == 1.0)), "num_prompts": len(rows)}


def pair_agreement(prompts: Sequence, chosen: Sequence[str], rejected: Sequence[str]) -> dict:
  """How often the oracle agrees with a round's chosen/rejected labels.

  ``agreement`` is computed over the pairs the oracle does not score equal; ``oracle_ties`` is
  the fraction it scores equal.
  """
  prefs = np.array([task.oracle_prefers(_prompt_text(p), c, r)
                    for p, c, r in zip(prompts, chosen, rejected)])
  decided = prefs != 0
  return {"agreement": float(np.mean(prefs[decided] > 0)) if decided.any() else None,
          "oracle_ties": float(np.mean(~decided)) if len(prefs) else None,
          "num_pairs": int(len(prefs))}


def sft_baseline(world: world_lib.World) -> dict[str, float]:
  with open(world.sft_eval_path) as f:
    return {r["instruction"]: float(r["score"]) for r in json.load(f)}


# ----------------------------------------------------------------------------- running


def _seed_file(world: world_lib.World, data_dir: str, *, split_seed: int, seed_size: float,
               flip_fraction: float) -> str:
  """A copy of the pool with ``flip_fraction`` of the seed rows' labels swapped.

  The seed rows are found with the pipeline's own `ssapo_jax.data.seed.split_rows` (same
  rows, same split seed), so only labels the pipeline will use as the seed are flipped.
  """
  from ssapo_jax.data.seed import split_rows
  pool = world_lib.read_jsonl(world.pool_path)
  manifest = split_rows(len(pool), seed_size=seed_size, seed=split_seed)
  seed_rows = np.asarray(manifest.seed_rows)
  rng = np.random.default_rng(split_seed + 7)
  flip = set(rng.choice(seed_rows, size=round(len(seed_rows) * flip_fraction),
                        replace=False).tolist())
  rows = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) if i in flip else r
          for i, r in enumerate(pool)]
  path = os.path.join(data_dir, f"pool_seedflip_{split_seed}.jsonl")
  world_lib.write_jsonl(path, rows)
  return path
