"""The cached phases of a self-annotation round t ≥ 1 (paper §4, Algorithm 1), with π_{t−1}:

1. `generate`: ``sampling.num_samples`` responses per prompt of pool t (``generations.npz``);
2. `annotate`: implicit reward ``log π_{t−1}(y|x) − log π_annot(y|x)`` (π_annot = SFT or
   π_{t−2}); best vs worst response become chosen/rejected (``pairs/``, ``annotation.npz``);
3. `train_set`: the round's training set with reference log-probs and the follower's
   worst-case atoms in the ε-Wasserstein ball around the margins (``train_set/``,
   ``follower.json``); round 0 is the labelled seed with plain-DPO atoms;
4. `evaluate`: greedy responses to held-out prompts (``eval_generations.json``).

Each phase writes its output under ``round_<t>/`` atomically and returns it from there when it is
present, so a resumed run repeats no finished phase; when it returns, the round directory is
copied up to a remote output directory (`round_phase`). Keys come from the run's named seed streams
(`ssapo_jax.experiment.stream_key`).

Across processes every phase does 1/P of the work (the sampler and the scorer feed each process's
rows of every global batch), gathers the results by global index, and leaves the files to process
0 (`ssapo_jax.pipeline.hosts`). Each phase logs its wall time and throughput (``metrics.jsonl``,
one printed line) at global step ``step``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable

import jax
import numpy as np

from ssapo_jax import annotate as annotation
from ssapo_jax import dro, rundir
from ssapo_jax.data import pairs_from_token_ids, save_round, tokenize_pairs, with_pair_columns
from ssapo_jax.models import CausalLM
from ssapo_jax.pipeline import hosts
from ssapo_jax.pipeline.runtime import Runtime
from ssapo_jax.sampling import RolloutStats, Sampler, decode, gather_samples


def round_phase(phase: Callable) -> Callable:
  """Marks ``phase(rt, t, ...)`` as a phase of round t: once it returns, ``round_<t>/`` is
  pushed to a remote output directory (a no-op for a local one)."""

  @functools.wraps(phase)
  def run_phase(rt: Runtime, t: int, *args, **kwargs):
    out = phase(rt, t, *args, **kwargs)
    rt.rundir.push(f"round_{t}")
    return out

  return run_phase


def _sample_all(
  rt: Runtime,
  model: CausalLM,
  prompt_ids: list,
  key,
  *,
  temperature: float,
  num_samples: int,
  desc: str,
) -> tuple[dict[str, np.ndarray], RolloutStats]:
  """Samples every prompt with the sharded `Sampler` (each process its share), gathered on every
  process: host arrays ``tokens``/``mask`` ``[num_prompts * num_samples, max_new_tokens]``,
  prompt-major rows, and the call's `RolloutStats`."""
  sampler = Sampler(
    rt.mesh,
    rt.config.sampling,
    pad_token_id=rt.tokenizer.pad_token_id,
    eos_token_ids=rt.tokenizer.eos_token_id,
    bucket_size=rt.config.data.bucket_size,
  )
  out = sampler.sample(
    model, prompt_ids, key, temperature=temperature, num_samples=num_samples, desc=desc
  )
  gen = gather_samples(out, len(prompt_ids))
  return {"tokens": gen.tokens, "mask": gen.mask}, out.stats


def _responses(gen: dict[str, np.ndarray]) -> list[list[int]]:
  lengths = gen["mask"].sum(axis=1)
  return [row[:n].tolist() for row, n in zip(gen["tokens"], lengths)]


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  rundir.atomic_npz(path, **arrays)


@round_phase
def generate(rt: Runtime, t: int, policy: CausalLM, *, step: int = 0) -> dict[str, np.ndarray]:
  """Round t's samples from π_{t−1}, cached in ``generations.npz``."""

  def compute():
    clock = hosts.PhaseClock()
    s = rt.config.sampling
    gen, stats = _sample_all(
      rt,
      policy,
      rt.prompt_ids(rt.data.pools[t - 1], report=f"round {t} prompts"),
      rt.config.key("generate", t),
      temperature=s.temperature,
      num_samples=s.num_samples,
      desc=f"round {t}: generate",
    )
    clock.report(
      rt.logger,
      step,
      "generate",
      t,
      chips=rt.mesh.devices.size,
      new_tokens=stats.new_tokens,
      padding_fraction=stats.padding_fraction,
    )
    return gen

  return hosts.cached_npz(os.path.join(rt.round_dir(t), "generations.npz"), compute, save=_save_npz)


@round_phase
def annotate(
  rt: Runtime, t: int, policy: CausalLM, gen: dict[str, np.ndarray], *, step: int = 0
) -> dict:
  """Implicit rewards of every sample and best/worst selection (``pairs/``, ``annotation.npz``)."""
  return hosts.cached_npz(
    os.path.join(rt.round_dir(t), "annotation.npz"),
    lambda: _annotate(rt, t, policy, gen, step),
    save=_save_npz,
  )


