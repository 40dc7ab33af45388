"""SSAPO rounds end to end (paper §4, Algorithm 1), composed from the pure pieces.

Round 0 trains π_0 from the SFT model on the labelled seed with DPO (reference: SFT).
Round t ≥ 1, with π_{t−1}:

1. ``generate``: sample ``sampling.num_samples`` responses per prompt of pool t;
2. ``annotate``: implicit reward ``log π_{t−1}(y|x) − log π_annot(y|x)`` (π_annot = SFT or
   π_{t−2}); best vs worst response become chosen/rejected (`annotate.select_pairs`);
3. ``follower``: worst-case atoms in the ε-Wasserstein ball around the margins (`dro`);
4. ``train``: π_t from π_{t−1}, reference π_{t−1} (or SFT), `robust_dpo_loss` on the atoms;
5. ``evaluate``: greedy responses to held-out prompts (AlpacaEval JSON), policy export.

Every phase writes its output under ``<output_dir>/round_<t>/`` atomically and is reused when
present, and the train state is checkpointed (orbax) every ``checkpoint.save_every_steps``
steps and at each round's end, so a run killed anywhere resumes to the same parameters.
Randomness derives from ``config.seed``: round t samples with ``fold_in(key(seed), t)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ssapo_jax import annotate, dro, rundir, sharding as shd, train as tr
from ssapo_jax.checkpoint import Checkpointer, checkpoint_dir
from ssapo_jax.config import ExperimentConfig
from ssapo_jax.data import (LoaderCursor, PreferenceLoader, PromptRecord, last_token_embeddings,
                            left_pad, load_preferences, load_prompts, pairs_from_token_ids,
                            save_manifest, save_round, select_rows, split_rows, tokenize_pairs,
                            tokenize_prompts, with_pair_columns)
from ssapo_jax.data.tokenize import round_up
from ssapo_jax.metrics import MetricsLogger
from ssapo_jax.models import Llama, load_hf, save_hf
from ssapo_jax.models.tokenizer import load_tokenizer
from ssapo_jax.sampling import decode, generate

ROUND_DONE = "round_done"


@dataclasses.dataclass
class RunData:
  """The run's records after validation and the seed/pool split (host memory)."""

  seed_pairs: list  # PreferencePair records of the labelled seed
  pools: list  # per round t >= 1, the PromptRecord list of pool t
  eval_prompts: list  # PromptRecord list for per-round evaluation


@dataclasses.dataclass
class Runtime:
  """Objects built once per run and shared by the phases (not checkpointed: all derivable)."""

  config: ExperimentConfig
  mesh: Any
  tokenizer: Any
  sft: Llama
  data: RunData
  ckpt: Checkpointer
  logger: MetricsLogger | None
  workdir: str  # local directory of the phase outputs (= output_dir unless that is remote)
  scorers: dict = dataclasses.field(default_factory=dict)  # jitted scoring fns per model graph
  policies: dict = dataclasses.field(default_factory=dict)  # round -> trained policy in memory

  @property
  def out(self) -> str:
    return self.workdir

  def round_dir(self, t: int) -> str:
    return os.path.join(self.out, f"round_{t}")


# ------------------------------------------------------------------------------ set-up

def prompt_embeddings(model: Llama, tokenizer, prompts, config: ExperimentConfig) -> np.ndarray:
  """``[N, D]`` float32 embeddings of chat-templated prompts for farthest-point seeding.

  The SFT model's last-layer hidden state at each prompt's last token (paper, appendix G.2).
  """
  d = config.data
  ids = tokenize_prompts(prompts, tokenizer, max_prompt_length=d.max_prompt_length,
                         truncation_mode=d.truncation_mode, system_message=d.system_message)
  graphdef, state = nnx.split(model)

  @jax.jit
  def embed(state, prompt_ids, prompt_mask):
    hidden = nnx.merge(graphdef, state).hidden_states(prompt_ids, prompt_mask)
    return last_token_embeddings(hidden, prompt_mask).astype(jnp.float32)

  size = config.sampling.batch_size
  out = []
  for start in tqdm(range(0, len(ids), size), desc="embed prompts", leave=False):
    chunk = ids[start:start + size]
    n = len(chunk)
    prompt_ids, prompt_mask = left_pad(chunk + [chunk[-1]] * (size - n),
                                       pad_id=tokenizer.pad_token_id, multiple=d.bucket_size)
    out.append(_to_host(embed(state, prompt_ids, prompt_mask))[:n])
  return np.concatenate(out)


