"""Hugging Face safetensors import/export for `Llama` (Llama, Mistral, Qwen2 checkpoints).

The mapping is one table (`_LAYER_TABLE` plus three global rows): HF tensor name → NNX
parameter path and a layout transform. Import is strict in both directions: a checkpoint
tensor with nowhere to go, a parameter left unfilled or a shape mismatch raises
`CheckpointError` naming every offending tensor.

Loading starts from ``nnx.eval_shape`` (no random init), memory-maps each safetensors file and
places one tensor at a time, so host memory stays near one copy of the model.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors' numpy reader)
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from ssapo_jax.errors import CheckpointError  # re-exported
from ssapo_jax.models.llama import Llama, LlamaConfig, SUPPORTED_MODEL_TYPES


# Layout transforms between HF ``torch.nn.Linear`` weights ``[out, in]`` and our einsum kernels.
IDENTITY = "identity"      # same array (embeddings, norm scales, lm_head [V, D])
IN_HEADS = "in_heads"      # HF [X*H, D] -> ours [D, X, H]   (q/k/v projections)
OUT_HEADS = "out_heads"    # HF [D, N*H] -> ours [N, H, D]   (o projection)
TRANSPOSE = "transpose"    # HF [F, D]   -> ours [D, F]      (MLP)
RESHAPE = "reshape"        # HF [X*H]    -> ours [X, H]      (biases)

_GLOBAL_TABLE = (
    ("model.embed_tokens.weight", "embedding", IDENTITY),
    ("model.norm.weight", "final_norm.scale", IDENTITY),
    ("lm_head.weight", "lm_head", IDENTITY),
)

# HF suffix after ``model.layers.{i}.`` -> our suffix after ``layers.{i}.``.
_LAYER_TABLE = (
    ("input_layernorm.weight", "input_norm.scale", IDENTITY),
    ("post_attention_layernorm.weight", "post_attn_norm.scale", IDENTITY),
    ("self_attn.q_proj.weight", "attn.q_proj", IN_HEADS),
    ("self_attn.k_proj.weight", "attn.k_proj", IN_HEADS),
    ("self_attn.v_proj.weight", "attn.v_proj", IN_HEADS),
    ("self_attn.o_proj.weight", "attn.o_proj", OUT_HEADS),
    ("self_attn.q_proj.bias", "attn.q_bias", RESHAPE),
    ("self_attn.k_proj.bias", "attn.k_bias", RESHAPE),
    ("self_attn.v_proj.bias", "attn.v_bias", RESHAPE),
    ("self_attn.o_proj.bias", "attn.o_bias", RESHAPE),
    ("mlp.gate_proj.weight", "mlp.gate_proj", TRANSPOSE),
    ("mlp.up_proj.weight", "mlp.up_proj", TRANSPOSE),
    ("mlp.down_proj.weight", "mlp.down_proj", TRANSPOSE),
    ("mlp.gate_proj.bias", "mlp.gate_bias", RESHAPE),
    ("mlp.up_proj.bias", "mlp.up_bias", RESHAPE),
    ("mlp.down_proj.bias", "mlp.down_bias", RESHAPE),
)

# Checkpoint tensors that carry no parameters of ours (old Llama checkpoints store RoPE buffers).
_IGNORABLE = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)


def tensor_mapping(config: LlamaConfig, param_paths) -> dict[str, tuple[str, str]]:
  """HF tensor name -> (our dotted parameter path, transform) for the parameters that exist."""
  paths = set(param_paths)
  table = {}
  for hf, ours, kind in _GLOBAL_TABLE:
    table[hf] = (ours, kind)
  for i in range(config.num_layers):
    for hf, ours, kind in _LAYER_TABLE:
      table[f"model.layers.{i}.{hf}"] = (f"layers.{i}.{ours}", kind)
  return {hf: v for hf, v in table.items() if v[0] in paths}


def hf_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  """The HF tensor shape of one of our parameters of ``shape``."""
  if kind == IDENTITY:
    return tuple(shape)
  if kind == IN_HEADS:
    d, x, h = shape
    return (x * h, d)
  if kind == OUT_HEADS:
    n, h, d = shape
    return (d, n * h)
  if kind == TRANSPOSE:
    return (shape[1], shape[0])
  if kind == RESHAPE:
    return (int(np.prod(shape)),)
  raise ValueError(f"unknown transform {kind!r}")


def to_ours(array: np.ndarray, shape: tuple[int, ...], kind: str) -> np.ndarray:
  """HF layout -> our layout (``shape``)."""
  if kind in (IDENTITY, RESHAPE):
    return array.reshape(shape)
  if kind in (IN_HEADS, OUT_HEADS, TRANSPOSE):
    return np.ascontiguousarray(array.T).reshape(shape)
  raise ValueError(f"unknown transform {kind!r}")


def to_hf(array: np.ndarray, kind: str) -> np.ndarray:
  """Our layout -> HF layout."""
  if kind == IDENTITY:
    return np.ascontiguousarray(array)
  if kind == RESHAPE:
    return np.ascontiguousarray(array.reshape(-1))
  if kind == IN_HEADS:
    return np.ascontiguousarray(array.reshape(array.shape[0], -1).T)
  if kind == OUT_HEADS:
    return np.ascontiguousarray(array.reshape(-1, array.shape[-1]).T)
  if kind == TRANSPOSE:
    return np.ascontiguousarray(array.T)
  raise ValueError(f"unknown transform {kind!r}")


def _path_str(path) -> str:
  return ".".join(str(getattr(p, "key", p)) for p in path)


def _flat_params(model_or_state) -> dict[str, nnx.Variable]:
  state = (nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module)
           else model_or_state)
  return {_path_str(path): var for path, var in nnx.to_flat_state(state)}


def read_config(path: str | os.PathLike) -> dict:
  """The ``config.json`` dict of a local HF model directory (clear errors when absent)."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise CheckpointError(f"{path}: no config.json (expected a local Hugging Face model dir)")
  with open(cfg_file) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e
  if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(f"{cfg_file}: unsupported model_type {config.get('model_type')!r}; "
                          f"supported: {SUPPORTED_MODEL_TYPES}")
  return config


