"""LoRA and QLoRA adapters over the parameter tree of a causal LM, in PEFT's layout.

An adapter of a target matrix ``W`` (our layout, stacked over the ``L`` layers) is a pair
``lora_a [L, r, in]`` and ``lora_b [L, out, r]`` in the layout of PEFT's ``lora_A``/``lora_B``
(HF ``nn.Linear`` weights are ``[out, in]``). The adapted weight is

    W' = W + (alpha / r) * to_ours(lora_b @ lora_a)

with ``to_ours`` the inverse of the family's HF layout transform (`models.params.to_hf`), so the
adapters export to PEFT as they are and a merged model is `save_hf` of ``W'``.

Everything here is a pure function of pytrees: `init_adapters` (``lora_b`` zero, so the adapted
model starts as the base exactly), `apply_adapters` (the adapted parameter tree; adapters
``None`` = the base: the reference with adapters off), `quantize_base` / `dequantize`
(QLoRA's frozen base: int8 or nf4 blocks), `save_peft` (``adapter_config.json`` +
``adapter_model.safetensors``) and `save_merged` (a Hugging Face model).

Why not qwix: qwix (0.1.8) attaches LoRA by intercepting ``dot_general``/``einsum`` of
parameters read inside the module's call. Our Llama reads its layer parameters after an
``nnx.split`` and runs them in one ``lax.scan`` (stacked layers), which qwix's interception does
not follow (``apply_lora_to_model`` fails inside the scan). The adapted weight is therefore
formed here, on the parameter tree, before the model runs; its gradient flows to the adapters by
the chain rule. The price: the step holds one compute-dtype copy of the adapted target matrices
and their gradient (qwix's ``x @ A @ B`` would not), but no optimizer state for them.
"""

from __future__ import annotations

import dataclasses
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
from ssapo_jax.models.params import IN_HEADS, OUT_HEADS, TRANSPOSE, tensor_mapping

BaseDtype = Literal["compute", "int8", "nf4"]
_MATRIX_KINDS = (IN_HEADS, OUT_HEADS, TRANSPOSE)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

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
  # The frozen base: compute (stored in the compute dtype), int8 (per-column absmax) or nf4
  # (64-value blocks, QLoRA's 4-bit NormalFloat).
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


def _to_ours(delta_hf: jax.Array, shape: tuple[int, ...], kind: str) -> jax.Array:
  """``[L, out, in]`` (HF layout) -> our stacked layout ``[L, *shape]``."""
  ours = jnp.swapaxes(delta_hf, -1, -2)  # [L, in, out]
  return ours.reshape((delta_hf.shape[0], *shape))


def init_adapters(model_config, params, lora: LoraConfig, key: jax.Array) -> dict[str, dict]:
  """Adapters of every target: ``{path: {"lora_a": [L, r, in], "lora_b": [L, out, r]}}``,
  float32.

  ``lora_a`` is PEFT's default (Kaiming-uniform with a = √5: uniform in ±1/√in) and ``lora_b``
  zero, so the adapted weights equal the base weights exactly until the first update.
  """
  flat = _pure(params)
  adapters = {}
  for i, (path, (_, kind)) in enumerate(sorted(target_kinds(model_config, params, lora).items())):
    num_layers, *shape = flat[path].shape
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


def adapter_delta(
  adapters: Mapping[str, Mapping[str, jax.Array]], path: str, shape, kind: str, scale: float
) -> jax.Array:
  """``scale * lora_b @ lora_a`` of one target in our stacked layout ``[L, *shape]`` (float32)."""
  a, b = adapters[path]["lora_a"], adapters[path]["lora_b"]
  delta = jnp.einsum("lor,lri->loi", b.astype(jnp.float32), a.astype(jnp.float32))
  return _to_ours(scale * delta, tuple(shape), kind)


# ----------------------------------------------------------------------------- the frozen base


def _quantize(w: np.ndarray, base_dtype: str) -> dict[str, np.ndarray]:
  """One stacked matrix ``[L, *shape]`` -> its quantised form (see `dequantize`)."""
  w = np.asarray(w, np.float32)
  if base_dtype == "int8":  # symmetric absmax per output column (the last axis)
    absmax = np.max(np.abs(w), axis=tuple(range(1, w.ndim - 1)), keepdims=True)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    return {"q": np.clip(np.rint(w / scale), -127, 127).astype(np.int8), "scale": scale}
  if base_dtype == "nf4":  # blocks of 64 consecutive values, absmax-scaled to [-1, 1]
    flat = w.reshape(-1)
    pad = (-flat.size) % 64
    blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, 64)
    absmax = np.max(np.abs(blocks), axis=1, keepdims=True)
    absmax = np.where(absmax > 0, absmax, 1.0).astype(np.float32)
    codes = np.argmin(np.abs(blocks[..., None] / absmax[..., None] - NF4_LEVELS), axis=-1)
    return {"q": codes.astype(np.uint8), "scale": absmax}
  raise ValueError(f"model.lora.base_dtype={base_dtype!r} is not a quantised dtype")


def dequantize(q: Mapping[str, jax.Array], shape: tuple[int, ...], dtype) -> jax.Array:
  """A quantised stacked matrix back to ``shape`` in ``dtype`` (inside the step: jnp)."""
  if q["q"].dtype == jnp.int8:
    return (q["q"].astype(jnp.float32) * q["scale"]).astype(dtype)
  values = jnp.asarray(NF4_LEVELS)[q["q"].astype(jnp.int32)] * q["scale"]
  return values.reshape(-1)[: int(np.prod(shape))].reshape(shape).astype(dtype)


def quantize_base(model_config, params, lora: LoraConfig) -> dict[str, dict]:
  """QLoRA's frozen base: ``{path: {"q", "scale"}}`` of every target matrix (the rest of the
  parameters stay as they are). Empty for ``base_dtype: compute``."""
  if lora.base_dtype == "compute":
    return {}
  flat = _pure(params)
  return {
    path: _quantize(np.asarray(jax.device_get(flat[path])), lora.base_dtype)
    for path in target_kinds(model_config, params, lora)
  }


def apply_adapters(
  model_config,
  params,
  adapters,
  lora: LoraConfig,
  *,
  quantized: Mapping[str, Mapping] | None = None,
) -> nnx.State:
  """The adapted parameter tree: each target ``W + scale * to_ours(lora_b @ lora_a)``.

  ``adapters=None`` gives the base (the reference with adapters off). With ``quantized``
  (`quantize_base`), the targets' base weights are its dequantised values; the sum is formed in
  float32 and cast to the base parameter's dtype. Differentiable in ``adapters``.
  """
  flat = _pure(params)
  kinds = target_kinds(model_config, params, lora)
  updates = {}
  for path, (_, kind) in kinds.items():
    w = flat[path]
    if quantized:
      w = dequantize(quantized[path], tuple(w.shape), w.dtype)
    if adapters is not None:
      delta = adapter_delta(adapters, path, w.shape[1:], kind, lora.scale)
      w = (w.astype(jnp.float32) + delta).astype(w.dtype)
    updates[path] = w
  return _set(params, updates)


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
  quantized=None,
  tokenizer=None,
  dtype=None,
) -> None:
  """Writes the merged model (base + adapters) in Hugging Face format (`models.save_hf`)."""
  from ssapo_jax.models import save_hf, split_params

  graphdef, params, rest = split_params(model)
  merged = apply_adapters(model.config, params, adapters, lora, quantized=quantized)
  save_hf(nnx.merge(graphdef, merged, rest), path, tokenizer=tokenizer, dtype=dtype)
