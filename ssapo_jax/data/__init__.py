"""Data for SSAPO: sources, validation, tokenisation, batching, seed/pools, round outputs.

See docs/data.md. Public entry points: `load_preferences`, `load_prompts`,
`tokenize_pairs`, `PreferenceLoader`, `split_rows`, `save_round`.
"""

from ssapo_jax.data.config import DataConfig
from ssapo_jax.data.loader import LoaderCursor, LoaderIterator, PreferenceLoader
from ssapo_jax.data.rounds_io import RoundCard, load_round, save_round
from ssapo_jax.data.seed import (
  SplitManifest,
  exclude_prompts,
  farthest_point_sampling,
  last_token_embeddings,
  load_manifest,
  prompt_key,
  save_manifest,
  select_rows,
  split_rows,
)
from ssapo_jax.data.sources import detect_format, load_preferences, load_prompts, read_rows
from ssapo_jax.data.tokenize import (
  PAIR_EXTRAS,
  left_pad,
  pairs_from_token_ids,
  strip_response,
  tokenize_pairs,
  tokenize_prompts,
  truncate_prompt,
  with_pair_columns,
)
from ssapo_jax.data.validate import (
  REASONS,
  DataValidationError,
  PreferencePair,
  PromptRecord,
  Records,
  ValidationReport,
)

__all__ = [
  "DataConfig",
  "DataValidationError",
  "LoaderCursor",
  "LoaderIterator",
  "PAIR_EXTRAS",
  "PreferenceLoader",
  "PreferencePair",
  "PromptRecord",
  "REASONS",
  "Records",
  "RoundCard",
  "SplitManifest",
  "ValidationReport",
  "detect_format",
  "exclude_prompts",
  "farthest_point_sampling",
  "last_token_embeddings",
  "left_pad",
  "load_manifest",
  "load_preferences",
  "load_prompts",
  "load_round",
  "pairs_from_token_ids",
  "prompt_key",
  "read_rows",
  "save_manifest",
  "save_round",
  "select_rows",
  "split_rows",
  "strip_response",
  "tokenize_pairs",
  "tokenize_prompts",
  "truncate_prompt",
  "with_pair_columns",
]
