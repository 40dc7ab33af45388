"""The demo's arms, each run through the real pipeline, and their oracle scoring.

Every arm is an `ssapo_jax.experiment.ExperimentConfig` loaded from ``configs/tiny_cpu.yaml`` with
dotted overrides (exactly what ``ssapo-train configs/tiny_cpu.yaml key=value ...`` builds) and
run with `ssapo_jax.pipeline.run.run`. The arms:

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
SEED_FRACTION = 1 / 30  # the labelled seed's share of the pool (paper: 2K of 60K)


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: its name, label, which seed file it trains on and its config overrides."""

  name: str
  label: str
  overrides: tuple[str, ...]
  self_annotated: bool  # rounds >= 1 self-annotate
  all_labels: bool = False  # train on the whole labelled pool
  flipped_seed: bool = False
  flat: bool = False  # one measurement (plotted as a horizontal line)
  color: str | None = None


@dataclasses.dataclass(frozen=True)
class DemoMode:
  """Sizes of one demo mode."""

  name: str
  world: world_lib.WorldConfig
  num_seeds: int
  num_rounds: int
  round_prompts: int  # unlabelled prompts per round
  epsilon: float
  arms: tuple[str, ...]
  overrides: tuple[str, ...] = ()  # extra config overrides for every arm
  seed_size: int | float = SEED_FRACTION  # the labelled seed: a fraction of the pool, or a count


