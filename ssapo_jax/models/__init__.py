"""Llama-family models in Flax NNX and Hugging Face checkpoint import/export."""

from ssapo_jax.models.llama import KVCache
from ssapo_jax.models.llama import Llama
from ssapo_jax.models.llama import LlamaConfig
from ssapo_jax.models.llama import chunked_token_logps
from ssapo_jax.models.llama import logical_axes
from ssapo_jax.models.llama import positions_from_mask
from ssapo_jax.models.params import CheckpointError
from ssapo_jax.models.params import load_hf
from ssapo_jax.models.params import save_hf
