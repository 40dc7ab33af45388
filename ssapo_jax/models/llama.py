"""Flax NNX decoder for the Llama family: Llama 2/3/3.1/3.2, Mistral and Qwen2/2.5.

One implementation covers the family; the differences are config fields (grouped-query
attention, q/k/v bias for Qwen2, sliding-window attention for Mistral/Qwen2, RoPE scaling of
type ``linear``/``dynamic``/``llama3``, tied embeddings). Numerics follow transformers'
PyTorch modules (``modeling_llama.py``): RMSNorm in float32, RoPE with ``rotate_half``,
softmax in float32.

Shape letters: B batch, T query length, S key length, D embed, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim, F MLP hidden, V vocab.

Every parameter is an ``nnx.Param`` carrying logical axis names (``"vocab"``, ``"embed"``,
``"q_heads"``, ``"kv_heads"``, ``"head_dim"``, ``"mlp"``, ``"norm"``, ``"layers"``) in its
sharding metadata; `logical_axes` reads them back for ``ssapo_jax.sharding``.

The decoder layers are stacked: every layer parameter has a leading ``[L]`` axis (logical name
``"layers"``) and the layers run in one ``jax.lax.scan`` (rematerialised per layer), so the
compiled program does not grow with depth; `LlamaConfig.scan_layers` off unrolls the same
stacked parameters into a Python loop (for shallow models, where XLA optimising across layers
is faster than the scan; the parameters and checkpoints do not change). Sliding/full attention patterns are a per-layer
index into the distinct windows, scanned alongside the parameters.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssapo_jax.models.attention import (
  IMPLEMENTATIONS,
  attention,
  cached_attention,
  resolve_implementation,
)
from ssapo_jax.models.base import (
  KVCache,
  LayerTransform,
  ModelFamily,
  annotated_param,
  register_family,
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]  # per-decoder-layer remat
REMAT_POLICIES: tuple[str, ...] = typing.get_args(RematPolicy)


def _dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-family decoder (hashable, so it can be static under jit).

  Field comments name the Hugging Face ``config.json`` source.
  """

  vocab_size: int  # ← vocab_size
  hidden_size: int  # ← hidden_size (D)
  intermediate_size: int  # ← intermediate_size (F)
  num_layers: int  # ← num_hidden_layers
  num_heads: int  # ← num_attention_heads (N)
  num_kv_heads: int  # ← num_key_value_heads (K)
  head_dim: int  # ← head_dim, else hidden_size // num_attention_heads (H)
  model_type: str = "llama"  # ← model_type: llama | mistral | qwen2
  rms_norm_eps: float = 1e-6  # ← rms_norm_eps
  rope_theta: float = 10000.0  # ← rope_parameters.rope_theta (old: rope_theta)
  # ← rope_parameters minus rope_theta (old: rope_scaling), as sorted (key, value) pairs;
  # () means plain RoPE. Keys: rope_type, factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings.
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  max_position_embeddings: int = 4096  # ← max_position_embeddings (dynamic RoPE threshold)
  tie_word_embeddings: bool = False  # ← tie_word_embeddings
  qkv_bias: bool = False  # ← attention_bias (llama) / always True for qwen2
  o_bias: bool = False  # ← attention_bias (llama); False for qwen2/mistral
  mlp_bias: bool = False  # ← mlp_bias (llama)
  sliding_window: int | None = None  # ← sliding_window (keys with q - k >= window are masked)
  # ← layer_types ("full_attention" | "sliding_attention"); () = all full attention.
  layer_types: tuple[str, ...] = ()
  max_window_layers: int | None = None  # ← max_window_layers (qwen2, kept for export)
  bos_token_id: int | None = None  # ← bos_token_id
  eos_token_ids: tuple[int, ...] = ()  # ← eos_token_id (int or list)
  pad_token_id: int | None = None  # ← pad_token_id
  # Runtime choices (not from HF): compute dtype, parameter dtype, rematerialisation policy:
  # "none"; "full" (save only layer inputs); "dots" (save matmul outputs,
  # jax.checkpoint_policies.dots_saveable); "dots_no_batch" (dots_with_no_batch_dims_saveable);
  # attention kernel (ssapo_jax.models.attention): auto | xla | splash | cudnn; scan_layers:
  # run the stacked layers in one lax.scan (True: the program does not grow with depth) or
  # as an unrolled Python loop over the same stacked parameters (False: XLA sees every layer,
  # faster for shallow models, compile time grows with depth). Checkpoints are identical.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention: str = "auto"
  scan_layers: bool = True

  def __post_init__(self):
    object.__setattr__(self, "dtype", _dtype_name(self.dtype))
    object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f"LlamaConfig.model_type must be one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}"
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of "
        f"num_kv_heads ({self.num_kv_heads})"
      )
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"LlamaConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.attention not in IMPLEMENTATIONS:
      raise ValueError(
        f"LlamaConfig.attention must be one of {IMPLEMENTATIONS}, got {self.attention!r}"
      )
    rope_type = self.rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(
        f"LlamaConfig.rope_scaling rope_type must be one of "
        f"{SUPPORTED_ROPE_TYPES}, got {rope_type!r}"
      )
    if self.layer_types:
      if len(self.layer_types) != self.num_layers:
        raise ValueError(
          f"LlamaConfig.layer_types has {len(self.layer_types)} entries; "
          f"expected num_layers = {self.num_layers}"
        )
      bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
      if bad:
        raise ValueError(f"LlamaConfig.layer_types has unsupported entries {sorted(bad)}")
      if "sliding_attention" in self.layer_types and not self.sliding_window:
        raise ValueError(
          "LlamaConfig.layer_types has sliding_attention layers but sliding_window is None"
        )

  @property
  def rope_type(self) -> str:
    """The RoPE variant (``rope_scaling``'s ``rope_type``; ``"default"`` for plain RoPE)."""
    return dict(self.rope_scaling).get("rope_type", "default")

  def layer_window(self, i: int) -> int | None:
    """Sliding window of layer ``i`` (None = full causal attention)."""
    if self.layer_types and self.layer_types[i] == "sliding_attention":
      return self.sliding_window
    return None

  @property
  def windows(self) -> tuple[int | None, ...]:
    """The distinct attention windows, in order of first use (``(None,)`` = all full)."""
    return tuple(dict.fromkeys(self.layer_window(i) for i in range(self.num_layers)))

  def window_indices(self) -> np.ndarray:
    """``[L]`` int32: each layer's index into `windows`."""
    return np.asarray(
      [self.windows.index(self.layer_window(i)) for i in range(self.num_layers)], np.int32
    )

  # ---- Hugging Face conversion

  @classmethod
  def from_hf(cls, hf_config, **overrides) -> "LlamaConfig":
    """Builds a config from a ``transformers`` config object or a ``config.json`` dict.

    ``overrides`` set runtime fields (``dtype``, ``param_dtype``, ``remat``, ``attention``,
    ``scan_layers``) or any other field.
    Raises ValueError for an unsupported ``model_type``, activation or RoPE type.
    """
    import transformers  # local import: only needed for conversion

    if isinstance(hf_config, dict):
      model_type = hf_config.get("model_type")
      if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
          f"unsupported model_type {model_type!r} in config; supported: {SUPPORTED_MODEL_TYPES}"
        )
      d = {k: v for k, v in hf_config.items() if k != "model_type"}
      hf_config = transformers.CONFIG_MAPPING[model_type](**d)
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"unsupported hidden_act {act!r} for {model_type}; only 'silu'")
    if hasattr(hf_config, "standardize_rope_params"):
      hf_config.standardize_rope_params()
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not rope:  # very old configs
      rope = dict(getattr(hf_config, "rope_scaling", None) or {})
      rope.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    rope_theta = float(rope.pop("rope_theta", 10000.0))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
      raise ValueError("partial_rotary_factor != 1 is not supported")
    rope.pop("partial_rotary_factor", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(
        f"unsupported RoPE type {rope_type!r} in rope_parameters; supported: {SUPPORTED_ROPE_TYPES}"
      )
    if rope_type == "default":
      rope = {}
    else:
      rope["rope_type"] = rope_type
      rope = {
        k: v
        for k, v in rope.items()
        if k
        in (
          "rope_type",
          "factor",
          "low_freq_factor",
          "high_freq_factor",
          "original_max_position_embeddings",
        )
      }
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    num_layers = hf_config.num_hidden_layers
    sliding_window = getattr(hf_config, "sliding_window", None)
    layer_types = tuple(getattr(hf_config, "layer_types", None) or ())
    if model_type == "mistral":
      layer_types = ("sliding_attention",) * num_layers if sliding_window else ()
    elif model_type == "llama":
      layer_types, sliding_window = (), None
    if layer_types and "sliding_attention" not in layer_types:
      layer_types = ()
    bias = bool(getattr(hf_config, "attention_bias", False))
    eos = getattr(hf_config, "eos_token_id", None)
    eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
    kwargs = dict(
      vocab_size=hf_config.vocab_size,
      hidden_size=hf_config.hidden_size,
      intermediate_size=hf_config.intermediate_size,
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
      head_dim=head_dim,
      model_type=model_type,
      rms_norm_eps=float(hf_config.rms_norm_eps),
      rope_theta=rope_theta,
      rope_scaling=tuple(sorted(rope.items())),
      max_position_embeddings=hf_config.max_position_embeddings,
      tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
      qkv_bias=True if model_type == "qwen2" else bias,
      o_bias=bias if model_type == "llama" else False,
      mlp_bias=bool(getattr(hf_config, "mlp_bias", False)) if model_type == "llama" else False,
      sliding_window=sliding_window if layer_types else None,
      layer_types=layer_types,
      max_window_layers=getattr(hf_config, "max_window_layers", None),
      bos_token_id=getattr(hf_config, "bos_token_id", None),
      eos_token_ids=eos,
      pad_token_id=getattr(hf_config, "pad_token_id", None),
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def matmul_params(self) -> int:
    """Parameters that multiply every token: attention and MLP matrices of all layers and the
    LM head (the input embedding is a lookup; norms and biases are negligible and left out)."""
    attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * self.hidden_size * self.intermediate_size
    return self.num_layers * (attention + mlp) + self.vocab_size * self.hidden_size

  def forward_flops(self, num_tokens: float, context: float) -> float:
    """Model flops of a forward pass over ``num_tokens`` tokens that each attend to
    ``context`` keys on average: ``2 * matmul_params`` per token plus ``QK^T`` and ``PV``."""
    attention = 4.0 * self.num_layers * self.num_heads * self.head_dim * context
    return num_tokens * (2.0 * self.matmul_params() + attention)

  def to_hf_dict(self) -> dict:
    """A ``config.json`` dict that ``transformers.AutoConfig`` reads back to this architecture."""
    rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
    rope.update(dict(self.rope_scaling))
    arch = {
      "llama": "LlamaForCausalLM",
      "mistral": "MistralForCausalLM",
      "qwen2": "Qwen2ForCausalLM",
    }[self.model_type]
    eos = (
      None
      if not self.eos_token_ids
      else self.eos_token_ids[0]
      if len(self.eos_token_ids) == 1
      else list(self.eos_token_ids)
    )
    d = {
      "architectures": [arch],
      "model_type": self.model_type,
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_layers,
      "num_attention_heads": self.num_heads,
      "num_key_value_heads": self.num_kv_heads,
      "head_dim": self.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": self.rms_norm_eps,
      "rope_theta": self.rope_theta,
      "rope_parameters": rope,
      "max_position_embeddings": self.max_position_embeddings,
      "tie_word_embeddings": self.tie_word_embeddings,
      "bos_token_id": self.bos_token_id,
      "eos_token_id": eos,
      "pad_token_id": self.pad_token_id,
      "torch_dtype": self.param_dtype,
      "dtype": self.param_dtype,
      "initializer_range": 0.02,
      "attention_dropout": 0.0,
      "use_cache": True,
    }
    if self.model_type == "llama":
      if self.qkv_bias != self.o_bias:
        raise ValueError("llama export needs qkv_bias == o_bias (HF attention_bias covers both)")
      d["attention_bias"] = self.qkv_bias
      d["mlp_bias"] = self.mlp_bias
    elif self.model_type == "mistral":
      d["sliding_window"] = self.sliding_window if self.layer_types else None
    elif self.model_type == "qwen2":
      sliding = bool(self.layer_types)
      d["use_sliding_window"] = sliding
      d["sliding_window"] = self.sliding_window if sliding else None
      d["max_window_layers"] = (
        self.max_window_layers if self.max_window_layers is not None else self.num_layers
      )
      d["layer_types"] = list(self.layer_types) or ["full_attention"] * self.num_layers
    return d


# ----------------------------------------------------------------------------- params


def _param(
  key: jax.Array, init, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype
) -> nnx.Param:
  """Creates an initialised ``nnx.Param`` annotated with logical axis names."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
  return annotated_param(init(key, shape, dtype), axes)


_normal = jax.nn.initializers.normal(stddev=0.02)
_zeros = jax.nn.initializers.zeros
_ones = jax.nn.initializers.ones


# ----------------------------------------------------------------------------- modules


class RMSNorm(nnx.Module):
  """RMSNorm as in HF ``LlamaRMSNorm``: normalise in float32, scale in the input dtype."""

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = _param(rngs.params(), _ones, (dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return self.scale[...].astype(x.dtype) * normed


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse RoPE frequencies ``[H // 2]`` float32 for default/linear/llama3 RoPE.

  Dynamic NTK scaling depends on the sequence length and is applied in `_rope_cos_sin`.
  Follows ``transformers.modeling_rope_utils`` (``_compute_llama3_parameters`` etc.).
  """
  dim = config.head_dim
  inv_freq = 1.0 / (
    config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
  )
  inv_freq = inv_freq.astype(np.float32)
  params = dict(config.rope_scaling)
  rope_type = config.rope_type
  if rope_type == "linear":
    inv_freq = inv_freq / np.float32(params["factor"])
  elif rope_type == "llama3":
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params.get("original_max_position_embeddings", config.max_position_embeddings)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def _rope_cos_sin(config: LlamaConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin ``[B, T, H]`` for integer ``positions [B, T]``."""
  if config.rope_type == "dynamic":
    # HF dynamic NTK: base grows with the longest position in the call once it exceeds
    # max_position_embeddings (identical to the plain base below it).
    dim = config.head_dim
    max_pos = config.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
    factor = dict(config.rope_scaling)["factor"]
    base = config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exps = jnp.asarray(np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    inv_freq = 1.0 / (base**exps)
  else:
    inv_freq = jnp.asarray(rope_inv_freq(config))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x ``[B, T, heads, H]``, cos/sin ``[B, T, H]`` (HF ``rotate_half`` convention)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE, optional q/k/v bias and sliding window."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    pd = c.param_dtype
    self.config = c
    self.q_proj = _param(
      rngs.params(),
      _normal,
      (c.hidden_size, c.num_heads, c.head_dim),
      ("embed", "q_heads", "head_dim"),
      pd,
    )
    self.k_proj = _param(
      rngs.params(),
      _normal,
      (c.hidden_size, c.num_kv_heads, c.head_dim),
      ("embed", "kv_heads", "head_dim"),
      pd,
    )
    self.v_proj = _param(
      rngs.params(),
      _normal,
      (c.hidden_size, c.num_kv_heads, c.head_dim),
      ("embed", "kv_heads", "head_dim"),
      pd,
    )
    self.o_proj = _param(
      rngs.params(),
      _normal,
      (c.num_heads, c.head_dim, c.hidden_size),
      ("q_heads", "head_dim", "embed"),
      pd,
    )
    if c.qkv_bias:
      self.q_bias = _param(
        rngs.params(), _zeros, (c.num_heads, c.head_dim), ("q_heads", "head_dim"), pd
      )
      self.k_bias = _param(
        rngs.params(), _zeros, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), pd
      )
      self.v_bias = _param(
        rngs.params(), _zeros, (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), pd
      )
    if c.o_bias:
      self.o_bias = _param(rngs.params(), _zeros, (c.hidden_size,), ("embed",), pd)

  def project_qkv(self, x, cos, sin):
    """x ``[B, T, D]`` -> q ``[B, T, N, H]``, k, v ``[B, T, K, H]`` (RoPE applied to q, k)."""
    dt = x.dtype
    q = jnp.einsum("BTD,DNH->BTNH", x, self.q_proj[...].astype(dt))
    k = jnp.einsum("BTD,DKH->BTKH", x, self.k_proj[...].astype(dt))
    v = jnp.einsum("BTD,DKH->BTKH", x, self.v_proj[...].astype(dt))
    if self.config.qkv_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v

  def attend(
    self,
    q,
    k,
    v,
    q_slots,
    k_slots,
    kv_mask,
    window_index,
    *,
    query_chunk_size: int | None = None,
  ):
    """Masked self-attention through `LlamaConfig.attention`'s kernel and the output projection.

    Args:
      q: ``[B, T, N, H]``; k, v: ``[B, S, K, H]``.
      q_slots: ``[T]`` int, index of each query in the sequence.
      k_slots: ``[S]`` int, index of each key.
      kv_mask: ``[B, S]`` 1 where the key is a real token.
      window_index: int scalar (may be traced), this layer's index into `LlamaConfig.windows`.
      query_chunk_size: on the ``xla`` path, compute the queries in chunks of this many
        (`ssapo_jax.models.attention.attention`); the fused kernels ignore it.

    Returns:
      ``[B, T, D]`` in the dtype of ``q``.
    """
    impl = resolve_implementation(self.config.attention, q.dtype)

    def attend_with(window):
      return lambda q, k, v: attention(
        q,
        k,
        v,
        q_slots=q_slots,
        k_slots=k_slots,
        kv_mask=kv_mask,
        window=window,
        implementation=impl,
        query_chunk_size=query_chunk_size,
      )

    return self._project_out(self._by_window(window_index, attend_with, q, k, v))

  def attend_cache(self, q, cache, layer_index, q_slots, kv_mask, window_index):
    """Attention of ``q [B, T, N, H]`` over layer ``layer_index`` of the stacked `KVCache`
    (``[L, B, K, S, H]``, holding the queries' own keys) and the output projection.

    `ssapo_jax.models.attention.cached_attention` whatever `LlamaConfig.attention` says (the
    fused kernels here need queries and keys of one sequence): only the blocks up to the last
    query's slot are read. Returns ``([B, T, D]`` in the dtype of ``q``, the cache): the cache
    threaded through the read, to be used instead of the argument (`cached_attention`).
    """

    def attend_with(window):
      return lambda q, keys, values: cached_attention(
        q, keys, values, layer=layer_index, q_slots=q_slots, kv_mask=kv_mask, window=window
      )

    out, keys, values = self._by_window(window_index, attend_with, q, *cache)
    return self._project_out(out), KVCache(keys, values)

  def _by_window(self, window_index, attend_with, *operands):
    """``attend_with(window)(*operands)`` for this layer's window (a ``lax.switch`` over the
    distinct windows of mixed sliding/full models; the window is static in each branch)."""
    branches = [attend_with(w) for w in self.config.windows]
    if len(branches) == 1:
      return branches[0](*operands)
    return jax.lax.switch(window_index, branches, *operands)

  def _project_out(self, out):
    """``[B, T, N, H]`` -> ``[B, T, D]`` through ``o_proj`` (and its bias)."""
    out = jnp.einsum("BTNH,NHD->BTD", out, self.o_proj[...].astype(out.dtype))
    if self.config.o_bias:
      out = out + self.o_bias[...].astype(out.dtype)
    return out


class MLP(nnx.Module):
  """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    pd = c.param_dtype
    self.gate_proj = _param(
      rngs.params(), _normal, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), pd
    )
    self.up_proj = _param(
      rngs.params(), _normal, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), pd
    )
    self.down_proj = _param(
      rngs.params(), _normal, (c.intermediate_size, c.hidden_size), ("mlp", "embed"), pd
    )
    self.bias = c.mlp_bias
    if c.mlp_bias:
      self.gate_bias = _param(rngs.params(), _zeros, (c.intermediate_size,), ("mlp",), pd)
      self.up_bias = _param(rngs.params(), _zeros, (c.intermediate_size,), ("mlp",), pd)
      self.down_bias = _param(rngs.params(), _zeros, (c.hidden_size,), ("embed",), pd)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    gate = jnp.einsum("BTD,DF->BTF", x, self.gate_proj[...].astype(dt))
    up = jnp.einsum("BTD,DF->BTF", x, self.up_proj[...].astype(dt))
    if self.bias:
      gate = gate + self.gate_bias[...].astype(dt)
      up = up + self.up_bias[...].astype(dt)
    out = jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, self.down_proj[...].astype(dt))
    if self.bias:
      out = out + self.down_bias[...].astype(dt)
    return out


