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
from ssapo_jax.checkpoint import Checkpointer, NoCheckpoints
from ssapo_jax.data import last_token_embeddings, left_pad, save_manifest, tokenize_prompts
from ssapo_jax.data.tokenize import fixed_size_batches
from ssapo_jax.experiment import ExperimentConfig
from ssapo_jax.metrics import MetricsLogger
from ssapo_jax.models import CausalLM, load_hf
from ssapo_jax.models.tokenizer import load_tokenizer
from ssapo_jax.pipeline.residency import held_dtype
from ssapo_jax.preflight import Preflight, Sources, load_sources, split_data
from ssapo_jax.rundir import RunDir
from ssapo_jax.runrecord import message, progress
from ssapo_jax.storage import local_copy
from ssapo_jax.train import DTYPES, Scorer, checkpoint_state


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
  sft: CausalLM  # the initial policy π_{-1} (and SFT reference)
  data: RunData
  ckpt: Checkpointer | NoCheckpoints
  logger: MetricsLogger
  rundir: RunDir  # the output directory and its local working copy
  scorer: Scorer
  policies: dict[int, CausalLM] = dataclasses.field(default_factory=dict)  # round -> π_t

  @classmethod
  def build(
    cls,
    config: ExperimentConfig,
    rundir: RunDir,
    *,
    ckpt,
    logger,
    preflight: Preflight | None = None,
  ) -> "Runtime":
    """Builds the mesh, tokenizer, SFT model, data split and scorer of a run (the split
    manifest is written and pushed), reusing the mesh, tokenizer and loaded sources of the
    pre-run checks when given. The returned runtime closes ``ckpt`` and ``logger`` when used as a
    context manager."""
    mesh = (
      shd.make_mesh(config.mesh) if preflight is None or preflight.mesh is None else preflight.mesh
    )
    tokenizer = (
      load_tokenizer(config.model.resolved_tokenizer_path)
      if preflight is None
      else preflight.tokenizer
    )
    sft = load_model(config.model.path, config, mesh)
    data = prepare_data(
      config,
      rundir.workdir,
      sft=sft,
      tokenizer=tokenizer,
      mesh=mesh,
      sources=None if preflight is None else preflight.sources,
    )
    rundir.push("split_manifest.json")
    return cls(
      config=config,
      mesh=mesh,
      tokenizer=tokenizer,
      sft=sft,
      data=data,
      ckpt=ckpt,
      logger=logger,
      rundir=rundir,
      scorer=Scorer.for_experiment(config, mesh, tokenizer.pad_token_id),
    )

  def __enter__(self) -> "Runtime":
    return self

  def __exit__(self, *exc) -> None:
    self.ckpt.close()
    self.logger.close()

  def save_checkpoint(self, step: int, state, meta: dict) -> None:
    """Saves checkpoint ``step`` of ``state`` (its `train.checkpoint_state`: with LoRA, the
    adapters without the base) and flushes the metrics: storage then holds every record the
    checkpoint covers, so a resume from it (which keeps the records up to its step and drops
    the rest) loses no history, even when ``output_dir`` is remote and the run is killed."""
    self.ckpt.save(step, checkpoint_state(state), meta, force=True)
    self.logger.flush()

  @property
  def workdir(self) -> str:
    """Local directory of the phase outputs (= output_dir unless that is remote)."""
    return self.rundir.workdir

  def round_dir(self, t: int) -> str:
    return self.rundir.round_dir(t)

  def prompt_ids(self, prompts, *, report: str | None = None) -> list[list[int]]:
    """Chat-templated, truncated prompt token ids (unpadded); ``report`` names the prompts in
    the truncation count it then logs."""
    d = self.config.data
    return tokenize_prompts(
      prompts,
      self.tokenizer,
      max_prompt_length=d.max_prompt_length,
      truncation_mode=d.truncation_mode,
      system_message=d.system_message,
      report=report,
    )

  def policy(self, t: int) -> CausalLM:
    """π_t: trained in this process, else its export from round t (π_{-1} = the SFT model)."""
    if t < 0:
      return self.sft
    if t not in self.policies:  # resumed run: the export is bitwise the trained parameters
      self.policies[t] = load_model(
        os.path.join(self.round_dir(t), "policy"), self.config, self.mesh
      )
    return self.policies[t]

  def judge(self, t: int) -> CausalLM:
    """π_annot of round t: the SFT model or π_{t−2} (``rounds.annotation_reference``)."""
    return self.policy(t - 2) if self.config.rounds.annotation_reference == "previous" else self.sft


