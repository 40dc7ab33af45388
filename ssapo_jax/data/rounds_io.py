"""Saving and reloading one round's self-annotated data.

A round directory holds ``data/`` (a `datasets` ``save_to_disk`` Arrow dataset, one row per
prompt), ``data.parquet`` (the same table, for tools outside Python's `datasets`), and
``card.json`` (round, models, settings, counts, column list).

Standard columns (all optional, aligned per prompt, ``k`` samples and ``K`` atoms):
``row`` (source row), ``prompt`` (message list), ``responses`` (``[k]`` texts),
``response_ids`` (``[k]`` token-id lists), ``rewards`` (``[k]`` implicit rewards),
``chosen_index`` / ``rejected_index``, ``chosen`` / ``rejected`` (texts), ``margins``,
``atom_weights`` / ``atom_shifts`` (``[K]``), ``weights``, ``ref_chosen_logps`` /
``ref_rejected_logps``. Other columns are accepted as given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

CARD_NAME = "card.json"
DATA_DIR = "data"
PARQUET_NAME = "data.parquet"


@dataclasses.dataclass(frozen=True)
class RoundCard:
  """What a round directory holds: round index, models, settings, counts, columns."""

  round: int
  models: dict
  settings: dict
  counts: dict
  columns: list
  created: str = ""


def _to_python(value: Any) -> Any:
  if isinstance(value, np.ndarray):
    return value.tolist()
  if hasattr(value, "__array__") and not isinstance(value, (list, tuple, str, bytes)):
    return np.asarray(value).tolist()  # jax arrays
  return list(value)


def save_round(
  path: str | os.PathLike,
  columns: Mapping[str, Any],
  *,
  round_index: int,
  models: Mapping[str, str] | None = None,
  settings: Mapping[str, Any] | None = None,
  counts: Mapping[str, int] | None = None,
  parquet: bool = True,
) -> RoundCard:
  """Writes a round's table and card to ``path`` (replacing an existing round there).

  Args:
    path: round directory.
    columns: name -> per-prompt values (lists or arrays with a leading ``[P]`` axis).
    round_index: the round number.
    models: e.g. ``{"policy": ..., "reference": ...}`` paths or names.
    settings: the settings that produced the round (JSON-serialisable).
    counts: extra counts (e.g. prompts sampled, pairs kept); ``num_rows`` is added.
    parquet: also write ``data.parquet``.

  Returns:
    The `RoundCard` written to ``card.json``.
  """
  import datasets

  path = os.fspath(path)
  data = {name: _to_python(v) for name, v in columns.items()}
  lengths = {name: len(v) for name, v in data.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"round columns have different lengths: {lengths}")
  if not data:
    raise ValueError("save_round needs at least one column")
  table = datasets.Dataset.from_dict(data)
  num_rows = next(iter(lengths.values()))
  card = RoundCard(
    round=int(round_index),
    models=dict(models or {}),
    settings=dict(settings or {}),
    counts={"num_rows": num_rows, **dict(counts or {})},
    columns=list(table.column_names),
    created=time.strftime("%Y-%m-%dT%H:%M:%S"),
  )
  json.dumps(dataclasses.asdict(card))  # Fail before writing anything if not serialisable.
  tmp = path + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  table.save_to_disk(os.path.join(tmp, DATA_DIR))
  if parquet:
    table.to_parquet(os.path.join(tmp, PARQUET_NAME))
  with open(os.path.join(tmp, CARD_NAME), "w") as f:
    json.dump(dataclasses.asdict(card), f, indent=2)
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)
  return card


def load_round(path: str | os.PathLike):
  """Reloads a round directory: ``(dataset, RoundCard)``."""
  import datasets

  path = os.fspath(path)
  card_path = os.path.join(path, CARD_NAME)
  if not os.path.isfile(card_path):
    raise ValueError(f"{path} is not a round directory: {CARD_NAME} is missing")
  with open(card_path) as f:
    card = RoundCard(**json.load(f))
  return datasets.load_from_disk(os.path.join(path, DATA_DIR)), card
