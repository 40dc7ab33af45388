"""The experiment config: its sections, the rules between sections, and named seed streams.

`ExperimentConfig` nests the sections that live beside the code they configure (`DataConfig`,
`SamplingConfig`, `TrainConfig`, `DroConfig`, `MeshConfig`, `CheckpointConfig`, `MetricsConfig`) and the two defined
here (`ModelConfig`, `RoundsConfig`); ``configs/*.yaml`` files have exactly this nesting and are
read by `load_experiment` with the generic loader of `ssapo_jax.config`.

One source of truth per setting. A setting that two sections need lives in one of them and is
copied into the other when the config resolves (`ExperimentConfig.__post_init__`):

* the leader's robust space ``train.robust_space`` (not a config key) follows ``dro.space``;
* ``dro.margin_scale`` (``null`` in YAML) defaults to ``train.beta``, so the follower's ξ and the
  leader's ``βΔ`` share units; an explicit value is kept, and the resolved config shows it.

Rules between sections are checked in `_check_sections`; each failure is one line.

Randomness. Every random draw of a run comes from the one ``seed`` through `stream_key`:
``fold_in(fold_in(key(seed), crc32(stream)), round)``, one named stream per use (`SEED_STREAMS`).
``data.split_seed`` stays an integer of its own: it is the shuffle seed of the seed/pool split,
which reproduces the authors' split (42) whatever the run seed.
"""

from __future__ import annotations

import dataclasses
import os
import typing
import zlib
from typing import Literal, Optional, Sequence

import jax
import numpy as np

from ssapo_jax.checkpoint import CheckpointConfig
from ssapo_jax.compilation import CompilationConfig
from ssapo_jax.config import check_choices, load_config
from ssapo_jax.data.config import DataConfig
from ssapo_jax.dro import DroConfig
from ssapo_jax.fielddocs import document_fields
from ssapo_jax.lora import LoraConfig
from ssapo_jax.losses import check_atom_scale
from ssapo_jax.metrics import MetricsConfig
from ssapo_jax.sampling import SamplingConfig
from ssapo_jax.sharding import MeshConfig
from ssapo_jax.train.step import TrainConfig

# What each named stream draws: sampling of round t, the follower's random groups, the loader's
# epoch order, and greedy evaluation (which draws nothing today). Streams are hashed by name,
# so removing one changes no other stream's keys.
SeedStream = Literal["generate", "follower", "shuffle", "evaluate"]
SEED_STREAMS: tuple[str, ...] = typing.get_args(SeedStream)


def stream_key(seed: int, stream: str, round_index: int) -> jax.Array:
  """The PRNG key of one named stream in one round: ``fold_in(fold_in(key(seed), crc32(stream)), t)``.

  The stream name is hashed (CRC-32), so streams do not depend on the order of `SEED_STREAMS`
  and no two (seed, stream) pairs share keys the way ``seed + 1`` offsets would.
  """
  if stream not in SEED_STREAMS:
    raise ValueError(f"unknown seed stream {stream!r}; streams: {', '.join(SEED_STREAMS)}")
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(stream.encode()))
  return jax.random.fold_in(key, round_index)


def stream_seed(seed: int, stream: str, round_index: int) -> int:
  """A non-negative int31 seed drawn from `stream_key`, for numpy-seeded code (the loader)."""
  bits = jax.random.bits(stream_key(seed, stream, round_index), dtype=np.uint32)
  return int(np.asarray(bits)) >> 1