# Prefill on the ``xla`` attention path computes this many queries at a time, so its float32
# scores are ``[B, heads, 128, P]`` rather than ``[B, heads, P, P + N]``. On CPU a 1024-token
# prefill's temporaries fell from 108 MB to 10 MB (2 rows, 4 heads); 256 left 27 MB.
PREFILL_QUERY_CHUNK = 128


class DecoderLayer(nnx.Module):
  """Pre-norm block: ``x + attn(norm(x))`` then ``h + mlp(norm(h))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    self.input_norm = RMSNorm(
      c.hidden_size, eps=c.rms_norm_eps, param_dtype=c.param_dtype, rngs=rngs
    )
    self.attn = Attention(c, rngs=rngs)
    self.post_attn_norm = RMSNorm(
      c.hidden_size, eps=c.rms_norm_eps, param_dtype=c.param_dtype, rngs=rngs
    )
    self.mlp = MLP(c, rngs=rngs)

  def __call__(
    self,
    x,
    cos,
    sin,
    q_slots,
    kv_mask,
    window_index,
    cache=None,
    cache_index=None,
    layer_index=None,
    prefill: bool = False,
  ):
    """One layer on x ``[B, T, D]``; ``window_index`` selects its `LlamaConfig.windows` entry.

    Without a cache, attention runs over the ``T`` tokens (``kv_mask [B, T]``). With ``cache``,
    the stacked `KVCache` of every layer (``[L, B, K, S, H]``), the new keys/values are first
    written into layer ``layer_index``'s slots ``cache_index .. cache_index + T - 1``
    (``kv_mask [B, S]``), then:

    * ``prefill`` (the cache holds nothing before ``cache_index`` = 0, static): attention runs
      over the ``T`` new tokens only, through `LlamaConfig.attention`'s kernel, with queries
      in chunks of `PREFILL_QUERY_CHUNK` on the ``xla`` path: no ``[B, heads, T, S]`` scores;
    * otherwise attention reads the layer's keys and values back from the written cache, block
      by block up to the last new slot (`Attention.attend_cache`). Writing before reading is
      what lets XLA update the cache carry in place: a slice read before the write keeps the
      old cache alive, and the compiled step copies it.

    Returns ``(y [B, T, D], cache)``: the updated `KVCache` (None without a cache).
    """
    q, k, v = self.attn.project_qkv(self.input_norm(x), cos, sin)
    if cache is None:
      out = self.attn.attend(q, k, v, q_slots, q_slots, kv_mask, window_index)
    else:
      k, v = k.astype(cache.keys.dtype), v.astype(cache.values.dtype)
      if q_slots.ndim == 2:  # each row at its own slots (`Llama.decode` with [B] cache_index)
        rows = jnp.arange(x.shape[0])[:, None]
        put = lambda c, x: c.at[layer_index, rows, :, q_slots, :].set(x, unique_indices=True)
      else:
        at = (layer_index, 0, 0, cache_index, 0)
        put = lambda c, x: jax.lax.dynamic_update_slice(c, jnp.swapaxes(x, 1, 2)[None], at)
      cache = KVCache(put(cache.keys, k), put(cache.values, v))
      if prefill:
        t = x.shape[1]
        out = self.attn.attend(
          q,
          k.astype(q.dtype),
          v.astype(q.dtype),
          q_slots,
          q_slots,
          kv_mask[:, :t],
          window_index,
          query_chunk_size=PREFILL_QUERY_CHUNK,
        )
      else:
        out, cache = self.attn.attend_cache(q, cache, layer_index, q_slots, kv_mask, window_index)
    h = x + out
    return h + self.mlp(self.post_attn_norm(h)), cache


_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Positions ``[B, T]`` int32: index among the real tokens, 0 on left padding.

  Matches transformers' ``generate`` (``cumsum(mask) - 1``, padding clipped), so left- and
  right-padded rows give the same positions to the same real tokens.
  """
  mask = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


