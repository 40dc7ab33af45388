"""The sharded DPO / robust-DPO train step, its train state and its optimizer.

Functional boundary (flax's ``01_functional_api.py``): the policy is split once with
``nnx.split`` outside jit; the step sees only pytrees (`TrainState`, `PreferenceBatch`) and
calls ``nnx.merge`` inside the loss.

One step (`train_step`):

1. the global batch ``[B, T]`` is split into ``micro_batches`` strided micro-batches (each
   device keeps its own rows, so no data moves), scanned with ``lax.scan``;
2. per micro-batch: one policy forward on chosen and rejected stacked along the batch
   (`concat_pairs`), summed response log-probs, reference log-probs from the batch
   (precomputed once per round) or from a frozen reference in the same step, then `dpo_loss`
   or `robust_dpo_loss`;
3. the accumulated loss is exactly ``sum_i w_i * loss_i / R`` over the ``R`` real rows of the
   global batch (padding rows of a partial batch, ``valid = 0``, are in neither sum), whatever
   the micro-batching and sharding; length-aware losses get the response lengths from the
   loss masks;
4. global-norm clipping and AdamW with linear warm-up then cosine/linear decay (optax);
5. a non-finite loss or gradient skips the update (parameters, optimizer state and step
   unchanged) and is counted; `check_finite_progress` stops the run when it keeps happening.

`make_train_step` jits it with ``in_shardings``/``out_shardings`` from `ssapo_jax.sharding`
and donates the state. Scoring sequences outside the step (reference log-probs,
self-annotation) is `ssapo_jax.train.scoring`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Callable, Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ssapo_jax import compilation
from ssapo_jax import lora as lora_lib
from ssapo_jax import sharding as shd
from ssapo_jax.batch import PackedPreferenceBatch, PreferenceBatch, concat_pairs, sequence_sums
from ssapo_jax.checkpoint import params_fingerprint
from ssapo_jax.config import check_choices, derived
from ssapo_jax.errors import CheckpointError, NonFiniteError  # NonFiniteError: re-exported
from ssapo_jax.fielddocs import document_fields
from ssapo_jax.lora import LoraConfig
from ssapo_jax.losses import (
  BATCH_COUPLED_LOSS_TYPES,
  LOSS_TYPES,
  FDivergence,
  LossAtoms,
  LossType,
  PairLogps,
  Space,
  check_loss_options,
  dpo_loss,
  pair_logps,
  robust_dpo_loss,
)
from ssapo_jax.models import LayerTransform, logical_axes, split_params
from ssapo_jax.models.llama import RematPolicy

Metrics = dict[str, jax.Array]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
Objective = Literal["dpo", "robust"]
Schedule = Literal["cosine", "linear", "constant"]
ReferenceMode = Literal["precomputed", "in_step"]
ComputeDtype = Literal[tuple(DTYPES)]
OBJECTIVES, SCHEDULES, REFERENCE_MODES = (
  typing.get_args(t) for t in (Objective, Schedule, ReferenceMode)
)


@document_fields
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyperparameters of the policy update (one SSAPO round's leader step)."""

  # dpo: weighted dpo_loss; robust: robust_dpo_loss on the batch's follower atoms. Not a config
  # key: an experiment derives it from dro.epsilon (robust iff ε > 0), its one robustness knob.
  objective: Objective = derived("dpo", "dro.epsilon")
  beta: float = 0.1  # DPO inverse temperature β of the implicit reward
  # dpo_loss variant(s) (keys of losses.LOSS_TYPES), summed with loss_weights; objective=dpo only
  loss_type: LossType | tuple[LossType, ...] = "sigmoid"
  # weight of each loss_type in the sum (TRL's loss_weights); None = 1 each
  loss_weights: tuple[float, ...] | None = None
  label_smoothing: float = 0.0  # dpo_loss label smoothing ε; objective=dpo only
  # f-DPO regulariser (TRL's f_divergence_type); objective=dpo only
  f_divergence_type: FDivergence = "reverse_kl"
  f_alpha_divergence_coef: float = 0.5  # α of f_divergence_type=alpha_divergence
  discopop_tau: float = 0.05  # τ of loss_type=discopop
  # LD-DPO weight in [0, 1] of response tokens past the shared length; None = plain sums; needs reference=in_step
  ld_alpha: float | None = None
  # WPO: weight each pair by its policy's length-normalised aligned probabilities
  use_weighting: bool = False
  # RPO: add rpo_alpha × the chosen response's token-mean NLL (both objectives)
  rpo_alpha: float | None = None
  reference_free: bool = False  # uniform reference (reference log-probs 0), both objectives
  # Robust atoms live on σ(βΔ) (authors' code) or on βΔ. Not a config key: an experiment copies
  # dro.space here, so the leader and the follower cannot disagree.
  robust_space: Space = derived("probability", "dro.space")
  # The follower's margin scale, checked against beta (not a config key: dro.margin_scale).
  robust_margin_scale: float | None = derived(None, "dro.margin_scale")  # None = beta
  # Accept robust_margin_scale != beta (not a config key: dro.allow_scale_mismatch).
  robust_allow_scale_mismatch: bool = derived(False, "dro.allow_scale_mismatch")
  robust_floor: float = 1e-6  # clamp of the shifted probability in robust_dpo_loss
  learning_rate: float = 5e-7  # peak AdamW learning rate
  warmup_ratio: float = 0.1  # fraction of steps with linear warm-up from 0 (paper: 0.1)
  schedule: Schedule = "cosine"  # decay after warm-up, to 0 at the last step
  weight_decay: float = 0.0  # AdamW decoupled weight decay (matrices only, not norm scales)
  adam_b1: float = 0.9  # AdamW β1
  adam_b2: float = 0.999  # AdamW β2
  adam_eps: float = 1e-8  # AdamW ε
  max_grad_norm: float = 1.0  # global-norm gradient clipping; 0 disables
  global_batch_size: int = 32  # pairs per optimizer step, over all hosts and micro-batches
  micro_batches: int = 1  # gradient-accumulation micro-batches per step (lax.scan)
  epochs: int = 1  # passes over the round's pairs
  compute_dtype: ComputeDtype = "bfloat16"  # forward/backward dtype
  param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights and Adam moments
  remat: RematPolicy = "full"  # activation rematerialisation policy
  # ref log-probs from the batch, or a frozen model in the step
  reference: ReferenceMode = "precomputed"
  max_nonfinite_steps: int = 10  # abort after this many consecutive skipped (non-finite) steps
  # LoRA adapters (an experiment copies model.lora here): the state's params are the adapters
  # and the frozen base rides beside them; None = full fine-tuning.
  lora: LoraConfig | None = derived(None, "model.lora")
  # jax.profiler trace of global steps start..stop (inclusive) in output_dir/profile/; None = off
  profile_steps: tuple[int, int] | None = None

  def __post_init__(self):
    check_choices(self, "train")
    positive = {
      "beta": self.beta,
      "robust_floor": self.robust_floor,
      "learning_rate": self.learning_rate,
      "adam_eps": self.adam_eps,
    }
    for name, value in positive.items():
      if not value > 0:
        raise ValueError(f"train.{name} must be > 0, got {value}")
    for name in ("global_batch_size", "micro_batches", "epochs", "max_nonfinite_steps"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"train.{name} must be an int >= 1, got {value!r}")
    if not 0 <= self.warmup_ratio <= 1:
      raise ValueError(f"train.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
    for name in ("adam_b1", "adam_b2"):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
    if self.weight_decay < 0 or self.max_grad_norm < 0 or self.label_smoothing < 0:
      raise ValueError(
        "train.weight_decay, train.max_grad_norm and train.label_smoothing must be "
        f">= 0, got {self.weight_decay}, {self.max_grad_norm}, {self.label_smoothing}"
      )
    if self.profile_steps is not None and not 1 <= self.profile_steps[0] <= self.profile_steps[1]:
      raise ValueError(
        "train.profile_steps must be [start, stop] global steps with "
        f"1 <= start <= stop, got {list(self.profile_steps)}"
      )
    if self.global_batch_size % self.micro_batches:
      raise ValueError(
        f"train.global_batch_size={self.global_batch_size} is not divisible by "
        f"train.micro_batches={self.micro_batches}"
      )
    for loss_type in (self.loss_type,) if isinstance(self.loss_type, str) else self.loss_type:
      if loss_type not in LOSS_TYPES:
        raise ValueError(
          f"train.loss_type must be one of {', '.join(map(repr, LOSS_TYPES))}; got {loss_type!r}"
        )
    try:
      types, _ = check_loss_options(
        self.loss_type,
        beta=self.beta,
        label_smoothing=self.label_smoothing,
        loss_weights=self.loss_weights,
        f_divergence_type=self.f_divergence_type,
        discopop_tau=self.discopop_tau,
        rpo_alpha=self.rpo_alpha,
      )
    except ValueError as e:
      raise ValueError(f"train: {e}") from None
    coupled = sorted(BATCH_COUPLED_LOSS_TYPES & set(types))
    if self.objective == "dpo" and coupled and self.micro_batches > 1:
      raise ValueError(
        f"train.loss_type {coupled} couples the rows of a batch (sorting or a "
        "batch mean), so its micro-batch means are not the batch mean; use "
        f"train.micro_batches=1, got {self.micro_batches}"
      )
    if self.use_weighting and {"aot", "aot_unpaired"} & set(types) and self.objective == "dpo":
      raise ValueError(
        "train.use_weighting does not apply to loss_type aot/aot_unpaired (they "
        "sort rows, so a pair's weight has no pair to attach to)"
      )
    if self.ld_alpha is not None:
      if not 0 <= self.ld_alpha <= 1:
        raise ValueError(f"train.ld_alpha must be in [0, 1], got {self.ld_alpha}")
      if self.reference != "in_step":
        raise ValueError(
          "train.ld_alpha needs train.reference=in_step (precomputed reference "
          "log-probs are plain sums, not LD-weighted)"
        )

  @property
  def micro_batch_size(self) -> int:
    """Pairs per micro-batch (over all hosts)."""
    return self.global_batch_size // self.micro_batches


# ---------------------------------------------------------------------------------------------
# Optimizer.
# ---------------------------------------------------------------------------------------------


# Memoised: equal configs give the same transformation objects, so `TrainState`s built for the
# same round (the run's, the restore target, the plan's) have equal tree structures.
@functools.lru_cache(maxsize=64)
def make_schedule(config: TrainConfig, num_steps: int) -> optax.Schedule:
  """Learning rate per optimizer step: linear warm-up from 0, then decay to 0 at ``num_steps``.

  Matches ``transformers.get_{cosine,linear,constant}_schedule_with_warmup`` with
  ``num_warmup_steps = ceil(warmup_ratio * num_steps)`` (HF's ``TrainingArguments``).
  """
  if num_steps < 1:
    raise ValueError(f"num_train_steps must be >= 1, got {num_steps}")
  warmup = min(math.ceil(config.warmup_ratio * num_steps), num_steps)
  peak = config.learning_rate
  if warmup >= num_steps:  # every step is warm-up (tiny runs): no decay phase is left
    return optax.linear_schedule(0.0, peak, num_steps)
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, num_steps, end_value=0.0)
  decay_steps = max(num_steps - warmup, 1)
  after = (
    optax.linear_schedule(peak, 0.0, decay_steps)
    if config.schedule == "linear"
    else optax.constant_schedule(peak)
  )
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params):
  # Decay matrices only, as transformers' Trainer excludes biases and norm weights.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


