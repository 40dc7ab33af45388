"""The cached phases of a self-annotation round t ≥ 1 (paper §4, Algorithm 1), with π_{t−1}:

1. `generate`: ``sampling.num_samples`` responses per prompt of pool t (``generations.npz``);
2. `annotate`: implicit reward ``log π_{t−1}(y|x) − log π_annot(y|x)`` (π_annot = SFT or
   π_{t−2}); best vs worst response become chosen/rejected (``pairs/``, ``annotation.npz``);
3. `follower`: the round's training set with reference log-probs and the worst-case atoms in the
   ε-Wasserstein ball around the margins (``train_set/``, ``follower.json``); round 0 is the
   labelled seed with plain-DPO atoms;
4. `evaluate`: greedy responses to held-out prompts (``eval_generations.json``).

Each phase writes its output under ``round_<t>/`` atomically and returns it from there when it is
present, so a resumed run repeats no finished phase. Keys come from the run's named seed streams
(`ssapo_jax.experiment.stream_key`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from tqdm.auto import tqdm

from ssapo_jax import annotate as annotation
from ssapo_jax import dro
from ssapo_jax import sharding as shd
from ssapo_jax.data import left_pad, pairs_from_token_ids, save_round, tokenize_pairs, with_pair_columns
from ssapo_jax.data.tokenize import fixed_size_batches
from ssapo_jax.models import Llama
from ssapo_jax.pipeline import rundir
from ssapo_jax.pipeline.runtime import Runtime
from ssapo_jax.sampling import decode
from ssapo_jax.sampling import generate as sample


def _sample_all(rt: Runtime, model: Llama, prompt_ids: list, key, *, temperature: float,
                num_samples: int, desc: str) -> dict[str, np.ndarray]:
  """Samples every prompt in fixed-size batches; host arrays ``tokens``/``mask``
  ``[num_prompts * num_samples, max_new_tokens]``, prompt-major rows."""
  s = rt.config.sampling
  pad, eos = rt.tokenizer.pad_token_id, rt.tokenizer.eos_token_id
  tokens, masks = [], []
  batches = fixed_size_batches(len(prompt_ids), s.batch_size)  # one compilation per round
  for b, (chunk, n) in enumerate(tqdm(batches, desc=desc, leave=False)):
    ids, mask = left_pad([prompt_ids[i] for i in chunk], pad_id=pad,
                         multiple=rt.config.data.bucket_size)
    gen = sample(model, ids, mask, jax.random.fold_in(key, b), max_new_tokens=s.max_new_tokens,
                 temperature=temperature, top_p=s.top_p, top_k=s.top_k, num_samples=num_samples,
                 eos_token_ids=(eos,), pad_token_id=pad)
    tokens.append(shd.to_host(gen.tokens)[:n * num_samples])
    masks.append(shd.to_host(gen.mask)[:n * num_samples])
  return {"tokens": np.concatenate(tokens), "mask": np.concatenate(masks)}


def _responses(gen: dict[str, np.ndarray]) -> list[list[int]]:
  lengths = gen["mask"].sum(axis=1)
  return [row[:n].tolist() for row, n in zip(gen["tokens"], lengths)]


def _load_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return dict(f)


def generate(rt: Runtime, t: int, policy: Llama) -> dict[str, np.ndarray]:
  """Round t's samples from π_{t−1}, cached in ``generations.npz``."""
  path = os.path.join(rt.round_dir(t), "generations.npz")
  if os.path.exists(path):
    return _load_npz(path)
  s = rt.config.sampling
  gen = _sample_all(rt, policy, rt.prompt_ids(rt.data.pools[t - 1]), rt.config.key("generate", t),
                    temperature=s.temperature, num_samples=s.num_samples,
                    desc=f"round {t}: generate")
  rundir.atomic_npz(path, **gen)  # every host keeps its own copy of what it needs to resume
  return gen