def prepare_data(config: ExperimentConfig, out: str, *, sft: Llama, tokenizer) -> RunData:
  """Loads and validates the sources, splits seed/pools and writes ``split_manifest.json``.

  The labelled seed is ``data.seed_size`` pairs of ``data.source`` (``random`` or
  ``farthest_point`` on SFT prompt embeddings); the round pools are the remaining prompts of
  the source (or of ``data.prompt_source``), in the authors' shuffled order.
  """
  d = config.data
  load_opts = dict(split=d.split, data_dir=d.data_dir, prompt_column=d.prompt_column,
                   policy=d.policy)
  pairs = load_preferences(d.source, format=d.format, chosen_column=d.chosen_column,
                           rejected_column=d.rejected_column, **load_opts)
  embeddings = None
  if d.seed_method == "farthest_point":
    embeddings = prompt_embeddings(sft, tokenizer, [p.prompt for p in pairs], config)
  split = dict(seed_size=d.seed_size, method=d.seed_method, seed=d.split_seed,
               embeddings=embeddings)
  if d.prompt_source is None:
    prompts = [PromptRecord(prompt=p.prompt, row=p.row) for p in pairs]
    manifest = split_rows([p.row for p in pairs], pool_sizes=d.pool_sizes, source=d.source,
                          **split)
    seed_rows = manifest.seed_rows
  else:
    prompts = load_prompts(d.prompt_source, **load_opts)
    manifest = split_rows([p.row for p in prompts], seed_size=0, pool_sizes=d.pool_sizes,
                          seed=d.split_seed, source=d.prompt_source)
    seed_rows = split_rows([p.row for p in pairs], source=d.source, **split).seed_rows
    manifest = dataclasses.replace(manifest, seed_rows=seed_rows)
  seed = select_rows(pairs, seed_rows)
  pools = [select_rows(prompts, rows) for rows in manifest.pool_rows]
  if d.eval_source is not None:
    eval_prompts = list(load_prompts(d.eval_source, **load_opts))
  else:
    eval_prompts = select_rows(prompts, manifest.rest_rows)
  eval_prompts = eval_prompts[:config.rounds.num_eval_prompts]
  if jax.process_index() == 0:
    save_manifest(manifest, os.path.join(out, "split_manifest.json"))
  if not seed:
    raise ValueError(f"data.seed_size={d.seed_size} selects no labelled pair from {d.source}")
  for t in range(config.rounds.num_rounds):
    if not pools[t]:
      raise ValueError(f"data.pool_sizes[{t}] gives round {t + 1} no prompts")
  return RunData(seed_pairs=seed, pools=pools, eval_prompts=eval_prompts)


def _load_model(path: str, config: ExperimentConfig, mesh) -> Llama:
  """A local HF checkpoint, its parameters placed with the mesh's partition rules."""
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"no Hugging Face model in {path!r} (config.json missing)")
  t = config.train
  return load_hf(path, dtype=tr.DTYPES[t.compute_dtype], param_dtype=tr.DTYPES[t.param_dtype],
                 remat=t.remat, attention=config.model.attention, mesh=mesh)


# ------------------------------------------------------------------------------ helpers

def _to_host(x) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _scoring_batch_size(rt: Runtime) -> int:
  return max(rt.config.train.micro_batch_size, shd.num_batch_shards(rt.mesh))


def _logps_fn(rt: Runtime, graphdef, params, rest):
  """`train.make_compute_logps`, built once per model graph so it compiles once per shape."""
  key = (graphdef, rt.config.train.compute_dtype)
  if key not in rt.scorers:
    rt.scorers[key] = tr.make_compute_logps(rt.mesh, graphdef, params, rest,
                                            compute_dtype=rt.config.train.compute_dtype)
  return rt.scorers[key]