@functools.lru_cache(maxsize=64)
def make_optimizer(config: TrainConfig, num_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW on the `make_schedule` learning rate."""
  parts = []
  if config.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(config.max_grad_norm))
  parts.append(
    optax.adamw(
      make_schedule(config, num_steps),
      b1=config.adam_b1,
      b2=config.adam_b2,
      eps=config.adam_eps,
      weight_decay=config.weight_decay,
      mask=_decay_mask,
    )
  )
  return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# Train state.
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything the step reads and writes; exactly what a checkpoint saves.

  Attributes:
    step: ``[]`` int32, optimizer updates applied (skipped steps do not count).
    params: policy parameters (``nnx.State`` of ``nnx.Param``), ``param_dtype``.
    opt_state: optax state, sharded like ``params``.
    nonfinite_consecutive: ``[]`` int32, skipped steps since the last applied one.
    nonfinite_total: ``[]`` int32, skipped steps so far.
    rest: the model's non-parameter state (buffers), passed through unchanged.
    ref_params: frozen reference parameters (``reference="in_step"``) or None.
    graphdef: static NNX graph of the policy (and reference) model.
    tx: static optimizer.
    schedule: static learning-rate schedule of ``tx`` (for metrics).
    base: with LoRA, the frozen base parameters in the compute dtype (``params`` are then the
      adapters, `ssapo_jax.lora`, and only they carry optimizer state); with QLoRA
      (``base_dtype`` int8/nf4) its target matrices hold their codes (`lora.quantize_base`),
      sharded by the same logical axes; else None.
    base_scales: with QLoRA, the codes' scales ``{path: [L, ...]}`` float32; else None.
    lora: static `LoraConfig` with LoRA, else None.
    model_config: static model config (the LoRA targets' layouts), with LoRA.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_consecutive: jax.Array
  nonfinite_total: jax.Array
  rest: Any
  ref_params: Any
  graphdef: Any = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  schedule: optax.Schedule = flax.struct.field(pytree_node=False)
  base: Any = None
  base_scales: Any = None
  lora: LoraConfig | None = flax.struct.field(pytree_node=False, default=None)
  model_config: Any = flax.struct.field(pytree_node=False, default=None)

  def policy_params(self, params: Any | None = None) -> Any:
    """The policy's full parameter tree: ``params`` (default the state's), or with LoRA the
    base with the adapters ``params`` applied."""
    params = self.params if params is None else params
    if self.lora is None:
      return params
    return lora_lib.apply_adapters(
      self.model_config, self.base, params, self.lora, scales=self.base_scales
    )


def param_shardings(params: Any, mesh: Mesh) -> Any:
  """`NamedSharding` of each parameter from the model's logical axes and `LOGICAL_AXIS_RULES`."""
  return shd.logical_shardings(params, logical_axes(params), mesh)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """Shardings for every leaf of ``state``: parameters and their optimizer moments by the
  logical-axis rules, everything else (step counts, scalars, buffers) replicated."""
  repl = shd.replicated(mesh)
  # LoRA adapters are small (rank r): replicated, with their Adam moments.
  p_shard = (
    param_shardings(state.params, mesh)
    if state.lora is None
    else jax.tree.map(lambda _: repl, state.params)
  )
  opt_shard = optax.tree_map_params(
    state.tx,
    lambda _, s: s,
    state.opt_state,
    p_shard,
    transform_non_params=lambda _: repl,
    is_leaf=lambda x: isinstance(x, NamedSharding),
  )
  return state.replace(
    step=repl,
    params=p_shard,
    opt_state=opt_shard,
    nonfinite_consecutive=repl,
    nonfinite_total=repl,
    rest=jax.tree.map(lambda _: repl, state.rest),
    ref_params=None if state.ref_params is None else p_shard,
    base=None if state.base is None else param_shardings(state.base, mesh),
    base_scales=None
    if state.base_scales is None
    else shd.logical_shardings(
      state.base_scales, lora_lib.scale_axes(state.base, state.base_scales), mesh
    ),
  )