def make_arms(*, epsilon: float) -> dict[str, Arm]:
  """The five arms (see the module docstring)."""
  arms = [
    Arm(
      "seed_dpo",
      "(a) DPO on seed only",
      ("dro.epsilon=0",),
      self_annotated=False,
      flat=True,
      color="tab:blue",
    ),
    Arm(
      "self_eps0",
      "(b) self-annotated DPO, ε=0",
      ("dro.epsilon=0",),
      self_annotated=True,
      color="tab:orange",
    ),
    Arm(
      "ssapo",
      f"(c) SSAPO, ε={epsilon:g}",
      (f"dro.epsilon={epsilon}",),
      self_annotated=True,
      color="tab:green",
    ),
    Arm(
      "all_labels",
      "(d) DPO on all pool labels",
      ("dro.epsilon=0",),
      self_annotated=False,
      all_labels=True,
      flat=True,
      color="tab:red",
    ),
    Arm(
      "ssapo_noisy",
      f"(e) SSAPO ε={epsilon:g}, 25% seed flipped",
      (f"dro.epsilon={epsilon}",),
      self_annotated=True,
      flipped_seed=True,
      color="tab:purple",
    ),
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


def score_generations(
  path: str, sft_scores: dict[str, float], *, score_fn=task.oracle_scores
) -> dict:
  """Oracle scores of an AlpacaEval-format generations file against the SFT greedy baseline.

  ``score_fn(prompts, responses) -> [n] scores in [0, 1]`` is the oracle (default: the synthetic
  task's; the real-model study passes its IFEval-style judge).

  Returns ``win_rate`` (ties half), ``mean_score``, ``exact`` and ``num_prompts``.
  """
  with open(path) as f:
    rows = json.load(f)
  if not rows:
    raise ValueError(f"{path}: no generations")
  prompts = [_prompt_text(r["instruction"]) for r in rows]
  missing = [p for p in prompts if p not in sft_scores]
  if missing:
    raise ValueError(
      f"{path}: {len(missing)} instructions are not among the demo's evaluation "
      f"prompts, e.g. {missing[0]!r}"
    )
  scores = np.asarray(score_fn(prompts, [r["output"] for r in rows]))
  baseline = np.array([sft_scores[p] for p in prompts])
  return {
    "win_rate": task.win_rate(scores, baseline),
    "mean_score": float(scores.mean()),
    "exact": float(np.mean(scores == 1.0)),
    "num_prompts": len(rows),
  }


def pair_agreement(
  prompts: Sequence,
  chosen: Sequence[str],
  rejected: Sequence[str],
  *,
  prefers_fn=task.oracle_prefers,
) -> dict:
  """How often the oracle (``prefers_fn(prompt, a, b) -> +1/0/-1``) agrees with a round's
  chosen/rejected labels.

  ``agreement`` is computed over the pairs the oracle does not score equal; ``oracle_ties`` is
  the fraction it scores equal.
  """
  prefs = np.array(
    [prefers_fn(_prompt_text(p), c, r) for p, c, r in zip(prompts, chosen, rejected)]
  )
  decided = prefs != 0
  return {
    "agreement": float(np.mean(prefs[decided] > 0)) if decided.any() else None,
    "oracle_ties": float(np.mean(~decided)) if len(prefs) else None,
    "num_pairs": int(len(prefs)),
  }


def sft_baseline(world: world_lib.World) -> dict[str, float]:
  with open(world.sft_eval_path) as f:
    return {r["instruction"]: float(r["score"]) for r in json.load(f)}


# ----------------------------------------------------------------------------- running


def _round_prompts_file(
  world: world_lib.World, data_dir: str, *, split_seed: int, seed_size: float
) -> str:
  """The world's pool prompts minus this seed's labelled-seed prompts (``data.prompt_source``).

  Includes the prompts whose two SFT samples tied (they carry no label, so nothing marks them);
  the seed rows are found with the pipeline's own `split_rows`, as in `_seed_file`.
  """
  from ssapo_jax.data.seed import split_rows

  pool = world_lib.read_jsonl(world.pool_path)
  manifest = split_rows(len(pool), seed_size=seed_size, seed=split_seed)
  seed_prompts = {pool[i]["prompt"] for i in np.asarray(manifest.seed_rows).tolist()}
  prompts = [
    r
    for r in world_lib.read_jsonl(os.path.join(world.root, "pool_prompts.jsonl"))
    if r["prompt"] not in seed_prompts
  ]
  path = os.path.join(data_dir, f"round_prompts_{split_seed}.jsonl")
  world_lib.write_jsonl(path, prompts)
  return path


def _seed_file(
  world: world_lib.World, data_dir: str, *, split_seed: int, seed_size: float, flip_fraction: float
) -> str:
  """A copy of the pool with ``flip_fraction`` of the seed rows' labels swapped.

  The seed rows are found with the pipeline's own `ssapo_jax.data.seed.split_rows` (same
  rows, same split seed), so only labels the pipeline will use as the seed are flipped.
  """
  from ssapo_jax.data.seed import split_rows

  pool = world_lib.read_jsonl(world.pool_path)
  manifest = split_rows(len(pool), seed_size=seed_size, seed=split_seed)
  seed_rows = np.asarray(manifest.seed_rows)
  rng = np.random.default_rng(split_seed + 7)
  flip = set(
    rng.choice(seed_rows, size=round(len(seed_rows) * flip_fraction), replace=False).tolist()
  )
  rows = [
    dict(r, chosen=r["rejected"], rejected=r["chosen"]) if i in flip else r
    for i, r in enumerate(pool)
  ]
  path = os.path.join(data_dir, f"pool_seedflip_{split_seed}.jsonl")
  world_lib.write_jsonl(path, rows)
  return path


# The arms run configs/tiny_cpu.yaml as shipped (its training settings come from the sweep in
# docs/demo.md); the demo adds only file paths, sizes and each arm's own choices.
SMOKE = DemoMode(
  name="smoke",
  world=world_lib.WorldConfig(
    sft_steps=150, pool_prompts=600, num_eval_prompts=64, sample_batch_size=128
  ),
  num_seeds=1,
  num_rounds=1,
  round_prompts=96,
  epsilon=0.01,
  arms=("seed_dpo", "ssapo", "all_labels"),
)
DEFAULT = DemoMode(
  name="default",
  world=world_lib.WorldConfig(),
  num_seeds=3,
  num_rounds=2,
  round_prompts=800,
  epsilon=0.01,
  arms=("seed_dpo", "self_eps0", "ssapo", "all_labels", "ssapo_noisy"),
)
FULL = dataclasses.replace(DEFAULT, name="full", num_seeds=5, num_rounds=3, round_prompts=1200)
MODES = {m.name: m for m in (SMOKE, DEFAULT, FULL)}


def repo_config_path() -> str:
  """``configs/tiny_cpu.yaml`` of the source checkout (the demo's base config)."""
  here = os.path.dirname(os.path.abspath(__file__))
  path = os.path.join(os.path.dirname(os.path.dirname(here)), CONFIG_RELPATH)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"the demo's base config {path} is missing; run ssapo-demo from an "
      "installed source checkout (pip install -e .)"
    )
  return path


