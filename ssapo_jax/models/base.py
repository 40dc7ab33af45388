"""What the rest of ssapo_jax needs of a causal LM, and the registry of model families.

The pipeline, sampler, scorer, train step and `ssapo-plan` are written against `CausalLM` and
`CausalLMConfig`, never against a concrete family. A family registers its config and module
classes under the Hugging Face ``model_type`` values it reads (`register_family`);
`ssapo_jax.models.load_hf` looks the ``config.json``'s ``model_type`` up in the registry. A new
family is a module in ``models/`` plus one `register_family` call.

Parameters are ``nnx.Param`` variables annotated with logical axis names (``"vocab"``,
``"embed"``, ``"heads"``, ``"kv_heads"``, ``"mlp"``, ``"layers"`` ...); `logical_axes` reads
them and `ssapo_jax.sharding` maps them to mesh axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Protocol, runtime_checkable

import flax.struct
import jax
from flax import nnx

# The NNX metadata key holding logical axis names (flax 0.12 renamed `sharding_names` to
# `out_sharding`); read and written only through `annotated_param` and `logical_axes`.
AXES_KEY = "out_sharding"


def annotated_param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
  """An ``nnx.Param`` holding ``value`` annotated with one logical axis name per dimension."""
  if len(axes) != value.ndim:
    raise ValueError(f"logical axes {axes} do not match parameter shape {value.shape}")
  # eager_sharding=False: the names are logical; ssapo_jax.sharding maps them to mesh axes.
  return nnx.Param(value, eager_sharding=False, **{AXES_KEY: tuple(axes)})


def _axes_of(variable) -> tuple[str | None, ...] | None:
  axes = variable.get_metadata().get(AXES_KEY)
  return None if axes is None else tuple(axes)


def logical_axes(params_state) -> Any:
  """Logical axis names of every parameter.

  Args:
    params_state: ``nnx.state(model, nnx.Param)`` (or a model).

  Returns:
    A pytree with the structure of ``params_state`` whose leaves are tuples of logical axis
    names (one per array dimension) or None for an unannotated variable.
  """
  if isinstance(params_state, nnx.Module):
    params_state = nnx.state(params_state, nnx.Param)
  return jax.tree.map(_axes_of, params_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def split_params(model: nnx.Module) -> tuple[Any, Any, Any]:
  """``(graphdef, params, rest)``: the model's graph, its ``nnx.Param`` state and the rest.

  The one place the parameter split is written; ``nnx.merge(graphdef, params, rest)`` undoes it.
  """
  return nnx.split(model, nnx.Param, ...)


@flax.struct.dataclass
class LayerTransform:
  """A rewrite of some of one decoder layer's parameters, applied inside the layer scan.

  The model scans ``inputs`` (a ``{path: pytree}`` mapping whose leaves carry the leading
  ``L`` axis of the stacked layers) alongside the layers; for layer ``l`` it replaces the
  arrays at ``path`` (dotted, under the layer stack: ``"attn.q_proj"``) by
  ``fn(path, value, inputs[path])`` on that layer's slices, so a weight-sized result exists for
  one layer at a time. `ssapo_jax.lora` builds one that adds low-rank adapters to (possibly
  quantised) frozen weights. Only the cacheless forward (training and scoring) takes one.

  Attributes:
    inputs: ``{path: per-layer inputs}`` (leaves ``[L, ...]``).
    fn: static ``fn(path, layer value, layer inputs) -> new layer value``.
  """

  inputs: Mapping[str, Any]
  fn: Callable[[str, jax.Array, Any], jax.Array] = flax.struct.field(pytree_node=False)

  def apply(self, layer_params, layer_inputs: Mapping[str, Any]):
    """``layer_params`` (one layer's ``nnx.State``) with the paths of ``layer_inputs`` rewritten."""
    out = jax.tree.map(lambda x: x, layer_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, inputs in layer_inputs.items():
      node = out
      *parents, leaf = path.split(".")
      for key in parents:
        node = node[key]
      variable = node[leaf]
      node[leaf] = variable.replace(self.fn(path, variable.get_value(), inputs))
    return out


class KVCache(NamedTuple):
  """Keys and values of every layer, each ``[L, B, K, S, H]`` (layers stacked, compute dtype).

  Slots after the kv heads: a layer's ``[B, K, S, H]`` slice is the operand layout of the
  attention einsums (batch ``B, K``, contraction over ``H`` or ``S``), so a decode step reads
  it as stored instead of transposing a copy of it for every layer and step.
  """

  keys: jax.Array
  values: jax.Array


@runtime_checkable
class CausalLMConfig(Protocol):
  """A family's architecture config: frozen, hashable (static under jit), HF round-trip."""

  model_type: str
  vocab_size: int
  num_layers: int
  dtype: str
  param_dtype: str
  eos_token_ids: tuple[int, ...] | None
  pad_token_id: int | None

  @classmethod
  def from_hf(cls, hf_config, **overrides) -> "CausalLMConfig":
    """From a ``transformers`` config or a ``config.json`` dict; overrides set runtime fields."""

  def to_hf_dict(self) -> dict:
    """The ``config.json`` dict `save_hf` writes."""

  def matmul_params(self) -> int:
    """Parameters that multiply every token (matrices and the LM head)."""

  def forward_flops(self, num_tokens: float, context: float) -> float:
    """Model flops of a forward pass over ``num_tokens`` tokens attending to ``context`` keys."""


@runtime_checkable
class CausalLM(Protocol):
  """A decoder-only LM as the train step, scorer, sampler and plan use it.

  All arrays are ``[batch, seq]`` int32 ids with a ``[batch, seq]`` 0/1 attention mask; rows
  may be left- or right-padded. Log-probs are float32 whatever the compute dtype.
  """

  config: Any  # a CausalLMConfig

  def __call__(
    self, input_ids: jax.Array, attention_mask: jax.Array, positions: jax.Array | None = None
  ) -> jax.Array:
    """Logits ``[B, T, V]`` in the compute dtype."""

  def sequence_logps(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    loss_mask: jax.Array,
    *,
    average: bool = False,
  ) -> jax.Array:
    """``[B]`` float32 summed (or averaged) log-probs of the tokens where ``loss_mask`` is 1."""

  def token_logps(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    log_sum_sq: bool = False,
    layer_transform: LayerTransform | None = None,
  ) -> Any:
    """``[B, T - 1]`` float32 next-token log-probs (and ``log Σ p²`` with ``log_sum_sq``);
    ``layer_transform`` rewrites each layer's parameters inside the layer scan."""

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """A zero `KVCache` with ``max_length`` slots."""

  def prefill(
    self, input_ids: jax.Array, positions: jax.Array, cache: KVCache, *, kv_mask: jax.Array
  ) -> tuple[jax.Array, KVCache]:
    """Writes ``[B, P]`` left-padded prompts into an empty cache; ``(last logits [B, V], cache)``."""

  def decode(
    self,
    input_ids: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    *,
    cache_index: jax.Array | int,
    kv_mask: jax.Array,
  ) -> tuple[jax.Array, KVCache]:
    """Runs ``[B, T]`` new tokens against the cache; ``(logits [B, T, V], cache)``."""


# One HF tensor: (HF name, or its suffix after ``model.layers.{i}.`` for a layer tensor; our
# dotted parameter path, or its suffix after ``layers.`` for row i of the layer stack; the
# layout transform between HF ``torch.nn.Linear`` weights ``[out, in]`` and our kernels:
# "identity" (same array), "in_heads" (HF [X*H, D] -> [D, X, H]), "out_heads" (HF [D, N*H] ->
# [N, H, D]), "transpose" (HF [F, D] -> [D, F]) or "reshape" (HF [X*H] -> [X, H])).
HfTensor = tuple[str, str, str]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  """A registered family: its config class (``from_hf``), its NNX module class and the
  tables that name its parameters in Hugging Face checkpoints (`HfTensor`)."""

  name: str
  config_cls: type
  model_cls: type
  hf_global_tensors: tuple[HfTensor, ...] = ()
  hf_layer_tensors: tuple[HfTensor, ...] = ()


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(model_types: tuple[str, ...], family: ModelFamily) -> None:
  """Makes `load_hf` read checkpoints whose ``config.json`` has one of ``model_types``."""
  for model_type in model_types:
    if model_type in _FAMILIES and _FAMILIES[model_type] != family:
      raise ValueError(
        f"model_type {model_type!r} is already registered to {_FAMILIES[model_type].name}"
      )
    _FAMILIES[model_type] = family


def supported_model_types() -> tuple[str, ...]:
  """Every registered Hugging Face ``model_type``, sorted."""
  return tuple(sorted(_FAMILIES))


def family_for(model_type: str | None) -> ModelFamily:
  """The registered family of a Hugging Face ``model_type``; ValueError when none is."""
  if model_type not in _FAMILIES:
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {supported_model_types()}")
  return _FAMILIES[model_type]


def build_model(config, *, abstract: bool = False, seed: int = 0) -> nnx.Module:
  """The family module for ``config`` (randomly initialised, or shapes only with ``abstract``)."""
  family = family_for(config.model_type)
  make = lambda: family.model_cls(config, rngs=nnx.Rngs(seed))  # noqa: E731
  return nnx.eval_shape(make) if abstract else make()