def split_model(model: nnx.Module, config: TrainConfig | None = None) -> tuple[Any, Any, Any]:
  """``(graphdef, params, rest)`` of ``model`` (`ssapo_jax.models.split_params`), with the
  graph rebuilt for the train config's runtime choices.

  With ``config``, the model config (``model.config``, a dataclass with
  ``dtype``/``param_dtype``/``remat`` fields as `ssapo_jax.models.LlamaConfig`) gets
  ``dtype=compute_dtype``, ``param_dtype`` and ``remat`` from ``config``, so the forward runs
  in the compute dtype and each decoder layer is rematerialised under the configured policy.
  Parameters are not copied.
  """
  graphdef, params, rest = split_params(model)
  model_config = getattr(model, "config", None)
  if config is None or not dataclasses.is_dataclass(model_config):
    return graphdef, params, rest
  runtime = {
    "dtype": config.compute_dtype,
    "param_dtype": config.param_dtype,
    "remat": config.remat,
  }
  runtime = {k: v for k, v in runtime.items() if hasattr(model_config, k)}
  if all(
    getattr(model_config, k) == jnp.dtype(v).name if k != "remat" else getattr(model_config, k) == v
    for k, v in runtime.items()
  ):
    return graphdef, params, rest
  new_config = dataclasses.replace(model_config, **runtime)
  abstract = nnx.eval_shape(lambda: type(model)(new_config, rngs=nnx.Rngs(0)))
  new_graphdef, new_params, _ = split_params(abstract)
  if jax.tree.structure(new_params) != jax.tree.structure(params):
    raise ValueError(
      f"rebuilding {type(model).__name__} with {runtime} changed its parameter "
      "tree; cannot apply the train config's runtime choices"
    )
  return new_graphdef, params, rest