def annotate(rt: Runtime, t: int, policy: Llama, gen: dict[str, np.ndarray]) -> dict:
  """Implicit rewards of every sample and best/worst selection (``pairs/``, ``annotation.npz``)."""
  cache = os.path.join(rt.round_dir(t), "annotation.npz")
  if os.path.exists(cache):
    return _load_npz(cache)
  cfg = rt.config
  n = cfg.sampling.num_samples
  prompts = rt.data.pools[t - 1]
  rep_prompts = [p for p in rt.prompt_ids(prompts) for _ in range(n)]
  responses = _responses(gen)
  policy_logps = rt.scorer.sequences(policy, rep_prompts, responses)
  judge_logps = rt.scorer.sequences(rt.judge(t), rep_prompts, responses)
  rewards = np.asarray(annotation.implicit_reward(policy_logps.reshape(-1, n),
                                                  judge_logps.reshape(-1, n)))
  valid = gen["mask"].sum(axis=1).reshape(-1, n) > 0
  sel = jax.tree.map(np.asarray, annotation.select_pairs(rewards, valid))
  usable = np.flatnonzero(sel.usable)
  if usable.size == 0:
    raise RuntimeError(f"round {t}: no prompt produced two responses with different rewards")
  result = {"prompt_index": usable, "chosen_row": usable * n + sel.chosen_idx[usable],
            "rejected_row": usable * n + sel.rejected_idx[usable], "margin": sel.margin[usable],
            "rewards": rewards}
  if jax.process_index() == 0:
    texts = decode(rt.tokenizer, gen["tokens"], gen["mask"])
    save_round(os.path.join(rt.round_dir(t), "pairs"), {
        "row": [prompts[i].row for i in usable],
        "prompt": [json.dumps(prompts[i].prompt) for i in usable],
        "responses": [texts[i * n:(i + 1) * n] for i in usable],
        "rewards": rewards[usable], "chosen": [texts[i] for i in result["chosen_row"]],
        "rejected": [texts[i] for i in result["rejected_row"]], "margin": sel.margin[usable]},
        round_index=t, models={"policy": f"round_{t - 1}",
                               "annotation_reference": cfg.rounds.annotation_reference},
        settings={"sampling": dataclasses.asdict(cfg.sampling)},
        counts={"prompts": len(prompts), "usable_pairs": int(usable.size)})
  rundir.atomic_npz(cache, **result)
  return result


def round_pairs(rt: Runtime, t: int):
  """The tokenised pairs that round t adds: the seed (t = 0) or its self-annotated pairs."""
  d = rt.config.data
  opts = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
              truncation_mode=d.truncation_mode, on_truncation=d.on_truncation, verbose=False)
  if t == 0:
    cache_dir = d.cache_dir if d.cache_dir is not None else os.path.join(rt.workdir, "cache")
    return tokenize_pairs(rt.data.seed_pairs, rt.tokenizer, system_message=d.system_message,
                          cache_dir=cache_dir, **opts)
  gen = _load_npz(os.path.join(rt.round_dir(t), "generations.npz"))
  ann = _load_npz(os.path.join(rt.round_dir(t), "annotation.npz"))
  prompt_ids = rt.prompt_ids(rt.data.pools[t - 1])
  lengths = gen["mask"].sum(axis=1)
  idx = ann["prompt_index"]
  return pairs_from_token_ids(
      [prompt_ids[i] for i in idx], gen["tokens"][ann["chosen_row"]],
      gen["tokens"][ann["rejected_row"]], eos_id=rt.tokenizer.eos_token_id,
      bos_id=rt.tokenizer.bos_token_id, chosen_lengths=lengths[ann["chosen_row"]],
      rejected_lengths=lengths[ann["rejected_row"]], rows=idx, **opts)


