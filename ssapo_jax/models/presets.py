"""Architectures of well-known checkpoints, for planning and benchmarks without any weights.

Each entry equals ``LlamaConfig.from_hf`` of the named checkpoint's ``config.json`` (architecture
fields only; runtime dtypes and remat are set by the caller with ``dataclasses.replace``), so
``ssapo-plan`` and ``benchmarks/accelerator.py`` can build abstract or random models of the real
shapes on a machine that holds no checkpoint.
"""

from __future__ import annotations

from ssapo_jax.models.llama import LlamaConfig

_LLAMA3_ROPE = (
  ("factor", 32.0),
  ("high_freq_factor", 4.0),
  ("low_freq_factor", 1.0),
  ("original_max_position_embeddings", 8192),
  ("rope_type", "llama3"),
)

# name -> architecture (the checkpoint it mirrors in the comment).
PRESETS: dict[str, LlamaConfig] = {
  # mistralai/Mistral-7B-v0.1, alignment-handbook/zephyr-7b-sft-full
  "mistral-7b": LlamaConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    model_type="mistral",
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=32768,
    sliding_window=4096,
    layer_types=("sliding_attention",) * 32,
    bos_token_id=1,
    eos_token_ids=(2,),
  ),
  # meta-llama/Meta-Llama-3-8B-Instruct
  "llama3-8b": LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    model_type="llama",
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    bos_token_id=128000,
    eos_token_ids=(128001, 128009),
  ),
  # meta-llama/Llama-3.2-3B-Instruct
  "llama3.2-3b": LlamaConfig(
    vocab_size=128256,
    hidden_size=3072,
    intermediate_size=8192,
    num_layers=28,
    num_heads=24,
    num_kv_heads=8,
    head_dim=128,
    model_type="llama",
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=_LLAMA3_ROPE,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_ids=(128001, 128008, 128009),
  ),
  # meta-llama/Llama-3.2-1B-Instruct
  "llama3.2-1b": LlamaConfig(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    model_type="llama",
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=_LLAMA3_ROPE,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_ids=(128001, 128008, 128009),
  ),
}


def preset(name: str) -> LlamaConfig:
  """The architecture called ``name`` (a key of `PRESETS`); ValueError naming the known ones."""
  if name not in PRESETS:
    raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(PRESETS))}")
  return PRESETS[name]