def arm_overrides(
  arm: Arm,
  mode: DemoMode,
  world: world_lib.World,
  run_dir: str,
  *,
  seed: int,
  source: str,
  prompt_source: str | None,
) -> list[str]:
  """The dotted overrides of one arm and seed (what one would pass to ``ssapo-train``)."""
  # The ceiling labels every pool pair: an explicit count (1.0 would read as one row).
  seed_size = world.stats["pool_pairs"] if arm.all_labels else mode.seed_size
  num_rounds = mode.num_rounds if arm.self_annotated else 0
  seed_rows = (
    seed_size if isinstance(seed_size, int) else round(world.stats["pool_pairs"] * seed_size)
  )
  left = world.config.pool_prompts - seed_rows
  per_round = min(mode.round_prompts, left // max(1, num_rounds)) if num_rounds else 0
  pools = "[" + ",".join([str(per_round)] * num_rounds) + "]"
  extra = [f"data.prompt_source={prompt_source}"] if prompt_source else []
  return [
    *extra,
    f"output_dir={run_dir}",
    f"model.path={world.model_path}",
    f"data.source={source}",
    f"data.seed_size={seed_size!r}",
    f"data.pool_sizes={pools}",
    f"data.split_seed={seed}",
    f"seed={seed}",
    f"rounds.num_rounds={num_rounds}",
    f"sampling.max_new_tokens={world.config.max_new_tokens}",
    f"data.eval_source={world.eval_prompts_path}",
    f"rounds.num_eval_prompts={world.config.num_eval_prompts}",
    *mode.overrides,
    *arm.overrides,
  ]


def score_run(
  run_dir: str,
  sft_scores: dict[str, float],
  *,
  score_fn=task.oracle_scores,
  prefers_fn=task.oracle_prefers,
) -> list[dict]:
  """Oracle measurements of every finished round of one run directory (see `report`)."""
  from ssapo_jax.data.rounds_io import load_round

  out = []
  t = 0
  while os.path.isfile(os.path.join(run_dir, f"round_{t}", "summary.json")):
    rdir = os.path.join(run_dir, f"round_{t}")
    with open(os.path.join(rdir, "summary.json")) as f:
      summary = json.load(f)
    m = {
      "round": t,
      **score_generations(
        os.path.join(rdir, "eval_generations.json"), sft_scores, score_fn=score_fn
      ),
      "num_train_pairs": summary.get("num_pairs"),
      "agreement": None,
      "oracle_ties": None,
    }
    if os.path.isdir(os.path.join(rdir, "pairs")):
      ds, _ = load_round(os.path.join(rdir, "pairs"))
      prompts = [json.loads(p) for p in ds["prompt"]]
      m.update(pair_agreement(prompts, ds["chosen"], ds["rejected"], prefers_fn=prefers_fn))
      margins = np.asarray(ds["margin"], np.float64)
      m["margin_quantiles"] = np.quantile(margins, [0.1, 0.5, 0.9]).tolist()
    if "follower" in summary:
      m["follower"] = summary["follower"]
    out.append(m)
    t += 1
  return out


def _drop_stale_run(run_dir: str, overrides: Sequence[str]) -> None:
  """Removes a demo run directory whose saved config differs (a finished or interrupted run
  with the same config is resumed/reused by the pipeline instead)."""
  import shutil

  from ssapo_jax import config as cfg_lib
  from ssapo_jax.experiment import load_experiment

  saved = os.path.join(run_dir, cfg_lib.CONFIG_FILENAME)
  if not os.path.isfile(saved):
    return
  new = cfg_lib.dump_yaml(load_experiment(repo_config_path(), overrides))
  with open(saved) as f:
    if f.read() != new:
      shutil.rmtree(run_dir)


def run_arm(arm: Arm, mode: DemoMode, world: world_lib.World, out: str, *, seed: int) -> str:
  """Runs one arm and seed through ``ssapo-train`` (`ssapo_jax.cli.main`); returns its run dir."""
  from ssapo_jax import cli as train_cli

  run_dir = os.path.join(out, "runs", f"seed_{seed}", arm.name)
  data_dir = os.path.join(out, "runs", f"seed_{seed}")
  os.makedirs(data_dir, exist_ok=True)
  source = world.pool_path
  if arm.flipped_seed:
    source = _seed_file(
      world, data_dir, split_seed=seed, seed_size=mode.seed_size, flip_fraction=0.25
    )
  prompt_source = None
  if arm.self_annotated:
    prompt_source = _round_prompts_file(world, data_dir, split_seed=seed, seed_size=mode.seed_size)
  overrides = arm_overrides(
    arm, mode, world, run_dir, seed=seed, source=source, prompt_source=prompt_source
  )
  # One compilation cache for every arm and seed (a run's default is its own directory, so each
  # arm would compile the same programs again).
  overrides.append(f"compilation.cache_dir={os.path.join(out, 'jax_cache')}")
  with open(os.path.join(data_dir, f"{arm.name}.command.txt"), "w") as f:
    f.write("ssapo-train " + " ".join([CONFIG_RELPATH, *overrides]) + "\n")
  _drop_stale_run(run_dir, overrides)
  status = train_cli.main([repo_config_path(), *overrides])
  if status != 0:
    raise RuntimeError(f"ssapo-train failed for arm {arm.name} seed {seed} (exit status {status})")
  return run_dir


def run_demo(
  world: world_lib.World,
  out: str,
  *,
  mode: DemoMode,
  num_seeds: int | None = None,
  started: float | None = None,
  log=print,
) -> dict:
  """Runs every arm of ``mode`` for each seed, scores them, writes results.json and the plot."""
  started = time.time() if started is None else started
  num_seeds = mode.num_seeds if num_seeds is None else num_seeds
  arms = make_arms(epsilon=mode.epsilon)
  sft_scores = sft_baseline(world)
  results = {
    name: {
      "label": arms[name].label,
      "flat": arms[name].flat,
      "color": arms[name].color,
      "runs": {},
    }
    for name in mode.arms
  }
  timings = {}
  for seed in range(num_seeds):
    os.makedirs(os.path.join(out, "runs", f"seed_{seed}"), exist_ok=True)
    for name in mode.arms:
      log(f"\n[demo] seed {seed}: arm {arms[name].label}")
      t0 = time.time()
      run_dir = run_arm(arms[name], mode, world, out, seed=seed)
      timings[f"seed_{seed}/{name}"] = time.time() - t0
      results[name]["runs"][f"seed_{seed}"] = score_run(run_dir, sft_scores)
      results[name]["run_dirs"] = results[name].get("run_dirs", []) + [run_dir]
  for arm in results.values():
    arm["summary"] = report.summarise(arm["runs"])
  elapsed = time.time() - started
  doc = {
    "mode": mode.name,
    "num_seeds": num_seeds,
    "num_rounds": mode.num_rounds,
    "epsilon": mode.epsilon,
    "config": repo_config_path(),
    "world": world.stats,
    "world_config": dataclasses.asdict(world.config),
    "arms": results,
    "arm_seconds": timings,
    "elapsed_seconds": elapsed,
  }
  results_path = os.path.join(out, "results.json")
  world_lib.write_json(results_path, doc)
  plot_path = report.plot_win_rates(
    results,
    os.path.join(out, "win_rates.png"),
    title=f"ssapo-demo ({mode.name}): oracle win rate vs SFT, {num_seeds} seed(s)",
  )
  log("\n" + report.format_table(results))
  log(f"\n[demo] {mode.name} mode, {num_seeds} seed(s), finished in {elapsed:.0f} s")
  log(f"[demo] results: {results_path}")
  log(f"[demo] plot:    {plot_path}")
  return doc