def follower_atoms(rt: Runtime, t: int, margins: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
  """The follower's worst case over ``margins [N]`` -> ``(atom_weights, atom_shifts, summary)``."""
  cfg = rt.config
  worst = dro.solve_follower(margins, cfg.dro, key=cfg.key("follower", t))
  weights, shifts = map(np.asarray, dro.to_loss_atoms(worst))
  summary = dro.summarize(worst, dro.margins_to_xi(margins, cfg.dro))
  return weights, shifts, summary


def follower(rt: Runtime, t: int, policy: Llama, reference: Llama):
  """Round t's training set with reference log-probs and follower atoms (``train_set/``).

  The set is round t's pairs (authors' code) or, with ``rounds.accumulate``, the pairs of
  rounds 0..t (Algorithm 1). For t ≥ 1 the follower runs on the implicit-reward margins of the
  whole set, ``(log π_{t−1} − log π_annot)(chosen) − (…)(rejected)``; round 0 is plain DPO
  (one atom of weight 1 and shift 0).

  Returns:
    ``(dataset, judge_logps)``: the pair dataset with ``ref_*_logps`` and ``atom_*`` columns,
    and the judge's ``judge_chosen_logps``/``judge_rejected_logps`` ``[N]`` (empty for t = 0),
    which a follower refresh reuses.
  """
  import datasets  # pylint: disable=import-outside-toplevel
  sets = [round_pairs(rt, s) for s in (range(t + 1) if rt.config.rounds.accumulate else [t])]
  dataset = datasets.concatenate_datasets(sets) if len(sets) > 1 else sets[0]
  cache = rt.round_dir(t)
  ref_c, ref_r = rt.scorer.pairs(reference, dataset, cache_dir=cache)
  extras = {"ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
  judge_logps = {}
  n = len(dataset)
  if t == 0:
    extras["atom_weights"], extras["atom_shifts"] = np.ones((n, 1)), np.zeros((n, 1))
  else:
    judge = rt.judge(t)
    pol_c, pol_r = ((ref_c, ref_r) if reference is policy
                    else rt.scorer.pairs(policy, dataset, cache_dir=cache))
    judge_c, judge_r = ((ref_c, ref_r) if judge is reference
                        else rt.scorer.pairs(judge, dataset, cache_dir=cache))
    margins = (pol_c - judge_c) - (pol_r - judge_r)
    extras["atom_weights"], extras["atom_shifts"], summary = follower_atoms(rt, t, margins)
    judge_logps = {"judge_chosen_logps": judge_c, "judge_rejected_logps": judge_r}
    if jax.process_index() == 0:
      rundir.atomic_json(os.path.join(rt.round_dir(t), "follower.json"),
                         {**summary, "num_pairs": n, "refresh_step": 0})
  dataset = with_pair_columns(dataset, **extras)
  if jax.process_index() == 0:
    save_round(os.path.join(rt.round_dir(t), "train_set"),
               {**{c: dataset[c] for c in dataset.column_names}, **judge_logps},
               round_index=t, settings={"dro": dataclasses.asdict(rt.config.dro),
                                        "accumulate": rt.config.rounds.accumulate},
               counts={"pairs": n})
  return dataset, judge_logps


def evaluate(rt: Runtime, t: int, policy: Llama) -> None:
  """Greedy responses to the eval prompts as AlpacaEval JSON (``eval_generations.json``)."""
  path = os.path.join(rt.round_dir(t), "eval_generations.json")
  if not rt.data.eval_prompts or os.path.exists(path):
    return
  gen = _sample_all(rt, policy, rt.prompt_ids(rt.data.eval_prompts), rt.config.key("evaluate", t),
                    temperature=0.0, num_samples=1, desc=f"round {t}: evaluate")
  texts = decode(rt.tokenizer, gen["tokens"], gen["mask"])
  name = f"{os.path.basename(os.path.normpath(rt.workdir))}-round{t}"
  records = [{"instruction": p.prompt[-1]["content"], "output": o, "generator": name,
              "dataset": "ssapo_eval"} for p, o in zip(rt.data.eval_prompts, texts)]
  if jax.process_index() == 0:
    rundir.atomic_json(path, records)