@document_fields
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The initial (SFT) policy: a local Hugging Face model directory.

  Compute dtype, parameter dtype and rematerialisation are training choices and live in
  `TrainConfig` (``train.compute_dtype``, ``train.param_dtype``, ``train.remat``); the chat
  template's system message is ``data.system_message``.
  """

  path: str  # local HF model directory (config.json, *.safetensors, tokenizer files)
  tokenizer_path: Optional[str] = None  # tokenizer directory; None = `path`
  # Attention kernel (LlamaConfig.attention): auto = splash on TPU, cudnn on GPU (bf16), else xla.
  attention: Literal["auto", "xla", "splash", "cudnn"] = "auto"
  # Layer stack as one lax.scan (True: compile time does not grow with depth, what a 32-layer
  # 7B/8B model needs) or unrolled over the same stacked parameters (False: faster steps for
  # shallow models, e.g. the tiny CPU config); checkpoints are the same (LlamaConfig.scan_layers).
  scan_layers: bool = True
  # LoRA/QLoRA adapters {rank, alpha, targets, base_dtype} (`ssapo_jax.lora`); None = full
  # fine-tuning.
  lora: Optional[LoraConfig] = None

  def __post_init__(self):
    check_choices(self, "model")
    if not self.path:
      raise ValueError("model.path must name a local Hugging Face model directory, got ''")

  @property
  def resolved_tokenizer_path(self) -> str:
    """The tokenizer directory (`tokenizer_path`, else the model `path`)."""
    return self.tokenizer_path or self.path


@document_fields
@dataclasses.dataclass(frozen=True)
class RoundsConfig:
  """The SSAPO loop: round 0 trains on the seed pairs, rounds 1..num_rounds self-annotate.

  Per-round learning rates and epochs override ``train.learning_rate`` / ``train.epochs`` when set
  (see `ExperimentConfig.train_for_round`).
  """

  # Self-annotation rounds after the seed round (paper: 3 Mistral, 2 Llama 3); round t draws its
  # prompts from pool t of ``data.pool_sizes``.
  num_rounds: int = 3
  seed_epochs: Optional[int] = None  # epochs of round 0 (seed DPO); None = train.epochs
  round_epochs: Optional[int] = None  # epochs of rounds >= 1; None = train.epochs
  seed_learning_rate: Optional[float] = None  # peak lr of round 0; None = train.learning_rate
  round_learning_rate: Optional[float] = None  # peak lr of rounds >= 1; None = train.learning_rate
  # Reference of the implicit-reward judge: the SFT model (authors' code) or the previous policy.
  annotation_reference: Literal["sft", "previous"] = "sft"
  # Reference of the DPO loss in rounds >= 1: the previous round's policy (authors' code) or SFT.
  train_reference: Literal["previous", "sft"] = "previous"
  # Train round t on all pairs so far (Algorithm 1) instead of only its new pairs (authors' code).
  accumulate: bool = False
  # Re-solve the follower (worst-case atoms) every this many leader steps; None = once per round.
  follower_refresh_steps: Optional[int] = None
  num_eval_prompts: int = 0  # held-out prompts scored after every round; 0 = no evaluation
  log_every_steps: int = 1  # train metrics logged (and the non-finite guard checked) every k steps

  def __post_init__(self):
    check_choices(self, "rounds")
    if self.num_rounds < 0:
      raise ValueError(f"rounds.num_rounds must be >= 0, got {self.num_rounds}")
    for name in ("seed_epochs", "round_epochs", "follower_refresh_steps"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"rounds.{name} must be >= 1 or null, got {value}")
    for name in ("seed_learning_rate", "round_learning_rate"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"rounds.{name} must be > 0 or null, got {value}")
    if self.log_every_steps < 1:
      raise ValueError(f"rounds.log_every_steps must be >= 1, got {self.log_every_steps}")
    if self.num_eval_prompts < 0:
      raise ValueError(f"rounds.num_eval_prompts must be >= 0, got {self.num_eval_prompts}")


@document_fields
@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A whole SSAPO run; ``configs/*.yaml`` files have exactly this nesting.

  Building one resolves the settings shared between sections (see the module docstring): the
  instance holds ``train.robust_space == dro.space`` and a numeric ``dro.margin_scale``.
  """

  model: ModelConfig  # the initial policy (and SFT reference)
  # run directory: config.yaml, metrics.jsonl, checkpoints/, phase outputs (local or gs://)
  output_dir: str
  data: DataConfig = DataConfig()  # seed preferences, prompt pools, tokenisation, batching
  sampling: SamplingConfig = SamplingConfig()  # response generation of rounds >= 1
  train: TrainConfig = TrainConfig()  # the leader (policy) update
  dro: DroConfig = DroConfig()  # the follower: worst-case distribution in the Wasserstein ball
  mesh: MeshConfig = MeshConfig()  # device mesh and multi-host set-up
  rounds: RoundsConfig = RoundsConfig()  # the SSAPO loop
  checkpoint: CheckpointConfig = CheckpointConfig()  # save interval and retention
  compilation: CompilationConfig = CompilationConfig()  # persistent compilation cache
  metrics: MetricsConfig = MetricsConfig()  # metric sinks besides metrics.jsonl and tensorboard/
  seed: int = 42  # the run's seed: every random draw derives from it (`stream_key`)

  def __post_init__(self):
    if not self.output_dir:
      raise ValueError("output_dir must be set (a local directory or gs://bucket/path)")
    _check_sections(self)
    # Resolve the shared settings: the follower's space drives the leader's, and the margin
    # scale defaults to β.
    scale = self.train.beta if self.dro.margin_scale is None else self.dro.margin_scale
    object.__setattr__(self, "dro", dataclasses.replace(self.dro, margin_scale=scale))
    object.__setattr__(
      self,
      "train",
      dataclasses.replace(
        self.train,
        robust_space=self.dro.space,
        robust_margin_scale=scale,
        robust_allow_scale_mismatch=self.dro.allow_scale_mismatch,
        objective="robust" if self.dro.epsilon > 0 else "dpo",
        lora=self.model.lora,
      ),
    )
    if self.train.objective == "robust" or self.rounds.num_rounds > 0:
      check_atom_scale(scale, self.train.beta, allow_scale_mismatch=self.dro.allow_scale_mismatch)

  def train_for_round(self, round_index: int) -> TrainConfig:
    """`TrainConfig` of one round: the seed round (0) or a later one, with per-round lr/epochs."""
    if round_index < 0 or round_index > self.rounds.num_rounds:
      raise ValueError(f"round_index must be in [0, {self.rounds.num_rounds}], got {round_index}")
    seed_round = round_index == 0
    lr = self.rounds.seed_learning_rate if seed_round else self.rounds.round_learning_rate
    epochs = self.rounds.seed_epochs if seed_round else self.rounds.round_epochs
    return dataclasses.replace(
      self.train,
      learning_rate=self.train.learning_rate if lr is None else lr,
      epochs=self.train.epochs if epochs is None else epochs,
    )

  def key(self, stream: str, round_index: int) -> jax.Array:
    """`stream_key` of this run's seed."""
    return stream_key(self.seed, stream, round_index)


