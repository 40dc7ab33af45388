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

from ssapo_jax.models.base import CausalLM
from ssapo_jax.models.base import CausalLMConfig
from ssapo_jax.models.base import KVCache
from ssapo_jax.models.base import ModelFamily
from ssapo_jax.models.base import build_model
from ssapo_jax.models.base import family_for
from ssapo_jax.models.base import logical_axes
from ssapo_jax.models.base import register_family
from ssapo_jax.models.base import split_params
from ssapo_jax.models.base import supported_model_types
from ssapo_jax.models.llama import Llama
from ssapo_jax.models.llama import LlamaConfig
from ssapo_jax.models.llama import chunked_token_logps
from ssapo_jax.models.llama import positions_from_mask
from ssapo_jax.models.params import CheckpointError
from ssapo_jax.models.params import load_hf
from ssapo_jax.models.params import save_hf