def init_train_state(
  params: Any,
  rest: Any,
  *,
  graphdef: Any,
  config: TrainConfig,
  num_train_steps: int,
  model_config: Any = None,
  key: jax.Array | None = None,
) -> TrainState:
  """The initial `TrainState` from split parameters (pure and traceable).

  Parameters are cast to ``config.param_dtype`` (fresh buffers: the step donates the state,
  and the model they came from, e.g. the SFT reference, keeps its own); the optimizer state is
  ``tx.init``; with ``reference="in_step"`` a second copy of the parameters is kept, frozen, as
  the reference. `create_train_state` runs this under jit with the state's shardings, and its
  abstract version is ``jax.eval_shape`` of this same function.

  With ``config.lora``, the trained ``params`` are fresh adapters (`lora.init_adapters` from
  ``key``, default ``key(0)``; ``lora_b`` zero, so the policy starts as the base exactly), the
  base is kept frozen in the compute dtype (target matrices quantised with ``base_dtype``
  int8/nf4), and the reference of ``reference="in_step"`` is that base with the adapters off
  (no second copy). ``model_config`` (the model's config) names
  the targets' layouts.
  """
  base = scales = ref_params = None
  if config.lora is not None:
    # QLoRA quantises from the given parameters (before any cast); the rest of the base is kept
    # in the compute dtype.
    base, scales = lora_lib.quantize_base(model_config, params, config.lora)
    base = _cast_floats(base, DTYPES[config.compute_dtype])
    params = lora_lib.init_adapters(
      model_config, params, config.lora, jax.random.key(0) if key is None else key
    )
  else:
    dtype = DTYPES[config.param_dtype]
    params = jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.copy(x), params
    )
    if config.reference == "in_step":
      ref_params = jax.tree.map(jnp.copy, params)
  tx = make_optimizer(config, num_train_steps)
  zero = jnp.zeros((), jnp.int32)
  return TrainState(
    step=zero,
    params=params,
    opt_state=tx.init(params),
    nonfinite_consecutive=zero,
    nonfinite_total=zero,
    rest=rest,
    ref_params=ref_params,
    graphdef=graphdef,
    tx=tx,
    schedule=make_schedule(config, num_train_steps),
    base=base,
    base_scales=scales,
    lora=config.lora,
    model_config=model_config if config.lora is not None else None,
  )


def create_train_state(
  model: nnx.Module,
  config: TrainConfig,
  mesh: Mesh,
  *,
  num_train_steps: int,
  abstract: bool = False,
) -> TrainState:
  """The sharded initial `TrainState` of ``model``: the one builder of the run and the plan.

  `init_train_state` runs inside one jit whose outputs carry the state's shardings
  (`state_shardings`), so no full replica of the parameters or the Adam moments ever exists on
  one device.

  Args:
    model: an NNX causal LM (`ssapo_jax.models.CausalLM`); may be abstract
      (``nnx.eval_shape``) when ``abstract`` is set.
    config: train config.
    mesh: device mesh.
    num_train_steps: optimizer steps of the schedule.
    abstract: return ``jax.ShapeDtypeStruct`` leaves with their shardings instead (the
      ``jax.eval_shape`` of the same function): the target a checkpoint is restored into and
      the state `ssapo-plan` compiles against; nothing is allocated.
  """
  graphdef, params, rest = split_model(model, config)
  init = functools.partial(
    init_train_state,
    graphdef=graphdef,
    config=config,
    num_train_steps=num_train_steps,
    model_config=getattr(model, "config", None),
  )
  shapes = jax.eval_shape(init, params, rest)
  shardings = state_shardings(shapes, mesh)
  if abstract:
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
  # Placed by their own logical axes (with LoRA they become the frozen base, maybe quantised).
  params = shd.shard_params(params, param_shardings(params, mesh))
  rest = shd.shard_params(rest, shardings.rest)
  return jax.jit(init, out_shardings=shardings)(params, rest)


def checkpoint_state(state: TrainState) -> TrainState:
  """What a checkpoint holds of ``state``: all of it, or with LoRA all but the frozen base
  (the adapters, their optimizer state and the step counters). The base is rebuilt from its
  source on resume (`resume_state`) and identified by `base_fingerprint`."""
  return state if state.lora is None else state.replace(base=None, base_scales=None)


def base_fingerprint(state: TrainState) -> str | None:
  """`checkpoint.params_fingerprint` of a LoRA state's frozen base (with QLoRA its codes and
  scales); None without LoRA. Equal bits give equal fingerprints on any mesh."""
  if state.lora is None:
    return None
  return params_fingerprint({"base": state.base, "scales": state.base_scales})