def _check_sections(config: ExperimentConfig) -> None:
  """The rules between sections; each raises a one-line ValueError naming both keys."""
  if len(config.data.pool_sizes) < config.rounds.num_rounds:
    raise ValueError(
      f"rounds.num_rounds={config.rounds.num_rounds} needs one prompt pool per "
      f"round, but data.pool_sizes={list(config.data.pool_sizes)} has "
      f"{len(config.data.pool_sizes)}"
    )
  if config.rounds.follower_refresh_steps is not None and config.dro.epsilon == 0:
    raise ValueError(
      f"rounds.follower_refresh_steps={config.rounds.follower_refresh_steps} "
      "re-solves the follower, but dro.epsilon=0 trains plain DPO without one; "
      "set dro.epsilon > 0 or rounds.follower_refresh_steps=null"
    )
  if config.dro.epsilon > 0:
    t = config.train
    plain_only = {
      "train.loss_type": (t.loss_type, "sigmoid"),
      "train.label_smoothing": (t.label_smoothing, 0.0),
      "train.f_divergence_type": (t.f_divergence_type, "reverse_kl"),
    }
    for key, (value, robust) in plain_only.items():
      if value != robust:
        raise ValueError(
          f"{key}={value!r} is a plain-DPO option, but dro.epsilon="
          f"{config.dro.epsilon} > 0 trains the robust objective (the sigmoid "
          f"loss under the follower's worst case); set dro.epsilon=0 or "
          f"{key}={robust!r}"
        )
  # Self-annotation needs two different responses per prompt: with fewer samples, or with
  # greedy sampling (every sample identical), no prompt yields a pair and round 1 would fail
  # after round 0 had trained.
  s = config.sampling
  if config.rounds.num_rounds > 0 and s.num_samples < 2:
    raise ValueError(
      f"sampling.num_samples={s.num_samples}: self-annotation rounds "
      f"(rounds.num_rounds={config.rounds.num_rounds}) need at least 2 samples per "
      "prompt to form a chosen/rejected pair"
    )
  if config.rounds.num_rounds > 0 and s.temperature == 0:
    raise ValueError(
      f"sampling.temperature=0 is greedy decoding: all sampling.num_samples="
      f"{s.num_samples} responses to a prompt are identical, so self-annotation "
      "finds no pair; use a temperature > 0 (e.g. 0.7)"
    )
  if config.rounds.train_reference == "sft" and config.train.reference == "in_step":
    raise ValueError(
      "rounds.train_reference=sft needs train.reference=precomputed: with in_step "
      "the reference is the policy a round starts from (the previous policy)"
    )


def load_experiment(
  yaml_path: str | os.PathLike, overrides: Sequence[str] = ()
) -> ExperimentConfig:
  """`load_config` for `ExperimentConfig` (a resolved config: see the module docstring)."""
  return load_config(ExperimentConfig, yaml_path, overrides)
