"""LoRA and QLoRA adapters over the parameter tree of a causal LM, in PEFT's layout.

An adapter of a target matrix ``W`` (our layout, stacked over the ``L`` layers) is a pair
``lora_a [L, r, in]`` and ``lora_b [L, out, r]`` in the layout of PEFT's ``lora_A``/``lora_B``
(HF ``nn.Linear`` weights are ``[out, in]``). The adapted weight is

    W' = W + (alpha / r) * to_ours(lora_b @ lora_a)

with ``to_ours`` the inverse of the family's HF layout transform (`models.params.to_hf`), so the
adapters export to PEFT as they are and a merged model is `save_hf` of ``W'``.

Everything here is a pure function of pytrees: `init_adapters` (``lora_b`` zero, so the adapted
model starts as the base exactly), `layer_transform` (the adapted model inside the layer scan:
the train step's forward), `apply_adapters` (the adapted parameter tree over the whole stack:
export, sampling, merging; adapters ``None`` = the base, the reference with adapters off),
`quantize_base` / `dequantize` (QLoRA's frozen base: int8 per output feature, or nf4 in blocks
of 64 packed two codes per byte), `save_peft` (``adapter_config.json`` +
``adapter_model.safetensors``) and `save_merged` (a Hugging Face model).

Why not qwix: qwix (0.1.8) attaches LoRA by intercepting ``dot_general``/``einsum`` of
parameters read inside the module's call. Our Llama reads its layer parameters after an
``nnx.split`` and runs them in one ``lax.scan`` (stacked layers), which qwix's interception does
not follow (``apply_lora_to_model`` fails inside the scan). The model's scan takes a
`ssapo_jax.models.LayerTransform` instead: the body forms one layer's adapted (and dequantised)
weights from that layer's slices of the base and the adapters, under its own
``jax.checkpoint``, so the step holds one layer's adapted matrices at a time (and their
gradient in the backward pass), never an ``[L, ...]`` adapted stack; the gradient reaches the
adapters by the chain rule.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssapo_jax.config import check_choices
from ssapo_jax.fielddocs import document_fields
from ssapo_jax.models.base import AXES_KEY, LayerTransform
from ssapo_jax.models.params import IN_HEADS, OUT_HEADS, TRANSPOSE, tensor_mapping

BaseDtype = Literal["compute", "int8", "nf4"]
_MATRIX_KINDS = (IN_HEADS, OUT_HEADS, TRANSPOSE)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LAYERS = "layers."  # the path prefix of the stacked decoder layers
NF4_BLOCK = 64  # values per nf4 absmax block (QLoRA's)

# The 16 levels of NF4 (QLoRA, Dettmers et al. 2023, appendix E; bitsandbytes' table).
NF4_LEVELS = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  np.float32,
)


@document_fields
@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters of the policy (``model.lora``); absent = full fine-tuning."""

  rank: int = 16  # r: rank of each adapter
  alpha: float = 32.0  # the update is scaled by alpha / rank (PEFT's lora_alpha)
  # Regex (full match) over our parameter paths of the adapted matrices, e.g.
  # 'layers\.attn\.(q|k|v|o)_proj' or 'layers\.(attn|mlp)\..*_proj' (all seven).
  targets: str = r"layers\.(attn|mlp)\..*_proj"
  # The frozen base: compute (stored in the compute dtype), int8 (absmax per output feature) or
  # nf4 (QLoRA's 4-bit NormalFloat, absmax blocks of 64, two codes per byte).
  base_dtype: BaseDtype = "compute"

  def __post_init__(self):
    check_choices(self, "model.lora")
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"model.lora.rank must be an int >= 1, got {self.rank!r}")
    if not self.alpha > 0:
      raise ValueError(f"model.lora.alpha must be > 0, got {self.alpha}")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f"model.lora.targets is not a regex ({e}): {self.targets!r}") from None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _pure(params) -> dict[str, Any]:
  """Dotted path -> array of an ``nnx.State`` (or nested dict) of parameters."""
  tree = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      path = f"{prefix}{key}"
      if isinstance(value, Mapping):
        walk(value, path + ".")
      else:
        flat[path] = value

  walk(tree, "")
  return flat


def _set(params: nnx.State, updates: Mapping[str, jax.Array]) -> nnx.State:
  """``params`` with the arrays at the dotted paths of ``updates`` replaced."""
  tree = nnx.to_pure_dict(params)
  for path, value in updates.items():
    node = tree
    *parents, leaf = path.split(".")
    for key in parents:
      node = node[key]
    node[leaf] = value
  out = jax.tree.map(lambda x: x, params)  # a copy: nnx.State is mutable
  nnx.replace_by_pure_dict(out, tree)
  return out