def resume_state(
  fresh: TrainState, restored: Any, *, saved_base: str | None, base_source: str
) -> TrainState:
  """``fresh`` (the round's initial state, built from its base) with the leaves of a restored
  `checkpoint_state`: everything but the base comes from the checkpoint.

  Args:
    fresh: `create_train_state` of the round (its static optimizer and schedule are kept).
    restored: the restored checkpoint state (the structure of ``checkpoint_state(fresh)``).
    saved_base: the `base_fingerprint` recorded with the checkpoint.
    base_source: where ``fresh``'s base came from (for the error message).

  Raises:
    CheckpointError: with LoRA, when ``fresh``'s base is not the one the checkpoint's adapters
      were trained on (the error names both fingerprints).
  """
  now = base_fingerprint(fresh)
  if now != saved_base:
    raise CheckpointError(
      f"the checkpoint's LoRA adapters were trained on a base with fingerprint {saved_base}, "
      f"but the base rebuilt from {base_source} has fingerprint {now}; resume with the same "
      "base model (or start afresh with --no-resume)"
    )
  view = checkpoint_state(fresh)
  state = jax.tree.unflatten(jax.tree.structure(view), jax.tree.leaves(restored))
  return state.replace(base=fresh.base, base_scales=fresh.base_scales)


def merge_params(state: TrainState, *, params: Any | None = None) -> nnx.Module:
  """An NNX model holding ``state``'s trained parameters (for sampling or saving)."""
  return nnx.merge(state.graphdef, state.policy_params(params), state.rest)


# ---------------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------------


def _cast_floats(tree, dtype):
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def _pair_logps(
  graphdef,
  params,
  rest,
  ids,
  mask,
  loss_mask,
  *,
  config: TrainConfig,
  log_sum_sq: bool,
  layer_transform: LayerTransform | None = None,
):
  """`losses.pair_logps` of stacked pairs ``[2b, T]`` under ``params`` (each layer rewritten by
  ``layer_transform`` inside the layer scan: LoRA)."""
  model = nnx.merge(graphdef, _cast_floats(params, DTYPES[config.compute_dtype]), rest)
  out = model.token_logps(ids, mask, log_sum_sq=log_sum_sq, layer_transform=layer_transform)
  token_logps, token_log_sum_sq = out if log_sum_sq else (out, None)
  return pair_logps(
    token_logps.astype(jnp.float32),
    loss_mask[:, 1:],
    ld_alpha=config.ld_alpha,
    token_log_sum_sq=token_log_sum_sq,
  )


def _packed_pair_logps(
  graphdef,
  params,
  rest,
  micro: PackedPreferenceBatch,
  *,
  config: TrainConfig,
  log_sum_sq: bool,
  num_micro: int,
  layer_transform: LayerTransform | None = None,
) -> PairLogps:
  """`losses.pair_logps` of a packed micro-batch: token log-probs summed per segment.

  ``micro.sequence_index`` holds global pair slots; micro-batches are strided (slot ``s`` is
  local slot ``s // num_micro`` of its micro-batch), so the index is mapped to the
  micro-batch's ``2p`` sequences here.
  """
  model = nnx.merge(graphdef, _cast_floats(params, DTYPES[config.compute_dtype]), rest)
  out = model.token_logps(
    micro.ids,
    micro.segment_ids,
    positions=micro.positions,
    log_sum_sq=log_sum_sq,
    layer_transform=layer_transform,
  )
  token_logps, token_log_sum_sq = out if log_sum_sq else (out, None)
  token_logps = token_logps.astype(jnp.float32)
  p = micro.batch_size
  g = p * num_micro
  idx = micro.sequence_index[:, 1:]  # the sequence of each scored (target) token
  local = jnp.where(
    idx < g, idx // num_micro, jnp.where(idx < 2 * g, p + (idx - g) // num_micro, 2 * p)
  )
  mask = micro.loss_mask[:, 1:].astype(jnp.float32)
  plain = sequence_sums(token_logps * mask, local, 2 * p)
  lengths = sequence_sums(mask, local, 2 * p)
  pair_weights = None
  if token_log_sum_sq is not None:  # WPO (losses.wpo_weights) per segment
    aligned = sequence_sums((token_logps - token_log_sum_sq) * mask, local, 2 * p)
    seq = jax.lax.stop_gradient(jnp.exp(aligned / jnp.maximum(lengths, 1.0)))
    pair_weights = seq[:p] * seq[p:]
  return PairLogps(plain[:p], plain[p:], lengths[:p], lengths[p:], -plain[:p], pair_weights)