def _score_sequences(rt: Runtime, model: Llama, prompts, responses) -> np.ndarray:
  """Summed log-probs ``[N]`` of each response given its prompt (unpadded id lists)."""
  bucket, size = rt.config.data.bucket_size, _scoring_batch_size(rt)
  rows = shd.host_batch_rows(rt.mesh, size)
  pad = rt.tokenizer.pad_token_id
  graphdef, params, rest = tr.split_model(model)

  def batches():
    for start in range(0, len(prompts), size):
      chunk = list(range(start, min(start + size, len(prompts))))
      # T from the whole global batch, so every host builds the same shape.
      t = round_up(max(len(prompts[i]) + len(responses[i]) for i in chunk), bucket)
      chunk = (chunk + [chunk[-1]] * (size - len(chunk)))[rows]  # fixed size, this host's rows
      seqs = [list(prompts[i]) + list(responses[i]) for i in chunk]
      ids = np.full((len(seqs), t), pad, np.int32)
      mask, loss_mask = np.zeros_like(ids), np.zeros_like(ids)
      for j, (x, i) in enumerate(zip(seqs, chunk)):
        ids[j, :len(x)], mask[j, :len(x)], loss_mask[j, len(prompts[i]):len(x)] = x, 1, 1
      yield ids, mask, loss_mask

  steps = -(-len(prompts) // size)
  logps = tr.compute_logps(_logps_fn(rt, graphdef, params, rest), params, rt.mesh,
                           tqdm(batches(), total=steps, desc="score", leave=False),
                           batch_size=size)
  return _gather_batches(logps, size)[:len(prompts)]


def _generate_all(rt: Runtime, model: Llama, prompt_ids: list, key, *, temperature: float,
                  num_samples: int, desc: str) -> dict[str, np.ndarray]:
  """Samples every prompt in fixed-size batches; returns host arrays, prompt-major rows."""
  s = rt.config.sampling
  batch = s.batch_size
  tokens, masks = [], []
  pad = rt.tokenizer.pad_token_id
  eos = rt.tokenizer.eos_token_id
  for b, start in enumerate(tqdm(range(0, len(prompt_ids), batch), desc=desc, leave=False)):
    chunk = prompt_ids[start:start + batch]
    n = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch - n)  # fixed shape: one compilation per round
    ids, mask = left_pad(chunk, pad_id=pad, multiple=rt.config.data.bucket_size)
    gen = generate(model, ids, mask, jax.random.fold_in(key, b), max_new_tokens=s.max_new_tokens,
                   temperature=temperature, top_p=s.top_p, top_k=s.top_k,
                   num_samples=num_samples, eos_token_ids=(eos,), pad_token_id=pad)
    tokens.append(_to_host(gen.tokens)[:n * num_samples])
    masks.append(_to_host(gen.mask)[:n * num_samples])
  return {"tokens": np.concatenate(tokens), "mask": np.concatenate(masks)}


def _responses(gen: dict[str, np.ndarray]) -> list[list[int]]:
  lengths = gen["mask"].sum(axis=1)
  return [row[:n].tolist() for row, n in zip(gen["tokens"], lengths)]


# ------------------------------------------------------------------------------ phases

def _prompt_ids(rt: Runtime, prompts) -> list[list[int]]:
  d = rt.config.data
  return tokenize_prompts(prompts, rt.tokenizer, max_prompt_length=d.max_prompt_length,
                          truncation_mode=d.truncation_mode, system_message=d.system_message)


def _policy_at(rt: Runtime, t: int) -> Llama:
  """π_t: trained in this process, else its export from round t (π_{-1} = the SFT model)."""
  if t < 0:
    return rt.sft
  if t not in rt.policies:  # resumed run: the export is bitwise the trained parameters
    rt.policies[t] = _load_model(os.path.join(rt.round_dir(t), "policy"), rt.config, rt.mesh)
  return rt.policies[t]


