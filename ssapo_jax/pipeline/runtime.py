"""What a run builds once and every phase reads: `Runtime`, model loading and the data split."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssapo_jax import sharding as shd
from ssapo_jax.checkpoint import Checkpointer
from ssapo_jax.data import (PromptRecord, last_token_embeddings, left_pad, load_preferences,
                            load_prompts, save_manifest, select_rows, split_rows, tokenize_prompts)
from ssapo_jax.data.tokenize import fixed_size_batches
from ssapo_jax.experiment import ExperimentConfig
from ssapo_jax.metrics import MetricsLogger
from ssapo_jax.models import Llama, load_hf
from ssapo_jax.runrecord import progress
from ssapo_jax.storage import local_copy
from ssapo_jax.train import DTYPES, Scorer, scoring_batch_size


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
  sft: Llama  # the initial policy π_{-1} (and SFT reference)
  data: RunData
  ckpt: Checkpointer
  logger: MetricsLogger
  workdir: str  # local directory of the phase outputs (= output_dir unless that is remote)
  scorer: Scorer
  policies: dict[int, Llama] = dataclasses.field(default_factory=dict)  # round -> π_t in memory

  def round_dir(self, t: int) -> str:
    return os.path.join(self.workdir, f"round_{t}")

  def prompt_ids(self, prompts) -> list[list[int]]:
    """Chat-templated, truncated prompt token ids (unpadded)."""
    d = self.config.data
    return tokenize_prompts(prompts, self.tokenizer, max_prompt_length=d.max_prompt_length,
                            truncation_mode=d.truncation_mode, system_message=d.system_message)

  def policy(self, t: int) -> Llama:
    """π_t: trained in this process, else its export from round t (π_{-1} = the SFT model)."""
    if t < 0:
      return self.sft
    if t not in self.policies:  # resumed run: the export is bitwise the trained parameters
      self.policies[t] = load_model(os.path.join(self.round_dir(t), "policy"), self.config,
                                    self.mesh)
    return self.policies[t]

  def judge(self, t: int) -> Llama:
    """π_annot of round t: the SFT model or π_{t−2} (``rounds.annotation_reference``)."""
    return self.policy(t - 2) if self.config.rounds.annotation_reference == "previous" else self.sft


def scorer_for(config: ExperimentConfig, mesh, pad_id: int) -> Scorer:
  """The run's `Scorer`: batches of the train micro-batch size (at least one row per shard)."""
  return Scorer(mesh, pad_id, scoring_batch_size(config.train, mesh),
                bucket_size=config.data.bucket_size, compute_dtype=config.train.compute_dtype)


def load_model(path: str, config: ExperimentConfig, mesh) -> Llama:
  """A local HF checkpoint, its parameters placed with the mesh's partition rules."""
  path = local_copy(path)  # a gs:// folder: this host's copy
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"no Hugging Face model in {path!r} (config.json missing)")
  t = config.train
  # Every tensor is read straight into its final sharding: no device holds a full replica.
  return load_hf(path, dtype=DTYPES[t.compute_dtype], param_dtype=DTYPES[t.param_dtype],
                 remat=t.remat, attention=config.model.attention, mesh=mesh)


def prompt_embeddings(model: Llama, tokenizer, prompts, config: ExperimentConfig,
                      mesh) -> np.ndarray:
  """``[N, D]`` float32 embeddings of chat-templated prompts for farthest-point seeding.

  The SFT model's last-layer hidden state at each prompt's last token (paper, appendix G.2).
  Batches of ``sampling.batch_size`` prompts are sharded over ``(data, fsdp)``: each process
  feeds and computes only its rows, then the rows are gathered in order on every process.
  """
  d = config.data
  ids = tokenize_prompts(prompts, tokenizer, max_prompt_length=d.max_prompt_length,
                         truncation_mode=d.truncation_mode, system_message=d.system_message)
  graphdef, state = nnx.split(model)

  @jax.jit
  def embed(state, prompt_ids, prompt_mask):
    hidden = nnx.merge(graphdef, state).hidden_states(prompt_ids, prompt_mask)
    return last_token_embeddings(hidden, prompt_mask).astype(jnp.float32)

  out = []
  size = config.sampling.batch_size
  rows = shd.host_batch_rows(mesh, size)
  for chunk, n in progress(fixed_size_batches(len(ids), size), desc="embed prompts"):
    prompt_ids, prompt_mask = left_pad([ids[i] for i in chunk], pad_id=tokenizer.pad_token_id,
                                       multiple=d.bucket_size)  # one length for the whole batch
    local = shd.global_batch(mesh, (prompt_ids[rows], prompt_mask[rows]))
    out.append(shd.to_host(embed(state, *local))[:n])
  return np.concatenate(out)


def prepare_data(config: ExperimentConfig, workdir: str, *, sft: Llama, tokenizer,
                 mesh) -> RunData:
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
    embeddings = prompt_embeddings(sft, tokenizer, [p.prompt for p in pairs], config, mesh)
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
    save_manifest(manifest, os.path.join(workdir, "split_manifest.json"))
  if not seed:
    raise ValueError(f"data.seed_size={d.seed_size} selects no labelled pair from {d.source}")
  for t in range(config.rounds.num_rounds):
    if not pools[t]:
      raise ValueError(f"data.pool_sizes[{t}] gives round {t + 1} no prompts")
  return RunData(seed_pairs=seed, pools=pools, eval_prompts=eval_prompts)