def target_kinds(model_config, params, lora: LoraConfig) -> dict[str, tuple[str, str]]:
  """Our path -> (HF module name without the layer prefix, layout transform) of every target.

  Raises:
    ValueError: a match that is not a layer matrix, or no match at all (naming
      ``model.lora.targets``).
  """
  paths = list(_pure(params))
  mapping = tensor_mapping(model_config, paths)
  layer_kinds = {
    ours: (hf.split(".", 3)[3].removesuffix(".weight"), kind)
    for hf, (ours, layer, kind) in mapping.items()
    if layer == 0
  }
  matched = [p for p in paths if re.fullmatch(lora.targets, p)]
  bad = [p for p in matched if p not in layer_kinds or layer_kinds[p][1] not in _MATRIX_KINDS]
  if bad:
    raise ValueError(
      f"model.lora.targets={lora.targets!r} matches {bad}, which are not layer weight matrices"
    )
  if not matched:
    adaptable = sorted(p for p, (_, k) in layer_kinds.items() if k in _MATRIX_KINDS)
    raise ValueError(
      f"model.lora.targets={lora.targets!r} matches no parameter; the layer "
      f"matrices are {adaptable}"
    )
  return {p: layer_kinds[p] for p in matched}


def _hf_in_out(shape: tuple[int, ...], kind: str) -> tuple[int, int]:
  """(in, out) features of one layer's matrix of our ``shape`` (no leading L)."""
  if kind == IN_HEADS:  # [D, X, H]
    return shape[0], shape[1] * shape[2]
  if kind == OUT_HEADS:  # [N, H, D]
    return shape[0] * shape[1], shape[2]
  return shape[0], shape[1]  # TRANSPOSE: [in, out]