def phase_generate(rt: Runtime, t: int, policy: Llama) -> dict[str, np.ndarray]:
  """Round t's samples from π_{t−1}, cached in ``generations.npz``."""
  path = os.path.join(rt.round_dir(t), "generations.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return dict(f)
  prompt_ids = _prompt_ids(rt, rt.data.pools[t - 1])
  key = jax.random.fold_in(jax.random.key(rt.config.seed), t)
  s = rt.config.sampling
  gen = _generate_all(rt, policy, prompt_ids, key, temperature=s.temperature,
                      num_samples=s.num_samples, desc=f"round {t}: generate")
  rundir.atomic_npz(path, **gen)  # every host keeps its own copy of what it needs to resume
  return gen


def phase_annotate(rt: Runtime, t: int, policy: Llama, gen: dict[str, np.ndarray]) -> dict:
  """Implicit rewards of every sample and best/worst selection (``pairs/``, ``annotation.npz``)."""
  cache = os.path.join(rt.round_dir(t), "annotation.npz")
  if os.path.exists(cache):
    with np.load(cache) as f:
      return dict(f)
  cfg = rt.config
  n = cfg.sampling.num_samples
  prompts = rt.data.pools[t - 1]
  rep_prompts = [p for p in _prompt_ids(rt, prompts) for _ in range(n)]
  responses = _responses(gen)
  policy_logps = _score_sequences(rt, policy, rep_prompts, responses)
  judge_logps = _score_sequences(rt, _judge(rt, t), rep_prompts, responses)
  rewards = np.asarray(annotate.implicit_reward(policy_logps.reshape(-1, n),
                                                judge_logps.reshape(-1, n)))
  valid = gen["mask"].sum(axis=1).reshape(-1, n) > 0
  sel = jax.tree.map(np.asarray, annotate.select_pairs(rewards, valid))
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


def _judge(rt: Runtime, t: int) -> Llama:
  """π_annot of round t: the SFT model or π_{t−2} (``rounds.annotation_reference``)."""
  return _policy_at(rt, t - 2) if rt.config.rounds.annotation_reference == "previous" else rt.sft


def round_pairs(rt: Runtime, t: int):
  """The tokenised pairs that round t adds: the seed (t = 0) or its self-annotated pairs."""
  d = rt.config.data
  opts = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
              truncation_mode=d.truncation_mode, verbose=False)
  if t == 0:
    return tokenize_pairs(rt.data.seed_pairs, rt.tokenizer, system_message=d.system_message,
                          cache_dir=os.path.join(rt.out, "cache"), **opts)
  with np.load(os.path.join(rt.round_dir(t), "generations.npz")) as f:
    gen = dict(f)
  with np.load(os.path.join(rt.round_dir(t), "annotation.npz")) as f:
    ann = dict(f)
  prompt_ids = _prompt_ids(rt, rt.data.pools[t - 1])
  lengths = gen["mask"].sum(axis=1)
  idx = ann["prompt_index"]
  return pairs_from_token_ids(
      [prompt_ids[i] for i in idx], gen["tokens"][ann["chosen_row"]],
      gen["tokens"][ann["rejected_row"]], eos_id=rt.tokenizer.eos_token_id,
      bos_id=rt.tokenizer.bos_token_id, chosen_lengths=lengths[ann["chosen_row"]],
      rejected_lengths=lengths[ann["rejected_row"]], rows=idx, **opts)


def score_pairs(rt: Runtime, t: int, dataset, model: Llama) -> tuple[np.ndarray, np.ndarray]:
  """Summed response log-probs ``([N], [N])`` of chosen and rejected under ``model``.

  One sharded scoring pass in dataset order, cached in the round directory by model and data
  fingerprints (TRL's ``precompute_ref_log_probs``).
  """
  size = _scoring_batch_size(rt)
  nproc = jax.process_count()
  loader = PreferenceLoader(dataset, global_batch_size=size, shuffle=False,
                            pad_id=rt.tokenizer.pad_token_id, bucket_size=rt.config.data.bucket_size,
                            num_hosts=nproc, host_index=jax.process_index())
  cursors = [LoaderCursor(0, i) for i in range(loader.batches_per_epoch)]
  graphdef, params, rest = tr.split_model(model)
  chosen, rejected = tr.precompute_ref_logps(_logps_fn(rt, graphdef, params, rest), params,
                                             rt.mesh, [loader.batch_at(c) for c in cursors],
                                             batch_size=size, cache_dir=rt.round_dir(t))
  order = np.concatenate([loader.batch_indices(c)[0] for c in cursors])
  out = []
  for values in (chosen, rejected):
    values = _gather_batches(values, size)
    full = np.zeros(len(dataset), np.float32)
    full[order] = values  # the padded copies in the last batch write equal values
    out.append(full)
  return out[0], out[1]


