"""Hugging Face safetensors import/export for the registered model families (`models.base`).

The mapping is the family's tables (`ModelFamily.hf_layer_tensors` plus its global rows): HF
tensor name → NNX
parameter path, layer index (our layer parameters are stacked on a leading ``[L]`` axis, so
``model.layers.3.mlp.up_proj.weight`` is row 3 of ``layers.mlp.up_proj``) and a layout
transform. Import is strict in both directions: a checkpoint tensor with nowhere to go, a
parameter left unfilled or a shape mismatch raises `CheckpointError` naming every offending
tensor.

Loading starts from ``nnx.eval_shape`` (no random init) and memory-maps each safetensors file.
With a mesh or shardings, every parameter is built with ``jax.make_array_from_callback``: each
device's block is read from the file slice it covers (``safe_open(...).get_slice``), so no
device ever holds a full tensor it does not own and each host reads only what its devices need.
Saving streams tensor by tensor: the safetensors header is written from the shapes first, then
each tensor is fetched to host (from the shards, one layer at a time) and appended.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors' numpy reader)
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from safetensors import safe_open

from ssapo_jax import sharding as shd
from ssapo_jax.errors import CheckpointError  # re-exported
from ssapo_jax.models.base import (
  CausalLM,
  build_model,
  family_for,
  logical_axes,
  split_params,
  supported_model_types,
)
from ssapo_jax.sharding import logical_to_spec
from ssapo_jax.storage import local_copy

IDENTITY, IN_HEADS, OUT_HEADS, TRANSPOSE, RESHAPE = (
  "identity",
  "in_heads",
  "out_heads",
  "transpose",
  "reshape",
)  # see `base.HfTensor`

# Checkpoint tensors that carry no parameters of ours (old Llama checkpoints store RoPE buffers).
_IGNORABLE = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)


def tensor_mapping(config, param_paths) -> dict[str, tuple[str, int | None, str]]:
  """HF tensor name -> (our dotted parameter path, layer row or None, transform), for the
  parameters that exist; embeddings, norm and head first, then layer by layer (the tables of
  ``config.model_type``'s registered family)."""
  family = family_for(config.model_type)
  paths = set(param_paths)
  table = {}
  for hf, ours, kind in family.hf_global_tensors:
    table[hf] = (ours, None, kind)
  for i in range(config.num_layers):
    for hf, ours, kind in family.hf_layer_tensors:
      table[f"model.layers.{i}.{hf}"] = (f"layers.{ours}", i, kind)
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


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
  bounds = []
  for sl, dim in zip(index, shape):
    start, stop, step = sl.indices(dim)
    if step != 1:
      raise ValueError(f"strided index {index} is not a shard")
    bounds.append((start, stop))
  return bounds


def read_block(tensor, shape: tuple[int, ...], kind: str, index: tuple[slice, ...]) -> np.ndarray:
  """The block ``index`` of our layout (``shape``) read from an HF tensor.

  Args:
    tensor: the HF tensor, or a lazy ``safe_open(...).get_slice(name)``; only the HF rows and
      columns that the block needs are read.
    shape: our (unstacked) shape of the parameter.
    kind: the layout transform.
    index: one slice per dimension of ``shape``.
  """
  b = _bounds(index, shape)
  if kind == IDENTITY or (kind == RESHAPE and len(shape) == 1):
    return np.asarray(tensor[tuple(slice(lo, hi) for lo, hi in b)])
  if kind == RESHAPE:  # HF [X*H] -> [X, H]
    (x0, x1), (h0, h1) = b[0], b[1]
    width = shape[1]
    return np.asarray(tensor[x0 * width : x1 * width]).reshape(x1 - x0, width)[:, h0:h1]
  if kind == TRANSPOSE:  # HF [F, D] -> [D, F]
    (d0, d1), (f0, f1) = b
    return np.asarray(tensor[f0:f1, d0:d1]).T
  if kind == IN_HEADS:  # HF [X*H, D] -> [D, X, H]
    (d0, d1), (x0, x1), (h0, h1) = b
    width = shape[2]
    rows = np.asarray(tensor[x0 * width : x1 * width, d0:d1]).T
    return rows.reshape(d1 - d0, x1 - x0, width)[:, :, h0:h1]
  if kind == OUT_HEADS:  # HF [D, N*H] -> [N, H, D]
    (n0, n1), (h0, h1), (d0, d1) = b
    width = shape[1]
    cols = np.asarray(tensor[d0:d1, n0 * width : n1 * width]).T
    return cols.reshape(n1 - n0, width, d1 - d0)[:, h0:h1, :]
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
  state = (
    nnx.state(model_or_state, nnx.Param)
    if isinstance(model_or_state, nnx.Module)
    else model_or_state
  )
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
  if config.get("model_type") not in supported_model_types():
    raise CheckpointError(
      f"{cfg_file}: unsupported model_type {config.get('model_type')!r}; "
      f"supported: {supported_model_types()}"
    )
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
  files = _weight_files(path)
  shapes = {}
  for file in files:
    with _open(os.path.join(path, file)) as f:  # validates the header against the file size
      for name in f.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
        shapes[name] = tuple(f.get_slice(name).get_shape())
  # The tensors config.json implies (shapes only: nnx.eval_shape allocates nothing).
  try:
    model_config = family_for(config["model_type"]).config_cls.from_hf(config)
  except (KeyError, ValueError, TypeError) as e:
    raise CheckpointError(
      f"{os.path.join(path, 'config.json')}: not a usable model config ({type(e).__name__}: {e})"
    ) from None
  flat = _flat_params(build_model(model_config, abstract=True))
  mapping = tensor_mapping(model_config, flat)
  _check_names(path, model_config, mapping, files)
  bad_shapes = [
    f"{name}: expected {expected}, found {shapes[name]}"
    for name, expected in _expected_hf_shapes(mapping, flat).items()
    if name in shapes and shapes[name] != expected
  ]
  if bad_shapes:
    raise CheckpointError(
      f"{path}: tensor shapes do not match config.json: {bad_shapes[:5]}"
      + (f" and {len(bad_shapes) - 5} more" if len(bad_shapes) > 5 else "")
    )
  return config


def _expected_hf_shapes(mapping, flat) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> the shape our parameters need it to have."""
  out = {}
  for name, (ours, layer, kind) in mapping.items():
    out[name] = hf_shape(tuple(flat[ours].shape)[0 if layer is None else 1 :], kind)
  return out


def _check_names(path, config, mapping, files) -> dict[str, str]:
  """Every tensor the config needs is in the files and no file holds one we cannot place;
  returns tensor name -> file. Raises `CheckpointError` listing the differences."""
  extra = []
  for names in files.values():
    for name in names:
      if name in mapping or any(p.fullmatch(name) for p in _IGNORABLE):
        continue
      if name == "lm_head.weight" and config.tie_word_embeddings:
        continue  # some tied checkpoints store the (identical) head anyway
      extra.append(name)
  file_of = {n: file for file, names in files.items() for n in names}
  missing = sorted(set(mapping) - set(file_of))
  if extra or missing:

    def show(names):
      return f"{names[:5]}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    raise CheckpointError(
      f"{path}: the weights do not match config.json "
      f"(num_hidden_layers={config.num_layers}, model_type "
      f"{config.model_type}); missing tensors: {show(missing)}; "
      f"unexpected tensors: {show(sorted(extra))}"
    )
  return file_of


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
    raise CheckpointError(
      f"{path}: no *.safetensors weights (PyTorch .bin checkpoints are not "
      "supported; re-save with safe_serialization=True)"
    )
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


def _target_shardings(abs_params, flat, mesh, shardings) -> dict[str, jax.sharding.Sharding]:
  """Dotted path -> final sharding of every parameter ({} = default device)."""
  if mesh is not None and shardings is not None:
    raise ValueError("load_hf takes mesh or shardings, not both")
  if mesh is not None:
    axes = {_path_str(p): a for p, a in nnx.to_flat_state(logical_axes(abs_params))}
    return {
      p: NamedSharding(mesh, logical_to_spec(axes[p], var.shape, mesh)) for p, var in flat.items()
    }
  if shardings is None:
    return {}
  leaves = jax.tree_util.tree_flatten_with_path(
    shardings, is_leaf=lambda x: isinstance(x, (jax.sharding.Sharding, nnx.Variable))
  )[0]
  out = {
    _path_str(p).removesuffix(".value"): (s.get_value() if isinstance(s, nnx.Variable) else s)
    for p, s in leaves
  }
  missing = sorted(set(flat) - set(out))
  if missing:
    raise ValueError(f"shardings has no entry for parameters {missing[:10]}")
  return out


def load_hf(
  path: str | os.PathLike,
  *,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  remat: str = "none",
  attention: str = "auto",
  scan_layers: bool = True,
  mesh: jax.sharding.Mesh | None = None,
  shardings=None,
) -> CausalLM:
  """Loads a local Hugging Face model directory into its registered family's model
  (`ssapo_jax.models.family_for`; today Llama, Mistral and Qwen2 checkpoints).

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` or sharded
      ``model-XXXXX-of-YYYYY.safetensors`` plus ``model.safetensors.index.json``; local, or a
      ``gs://`` folder (copied to this host first, `ssapo_jax.storage.local_copy`).
    dtype: compute dtype of the model.
    param_dtype: dtype parameters are stored in (cast from the checkpoint dtype).
    remat: rematerialisation policy (`LlamaConfig.remat`).
    attention: attention implementation (`LlamaConfig.attention`).
    scan_layers: scan the layer stack or unroll it (`LlamaConfig.scan_layers`).
    mesh: place every parameter on its sharding under ``ssapo_jax.sharding``'s logical-axis
      rules for this mesh.
    shardings: instead of ``mesh``, a pytree of ``jax.sharding.Sharding`` with the structure
      of ``nnx.state(model, nnx.Param)``. With neither, parameters go to the default device.

  With a mesh or shardings each device's block is read from the file and placed directly
  (``jax.make_array_from_callback``): no device holds more than its shard, and each process
  reads only the blocks of its own devices.

  Raises:
    CheckpointError: unsupported model_type, missing/extra tensors, shape mismatch, unreadable
      safetensors file.
  """
  path = local_copy(path)  # a gs:// folder: this host's copy
  hf = read_config(path)
  config = family_for(hf["model_type"]).config_cls.from_hf(
    hf,
    dtype=dtype,
    param_dtype=param_dtype,
    remat=remat,
    attention=attention,
    scan_layers=scan_layers,
  )
  graphdef, abs_params, rest = split_params(build_model(config, abstract=True))
  flat = _flat_params(abs_params)
  mapping = tensor_mapping(config, flat)
  targets = _target_shardings(abs_params, flat, mesh, shardings)
  files = _weight_files(path)

  file_of = _check_names(path, config, mapping, files)

  pdt = jnp.dtype(param_dtype)
  with contextlib.ExitStack() as stack:
    handles = {file: stack.enter_context(_open(os.path.join(path, file))) for file in files}
    # our path -> {layer row or None: lazy HF slice}; every shape checked before any read.
    sources: dict[str, dict[int | None, object]] = {}
    kinds: dict[str, str] = {}
    bad_shapes = []
    for name, (ours, layer, kind) in mapping.items():
      full = os.path.join(path, file_of[name])
      try:
        lazy = handles[file_of[name]].get_slice(name)
        shape = tuple(lazy.get_shape())
      except Exception as e:
        raise CheckpointError(f"{full}: tensor {name} is not readable ({e})") from e
      target = tuple(flat[ours].shape)[0 if layer is None else 1 :]
      expected = hf_shape(target, kind)
      if shape != expected:
        bad_shapes.append(f"{name}: expected {expected}, found {shape}")
      sources.setdefault(ours, {})[layer] = lazy
      kinds[ours] = kind
    if bad_shapes:
      raise CheckpointError(f"{path}: tensor shapes do not match the config: {bad_shapes}")

    for ours, var in flat.items():
      shape = tuple(var.shape)
      reader = _BlockReader(sources[ours], kinds[ours], shape, pdt, path=f"{path}: {ours}")
      if ours in targets:
        value = jax.make_array_from_callback(shape, targets[ours], reader)
      else:
        value = jax.device_put(reader(tuple(slice(None) for _ in shape)))
      var.set_value(value)
  return nnx.merge(graphdef, abs_params, rest)


class _BlockReader:
  """``index -> np.ndarray`` of one parameter, read block-wise from its HF tensor(s).

  A stacked layer parameter ``[L, ...]`` reads each covered layer's tensor; blocks already
  read (replicas on several devices) are reused.
  """

  def __init__(self, sources, kind, shape, dtype, *, path):
    self.sources, self.kind, self.shape, self.dtype, self.path = sources, kind, shape, dtype, path
    self.stacked = None not in sources
    self.blocks = {}

  def __call__(self, index):
    index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
    key = tuple(tuple(b) for b in _bounds(index, self.shape))
    if key not in self.blocks:
      try:
        if self.stacked:
          (l0, l1), inner = key[0], index[1:]
          block = np.stack(
            [read_block(self.sources[i], self.shape[1:], self.kind, inner) for i in range(l0, l1)]
          )
        else:
          block = read_block(self.sources[None], self.shape, self.kind, index)
      except CheckpointError:
        raise
      except Exception as e:
        raise CheckpointError(f"{self.path} is not readable ({e})") from e
      self.blocks[key] = np.ascontiguousarray(block.astype(self.dtype, copy=False))
    return self.blocks[key]


# safetensors dtype names (the format's header) of the dtypes we write.
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


def _host_block(x: jax.Array, layer: int | None) -> np.ndarray:
  """``x`` (or its row ``layer``) on this host, assembled from the shards without a device
  gather; arrays spanning several processes are all-gathered one tensor at a time (every
  process must call)."""
  if not x.is_fully_addressable:
    return shd.to_host(x if layer is None else x[layer])
  shape = x.shape if layer is None else x.shape[1:]
  out = np.empty(shape, x.dtype)
  for shard in x.addressable_shards:
    if shard.replica_id != 0:
      continue
    index = shard.index
    if layer is None:
      out[index] = np.asarray(shard.data)
      continue
    lo, hi, _ = index[0].indices(x.shape[0])
    if lo <= layer < hi:
      out[index[1:]] = np.asarray(shard.data[layer - lo])
  return out


def _write_safetensors(file: str, names: list[str], shapes: dict, dtype, produce) -> None:
  """Writes a safetensors file tensor by tensor: the header from the shapes, then each
  ``produce(name)`` (an array of ``shapes[name]``) appended, so one tensor is in memory."""
  header, offset = {}, 0
  for name in names:
    nbytes = int(np.prod(shapes[name])) * dtype.itemsize
    header[name] = {
      "dtype": _SAFETENSORS_DTYPES[dtype.name],
      "shape": list(shapes[name]),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
  with open(file, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name in names:
      array = np.ascontiguousarray(produce(name), dtype=dtype)
      if array.shape != tuple(shapes[name]):
        raise ValueError(f"{name}: produced shape {array.shape}, expected {shapes[name]}")
      f.write(array.reshape(-1).view(np.uint8).data)  # no bytes copy


def write_hf_config(config, path: str, dtype) -> None:
  """Writes ``config.json`` and ``generation_config.json`` of ``config`` into ``path`` (created),
  recording ``dtype`` as the weights' dtype (what `save_hf` and the GGUF importer write)."""
  import transformers

  os.makedirs(path, exist_ok=True)
  hf_dict = config.to_hf_dict()
  hf_dict["dtype"] = hf_dict["torch_dtype"] = jnp.dtype(dtype).name
  hf_config = transformers.CONFIG_MAPPING[config.model_type](
    **{k: v for k, v in hf_dict.items() if k != "model_type"}
  )
  hf_config.save_pretrained(path)
  gen = transformers.GenerationConfig(
    bos_token_id=config.bos_token_id,
    eos_token_id=hf_dict["eos_token_id"],
    pad_token_id=config.pad_token_id,
  )
  gen.save_pretrained(path)


def save_hf(
  model: CausalLM,
  path: str | os.PathLike,
  *,
  tokenizer=None,
  shard_size: int = 5 * 1024**3,
  dtype=None,
) -> None:
  """Writes ``model`` as a Hugging Face directory (``config.json``, safetensors, index).

  ``transformers.AutoModelForCausalLM.from_pretrained(path)`` and vLLM load the result.

  Args:
    model: the model to save (parameters on any sharding).
    path: output directory (created).
    tokenizer: optional HF tokenizer, saved alongside (``tokenizer.save_pretrained``).
    shard_size: maximum bytes per safetensors file; more than one file adds
      ``model.safetensors.index.json``.
    dtype: dtype of the saved tensors (default: the model's ``param_dtype``).

  Streams one HF tensor at a time: each is assembled on the host from its device shards (no
  gather onto one device) and appended to its file, so host memory holds one tensor. Only
  process 0 writes; when parameters span several processes every process must call this
  (each tensor is then all-gathered to the hosts in turn).
  """
  path = os.fspath(path)
  writer = jax.process_index() == 0
  config = model.config
  out_dtype = jnp.dtype(dtype or config.param_dtype)
  flat = _flat_params(model)
  mapping = tensor_mapping(config, flat)
  shapes = {}
  for hf_name, (ours, layer, kind) in mapping.items():
    ours_shape = tuple(flat[ours].shape)[0 if layer is None else 1 :]
    shapes[hf_name] = hf_shape(ours_shape, kind)

  # Files planned from the shapes: table order (embeddings, norm, head, then layer by layer).
  groups: list[list[str]] = [[]]
  size = 0
  for hf_name in mapping:
    nbytes = int(np.prod(shapes[hf_name])) * out_dtype.itemsize
    if groups[-1] and size + nbytes > shard_size:
      groups.append([])
      size = 0
    groups[-1].append(hf_name)
    size += nbytes
  n = len(groups)
  finals = (
    ["model.safetensors"]
    if n == 1
    else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  )

  def produce(hf_name):
    ours, layer, kind = mapping[hf_name]
    return to_hf(_host_block(flat[ours].get_value(), layer).astype(out_dtype, copy=False), kind)

  if writer:
    write_hf_config(config, path, out_dtype)
    for stale in os.listdir(path):  # weights of an earlier save into the same dir
      if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
        os.remove(os.path.join(path, stale))
  for group, final in zip(groups, finals):
    if writer:
      tmp = os.path.join(path, final + ".tmp")
      _write_safetensors(tmp, group, shapes, out_dtype, produce)
      os.replace(tmp, os.path.join(path, final))
    else:
      for hf_name in group:  # take part in the all-gathers
        produce(hf_name)
  if writer and n > 1:
    total = sum(int(np.prod(s)) * out_dtype.itemsize for s in shapes.values())
    weight_map = {name: final for group, final in zip(groups, finals) for name in group}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  if writer and tokenizer is not None:
    tokenizer.save_pretrained(path)
