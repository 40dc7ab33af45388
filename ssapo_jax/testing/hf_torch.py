"""Tiny random transformers (PyTorch) checkpoints for tests and benchmarks (no hub downloads).

``save_tiny_hf(path, family)`` builds a 2-layer transformers PyTorch model with random weights,
``save_pretrained``s it into ``path`` and returns it (eval mode, float32), so tests can load the
same weights into `Llama` with `load_hf` and compare against the PyTorch reference.
Requires torch (the test extra): only tests and benchmarks import this module.
"""

from __future__ import annotations

import os

TINY = dict(
  vocab_size=128,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
  bos_token_id=1,
  eos_token_id=2,
  pad_token_id=0,
)

# family -> (transformers config class name, extra config fields)
FAMILIES = {
  "llama": ("LlamaConfig", {}),
  "llama_mqa_tied_bias": (
    "LlamaConfig",
    dict(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
  ),
  "llama3_rope": (
    "LlamaConfig",
    dict(
      rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8,
      )
    ),
  ),
  "llama_linear_rope": (
    "LlamaConfig",
    dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
  ),
  "llama_dynamic_rope": (
    "LlamaConfig",
    dict(
      max_position_embeddings=8,
      rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
    ),
  ),
  "mistral": ("MistralConfig", dict(sliding_window=4, head_dim=16)),
  "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
  "qwen2_sliding": (
    "Qwen2Config",
    dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
  ),
}


def tiny_hf_config(family: str = "llama", **overrides):
  """A transformers config of the tiny size for ``family`` (see `FAMILIES`)."""
  import transformers

  if family not in FAMILIES:
    raise ValueError(f"unknown tiny family {family!r}; known: {sorted(FAMILIES)}")
  cls_name, extra = FAMILIES[family]
  kwargs = {**TINY, **extra, **overrides}
  return getattr(transformers, cls_name)(**kwargs)


def save_tiny_hf(path: str | os.PathLike, family: str = "llama", *, seed: int = 0, **overrides):
  """Builds, saves (safetensors) and returns a tiny random transformers causal LM."""
  import torch
  import transformers

  config = tiny_hf_config(family, **overrides)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  # Random norm scales and biases too, so a transposed or skipped tensor cannot go unnoticed.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
  model = model.float().eval()
  model.save_pretrained(path)
  return model