def _policy_and_ref_logps(
  params,
  ref_params,
  rest,
  micro,
  *,
  graphdef,
  config: TrainConfig,
  mesh: Mesh | None,
  num_micro: int,
  transforms: tuple[LayerTransform | None, LayerTransform | None] = (None, None),
):
  """``(policy PairLogps, ref chosen [b], ref rejected [b])`` of a plain or packed micro-batch;
  ``transforms`` rewrite the policy's and the reference's layers inside the scan (LoRA)."""
  policy_transform, ref_transform = transforms
  if isinstance(micro, PackedPreferenceBatch):
    if mesh is not None:  # rows over the batch axes, as the plain path's 2b sequences
      rows = NamedSharding(mesh, shd.batch_spec(2, micro.num_rows, mesh))
      micro = micro.replace(
        **{
          k: jax.lax.with_sharding_constraint(getattr(micro, k), rows)
          for k in ("ids", "segment_ids", "positions", "loss_mask", "sequence_index")
        }
      )
    logps = functools.partial(
      _packed_pair_logps, graphdef, micro=micro, config=config, num_micro=num_micro
    )
    policy = logps(params, rest, log_sum_sq=config.use_weighting, layer_transform=policy_transform)
    if ref_params is None:
      return policy, micro.ref_chosen_logps, micro.ref_rejected_logps
    ref = jax.lax.stop_gradient(
      logps(ref_params, rest, log_sum_sq=False, layer_transform=ref_transform)
    )
    return policy, ref.chosen_logps, ref.rejected_logps
  ids, mask, loss_mask = concat_pairs(micro)
  if mesh is not None:
    # The forward runs on 2b sequences: shard those over the batch axes. A micro-batch of b
    # pairs that does not divide over data*fsdp (kept whole on every device) still splits as
    # 2b sequences, instead of every device computing all of them.
    seq = NamedSharding(mesh, shd.batch_spec(2, ids.shape[0], mesh))
    ids, mask, loss_mask = (
      jax.lax.with_sharding_constraint(a, seq) for a in (ids, mask, loss_mask)
    )
  policy = _pair_logps(
    graphdef,
    params,
    rest,
    ids,
    mask,
    loss_mask,
    config=config,
    log_sum_sq=config.use_weighting,
    layer_transform=policy_transform,
  )
  if ref_params is None:
    return policy, micro.ref_chosen_logps, micro.ref_rejected_logps
  ref = jax.lax.stop_gradient(
    _pair_logps(
      graphdef,
      ref_params,
      rest,
      ids,
      mask,
      loss_mask,
      config=config,
      log_sum_sq=False,
      layer_transform=ref_transform,
    )
  )
  return policy, ref.chosen_logps, ref.rejected_logps


def _pair_loss(
  params,
  ref_params,
  rest,
  micro: PreferenceBatch | PackedPreferenceBatch,
  *,
  graphdef,
  config: TrainConfig,
  num_real_rows: jax.Array,
  mean_chosen_length: jax.Array,
  mesh: Mesh | None = None,
  num_micro: int = 1,
  transforms: tuple[LayerTransform | None, LayerTransform | None] = (None, None),
) -> tuple[jax.Array, Metrics]:
  """One micro-batch's share of the global loss and its TRL metrics (means over its kept rows).

  The loss is ``Σ_{kept i} w_i loss_i / num_real_rows``, with ``num_real_rows`` and
  ``mean_chosen_length`` taken over the global batch, so micro-batch shares sum to the global
  mean over the real rows exactly. Plain and packed micro-batches give the same loss.
  """
  policy, ref_chosen, ref_rejected = _policy_and_ref_logps(
    params,
    ref_params,
    rest,
    micro,
    graphdef=graphdef,
    config=config,
    mesh=mesh,
    num_micro=num_micro,
    transforms=transforms,
  )
  weights = micro.weights if policy.wpo_weights is None else micro.weights * policy.wpo_weights
  rows = dict(
    weights=weights,
    valid=micro.valid,
    num_real_rows=num_real_rows,
    chosen_lengths=policy.chosen_lengths,
    chosen_nll=policy.chosen_nll,
    mean_chosen_length=mean_chosen_length,
    rpo_alpha=config.rpo_alpha,
    reference_free=config.reference_free,
  )
  if config.objective == "robust":
    # A TrainConfig built on its own has no follower scale: dro.margin_scale's default, beta.
    scale = config.beta if config.robust_margin_scale is None else config.robust_margin_scale
    atoms = LossAtoms(
      micro.atom_weights, micro.atom_shifts, space=config.robust_space, margin_scale=scale
    )
    loss, metrics = robust_dpo_loss(
      policy.chosen_logps,
      policy.rejected_logps,
      ref_chosen,
      ref_rejected,
      atoms,
      beta=config.beta,
      space=config.robust_space,
      floor=config.robust_floor,
      allow_scale_mismatch=config.robust_allow_scale_mismatch,
      **rows,
    )
  else:
    loss, metrics = dpo_loss(
      policy.chosen_logps,
      policy.rejected_logps,
      ref_chosen,
      ref_rejected,
      beta=config.beta,
      loss_type=config.loss_type,
      loss_weights=config.loss_weights,
      label_smoothing=config.label_smoothing,
      rejected_lengths=policy.rejected_lengths,
      f_divergence_type=config.f_divergence_type,
      f_alpha_divergence_coef=config.f_alpha_divergence_coef,
      discopop_tau=config.discopop_tau,
      **rows,
    )
  metrics = {k: v for k, v in metrics.items() if jnp.ndim(v) == 0}
  return loss, metrics


def _split_micro(x: jax.Array, num_micro: int) -> jax.Array:
  """``[B, ...] -> [M, B/M, ...]`` with micro-batch j = rows ``j, j+M, j+2M, ...``.

  Strided, so each device's contiguous block of rows contributes equally to every
  micro-batch and splitting moves no data between devices.
  """
  return x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)


