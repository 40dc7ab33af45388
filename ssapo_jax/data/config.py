"""`DataConfig`: the data section of the experiment config."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

from ssapo_jax.config import check_choices
from ssapo_jax.data import validate as V
from ssapo_jax.data.seed import SeedMethod
from ssapo_jax.data.tokenize import OnTruncation, TruncationMode
from ssapo_jax.fielddocs import document_fields


@document_fields
@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the data comes from and how it becomes batches (paper defaults)."""

  # File, dir, datasets or tfds: name.
  source: str = "argilla/ultrafeedback-binarized-preferences-cleaned"
  prompt_source: str | None = None  # Unlabelled prompts; None = the prompts of `source`.
  eval_source: str | None = None  # Held-out eval prompts; None = rows left after seed and pools.
  split: str = "train"  # Split of datasets/tfds sources.
  data_dir: str | None = None  # tfds data directory.
  format: Literal["auto", "ultrafeedback", "plain"] = "auto"  # Pair format; auto detects it.
  prompt_column: str = "prompt"  # Column names in the source.
  chosen_column: str = "chosen"  # column of the chosen response
  rejected_column: str = "rejected"  # column of the rejected response
  policy: str | Mapping[str, str] = "error"  # error | skip | {reason: error|skip, default: ...}.
  # Inserted first in every prompt; "" for zephyr, None for Llama.
  system_message: str | None = None
  max_length: int = 2048  # Longest prompt + response, tokens.
  max_prompt_length: int = 1024  # Longest prompt, tokens.
  # Of the prompt: keep_end | keep_start (TRL's names).
  truncation_mode: TruncationMode = "keep_end"
  on_truncation: OnTruncation = "truncate"  # Responses cut by max_length: truncate | skip | error.
  bucket_size: int = 64  # Padded sequence length is a multiple of this.
  bucket_window: int = 1  # Global batches per length-sorting window (1 = off).
  packing: bool = False  # Pack sequences whole into rows of pack_length (train and scoring).
  # Tokens per packed row; None = max_length rounded up to bucket_size.
  pack_length: int | None = None
  seed_method: SeedMethod = "random"  # random | farthest_point (appendix G.2).
  seed_size: int | float = 2000  # Labelled seed: count, or fraction of all rows.
  pool_sizes: tuple[int | float, ...] = (8000, 20000, 30000)  # Per-round prompt pools.
  split_seed: int = 42  # Shuffle seed of the seed/pool split (authors: 42).
  cache_dir: str | None = None  # Tokenised-seed cache; None = <output_dir>/cache.

  def __post_init__(self):
    check_choices(self, "data")
    try:
      V.resolve_policy(self.policy)
    except ValueError as e:
      raise ValueError(f"data.policy: {e}") from None
    for name in ("prompt_column", "chosen_column", "rejected_column", "source", "split"):
      if not isinstance(getattr(self, name), str) or not getattr(self, name):
        raise ValueError(f"data.{name} must be a non-empty string, got {getattr(self, name)!r}")
    if not 0 < self.max_prompt_length < self.max_length:
      raise ValueError(
        f"data.max_prompt_length must be in (0, max_length={self.max_length}), "
        f"got {self.max_prompt_length}"
      )
    for name in ("bucket_size", "bucket_window"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"data.{name} must be an int >= 1, got {getattr(self, name)!r}")
    if not isinstance(self.packing, bool):
      raise ValueError(f"data.packing must be true or false, got {self.packing!r}")
    if self.pack_length is not None and (
      not isinstance(self.pack_length, int) or self.pack_length < self.max_length
    ):
      raise ValueError(
        f"data.pack_length must be an int >= data.max_length={self.max_length} "
        f"(a packed row holds any sequence), got {self.pack_length!r}"
      )
    sizes = [("seed_size", self.seed_size)] + [
      (f"pool_sizes[{i}]", s) for i, s in enumerate(self.pool_sizes)
    ]
    for name, s in sizes:
      ok = (isinstance(s, int) and not isinstance(s, bool) and s >= 0) or (
        isinstance(s, float) and 0.0 < s <= 1.0
      )
      if not ok:
        raise ValueError(f"data.{name} must be a count >= 0 or a fraction in (0, 1], got {s!r}")
    if not isinstance(self.pool_sizes, tuple):
      object.__setattr__(self, "pool_sizes", tuple(self.pool_sizes))

  @property
  def resolved_pack_length(self) -> int:
    """Tokens per packed row: ``pack_length``, else ``max_length`` rounded up to ``bucket_size``."""
    if self.pack_length is not None:
      return self.pack_length
    return -(-self.max_length // self.bucket_size) * self.bucket_size