def _annotate(rt: Runtime, t: int, policy: CausalLM, gen: dict[str, np.ndarray], step: int) -> dict:
  clock = hosts.PhaseClock()
  cfg = rt.config
  n = cfg.sampling.num_samples
  prompts = rt.data.pools[t - 1]
  rep_prompts = [p for p in rt.prompt_ids(prompts) for _ in range(n)]
  responses = _responses(gen)
  policy_logps = rt.scorer.sequences(policy, rep_prompts, responses)
  judge_logps = rt.scorer.sequences(rt.judge(t), rep_prompts, responses)
  rewards = np.asarray(
    annotation.implicit_reward(policy_logps.reshape(-1, n), judge_logps.reshape(-1, n))
  )
  valid = gen["mask"].sum(axis=1).reshape(-1, n) > 0
  sel = jax.tree.map(np.asarray, annotation.select_pairs(rewards, valid))
  usable = np.flatnonzero(sel.usable)
  if usable.size == 0:
    raise RuntimeError(f"round {t}: no prompt produced two responses with different rewards")
  result = {
    "prompt_index": usable,
    "chosen_row": usable * n + sel.chosen_idx[usable],
    "rejected_row": usable * n + sel.rejected_idx[usable],
    "margin": sel.margin[usable],
    "rewards": rewards,
  }
  if hosts.is_process0():
    texts = decode(rt.tokenizer, gen["tokens"], gen["mask"])
    save_round(
      os.path.join(rt.round_dir(t), "pairs"),
      {
        "row": [prompts[i].row for i in usable],
        "prompt": [json.dumps(prompts[i].prompt) for i in usable],
        "responses": [texts[i * n : (i + 1) * n] for i in usable],
        "rewards": rewards[usable],
        "chosen": [texts[i] for i in result["chosen_row"]],
        "rejected": [texts[i] for i in result["rejected_row"]],
        "margin": sel.margin[usable],
      },
      round_index=t,
      models={"policy": f"round_{t - 1}", "annotation_reference": cfg.rounds.annotation_reference},
      settings={"sampling": dataclasses.asdict(cfg.sampling)},
      counts={"prompts": len(prompts), "usable_pairs": int(usable.size)},
    )
  # Sequences scored: every (prompt, response) under the policy and the judge.
  clock.report(
    rt.logger, step, "annotate", t, chips=rt.mesh.devices.size, sequences=2 * len(responses)
  )
  return result


def round_pairs(rt: Runtime, t: int):
  """The tokenised pairs that round t adds: the seed (t = 0) or its self-annotated pairs."""
  d = rt.config.data
  opts = dict(
    max_length=d.max_length,
    max_prompt_length=d.max_prompt_length,
    truncation_mode=d.truncation_mode,
    on_truncation=d.on_truncation,
    verbose=False,
  )
  if t == 0:
    cache_dir = d.cache_dir if d.cache_dir is not None else os.path.join(rt.workdir, "cache")
    return tokenize_pairs(
      rt.data.seed_pairs,
      rt.tokenizer,
      system_message=d.system_message,
      cache_dir=cache_dir,
      source="round 0 labelled seed",
      **{**opts, "verbose": True},
    )  # its truncation counts, in run.log
  gen = hosts.read_npz(os.path.join(rt.round_dir(t), "generations.npz"))
  ann = hosts.read_npz(os.path.join(rt.round_dir(t), "annotation.npz"))
  prompt_ids = rt.prompt_ids(rt.data.pools[t - 1])
  lengths = gen["mask"].sum(axis=1)
  idx = ann["prompt_index"]
  return pairs_from_token_ids(
    [prompt_ids[i] for i in idx],
    gen["tokens"][ann["chosen_row"]],
    gen["tokens"][ann["rejected_row"]],
    eos_id=rt.tokenizer.eos_token_id,
    bos_id=rt.tokenizer.bos_token_id,
    chosen_lengths=lengths[ann["chosen_row"]],
    rejected_lengths=lengths[ann["rejected_row"]],
    rows=idx,
    **opts,
  )


def solve_follower_on_process0(
  rt: Runtime, t: int, margins: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict]:
  """The follower's worst case over ``margins [N]`` -> ``(atom_weights, atom_shifts, summary)``.

  Solved once, on process 0 (a fraction of a second), and broadcast to the other processes.
  """
  cfg = rt.config
  atoms = summary = None
  if hosts.is_process0():
    worst = dro.solve_follower(margins, cfg.dro, key=cfg.key("follower", t))
    loss_atoms = dro.to_loss_atoms(worst, cfg.dro)
    weights, shifts = np.asarray(loss_atoms.weights), np.asarray(loss_atoms.shifts)
    atoms = {"atom_weights": weights, "atom_shifts": shifts}
    summary = dro.summarize(worst, dro.margins_to_xi(margins, cfg.dro))
  atoms, summary = hosts.broadcast_npz(atoms), hosts.broadcast_json(summary)
  return atoms["atom_weights"], atoms["atom_shifts"], summary


