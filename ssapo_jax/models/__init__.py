"""Causal LMs in Flax NNX: the `CausalLM` interface and family registry, the Llama family,
and Hugging Face checkpoint import/export."""

import logging


class _NoTorchNotice(logging.Filter):
  """Drops transformers' "PyTorch was not found" notice: torch is optional here by design.

  Installed before any module of this package imports transformers (only its tokenizers and
  configs are used), so the notice never looks like a broken install.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found")


logging.getLogger("transformers").addFilter(_NoTorchNotice())

from ssapo_jax.models.base import (
  CausalLM,
  CausalLMConfig,
  KVCache,
  LayerTransform,
  ModelFamily,
  build_model,
  family_for,
  logical_axes,
  register_family,
  split_params,
  supported_model_types,
)
from ssapo_jax.models.llama import Llama, LlamaConfig, chunked_token_logps, positions_from_mask
from ssapo_jax.models.params import CheckpointError, load_hf, save_hf