def check_hf_dir(path: str | os.PathLike) -> dict:
  """Checks a local HF model directory without loading weights; returns its config dict.

  Reads ``config.json`` and every safetensors header (listed by the index, else found in the
  directory), so a missing, truncated or unlisted weight file raises `CheckpointError` before a
  run starts.
  """
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory (expected a local Hugging Face model dir)")
  config = read_config(path)
  for file in _weight_files(path):
    with _open(os.path.join(path, file)):  # validates the header against the file size
      pass
  return config


def _weight_files(path) -> dict[str, list[str]]:
  """safetensors file -> tensor names it should hold (from the index, else the file header)."""
  index_file = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index_file):
    with open(index_file) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_file}: not a safetensors index ({e!r})") from e
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
      files.setdefault(file, []).append(name)
    for file in files:
      if not os.path.isfile(os.path.join(path, file)):
        raise CheckpointError(f"{index_file} names {file}, which does not exist in {path}")
    return files
  names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not names:
    raise CheckpointError(f"{path}: no *.safetensors weights (PyTorch .bin checkpoints are not "
                          "supported; re-save with safe_serialization=True)")
  files = {}
  for file in names:
    with _open(os.path.join(path, file)) as f:
      files[file] = list(f.keys())
  return files


def _open(file: str):
  try:
    return safe_open(file, framework="numpy")
  except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt headers
    raise CheckpointError(f"cannot read safetensors file {file}: {e}") from e


def _placer(shardings, flat_paths) -> Callable[[str, np.ndarray], jax.Array]:
  if shardings is None:
    return lambda path, array: jax.device_put(array)
  if callable(shardings) and not isinstance(shardings, (dict, nnx.State)):
    return shardings
  flat = {_path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: isinstance(x, (jax.sharding.Sharding, nnx.Variable)))[0]}
  flat = {k.removesuffix(".value"): (v.get_value() if isinstance(v, nnx.Variable) else v)
          for k, v in flat.items()}
  missing = sorted(set(flat_paths) - set(flat))
  if missing:
    raise ValueError(f"shardings has no entry for parameters {missing[:10]}")
  return lambda path, array: jax.device_put(array, flat[path])