def _gather_batches(values: np.ndarray, batch_size: int) -> np.ndarray:
  """Host-local rows of fixed-size global batches -> all rows in global order."""
  nproc = jax.process_count()
  if nproc == 1:
    return values
  from jax.experimental import multihost_utils
  local = values.reshape(-1, batch_size // nproc)
  gathered = np.asarray(multihost_utils.process_allgather(local))  # [proc, batches, local]
  return gathered.transpose(1, 0, 2).reshape(-1)


def follower_atoms(rt: Runtime, t: int, margins: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
  """The follower's worst case over ``margins`` -> ``(atom_weights, atom_shifts, summary)``."""
  cfg = rt.config
  worst = dro.solve_follower(margins, cfg.dro,
                             key=jax.random.fold_in(jax.random.key(cfg.seed + 1), t))
  weights, shifts = map(np.asarray, dro.to_loss_atoms(worst))
  summary = dro.summarize(worst, dro.margins_to_xi(margins, cfg.dro))
  return weights, shifts, summary


def phase_follower(rt: Runtime, t: int, policy: Llama, reference: Llama):
  """Round t's training set with reference log-probs and follower atoms (``train_set/``).

  The set is round t's pairs (authors' code) or, with ``rounds.accumulate``, the pairs of
  rounds 0..t (Algorithm 1). For t ≥ 1 the follower runs on the implicit-reward margins of the
  whole set, ``(log π_{t−1} − log π_annot)(chosen) − (…)(rejected)``; round 0 is plain DPO
  (one atom of weight 1 and shift 0).
  """
  import datasets
  sets = [round_pairs(rt, s) for s in (range(t + 1) if rt.config.rounds.accumulate else [t])]
  dataset = datasets.concatenate_datasets(sets) if len(sets) > 1 else sets[0]
  ref_c, ref_r = score_pairs(rt, t, dataset, reference)
  extras = {"ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
  n = len(dataset)
  if t == 0:
    extras["atom_weights"], extras["atom_shifts"] = np.ones((n, 1)), np.zeros((n, 1))
  else:
    judge = _judge(rt, t)
    pol_c, pol_r = (ref_c, ref_r) if reference is policy else score_pairs(rt, t, dataset, policy)
    judge_c, judge_r = ((ref_c, ref_r) if judge is reference
                        else score_pairs(rt, t, dataset, judge))
    margins = (pol_c - judge_c) - (pol_r - judge_r)
    weights, shifts, summary = follower_atoms(rt, t, margins)
    extras["atom_weights"], extras["atom_shifts"] = weights, shifts
    extras["judge_chosen_logps"], extras["judge_rejected_logps"] = judge_c, judge_r
    if jax.process_index() == 0:
      rundir.atomic_json(os.path.join(rt.round_dir(t), "follower.json"),
                         {**summary, "num_pairs": n, "refresh_step": 0})
  judge_logps = {k: extras.pop(k) for k in ("judge_chosen_logps", "judge_rejected_logps")
                 if k in extras}
  dataset = with_pair_columns(dataset, **extras)
  if jax.process_index() == 0:
    save_round(os.path.join(rt.round_dir(t), "train_set"),
               {**{c: dataset[c] for c in dataset.column_names}, **judge_logps},
               round_index=t, settings={"dro": dataclasses.asdict(rt.config.dro),
                                        "accumulate": rt.config.rounds.accumulate},
               counts={"pairs": n})
  return dataset, judge_logps


def _refresh_path(rt: Runtime, t: int, round_step: int) -> str:
  return os.path.join(rt.round_dir(t), "follower_refresh", f"step_{round_step:08d}.npz")


def _latest_refresh(rt: Runtime, t: int, round_step: int) -> str | None:
  folder = os.path.join(rt.round_dir(t), "follower_refresh")
  if not os.path.isdir(folder):
    return None
  steps = sorted(int(f[5:13]) for f in os.listdir(folder) if f.endswith(".npz") and f[5:13].isdigit())
  steps = [s for s in steps if s <= round_step]
  return _refresh_path(rt, t, steps[-1]) if steps else None


def _with_saved_atoms(dataset, path: str):
  with np.load(path) as f:
    return with_pair_columns(dataset, atom_weights=f["atom_weights"], atom_shifts=f["atom_shifts"])


def _refresh_follower(rt: Runtime, t: int, state, dataset, judge_logps, round_step: int):
  """Re-solves the follower from the current policy's margins (paper eq. 7–8)."""
  current = tr.merge_params(state)
  # Scoring cache keys on parameter fingerprints, so every refresh is a fresh pass.
  pol_c, pol_r = score_pairs(rt, t, dataset, current)
  margins = ((pol_c - judge_logps["judge_chosen_logps"])
             - (pol_r - judge_logps["judge_rejected_logps"]))
  weights, shifts, summary = follower_atoms(rt, t, margins)
  path = _refresh_path(rt, t, round_step)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rundir.atomic_npz(path, atom_weights=weights, atom_shifts=shifts)
  return with_pair_columns(dataset, atom_weights=weights, atom_shifts=shifts), summary


def _loader(rt: Runtime, dataset, t: int, train_cfg) -> PreferenceLoader:
  d = rt.config.data
  return PreferenceLoader(dataset, global_batch_size=train_cfg.global_batch_size,
                          seed=d.shuffle_seed + t, pad_id=rt.tokenizer.pad_token_id,
                          bucket_size=d.bucket_size, bucket_window=d.bucket_window,
                          num_hosts=jax.process_count(), host_index=jax.process_index())


def phase_train(rt: Runtime, t: int, init: Llama, dataset, judge_logps, *,
                resume_state, resume_meta, global_step: int) -> tuple[Any, int]:
  """Trains round t from ``init`` on ``dataset``; resumes from a restored state and metadata."""
  cfg = rt.config
  train_cfg = cfg.train_for_round(t)
  loader = _loader(rt, dataset, t, train_cfg)
  num_steps = train_cfg.epochs * loader.batches_per_epoch
  state = tr.create_train_state(init, train_cfg, rt.mesh, num_train_steps=num_steps,
                                key=jax.random.fold_in(jax.random.key(cfg.seed + 2), t))
  cursor = LoaderCursor()
  if resume_state is not None:
    # Same structure and shardings; the round's static optimizer/schedule come from `state`.
    state = jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(resume_state))
    cursor = LoaderCursor.from_dict(resume_meta["cursor"])
  done = cursor.epoch * loader.batches_per_epoch + cursor.step
  refresh = cfg.rounds.follower_refresh_steps if t > 0 else None
  if refresh and done > 0 and (latest := _latest_refresh(rt, t, done)) is not None:
    dataset = _with_saved_atoms(dataset, latest)  # the atoms in force at the checkpoint
    loader = _loader(rt, dataset, t, train_cfg)
  step_fn = tr.make_train_step(train_cfg, rt.mesh, state)
  it = loader.iterator(cursor, num_epochs=train_cfg.epochs)
  bar = tqdm(total=num_steps, initial=done, desc=f"round {t}: train", leave=False)
  tokens, last = 0, time.perf_counter()
  while True:
    if refresh and done > 0 and done % refresh == 0 and done < num_steps:
      if os.path.exists(_refresh_path(rt, t, done)):  # resumed exactly at a refresh point
        dataset = _with_saved_atoms(dataset, _refresh_path(rt, t, done))
      else:
        dataset, summary = _refresh_follower(rt, t, state, dataset, judge_logps, done)
        rt.logger.log(global_step, summary, round=t, round_step=done)
      loader = _loader(rt, dataset, t, train_cfg)
      it = loader.iterator(it.cursor, num_epochs=train_cfg.epochs)
    try:
      batch = next(it)
    except StopIteration:
      break
    tokens += int(batch.chosen_mask.sum() + batch.rejected_mask.sum()) * jax.process_count()
    state, metrics = step_fn(state, shd.global_batch(rt.mesh, batch))
    done, global_step = done + 1, global_step + 1
    bar.update(1)
    if done % cfg.rounds.log_every_steps == 0 or done == num_steps:
      metrics = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
      tr.check_finite_progress(metrics, train_cfg)
      now = time.perf_counter()
      metrics["tokens_per_second"] = tokens / max(now - last, 1e-9)
      tokens, last = 0, now
      rt.logger.log(global_step, metrics, round=t, round_step=done)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}")
    if done % cfg.checkpoint.save_every_steps == 0 and done < num_steps:
      rt.ckpt.save(global_step, state, {"round": t, "phase": "train", "round_step": done,
                                         "cursor": it.cursor.to_dict(),
                                         "global_step": global_step}, force=True)
  bar.close()
  return state, global_step


def phase_evaluate(rt: Runtime, t: int, policy: Llama) -> None:
  """Greedy responses to the eval prompts as AlpacaEval JSON (``eval_generations.json``)."""
  if not rt.data.eval_prompts:
    return
  prompt_ids = _prompt_ids(rt, rt.data.eval_prompts)
  gen = _generate_all(rt, policy, prompt_ids, jax.random.key(0), temperature=0.0, num_samples=1,
                      desc=f"round {t}: evaluate")
  texts = decode(rt.tokenizer, gen["tokens"], gen["mask"])
  name = f"{os.path.basename(os.path.normpath(rt.out))}-round{t}"
  records = [{"instruction": p.prompt[-1]["content"], "output": o, "generator": name,
              "dataset": "ssapo_eval"} for p, o in zip(rt.data.eval_prompts, texts)]
  if jax.process_index() == 0:
    rundir.atomic_json(os.path.join(rt.round_dir(t), "eval_generations.json"), records)


# ------------------------------------------------------------------------------ the loop

def _resume_point(rt: Runtime) -> tuple[int, int | None, int]:
  """``(round, checkpoint step to restore or None, global step)`` of the newest readable
  checkpoint's metadata (an unreadable one is skipped with a warning)."""
  for step in reversed(rt.ckpt.all_steps()):
    try:
      meta = rt.ckpt.restore_metadata(step)
    except Exception as e:  # orbax raises many types for unreadable files
      warnings.warn(f"checkpoint {step} metadata unreadable ({type(e).__name__}: {e}); "
                    "trying an older one")
      continue
    if meta["phase"] == ROUND_DONE:
      return meta["round"] + 1, None, meta["global_step"]
    return meta["round"], step, meta["global_step"]
  return 0, None, 0


def _restore_train_state(rt: Runtime, t: int, init: Llama, step: int):
  """The train-phase state of round t at checkpoint ``step`` (with fallback to older ones)."""
  template = tr.create_train_state(init, rt.config.train_for_round(t), rt.mesh, num_train_steps=1)
  restored = rt.ckpt.restore(template)  # newest readable; warns when it falls back
  meta = restored.metadata
  if meta["phase"] == ROUND_DONE and meta["round"] == t - 1:
    return None, None, meta["global_step"]  # fell back to the start of round t
  if meta["phase"] != "train" or meta["round"] != t:
    raise RuntimeError(f"checkpoint {restored.step} in {rt.ckpt.directory} is {meta}, expected "
                       f"round {t}; delete the newer broken checkpoints or start with --no-resume")
  if restored.step != step:
    warnings.warn(f"resuming round {t} from checkpoint {restored.step} instead of {step}")
  return restored.state, meta, meta["global_step"]


def _export_policy(rt: Runtime, t: int, policy: Llama) -> None:
  """Saves π_t in Hugging Face format to ``round_<t>/policy`` (atomically)."""
  if jax.process_index() != 0:
    return
  final = os.path.join(rt.round_dir(t), "policy")
  tmp = final + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  save_hf(policy, tmp, tokenizer=rt.tokenizer)
  shutil.rmtree(final, ignore_errors=True)
  os.replace(tmp, final)


def run(config: ExperimentConfig, *, resume: bool = True) -> dict[int, dict[str, Any]]:
  """Runs (or resumes) every round of ``config``; returns the per-round summaries.

  Writes under ``config.output_dir``: ``split_manifest.json``, ``metrics.jsonl`` and
  ``tensorboard/``, ``checkpoints/``, ``round_<t>/`` (``generations.npz``, ``pairs/``,
  ``train_set/``, ``follower.json``, ``eval_generations.json``, ``summary.json``, ``policy/``)
  and ``final_policy/`` (Hugging Face format). A remote (``gs://``) output directory gets
  checkpoints and metrics directly; the phase outputs are written to a local mirror on every
  host and copied up by process 0 after each phase (and down again when a run resumes).
  """
  workdir = rundir.local_workdir(config.output_dir)
  os.makedirs(workdir, exist_ok=True)
  if resume and rundir.is_remote(config.output_dir):
    rundir.pull(config.output_dir, workdir)
  mesh = shd.make_mesh(config.mesh)
  tokenizer = load_tokenizer(config.model.resolved_tokenizer_path)
  sft = _load_model(config.model.path, config, mesh)
  data = prepare_data(config, workdir, sft=sft, tokenizer=tokenizer)
  ckpt = Checkpointer(checkpoint_dir(config.output_dir), config=config.checkpoint)
  rt = Runtime(config, mesh, tokenizer, sft, data, ckpt, None, workdir)
  rundir.push(config.output_dir, workdir, "split_manifest.json")
  first_round, resume_step, global_step = _resume_point(rt) if resume else (0, None, 0)
  rt.logger = MetricsLogger(config.output_dir, resume_step=global_step if resume else -1)
  summaries = {}
  try:
    for t in range(first_round, config.rounds.num_rounds + 1):
      rel = f"round_{t}"
      os.makedirs(rt.round_dir(t), exist_ok=True)
      policy = _policy_at(rt, t - 1)
      resume_state = resume_meta = None
      if t == first_round and resume_step is not None:
        resume_state, resume_meta, global_step = _restore_train_state(rt, t, policy, resume_step)
      if t > 0:
        gen = phase_generate(rt, t, policy)
        rundir.push(config.output_dir, workdir, rel)
        phase_annotate(rt, t, policy, gen)
        rundir.push(config.output_dir, workdir, rel)
      reference = (policy if t > 0 and config.rounds.train_reference == "previous" else sft)
      dataset, judge_logps = phase_follower(rt, t, policy, reference)
      rundir.push(config.output_dir, workdir, rel)
      state, global_step = phase_train(rt, t, policy, dataset, judge_logps,
                                       resume_state=resume_state, resume_meta=resume_meta,
                                       global_step=global_step)
      rt.policies[t] = tr.merge_params(state)
      rt.policies.pop(t - 2, None)  # keep π_{t-1} and π_t: all that later rounds read
      _export_policy(rt, t, rt.policies[t])
      phase_evaluate(rt, t, rt.policies[t])
      summary = {"round": t, "global_step": global_step, "num_pairs": len(dataset)}
      follower = os.path.join(rt.round_dir(t), "follower.json")
      if os.path.exists(follower):
        with open(follower) as f:
          summary["follower"] = json.load(f)
      if jax.process_index() == 0:
        rundir.atomic_json(os.path.join(rt.round_dir(t), "summary.json"), summary)
      rundir.push(config.output_dir, workdir, rel)
      summaries[t] = summary
      global_step += 1  # the round-end checkpoint gets a step of its own
      ckpt.save(global_step, state, {"round": t, "phase": ROUND_DONE, "global_step": global_step},
                force=True)
      ckpt.wait()
    last = os.path.join(rt.round_dir(config.rounds.num_rounds), "policy")
    if jax.process_index() == 0 and os.path.isdir(last):
      final = os.path.join(workdir, "final_policy")
      shutil.rmtree(final, ignore_errors=True)
      shutil.copytree(last, final)
      rundir.push(config.output_dir, workdir, "final_policy")
  finally:
    ckpt.close()
    rt.logger.close()
  return summaries