@round_phase
def train_set(rt: Runtime, t: int, policy: CausalLM, reference: CausalLM, *, step: int = 0):
  """Round t's training set with reference log-probs and follower atoms (``train_set/``).

  The set is round t's pairs (authors' code) or, with ``rounds.accumulate``, the pairs of
  rounds 0..t (Algorithm 1). For t ≥ 1 the follower runs on the implicit-reward margins of the
  whole set, ``(log π_{t−1} − log π_annot)(chosen) − (…)(rejected)``; round 0 and ε = 0 are
  plain DPO (one atom of weight 1 and shift 0, no follower).

  Returns:
    ``(dataset, judge_logps)``: the pair dataset with ``ref_*_logps`` and ``atom_*`` columns,
    and the judge's ``judge_chosen_logps``/``judge_rejected_logps`` ``[N]`` (empty for t = 0),
    which a follower refresh reuses.
  """
  import datasets  # pylint: disable=import-outside-toplevel

  clock = hosts.PhaseClock()
  sets = [round_pairs(rt, s) for s in (range(t + 1) if rt.config.rounds.accumulate else [t])]
  dataset = datasets.concatenate_datasets(sets) if len(sets) > 1 else sets[0]
  cache = rt.round_dir(t)
  ref_c, ref_r = rt.scorer.pairs(reference, dataset, cache_dir=cache)
  extras = {"ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
  judge_logps = {}
  n = len(dataset)
  scored = 1  # models the pairs were scored under
  if t == 0 or rt.config.train.objective == "dpo":
    # Round 0, or ε = 0 (plain DPO): one atom of weight 1 and shift 0, no follower to solve.
    extras["atom_weights"], extras["atom_shifts"] = np.ones((n, 1)), np.zeros((n, 1))
  else:
    judge = rt.judge(t)
    pol_c, pol_r = (
      (ref_c, ref_r) if reference is policy else rt.scorer.pairs(policy, dataset, cache_dir=cache)
    )
    judge_c, judge_r = (
      (ref_c, ref_r) if judge is reference else rt.scorer.pairs(judge, dataset, cache_dir=cache)
    )
    scored += (reference is not policy) + (judge is not reference)
    margins = (pol_c - judge_c) - (pol_r - judge_r)
    extras["atom_weights"], extras["atom_shifts"], summary = solve_follower_on_process0(
      rt, t, margins
    )
    judge_logps = {"judge_chosen_logps": judge_c, "judge_rejected_logps": judge_r}
    if hosts.is_process0():
      rundir.atomic_json(
        os.path.join(rt.round_dir(t), "follower.json"),
        {**summary, "num_pairs": n, "refresh_step": 0},
      )
  dataset = with_pair_columns(dataset, **extras)
  if hosts.is_process0():
    save_round(
      os.path.join(rt.round_dir(t), "train_set"),
      {**{c: dataset[c] for c in dataset.column_names}, **judge_logps},
      round_index=t,
      settings={
        "dro": dataclasses.asdict(rt.config.dro),
        "accumulate": rt.config.rounds.accumulate,
      },
      counts={"pairs": n},
    )
  # The round's n pairs; each pair's chosen and rejected sequence under each scoring model.
  clock.report(
    rt.logger, step, "follower", t, chips=rt.mesh.devices.size, pairs=n, sequences=2 * scored * n
  )
  return dataset, judge_logps


@round_phase
def evaluate(rt: Runtime, t: int, policy: CausalLM, *, step: int = 0) -> None:
  """Greedy responses to the eval prompts as AlpacaEval JSON (``eval_generations.json``)."""
  path = os.path.join(rt.round_dir(t), "eval_generations.json")
  if not rt.data.eval_prompts or hosts.broadcast_json(hosts.is_process0() and os.path.exists(path)):
    return
  clock = hosts.PhaseClock()
  gen, stats = _sample_all(
    rt,
    policy,
    rt.prompt_ids(rt.data.eval_prompts, report=f"round {t} eval prompts"),
    rt.config.key("evaluate", t),
    temperature=0.0,
    num_samples=1,
    desc=f"round {t}: evaluate",
  )
  texts = decode(rt.tokenizer, gen["tokens"], gen["mask"])
  name = f"{os.path.basename(os.path.normpath(rt.workdir))}-round{t}"
  records = [
    {
      "instruction": p.prompt[-1]["content"],
      "output": o,
      "generator": name,
      "dataset": "ssapo_eval",
    }
    for p, o in zip(rt.data.eval_prompts, texts)
  ]
  if hosts.is_process0():
    rundir.atomic_json(path, records)
  clock.report(
    rt.logger,
    step,
    "evaluate",
    t,
    chips=rt.mesh.devices.size,
    new_tokens=stats.new_tokens,
    padding_fraction=stats.padding_fraction,
  )