def load_hf(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
            shardings=None, remat: str = "none") -> Llama:
  """Loads a local Hugging Face Llama/Mistral/Qwen2 directory into a `Llama`.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` or sharded
      ``model-XXXXX-of-YYYYY.safetensors`` plus ``model.safetensors.index.json``.
    dtype: compute dtype of the model.
    param_dtype: dtype parameters are stored in (cast from the checkpoint dtype).
    shardings: None (default device), a pytree of ``jax.sharding.Sharding`` with the structure
      of ``nnx.state(model, nnx.Param)``, or a callable ``(dotted_path, np.ndarray) ->
      jax.Array`` that places each tensor.
    remat: rematerialisation policy (`LlamaConfig.remat`).

  Raises:
    CheckpointError: unsupported model_type, missing/extra tensors, shape mismatch, unreadable
      safetensors file.
  """
  path = os.fspath(path)
  config = LlamaConfig.from_hf(read_config(path), dtype=dtype, param_dtype=param_dtype,
                               remat=remat)
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
  flat = _flat_params(abs_params)
  mapping = tensor_mapping(config, flat)
  place = _placer(shardings, flat)
  files = _weight_files(path)

  extra = []
  for names in files.values():
    for name in names:
      if name in mapping or any(p.fullmatch(name) for p in _IGNORABLE):
        continue
      if name == "lm_head.weight" and config.tie_word_embeddings:
        continue  # some tied checkpoints store the (identical) head anyway
      extra.append(name)
  present = {n for names in files.values() for n in names}
  missing = sorted(set(mapping) - present)
  if extra or missing:
    raise CheckpointError(f"{path}: checkpoint does not match {config.model_type} config; "
                          f"missing tensors: {missing}; unexpected tensors: {sorted(extra)}")

  values: dict[str, jax.Array] = {}
  bad_shapes = []
  pdt = jnp.dtype(param_dtype)
  for file, names in files.items():
    full = os.path.join(path, file)
    with _open(full) as f:
      for name in names:
        if name not in mapping:
          continue
        ours, kind = mapping[name]
        target = tuple(flat[ours].shape)
        expected = hf_shape(target, kind)
        try:
          shape = tuple(f.get_slice(name).get_shape())
        except Exception as e:
          raise CheckpointError(f"{full}: tensor {name} is not readable ({e})") from e
        if shape != expected:
          bad_shapes.append(f"{name}: expected {expected}, found {shape}")
          continue
        try:
          array = f.get_tensor(name)
        except Exception as e:
          raise CheckpointError(f"{full}: tensor {name} is not readable ({e})") from e
        values[ours] = place(ours, to_ours(array, target, kind).astype(pdt))
        del array
  if bad_shapes:
    raise CheckpointError(f"{path}: tensor shapes do not match the config: {bad_shapes}")

  for p, var in flat.items():
    var.set_value(values[p])
  return nnx.merge(graphdef, abs_params, rest)


def save_hf(model: Llama, path: str | os.PathLike, *, tokenizer=None,
            shard_size: int = 5 * 1024**3, dtype=None) -> None:
  """Writes ``model`` as a Hugging Face directory (``config.json``, safetensors, index).

  ``transformers.AutoModelForCausalLM.from_pretrained(path)`` and vLLM load the result.

  Args:
    model: the model to save.
    path: output directory (created).
    tokenizer: optional HF tokenizer, saved alongside (``tokenizer.save_pretrained``).
    shard_size: maximum bytes per safetensors file; more than one file adds
      ``model.safetensors.index.json``.
    dtype: dtype of the saved tensors (default: the model's ``param_dtype``).

  Tensors are fetched to host one at a time; only one shard is held in host memory.
  Single-process only: multi-host sharded arrays must be gathered first.
  """
  import transformers

  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  config = model.config
  out_dtype = jnp.dtype(dtype or config.param_dtype)
  hf_dict = config.to_hf_dict()
  hf_dict["dtype"] = hf_dict["torch_dtype"] = out_dtype.name
  hf_config = transformers.CONFIG_MAPPING[config.model_type](
      **{k: v for k, v in hf_dict.items() if k != "model_type"})
  hf_config.save_pretrained(path)
  gen = transformers.GenerationConfig(bos_token_id=config.bos_token_id,
                                      eos_token_id=hf_dict["eos_token_id"],
                                      pad_token_id=config.pad_token_id)
  gen.save_pretrained(path)

  flat = _flat_params(model)
  mapping = tensor_mapping(config, flat)
  order = list(mapping)  # table order: embeddings, norm, head, then layer by layer

  shards: list[dict[str, np.ndarray]] = [{}]
  sizes = [0]
  tmp_names = []

  def flush():
    index = len(tmp_names)
    name = f"shard-{index}.tmp.safetensors"
    save_file(shards[-1], os.path.join(path, name), metadata={"format": "pt"})
    tmp_names.append((name, list(shards[-1])))
    shards[-1] = {}
    sizes[-1] = 0

  total = 0
  for hf_name in order:
    ours, kind = mapping[hf_name]
    array = np.asarray(jax.device_get(flat[ours].get_value())).astype(out_dtype)
    array = to_hf(array, kind)
    if sizes[-1] and sizes[-1] + array.nbytes > shard_size:
      flush()
    shards[-1][hf_name] = array
    sizes[-1] += array.nbytes
    total += array.nbytes
  flush()

  n = len(tmp_names)
  for stale in os.listdir(path):  # remove weights of an earlier save into the same dir
    if stale.endswith(".safetensors") and not stale.endswith(".tmp.safetensors"):
      os.remove(os.path.join(path, stale))
  index_file = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index_file):
    os.remove(index_file)
  weight_map = {}
  for i, (tmp, names) in enumerate(tmp_names):
    final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.replace(os.path.join(path, tmp), os.path.join(path, final))
    weight_map.update({name: final for name in names})
  if n > 1:
    with open(index_file, "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