def train_step(
  state: TrainState,
  batch: PreferenceBatch | PackedPreferenceBatch,
  *,
  config: TrainConfig,
  mesh: Mesh | None = None,
) -> tuple[TrainState, Metrics]:
  """One optimizer step on a global batch of ``config.global_batch_size`` pairs (pure).

  Args:
    state: the train state.
    batch: `PreferenceBatch` with ``[B, T]`` token arrays, ``B = global_batch_size``, or a
      `PackedPreferenceBatch` of ``B`` pairs in ``[R, T]`` rows packed for
      ``config.micro_batches`` (the loss, gradient and metrics equal the plain batch's); uses
      ``weights``, the reference log-probs (``reference="precomputed"``) and the follower
      atoms (``objective="robust"``).
    config: train config (static).
    mesh: when given, micro-batches and gradients get sharding constraints for this mesh.

  Returns:
    ``(new_state, metrics)``; metrics are float32 scalars: ``loss`` (exactly
    ``sum_{real i} w_i loss_i / (number of real rows)``: padding rows, ``valid = 0``, count in
    neither), TRL reward/log-prob means over the real rows of nonzero weight, ``grad_norm``
    (before clipping),
    ``learning_rate``, ``nonfinite/skipped`` (1 if this step was skipped),
    ``nonfinite/consecutive`` and ``nonfinite/total``.
  """
  if isinstance(batch, PackedPreferenceBatch) and config.ld_alpha is not None:
    raise ValueError(
      "train.ld_alpha needs data.packing=false (LD-DPO weights tokens by their "
      "rank in the response; packed batches sum whole segments)"
    )
  if batch.batch_size != config.global_batch_size:
    raise ValueError(
      f"batch has {batch.batch_size} pairs; train.global_batch_size is {config.global_batch_size}"
    )
  num_micro = config.micro_batches
  ref_params = state.ref_params if config.reference == "in_step" else None
  compute_dtype = DTYPES[config.compute_dtype]
  ref_transform = None
  if state.lora is not None:
    # The reference is the same base with the adapters off (dequantised per layer with QLoRA).
    ref_params = state.base if config.reference == "in_step" else None
    ref_transform = lora_lib.layer_transform(
      None, state.lora, scales=state.base_scales, dtype=compute_dtype
    )
  if config.reference == "in_step" and ref_params is None:
    raise ValueError(
      "train.reference='in_step' but the state has no ref_params "
      "(build it with create_train_state under the same config)"
    )

  # The mean is over the global batch's real rows: every micro-batch divides its sum by their
  # count (and the sft term by their mean chosen length), so the shares add up exactly.
  valid = batch.valid > 0
  num_real_rows = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  mean_chosen_length = jnp.sum(jnp.where(valid, batch.chosen_lengths, 0)) / num_real_rows
  num_kept = jnp.maximum(jnp.sum(valid & (batch.weights != 0)), 1).astype(jnp.float32)

  def loss_fn(params, micro):
    weights, transforms = params, (None, None)
    if state.lora is not None:
      # ``params`` are the adapters: each layer's adapted weights are formed inside the layer
      # scan from the frozen base, and the gradient reaches the adapters through them.
      weights = state.base
      policy_transform = lora_lib.layer_transform(
        params, state.lora, scales=state.base_scales, dtype=compute_dtype
      )
      transforms = (policy_transform, ref_transform)
    return _pair_loss(
      weights,
      ref_params,
      state.rest,
      micro,
      graphdef=state.graphdef,
      config=config,
      num_real_rows=num_real_rows,
      mean_chosen_length=mean_chosen_length,
      mesh=mesh,
      num_micro=num_micro,
      transforms=transforms,
    )

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  p_shardings = (
    state_shardings(state, mesh).params
    if mesh is not None and state.lora is not None
    else param_shardings(state.params, mesh)
    if mesh is not None
    else None
  )

  def constrain(tree, shardings):
    if shardings is None:
      return tree
    return jax.lax.with_sharding_constraint(tree, shardings)

  if num_micro == 1:
    (loss, metrics), grads = grad_fn(state.params, batch)
    grads = constrain(grads, p_shardings)
  else:
    micro = jax.tree.map(lambda x: _split_micro(x, num_micro), batch)
    if mesh is not None:
      micro = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(
          x, NamedSharding(mesh, PartitionSpec(None, *shd.batch_spec(x.ndim - 1, x.shape[1], mesh)))
        ),
        micro,
      )

    def body(carry, mb):
      grad_acc, loss_acc, metric_acc = carry
      (loss, metrics), grads = grad_fn(state.params, mb)
      grad_acc = constrain(jax.tree.map(jnp.add, grad_acc, grads), p_shardings)
      # Metrics are means over each micro-batch's kept rows: weigh them by their share.
      share = jnp.sum((mb.valid > 0) & (mb.weights != 0)) / num_kept
      metric_acc = jax.tree.map(lambda a, m: a + m * share, metric_acc, metrics)
      return (grad_acc, loss_acc + loss, metric_acc), None

    zeros = constrain(
      jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params), p_shardings
    )
    metric_shapes = jax.eval_shape(
      lambda p, mb: loss_fn(p, mb)[1], state.params, jax.tree.map(lambda x: x[0], micro)
    )
    metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    (grads, loss, metrics), _ = jax.lax.scan(
      body, (zeros, jnp.zeros((), jnp.float32), metric_zeros), micro
    )
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

  grad_norm = optax.tree.norm(grads)
  # The global norm is finite iff every gradient entry is (an overflowing norm also skips).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)

  def keep(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  skipped = (~finite).astype(jnp.int32)
  consecutive = jnp.where(finite, 0, state.nonfinite_consecutive + 1).astype(jnp.int32)
  new_state = state.replace(
    step=state.step + (1 - skipped),
    params=keep(new_params, state.params),
    opt_state=keep(new_opt_state, state.opt_state),
    nonfinite_consecutive=consecutive,
    nonfinite_total=state.nonfinite_total + skipped,
  )
  metrics = dict(metrics)
  metrics.update(
    {
      "loss": loss.astype(jnp.float32),
      "grad_norm": grad_norm.astype(jnp.float32),
      "learning_rate": jnp.asarray(state.schedule(state.step), jnp.float32),
      "nonfinite/skipped": skipped.astype(jnp.float32),
      "nonfinite/consecutive": consecutive.astype(jnp.float32),
      "nonfinite/total": new_state.nonfinite_total.astype(jnp.float32),
    }
  )
  return new_state, metrics


def check_finite_progress(metrics: Metrics, config: TrainConfig) -> None:
  """Host-side guard: raises `NonFiniteError` after ``max_nonfinite_steps`` consecutive skips.

  Reads one scalar from ``metrics`` (a device-to-host transfer); call it every step or every
  few steps.
  """
  consecutive = int(metrics["nonfinite/consecutive"])
  if consecutive >= config.max_nonfinite_steps:
    raise NonFiniteError(
      f"{consecutive} consecutive train steps had a non-finite loss or gradient "
      f"(train.max_nonfinite_steps={config.max_nonfinite_steps}; "
      f"{int(metrics['nonfinite/total'])} skipped in total). Likely causes, most likely "
      "first: (1) corrupted inputs: non-finite values in the model files, a restored "
      "checkpoint or the round's train_set (reference log-probs, atom weights); (2) "
      "train.learning_rate too high; (3) train.compute_dtype=bfloat16 overflowing "
      "(try float32)"
    )


def batch_shardings(mesh: Mesh, config: TrainConfig) -> PreferenceBatch:
  """`NamedSharding` of each `PreferenceBatch` field: rows over ``("data", "fsdp")``.

  The global batch must divide over ``data * fsdp``. Micro-batches should too (then
  splitting them moves no data); otherwise each is sharded over the axes that divide it.
  """
  shd.check_batch_divisible(config.global_batch_size, mesh, what="train.global_batch_size")
  b = config.global_batch_size
  tok = NamedSharding(mesh, shd.batch_spec(2, b, mesh))
  vec = NamedSharding(mesh, shd.batch_spec(1, b, mesh))
  return PreferenceBatch(
    chosen_ids=tok,
    chosen_mask=tok,
    chosen_loss_mask=tok,
    rejected_ids=tok,
    rejected_mask=tok,
    rejected_loss_mask=tok,
    weights=vec,
    valid=vec,
    ref_chosen_logps=vec,
    ref_rejected_logps=vec,
    atom_weights=tok,
    atom_shifts=tok,
  )


def packed_row_multiple(mesh: Mesh, config: TrainConfig) -> int:
  """Packed rows per micro-batch are a multiple of this, so that the ``M * r`` rows of a packed
  batch split over ``data * fsdp`` like its pairs (the loader's ``row_multiple``)."""
  shards = shd.num_batch_shards(mesh)
  return shards // math.gcd(shards, config.micro_batches)


def packed_batch_shardings(mesh: Mesh, config: TrainConfig) -> PackedPreferenceBatch:
  """`NamedSharding` of each `PackedPreferenceBatch` field: rows and pairs over the batch axes
  (rows are a multiple of `packed_row_multiple` per micro-batch, so they divide alike)."""
  plain = batch_shardings(mesh, config)
  tok = plain.chosen_ids
  return PackedPreferenceBatch(
    ids=tok,
    segment_ids=tok,
    positions=tok,
    loss_mask=tok,
    sequence_index=tok,
    chosen_lengths=plain.weights,
    rejected_lengths=plain.weights,
    weights=plain.weights,
    valid=plain.valid,
    ref_chosen_logps=plain.ref_chosen_logps,
    ref_rejected_logps=plain.ref_rejected_logps,
    atom_weights=plain.atom_weights,
    atom_shifts=plain.atom_shifts,
  )


def make_train_step(
  config: TrainConfig,
  mesh: Mesh,
  state: TrainState,
  *,
  packed: bool = False,
) -> Callable[[TrainState, PreferenceBatch], tuple[TrainState, Metrics]]:
  """`train_step` jitted for ``mesh``: sharded in/out, the state donated.

  Args:
    config: train config (``micro_batch_size`` must divide over ``data * fsdp``).
    mesh: device mesh.
    state: the state from `create_train_state` (or an abstract copy); only its structure,
      static fields and parameter axes are read.
    packed: the step takes `PackedPreferenceBatch`es (``data.packing``); it compiles once per
      row count (`ssapo_jax.batch.row_buckets`).

  Returns:
    ``step(state, batch) -> (state, metrics)``; ``batch`` is a global `PreferenceBatch`
    (see `ssapo_jax.sharding.global_batch`). The input state is donated: do not reuse it.
  """
  s_shard = state_shardings(state, mesh)
  b_shard = (packed_batch_shardings if packed else batch_shardings)(mesh, config)
  repl = shd.replicated(mesh)

  def step(state, batch):
    # Runs once per traced shape: the run's count of train-step programs (compilation.stats).
    compilation.record_program("train_step", (batch.ids if packed else batch.chosen_ids).shape)
    # The mesh as trace context: shard_map'd kernels (splash attention) read it.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return train_step(state, batch, config=config, mesh=mesh)

  return jax.jit(
    step, in_shardings=(s_shard, b_shard), out_shardings=(s_shard, repl), donate_argnums=0
  )
