"""Builds the demo's offline world: tokenizer, SFT model, oracle-labelled pool and prompt files.

Nothing is downloaded. `build_world` writes into ``<out>/world/``:

* ``sft_model/``: a tiny Llama-family model (the same `ssapo_jax.models.Llama` code as real
  runs) trained from scratch by supervised fine-tuning on the imperfect demonstrations of
  `ssapo_jax.demo.task`, saved with `ssapo_jax.models.params.save_hf` together with a locally
  built word-level tokenizer and chat template; it is then reloaded with ``load_hf`` like any
  real checkpoint.
* ``pool.jsonl``: the preference pool. For each pool prompt the SFT model samples two
  responses (temperature ``pool_temperature``); the oracle labels them chosen/rejected, and
  prompts whose two responses tie under the oracle are left out (as a human annotator would
  have no preference), as are pairs with an empty response (the data pipeline rejects them). Plain-string format (``prompt``, ``chosen``, ``rejected``) plus the
  oracle scores.
* ``pool_prompts.jsonl``: every pool prompt (tied ones included), unlabelled.
* ``eval_prompts.jsonl``: held-out prompts, and ``sft_eval.json``, the SFT model's greedy
  outputs on them in AlpacaEval's format (the baseline of every win rate).
* ``world.json``: the world's settings and measured statistics; a later run with the same
  settings reuses the world instead of rebuilding it.

The pipeline's own seed/pool split (``data.seed_size``, ``data.pool_sizes``) then draws each
experiment seed's labelled seed from ``pool.jsonl`` (see `ssapo_jax.demo.arms`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from ssapo_jax import sampling
from ssapo_jax.demo import task
from ssapo_jax.models import tokenizer as tk
from ssapo_jax.models.base import split_params
from ssapo_jax.models.llama import Llama, LlamaConfig
from ssapo_jax.models.params import load_hf, save_hf

WORLD_FILE = "world.json"
GENERATOR_SFT = "demo-sft"


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Settings of the demo world (all sizes are small enough for 2 CPU cores)."""

  seed: int = 0  # world seed: problems, demonstrations, init, samples
  # Model (a Llama-family decoder trained from scratch).
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2  # grouped-query attention, as Llama 3 / Mistral
  # Supervised fine-tuning on imperfect demonstrations.
  sft_steps: int = 800
  sft_batch_size: int = 64
  sft_learning_rate: float = 1e-3
  # Problems.
  min_len: int = 4
  max_len: int = 7
  # Preference pool and evaluation prompts.
  pool_prompts: int = 4500  # prompts sampled twice; oracle ties are left out
  pool_temperature: float = 1.0
  num_eval_prompts: int = 400
  max_new_tokens: int = 12  # response limit (answers have at most max_len + EOS tokens)
  sample_batch_size: int = 512  # prompts per `sampling.generate` call

  def __post_init__(self):
    for name in (
      "sft_steps",
      "sft_batch_size",
      "pool_prompts",
      "num_eval_prompts",
      "max_new_tokens",
      "sample_batch_size",
    ):
      if getattr(self, name) < 1:
        raise ValueError(f"WorldConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.max_new_tokens < self.max_len + 1:
      raise ValueError(
        f"WorldConfig.max_new_tokens ({self.max_new_tokens}) must fit the longest "
        f"answer plus EOS ({self.max_len + 1})"
      )


@dataclasses.dataclass(frozen=True)
class World:
  """Paths and statistics of a built world (``stats`` is ``world.json``'s ``stats``)."""

  root: str
  config: WorldConfig
  stats: dict

  @property
  def model_path(self) -> str:
    return os.path.join(self.root, "sft_model")

  @property
  def pool_path(self) -> str:
    return os.path.join(self.root, "pool.jsonl")

  @property
  def eval_prompts_path(self) -> str:
    return os.path.join(self.root, "eval_prompts.jsonl")

  @property
  def sft_eval_path(self) -> str:
    return os.path.join(self.root, "sft_eval.json")


# ----------------------------------------------------------------------------- io helpers


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- model


def model_config(tokenizer, config: WorldConfig) -> LlamaConfig:
  """The tiny Llama config for the demo tokenizer."""
  return LlamaConfig(
    vocab_size=len(tokenizer),
    hidden_size=config.hidden_size,
    intermediate_size=config.intermediate_size,
    num_layers=config.num_layers,
    num_heads=config.num_heads,
    num_kv_heads=config.num_kv_heads,
    head_dim=config.hidden_size // config.num_heads,
    max_position_embeddings=64,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_ids=(tokenizer.eos_token_id,),
    pad_token_id=tokenizer.pad_token_id,
  )


def _pad_right(seqs: Sequence[Sequence[int]], length: int, pad: int) -> np.ndarray:
  out = np.full((len(seqs), length), pad, np.int32)
  for i, s in enumerate(seqs):
    out[i, : len(s)] = s
  return out


def _pad_left(
  seqs: Sequence[Sequence[int]], length: int, pad: int
) -> tuple[np.ndarray, np.ndarray]:
  ids = np.full((len(seqs), length), pad, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    ids[i, length - len(s) :] = s
    mask[i, length - len(s) :] = 1
  return ids, mask


def sft_sequences(
  tokenizer, prompts: Sequence[str], responses: Sequence[str], length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-padded ``[num, length]`` ids, attention mask and response loss mask (incl. EOS)."""
  p_ids = tk.chat_prompt_ids_batch(tokenizer, list(prompts))
  r_ids = tk.response_ids_batch(tokenizer, list(responses))
  seqs = [p + r for p, r in zip(p_ids, r_ids)]
  if max(map(len, seqs)) > length:
    raise ValueError(
      f"sft_sequences: a sequence has {max(map(len, seqs))} tokens; the padded length is {length}"
    )
  ids = _pad_right(seqs, length, tokenizer.pad_token_id)
  attn = _pad_right([[1] * len(s) for s in seqs], length, 0)
  loss = _pad_right([[0] * len(p) + [1] * len(r) for p, r in zip(p_ids, r_ids)], length, 0)
  return ids, attn, loss


def train_sft(
  model: Llama, tokenizer, config: WorldConfig, rng: np.random.Generator, *, progress: bool = True
) -> list[float]:
  """Supervised fine-tuning on fresh imperfect demonstrations each step (in place).

  Returns the per-step mean token negative log-likelihood.
  """
  length = 2 * config.max_len + 10
  n_total = config.sft_steps * config.sft_batch_size
  problems = [
    task.sample_problem(rng, min_len=config.min_len, max_len=config.max_len) for _ in range(n_total)
  ]
  demos = [task.demonstration(p, rng) for p in problems]
  ids, attn, loss_mask = sft_sequences(tokenizer, [p.prompt for p in problems], demos, length)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    config.sft_learning_rate,
    max(1, config.sft_steps // 20),
    config.sft_steps,
    end_value=config.sft_learning_rate * 0.1,
  )
  optimizer = optax.adamw(schedule, weight_decay=0.01)
  graphdef, params, rest = split_params(model)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, ids, attn, loss_mask):
    def loss_fn(p):
      m = nnx.merge(graphdef, p, rest)
      logps = m.sequence_logps(ids, attn, loss_mask)
      return -jnp.sum(logps) / jnp.sum(loss_mask[:, 1:])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  b = config.sft_batch_size
  bar = tqdm(
    range(config.sft_steps),
    desc="SFT on imperfect demonstrations",
    disable=not progress,
    leave=False,
  )
  for i in bar:
    sl = slice(i * b, (i + 1) * b)
    params, opt_state, loss = step(params, opt_state, ids[sl], attn[sl], loss_mask[sl])
    if i % 50 == 0 or i == config.sft_steps - 1:
      losses.append(float(loss))
      bar.set_postfix(nll=f"{losses[-1]:.3f}")
  nnx.update(model, params)
  return losses


# ----------------------------------------------------------------------------- sampling


def generate_responses(
  model: Llama,
  tokenizer,
  prompts: Sequence[str],
  key: jax.Array,
  *,
  temperature: float,
  num_samples: int,
  max_new_tokens: int,
  batch_size: int,
  desc: str = "sampling",
  progress: bool = True,
) -> list[list[str]]:
  """``num_samples`` responses per prompt with `ssapo_jax.sampling.generate` (greedy at T=0).

  Batches are padded to ``batch_size`` prompts so one compiled program serves all of them.
  """
  p_ids = tk.chat_prompt_ids_batch(tokenizer, list(prompts))
  length = max(map(len, p_ids))
  out: list[list[str]] = []
  for start in tqdm(
    range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False
  ):
    chunk = p_ids[start : start + batch_size]
    real = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - real)
    ids, mask = _pad_left(chunk, length, tokenizer.pad_token_id)
    gen = sampling.generate(
      model,
      ids,
      mask,
      jax.random.fold_in(key, start),
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      num_samples=num_samples,
    )
    texts = sampling.decode(tokenizer, gen.tokens, gen.mask)
    for i in range(real):
      out.append(texts[i * num_samples : (i + 1) * num_samples])
  return out


# ----------------------------------------------------------------------------- world


@dataclasses.dataclass
class PoolLabels:
  """The SFT model's greedy baseline and its judged pool (`label_pool`)."""

  greedy: list[str]  # greedy response to each eval prompt
  sft_scores: Any  # [E] judge scores of those responses
  pool: list[dict]  # {prompt, chosen, rejected, chosen_score, rejected_score} per kept prompt
  sample_scores: list[float]  # judge score of every pool sample, two per prompt
  ties: int  # prompts left out: equal scores or identical responses
  empty: int  # prompts left out: an empty response (the data pipeline rejects them)


def label_pool(
  model, tokenizer, eval_prompts, pool_prompts, k_eval, k_pool, *, temperature, score, scores, **gen
) -> PoolLabels:
  """The SFT model's greedy responses to ``eval_prompts`` and two samples per pool prompt,
  judged by ``score(prompt, response)`` / ``scores(prompts, responses)``: the better sample
  becomes chosen, the worse rejected (the demo's oracle and the real study's judge)."""
  greedy = [
    r[0]
    for r in generate_responses(
      model,
      tokenizer,
      eval_prompts,
      k_eval,
      temperature=0.0,
      num_samples=1,
      desc="SFT greedy on eval prompts",
      **gen,
    )
  ]
  sft_scores = scores(eval_prompts, greedy)
  sampled = generate_responses(
    model,
    tokenizer,
    pool_prompts,
    k_pool,
    temperature=temperature,
    num_samples=2,
    desc="SFT samples for the pool",
    **gen,
  )
  pool, sample_scores, ties, empty = [], [], 0, 0
  for prompt, (a, b) in zip(pool_prompts, sampled):
    sa, sb = score(prompt, a), score(prompt, b)
    sample_scores += [sa, sb]
    if not a.strip() or not b.strip():  # The data pipeline rejects empty responses.
      empty += 1
      continue
    if sa == sb or a.strip() == b.strip():
      ties += 1
      continue
    chosen, rejected, sc, sr = (a, b, sa, sb) if sa > sb else (b, a, sb, sa)
    pool.append(
      {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_score": sc,
        "rejected_score": sr,
      }
    )
  return PoolLabels(greedy, sft_scores, pool, sample_scores, ties, empty)


def _distinct_prompts(
  rng: np.random.Generator, num: int, config: WorldConfig, exclude: set[str]
) -> list[str]:
  prompts, seen = [], set(exclude)
  while len(prompts) < num:
    p = task.sample_problem(rng, min_len=config.min_len, max_len=config.max_len).prompt
    if p not in seen:
      seen.add(p)
      prompts.append(p)
  return prompts


def _score_stats(scores: np.ndarray) -> dict:
  return {"mean_score": float(np.mean(scores)), "exact": float(np.mean(scores == 1.0))}


def load_world(root: str, config: WorldConfig) -> World | None:
  """The world at ``root`` if it was built with ``config``, else None."""
  path = os.path.join(root, WORLD_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    meta = json.load(f)
  if meta.get("config") != dataclasses.asdict(config):
    return None
  return World(root, config, meta["stats"])


def build_world(
  root: str, config: WorldConfig = WorldConfig(), *, progress: bool = True, log=print
) -> World:
  """Builds (or reuses) the demo world under ``root``; see the module docstring."""
  cached = load_world(root, config)
  if cached is not None:
    log(f"[world] reusing {root} (built in {cached.stats['build_seconds']:.0f} s)")
    return cached
  t0 = time.time()
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(config.seed)
  model_dir = os.path.join(root, "sft_model")
  tokenizer = tk.build_word_tokenizer(model_dir, task.VOCAB_WORDS)
  tokenizer = tk.load_tokenizer(model_dir)

  # Held-out evaluation prompts first, so that no pool prompt repeats one.
  eval_prompts = _distinct_prompts(rng, config.num_eval_prompts, config, set())
  pool_prompts = _distinct_prompts(rng, config.pool_prompts, config, set(eval_prompts))

  # Demonstration quality on the evaluation prompts (what SFT imitates).
  demo_scores = task.oracle_scores(
    eval_prompts, [task.demonstration(task.parse_prompt(p), rng) for p in eval_prompts]
  )

  mcfg = model_config(tokenizer, config)
  model = Llama(mcfg, rngs=nnx.Rngs(config.seed))
  t_sft = time.time()
  losses = train_sft(model, tokenizer, config, rng, progress=progress)
  sft_seconds = time.time() - t_sft
  save_hf(model, model_dir, tokenizer=tokenizer)
  model = load_hf(model_dir)  # exactly what every arm will load

  key = jax.random.key(config.seed)
  k_eval, k_pool, k_t1 = jax.random.split(key, 3)
  gen = dict(
    max_new_tokens=config.max_new_tokens, batch_size=config.sample_batch_size, progress=progress
  )
  labels = label_pool(
    model,
    tokenizer,
    eval_prompts,
    pool_prompts,
    k_eval,
    k_pool,
    temperature=config.pool_temperature,
    score=task.oracle_score,
    scores=task.oracle_scores,
    **gen,
  )
  greedy, sft_scores, pool = labels.greedy, labels.sft_scores, labels.pool
  ties, empty, sample_scores = labels.ties, labels.empty, labels.sample_scores
  sample_scores = np.array(sample_scores)

  write_jsonl(os.path.join(root, "pool.jsonl"), pool)
  write_jsonl(os.path.join(root, "pool_prompts.jsonl"), [{"prompt": p} for p in pool_prompts])
  write_jsonl(os.path.join(root, "eval_prompts.jsonl"), [{"prompt": p} for p in eval_prompts])
  write_json(
    os.path.join(root, "sft_eval.json"),
    [
      {"instruction": p, "output": o, "generator": GENERATOR_SFT, "score": float(s)}
      for p, o, s in zip(eval_prompts, greedy, sft_scores)
    ],
  )
  stats = {
    "num_params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
    "vocab_size": mcfg.vocab_size,
    "sft_nll_first": losses[0],
    "sft_nll_last": losses[-1],
    "sft_seconds": sft_seconds,
    "demonstrations": _score_stats(demo_scores),
    "sft_greedy": _score_stats(sft_scores),
    "sft_samples": _score_stats(sample_scores),
    "optimal": {"mean_score": 1.0, "exact": 1.0},
    "pool_prompts": config.pool_prompts,
    "pool_pairs": len(pool),
    "pool_ties_dropped": ties,
    "pool_empty_dropped": empty,
    "pool_mean_gap": float(np.mean([r["chosen_score"] - r["rejected_score"] for r in pool])),
    "build_seconds": time.time() - t0,
  }
  write_json(os.path.join(root, WORLD_FILE), {"config": dataclasses.asdict(config), "stats": stats})
  return World(root, config, stats)