def _to_ours(delta_hf: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``[..., out, in]`` (HF layout) -> our layout ``[..., *shape]`` (leading axes kept)."""
  ours = jnp.swapaxes(delta_hf, -1, -2)  # [..., in, out]
  return ours.reshape((*delta_hf.shape[:-2], *shape))


def init_adapters(model_config, params, lora: LoraConfig, key: jax.Array) -> dict[str, dict]:
  """Adapters of every target: ``{path: {"lora_a": [L, r, in], "lora_b": [L, out, r]}}``,
  float32.

  ``lora_a`` is PEFT's default (Kaiming-uniform with a = √5: uniform in ±1/√in) and ``lora_b``
  zero, so the adapted weights equal the base weights exactly until the first update.
  """
  flat = _pure(params)
  adapters = {}
  for i, (path, (_, kind)) in enumerate(sorted(target_kinds(model_config, params, lora).items())):
    num_layers, *shape = _dense_shape(flat[path])
    fan_in, fan_out = _hf_in_out(tuple(shape), kind)
    bound = 1.0 / np.sqrt(fan_in)
    a = jax.random.uniform(
      jax.random.fold_in(key, i), (num_layers, lora.rank, fan_in), jnp.float32, -bound, bound
    )
    adapters[path] = {
      "lora_a": a,
      "lora_b": jnp.zeros((num_layers, fan_out, lora.rank), jnp.float32),
    }
  return adapters


def _adapted(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``w + scale * to_ours(b @ a)`` in ``w``'s dtype (the sum in float32); ``a [..., r, in]``,
  ``b [..., out, r]`` with ``w``'s leading axes (none inside the layer scan, ``L`` outside)."""
  delta = jnp.einsum("...or,...ri->...oi", b.astype(jnp.float32), a.astype(jnp.float32))
  delta = _to_ours(scale * delta, w.shape[a.ndim - 2 :])
  return (w.astype(jnp.float32) + delta).astype(w.dtype)


# ----------------------------------------------------------------------------- the frozen base


def _input_axes(kind: str) -> tuple[int, ...]:
  """Axes of one layer's matrix (no leading L) that a matmul contracts: int8's absmax runs over
  them, so each output feature gets its own scale."""
  return (0, 1) if kind == OUT_HEADS else (0,)


def _nf4_block(last: int) -> int:
  """NF4 block: 64 consecutive values of the last axis, or the whole axis when 64 does not
  divide it (small test models)."""
  return NF4_BLOCK if last % NF4_BLOCK == 0 else last


def _dense_shape(w: jax.Array) -> tuple[int, ...]:
  """The dense shape of a (possibly nf4-packed) target: nf4 codes halve the last axis."""
  return (*w.shape[:-1], 2 * w.shape[-1]) if w.dtype == jnp.uint8 else tuple(w.shape)


def _quantize_layer(w: jax.Array, kind: str, base_dtype: str) -> tuple[jax.Array, jax.Array]:
  """One layer's matrix (our layout, no L) -> ``(codes, scale)`` (see `dequantize`); jnp."""
  w = w.astype(jnp.float32)
  if base_dtype == "int8":  # symmetric absmax per output feature
    absmax = jnp.max(jnp.abs(w), axis=_input_axes(kind), keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    return jnp.clip(jnp.rint(w / scale), -127, 127).astype(jnp.int8), scale
  if base_dtype == "nf4":  # blocks along the last axis, absmax-scaled to [-1, 1]
    last = w.shape[-1]
    if last % 2:
      raise ValueError(f"nf4 packs two codes per byte along the last axis; got {w.shape}")
    block = _nf4_block(last)
    blocks = w.reshape(*w.shape[:-1], last // block, block)
    absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    absmax = jnp.where(absmax > 0, absmax, 1.0)
    # The nearest level: the number of midpoints between consecutive levels below the value.
    mids = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.searchsorted(mids, (blocks / absmax).reshape(w.shape)).astype(jnp.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # two codes per byte, low nibble first
    return packed, absmax[..., 0]
  raise ValueError(f"model.lora.base_dtype={base_dtype!r} is not a quantised dtype")


def dequantize(codes: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """A quantised matrix back to its dense values in ``dtype``; any leading axes (a layer's
  matrix inside the scan, or the ``[L, ...]`` stack).

  int8 codes (same shape as the matrix) times a per-output-feature scale; nf4 codes (uint8,
  two 4-bit codes per byte along the last axis) index `NF4_LEVELS`, times the absmax of their
  block.
  """
  if codes.dtype == jnp.int8:
    return (codes.astype(jnp.float32) * scale).astype(dtype)
  idx = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(_dense_shape(codes))
  values = jnp.asarray(NF4_LEVELS)[idx.astype(jnp.int32)]
  last = values.shape[-1]
  values = values.reshape(*values.shape[:-1], scale.shape[-1], last // scale.shape[-1])
  return (values * scale[..., None]).reshape(idx.shape).astype(dtype)


def quantize_base(model_config, params, lora: LoraConfig) -> tuple[nnx.State, dict[str, Any]]:
  """QLoRA's frozen base: ``(params, scales)``, the target matrices of ``params`` replaced by
  their codes (int8 of the matrix's shape, or nf4 uint8 with the last axis halved: the
  same logical axes, so the same sharding rules apply) and ``scales`` ``{path: [L, ...]}``
  float32. Traceable; quantises one layer at a time (``lax.map``), so the temporaries are one
  layer's. ``base_dtype: compute`` returns ``(params, None)``."""
  if lora.base_dtype == "compute":
    return params, None
  flat = _pure(params)
  codes, scales = {}, {}
  for path, (_, kind) in target_kinds(model_config, params, lora).items():
    quantize = functools.partial(_quantize_layer, kind=kind, base_dtype=lora.base_dtype)
    codes[path], scales[path] = jax.lax.map(quantize, flat[path])
  return _set(params, codes), scales


def scale_axes(params: nnx.State, scales: Mapping[str, Any]) -> dict[str, tuple]:
  """Logical axes of each quantisation scale: its matrix's (same rank, smaller dimensions,
  which `ssapo_jax.sharding` replicates when a mesh axis does not divide them)."""
  axes = {
    ".".join(map(str, path)): tuple(variable.get_metadata()[AXES_KEY])
    for path, variable in nnx.to_flat_state(params)
  }
  return {path: axes[path] for path in scales}


@dataclasses.dataclass(frozen=True)
class _AdaptLayer:
  """`LayerTransform.fn` of `layer_transform` (hashable: static under jit)."""

  scale: float
  dtype: str

  def __call__(self, path: str, value: jax.Array, inputs: Mapping[str, jax.Array]) -> jax.Array:
    w = value
    if "scale" in inputs:  # QLoRA: the layer's codes
      w = dequantize(w, inputs["scale"], self.dtype)
    if "lora_a" in inputs:
      w = _adapted(w, inputs["lora_a"], inputs["lora_b"], self.scale)
    return w


def layer_transform(
  adapters, lora: LoraConfig, *, scales: Mapping[str, jax.Array] | None = None, dtype
) -> LayerTransform | None:
  """The `LayerTransform` that runs the adapted model inside the layer scan: for each target,
  one layer's ``W + scale * to_ours(lora_b @ lora_a)`` (``W`` dequantised to ``dtype`` from
  its codes when ``scales`` are given), so no ``[L, ...]`` adapted stack is ever formed.

  ``adapters=None`` is the base with the adapters off; None when there is nothing to do (no
  adapters, no quantised base).
  """
  inputs: dict[str, dict] = {}
  for path in set(adapters or ()) | set(scales or ()):
    entry = dict(adapters[path]) if adapters else {}
    if scales:
      entry["scale"] = scales[path]
    inputs[path.removeprefix(LAYERS)] = entry
  if not inputs:
    return None
  return LayerTransform(inputs, _AdaptLayer(lora.scale, jnp.dtype(dtype).name))


def apply_adapters(
  model_config,
  params,
  adapters,
  lora: LoraConfig,
  *,
  scales: Mapping[str, jax.Array] | None = None,
  dtype=None,
) -> nnx.State:
  """The adapted parameter tree: each target ``W + scale * to_ours(lora_b @ lora_a)`` over the
  whole ``[L, ...]`` stack (export, sampling, merging between rounds; the step uses
  `layer_transform`).

  ``adapters=None`` gives the base (the reference with adapters off). With ``scales``
  (`quantize_base`), the targets of ``params`` are codes, dequantised to ``dtype`` (default:
  the dtype of the other floating parameters); the sum is formed in float32 and cast to the
  base weight's dtype. Differentiable in ``adapters``.
  """
  flat = _pure(params)
  if scales and dtype is None:
    dtype = next(x.dtype for p, x in flat.items() if p not in scales and _is_float(x))
  updates = {}
  for path in target_kinds(model_config, params, lora):
    w = flat[path]
    if scales:
      w = dequantize(w, scales[path], dtype)
    if adapters is not None:
      w = _adapted(w, adapters[path]["lora_a"], adapters[path]["lora_b"], lora.scale)
    updates[path] = w
  return _set(params, updates)


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


# ----------------------------------------------------------------------------- export


def _host(x) -> np.ndarray:
  """A replicated (or local) array on the host, float32; also on one process of several."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(jax.device_get(x), np.float32)


def save_peft(
  model_config, params, adapters, lora: LoraConfig, path: str | os.PathLike, *, base_model: str = ""
) -> None:
  """Writes the adapters in PEFT's format: ``adapter_config.json`` and
  ``adapter_model.safetensors`` (``base_model.model.model.layers.{i}.<module>.lora_A.weight``
  ``[r, in]`` and ``lora_B.weight`` ``[out, r]``, float32), which
  ``peft.PeftModel.from_pretrained(base, path)`` loads."""
  from safetensors.numpy import save_file

  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  kinds = target_kinds(model_config, params, lora)
  tensors = {}
  for our_path, (module, _) in kinds.items():
    a = _host(adapters[our_path]["lora_a"])
    b = _host(adapters[our_path]["lora_b"])
    for i in range(a.shape[0]):
      prefix = f"base_model.model.model.layers.{i}.{module}"
      tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i])
      tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i])
  save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS))
  modules = sorted({module.rsplit(".", 1)[-1] for module, _ in kinds.values()})
  config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model,
    "r": lora.rank,
    "lora_alpha": lora.alpha,
    "lora_dropout": 0.0,
    "bias": "none",
    "target_modules": modules,
    "fan_in_fan_out": False,
    "init_lora_weights": True,
    "inference_mode": True,
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
  }
  with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)


def save_merged(
  model: nnx.Module,
  adapters,
  lora: LoraConfig,
  path: str | os.PathLike,
  *,
  scales=None,
  tokenizer=None,
  dtype=None,
) -> None:
  """Writes the merged model (base + adapters) in Hugging Face format (`models.save_hf`);
  with ``scales``, ``model``'s targets hold `quantize_base` codes."""
  from ssapo_jax.models import save_hf, split_params

  graphdef, params, rest = split_params(model)
  merged = apply_adapters(model.config, params, adapters, lora, scales=scales)
  save_hf(nnx.merge(graphdef, merged, rest), path, tokenizer=tokenizer, dtype=dtype)