class Llama(nnx.Module):
  """Llama-family causal LM.

  Parameters (logical axes): ``embedding [V, D] (vocab, embed)``; stacked over the ``L``
  layers, ``layers.attn.q_proj [L, D, N, H]``, ``layers.attn.k_proj``/``v_proj [L, D, K, H]``,
  ``layers.attn.o_proj [L, N, H, D]``, ``layers.mlp.gate_proj``/``up_proj [L, D, F]``,
  ``layers.mlp.down_proj [L, F, D]``, ``layers.input_norm.scale``/``post_attn_norm.scale
  [L, D]`` (the leading axis is ``layers``); ``final_norm.scale [D] (norm)``;
  ``lm_head [V, D] (vocab, embed)`` unless embeddings are tied.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.embedding = _param(
      rngs.params(), _normal, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype
    )

    @nnx.split_rngs(splits=c.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked_layers(rngs):
      return DecoderLayer(c, rngs=rngs)

    self.layers = stacked_layers(rngs)
    self.final_norm = RMSNorm(
      c.hidden_size, eps=c.rms_norm_eps, param_dtype=c.param_dtype, rngs=rngs
    )
    if not c.tie_word_embeddings:
      self.lm_head = _param(
        rngs.params(), _normal, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype
      )

  @property
  def dtype(self):
    """The compute dtype (``config.dtype``) as a numpy dtype."""
    return jnp.dtype(self.config.dtype)

  def unembedding(self) -> jax.Array:
    """The LM head matrix ``[V, D]`` (the embedding when tied), parameter dtype."""
    return (self.embedding if self.config.tie_word_embeddings else self.lm_head)[...]

  def _run_layers(
    self,
    x,
    cos,
    sin,
    q_slots,
    kv_mask,
    cache=None,
    cache_index=None,
    prefill: bool = False,
    layer_transform: LayerTransform | None = None,
  ):
    """The layer stack in one ``lax.scan`` (or, with ``scan_layers`` off, a Python loop over
    the stacked parameters); returns ``(final-normed x, new cache or None)``.

    ``layer_transform`` (cacheless only) rewrites each layer's parameters inside the layer body,
    under its own ``jax.checkpoint``: the rewritten weights are recomputed in the backward pass
    instead of being saved per layer, whatever the remat policy.
    """
    c = self.config
    graphdef, stacked = nnx.split(self.layers)
    window_indices = jnp.asarray(c.window_indices())
    if layer_transform is not None and cache is not None:
      raise ValueError("a layer_transform applies to the cacheless forward only")
    transform = inputs = None
    if layer_transform is not None:  # the static part only: the inputs come in per layer
      transform = jax.checkpoint(layer_transform.replace(inputs={}).apply)
      inputs = layer_transform.inputs

    def layer(params, layer_inputs, x, window_index, cache=None, layer_index=None):
      if transform is not None:
        params = transform(params, layer_inputs)
      return nnx.merge(graphdef, params)(
        x, cos, sin, q_slots, kv_mask, window_index, cache, cache_index, layer_index, prefill
      )

    if not c.scan_layers:  # the same layers, unrolled: row i of every stacked parameter
      row = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
      run = layer
      if cache is None and c.remat != "none":
        run = jax.checkpoint(layer, policy=_POLICIES[c.remat], prevent_cse=False)
      cache = None if cache is None else KVCache(*cache)
      for i in range(c.num_layers):
        index = jnp.asarray(i, jnp.int32)
        if cache is None:
          x = run(row(stacked, i), row(inputs, i), x, window_indices[i])[0]
        else:
          x, cache = run(row(stacked, i), None, x, window_indices[i], cache, index)
      return self.final_norm(x), cache

    if cache is None:

      def body(x, xs):
        params, window_index, layer_inputs = xs
        return layer(params, layer_inputs, x, window_index)[0], None

      if c.remat != "none":
        body = jax.checkpoint(body, policy=_POLICIES[c.remat], prevent_cse=False)
      x, _ = jax.lax.scan(body, x, (stacked, window_indices, inputs))
      return self.final_norm(x), None

    # The whole cache rides in the carry; each layer writes its new tokens into it in place
    # (`DecoderLayer`), so a step moves the new tokens plus one read of each layer's slice.
    def cached_body(carry, xs):
      x, cache = carry
      params, window_index, i = xs
      return layer(params, None, x, window_index, cache, i), None

    xs = (stacked, window_indices, jnp.arange(c.num_layers))
    (x, cache), _ = jax.lax.scan(cached_body, (x, KVCache(*cache)), xs)
    return self.final_norm(x), cache

  def hidden_states(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array | None = None,
    *,
    layer_transform: LayerTransform | None = None,
  ) -> jax.Array:
    """Final (normed) hidden states ``[B, T, D]`` in the compute dtype; ``layer_transform``
    rewrites each layer's parameters inside the layer scan (`LayerTransform`)."""
    _check_ids(input_ids, attention_mask)
    if positions is None:
      positions = positions_from_mask(attention_mask)
    x = self.embedding[...].astype(self.dtype)[input_ids]
    cos, sin = _rope_cos_sin(self.config, positions, self.dtype)
    q_slots = jnp.arange(input_ids.shape[1])
    with jax.named_scope("decoder"):
      h, _ = self._run_layers(x, cos, sin, q_slots, attention_mask, layer_transform=layer_transform)
    return h

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array | None = None,
    *,
    layer_transform: LayerTransform | None = None,
  ) -> jax.Array:
    """Logits ``[B, T, V]`` (compute dtype) for ``input_ids [B, T]`` int32.

    ``attention_mask [B, T]`` is 1 on real tokens; rows may be left- or right-padded.
    ``positions [B, T]`` default to `positions_from_mask`. ``layer_transform``: see
    `hidden_states`.
    """
    h = self.hidden_states(input_ids, attention_mask, positions, layer_transform=layer_transform)
    return jnp.einsum("BTD,VD->BTV", h, self.unembedding().astype(h.dtype))

  def sequence_logps(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    loss_mask: jax.Array,
    *,
    average: bool = False,
    positions: jax.Array | None = None,
    vocab_chunk_size: int | None = None,
  ) -> jax.Array:
    """Per-sequence log-probability ``[B]`` float32 without float32 ``[B, T, V]`` logits.

    Sums (or, with ``average``, averages) ``log p(input_ids[:, t] | input_ids[:, :t])`` over
    ``t`` with ``loss_mask[:, t] == 1`` (``loss_mask[:, 0]`` is ignored). Equals
    ``ssapo_jax.losses.sequence_logps(model(...)[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])``.
    The LM head, logsumexp and gather run in a rematerialised scan over vocabulary chunks of
    ``vocab_chunk_size`` (default: ``min(V, 8192)``), so at most ``[B, T, chunk]`` logits live.
    """
    mask = loss_mask[:, 1:].astype(jnp.float32)
    token_logps = self.token_logps(
      input_ids, attention_mask, positions=positions, vocab_chunk_size=vocab_chunk_size
    )
    total = jnp.sum(token_logps * mask, axis=-1)
    if average:
      return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return total

  def token_logps(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    positions: jax.Array | None = None,
    vocab_chunk_size: int | None = None,
    log_sum_sq: bool = False,
    layer_transform: LayerTransform | None = None,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``log p(input_ids[:, t + 1] | input_ids[:, :t + 1])`` as ``[B, T − 1]`` float32.

    With ``log_sum_sq``, also ``log Σ_v p_v²`` of each position's next-token distribution
    (``[B, T − 1]``, WPO's alignment term), from the same chunked pass (`chunked_token_logps`).
    """
    h = self.hidden_states(input_ids, attention_mask, positions, layer_transform=layer_transform)[
      :, :-1
    ]
    return chunked_token_logps(
      h,
      self.unembedding(),
      input_ids[:, 1:],
      vocab_chunk_size=vocab_chunk_size,
      log_sum_sq=log_sum_sq,
    )

  # ---- KV-cache decoding

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """Zero cache for ``max_length`` slots: keys and values ``[L, B, K, S, H]``."""
    c = self.config
    shape = (c.num_layers, batch_size, c.num_kv_heads, max_length, c.head_dim)
    dtype = self.dtype if dtype is None else dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  def decode(
    self,
    input_ids: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    *,
    cache_index: jax.Array | int,
    kv_mask: jax.Array,
  ) -> tuple[jax.Array, KVCache]:
    """Runs ``input_ids [B, T]`` against the cache and returns ``(logits [B, T, V], cache)``.

    The tokens are written at cache slots ``cache_index .. cache_index + T - 1``: the same for
    all rows (an int scalar; prompts left-padded), or each row's own (``cache_index [B]``,
    rows that started at different times, as the sampler's refill runs them).
    ``positions [B, T]`` are their RoPE positions and ``kv_mask [B, S]`` marks valid slots
    (including the new ones). Numerics equal the full forward (same masks, same dtypes), and
    a row's do not depend on the other rows (nor on whether the slots are shared); dynamic
    RoPE uses the longest position of this call, as transformers' cached decoding does.
    Attention against the cache reads only the slots up to the last new one, whatever
    `LlamaConfig.attention` says (`Attention.attend_cache`), so a step's attention costs the
    filled length, not the allocated ``S``.
    """
    x = self.embedding[...].astype(self.dtype)[input_ids]
    cos, sin = _rope_cos_sin(self.config, positions, self.dtype)
    cache_index = jnp.asarray(cache_index)
    q_slots = cache_index[..., None] + jnp.arange(input_ids.shape[1])  # [T] or [B, T]
    h, cache = self._run_layers(x, cos, sin, q_slots, kv_mask, cache, cache_index)
    logits = jnp.einsum("BTD,VD->BTV", h, self.unembedding().astype(h.dtype))
    return logits, cache

  def prefill(
    self, input_ids: jax.Array, positions: jax.Array, cache: KVCache, *, kv_mask: jax.Array
  ) -> tuple[jax.Array, KVCache]:
    """Writes left-padded prompts into an empty cache; returns ``(logits [B, V], cache)``.

    ``input_ids [B, P]`` go to slots ``0 .. P - 1``; ``positions [B, P]`` are their RoPE
    positions and ``kv_mask [B, S]`` marks valid slots (the prompt's real tokens). Equals
    `decode` at ``cache_index=0`` with its logits at the last position, without the waste:
    attention runs over the prompt only, through the configured kernel (chunked queries on the
    ``xla`` path, see `DecoderLayer`), and only the last position goes through the LM head.
    """
    x = self.embedding[...].astype(self.dtype)[input_ids]
    cos, sin = _rope_cos_sin(self.config, positions, self.dtype)
    q_slots = jnp.arange(input_ids.shape[1])
    h, cache = self._run_layers(x, cos, sin, q_slots, kv_mask, cache, 0, prefill=True)
    logits = jnp.einsum("BD,VD->BV", h[:, -1], self.unembedding().astype(h.dtype))
    return logits, cache


def _check_ids(input_ids, attention_mask):
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
  if attention_mask.shape != input_ids.shape:
    raise ValueError(
      f"attention_mask shape {attention_mask.shape} must equal input_ids shape {input_ids.shape}"
    )


def chunked_token_logps(
  hidden: jax.Array,
  unembedding: jax.Array,
  labels: jax.Array,
  *,
  vocab_chunk_size: int | None = None,
  log_sum_sq: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """``log softmax(hidden @ unembedding.T)[labels]`` ``[B, T]`` float32, chunked over V.

  Args:
    hidden: ``[B, T, D]`` final hidden states (compute dtype).
    unembedding: ``[V, D]`` LM head.
    labels: ``[B, T]`` int token ids.
    vocab_chunk_size: chunk width; the vocabulary is zero-padded to a multiple of it.
    log_sum_sq: also return ``log Σ_v p_v²`` ``[B, T]`` (no gradient), as a second output.

  An online logsumexp runs in a ``lax.scan`` whose body is rematerialised, so neither the
  forward nor the backward pass holds more than ``[B, T, chunk]`` logits. A vocabulary that
  fits one chunk (``V <= vocab_chunk_size``, by default ``V <= 8192``: small models) is one
  plain pass instead, whose backward reuses the forward's logits (no recomputation).
  """
  vocab, dim = unembedding.shape
  chunk = min(vocab, 8192) if vocab_chunk_size is None else int(vocab_chunk_size)
  if chunk <= 0:
    raise ValueError(f"vocab_chunk_size must be positive, got {vocab_chunk_size}")
  num_chunks = -(-vocab // chunk)
  if num_chunks == 1:  # the whole vocabulary in one chunk: no scan, nothing recomputed
    logits = jnp.einsum(
      "BTD,VD->BTV", hidden, unembedding.astype(hidden.dtype), preferred_element_type=jnp.float32
    )
    logits = logits.astype(hidden.dtype).astype(jnp.float32)  # round like the full forward
    lse = jax.nn.logsumexp(logits, axis=-1)
    token_logps = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0] - lse
    if not log_sum_sq:
      return token_logps
    log_p = jax.lax.stop_gradient(logits - lse[..., None])
    return token_logps, jax.nn.logsumexp(2 * log_p, axis=-1)
  pad = num_chunks * chunk - vocab
  w = unembedding.astype(hidden.dtype)
  if pad:
    w = jnp.concatenate([w, jnp.zeros((pad, dim), w.dtype)], axis=0)
  w = w.reshape(num_chunks, chunk, dim)
  b, t = labels.shape
  neg = jnp.full((b, t), -jnp.inf, jnp.float32)

  @jax.checkpoint
  def body(carry, xs):
    run_max, run_sum, run_sum_sq, label_logit = carry
    w_c, start = xs
    logits = jnp.einsum("BTD,CD->BTC", hidden, w_c, preferred_element_type=jnp.float32)
    logits = logits.astype(hidden.dtype).astype(jnp.float32)  # round like the full forward
    ids = start + jnp.arange(chunk)
    logits = jnp.where(ids < vocab, logits, -jnp.inf)
    new_max = jnp.maximum(run_max, jnp.max(logits, axis=-1))
    run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.sum(
      jnp.exp(logits - new_max[..., None]), axis=-1
    )
    if log_sum_sq:  # Σ exp(2 (x − max)), rescaled like run_sum
      run_sum_sq = run_sum_sq * jnp.exp(2 * (run_max - new_max)) + jnp.sum(
        jnp.exp(2 * (logits - new_max[..., None])), axis=-1
      )
    local = labels - start
    in_chunk = (local >= 0) & (local < chunk)
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[..., None], axis=-1)[..., 0]
    label_logit = jnp.where(in_chunk, picked, label_logit)
    return (new_max, run_sum, run_sum_sq, label_logit), None

  starts = jnp.arange(num_chunks) * chunk
  zeros = jnp.zeros((b, t), jnp.float32)
  (run_max, run_sum, run_sum_sq, label_logit), _ = jax.lax.scan(
    body, (neg, zeros, zeros, zeros), (w, starts)
  )
  token_logps = label_logit - (run_max + jnp.log(run_sum))
  if not log_sum_sq:
    return token_logps
  # log Σ p² = log Σ exp(2(x − max)) − 2 log Σ exp(x − max).
  return token_logps, jax.lax.stop_gradient(jnp.log(run_sum_sq) - 2 * jnp.log(run_sum))


# ----------------------------------------------------------------------------- HF names

HF_GLOBAL_TENSORS = (
  ("model.embed_tokens.weight", "embedding", "identity"),
  ("model.norm.weight", "final_norm.scale", "identity"),
  ("lm_head.weight", "lm_head", "identity"),
)

# HF suffix after ``model.layers.{i}.`` -> our suffix after ``layers.`` (row i of the stack).
HF_LAYER_TENSORS = (
  ("input_layernorm.weight", "input_norm.scale", "identity"),
  ("post_attention_layernorm.weight", "post_attn_norm.scale", "identity"),
  ("self_attn.q_proj.weight", "attn.q_proj", "in_heads"),
  ("self_attn.k_proj.weight", "attn.k_proj", "in_heads"),
  ("self_attn.v_proj.weight", "attn.v_proj", "in_heads"),
  ("self_attn.o_proj.weight", "attn.o_proj", "out_heads"),
  ("self_attn.q_proj.bias", "attn.q_bias", "reshape"),
  ("self_attn.k_proj.bias", "attn.k_bias", "reshape"),
  ("self_attn.v_proj.bias", "attn.v_bias", "reshape"),
  ("self_attn.o_proj.bias", "attn.o_bias", "reshape"),
  ("mlp.gate_proj.weight", "mlp.gate_proj", "transpose"),
  ("mlp.up_proj.weight", "mlp.up_proj", "transpose"),
  ("mlp.down_proj.weight", "mlp.down_proj", "transpose"),
  ("mlp.gate_proj.bias", "mlp.gate_bias", "reshape"),
  ("mlp.up_proj.bias", "mlp.up_bias", "reshape"),
  ("mlp.down_proj.bias", "mlp.down_bias", "reshape"),
)


register_family(
  SUPPORTED_MODEL_TYPES,
  ModelFamily("llama", LlamaConfig, Llama, HF_GLOBAL_TENSORS, HF_LAYER_TENSORS),
)