def load_model(path: str, config: ExperimentConfig, mesh) -> CausalLM:
  """A local HF checkpoint, its parameters placed with the mesh's partition rules."""
  path = local_copy(path)  # a gs:// folder: this host's copy
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"no Hugging Face model in {path!r} (config.json missing)")
  t = config.train
  # Every tensor is read straight into its final sharding: no device holds a full replica.
  return load_hf(
    path,
    dtype=DTYPES[t.compute_dtype],
    param_dtype=DTYPES[held_dtype(config)],
    remat=t.remat,
    attention=config.model.attention,
    scan_layers=config.model.scan_layers,
    mesh=mesh,
  )


def prompt_embeddings(
  model: CausalLM, tokenizer, prompts, config: ExperimentConfig, mesh
) -> np.ndarray:
  """``[N, D]`` float32 embeddings of chat-templated prompts for farthest-point seeding.

  The SFT model's last-layer hidden state at each prompt's last token (paper, appendix G.2).
  Batches of ``sampling.batch_size`` prompts are sharded over ``(data, fsdp)``: each process
  feeds and computes only its rows, then the rows are gathered in order on every process.
  """
  d = config.data
  ids = tokenize_prompts(
    prompts,
    tokenizer,
    max_prompt_length=d.max_prompt_length,
    truncation_mode=d.truncation_mode,
    system_message=d.system_message,
  )
  graphdef, state = nnx.split(model)  # the whole model: hidden_states reads buffers too

  @jax.jit
  def embed(state, prompt_ids, prompt_mask):
    hidden = nnx.merge(graphdef, state).hidden_states(prompt_ids, prompt_mask)
    return last_token_embeddings(hidden, prompt_mask).astype(jnp.float32)

  out = []
  size = config.sampling.batch_size
  rows = shd.host_batch_rows(mesh, size)
  for chunk, n in progress(fixed_size_batches(len(ids), size), desc="embed prompts"):
    prompt_ids, prompt_mask = left_pad(
      [ids[i] for i in chunk], pad_id=tokenizer.pad_token_id, multiple=d.bucket_size
    )  # one length for the whole batch
    local = shd.global_batch(mesh, (prompt_ids[rows], prompt_mask[rows]))
    out.append(shd.to_host(embed(state, *local))[:n])
  return np.concatenate(out)


def prepare_data(
  config: ExperimentConfig,
  workdir: str,
  *,
  sft: CausalLM,
  tokenizer,
  mesh,
  sources: Sources | None = None,
) -> RunData:
  """The run's seed/pool split (`preflight.split_data` of ``sources``, loaded when not given);
  process 0 writes ``split_manifest.json``.

  With ``data.seed_method=farthest_point`` the seed is chosen on the SFT model's prompt
  embeddings (`prompt_embeddings`).
  """
  sources = load_sources(config) if sources is None else sources
  embeddings = None
  if config.data.seed_method == "farthest_point":
    embeddings = lambda pairs: prompt_embeddings(
      sft,
      tokenizer,
      [p.prompt for p in pairs],  # noqa: E731
      config,
      mesh,
    )
  split = split_data(config, sources, embeddings=embeddings)
  if split.left_out.get("data.source"):
    message(
      f"data.source: left out {split.left_out['data.source']} pairs whose prompt is in "
      "data.eval_source"
    )
  if split.left_out.get("data.prompt_source"):
    message(
      f"data.prompt_source: left out {split.left_out['data.prompt_source']} prompts "
      "already in the labelled seed or data.eval_source"
    )
  if jax.process_index() == 0:
    save_manifest(split.manifest, os.path.join(workdir, "split_manifest.json"))
  return RunData(seed_pairs=split.seed_pairs, pools=split.pools, eval_prompts=split.eval_prompts)
