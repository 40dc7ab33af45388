"""Reading preference and prompt sources: local files/directories, `datasets` names, tfds.

``source`` is one of:

* a local file: ``.jsonl``/``.json`` (``load_dataset("json")``), ``.parquet``, ``.arrow``,
  ``.csv``;
* a local directory: a ``save_to_disk`` directory (``load_from_disk``), a prepared tfds
  dataset directory (one holding ``dataset_info.json`` and ``features.json``), or any
  folder ``load_dataset`` understands;
* ``"tfds:<builder name>"`` (with ``data_dir``) or ``"tfds:<prepared directory>"``, read with
  ``tfds.data_source`` (array_record; no TensorFlow needed);
* otherwise a `datasets` name for ``load_dataset`` (needs the hub or its local cache).

A jsonl file whose bytes are not all UTF-8 is re-read line by line so the bad row is named.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from ssapo_jax.data import validate as V
from ssapo_jax.errors import DataError

_EXT_BUILDERS = {
  ".jsonl": "json",
  ".json": "json",
  ".parquet": "parquet",
  ".arrow": "arrow",
  ".csv": "csv",
}
DEFAULT_COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
COLUMN_KEYS = {
  "prompt": "data.prompt_column",
  "chosen": "data.chosen_column",
  "rejected": "data.rejected_column",
}  # the config keys that rename each column


def looks_like_path(source: str) -> bool:
  """True if ``source`` names a local file or directory rather than a `datasets`/tfds name."""
  return (
    source.startswith((".", "/", "~"))
    or os.path.isabs(source)
    or os.path.splitext(source)[1].lower() in _EXT_BUILDERS
  )


def check_source_exists(source: str | os.PathLike) -> None:
  """Raises `DataError` when a path-like ``source`` does not exist, cannot be read, or is an
  empty file or directory (no download is tried)."""
  source = os.fspath(source)
  if source.startswith("tfds:") or not looks_like_path(source):
    return
  path = os.path.expanduser(source)
  if not os.path.exists(path):
    raise DataError(f"{source}: no such file or directory")
  if not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
    raise DataError(f"{source}: not readable (permission denied)")
  if os.path.isdir(path) and not any(not name.startswith(".") for name in os.listdir(path)):
    raise DataError(f"{source}: empty directory (no data files)")
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    raise DataError(f"{source}: empty file (no rows)")


def _require_columns(name: str, column_names, columns: Mapping[str, str], roles) -> None:
  """Raises `DataValidationError` naming the available columns and the keys that rename them."""
  if not column_names:
    return  # unknown until the rows are read (e.g. a jsonl re-read line by line)
  missing = [r for r in roles if columns[r] not in column_names]
  if missing:
    names = ", ".join(repr(columns[r]) for r in missing)
    keys = " and ".join(f"{COLUMN_KEYS[r]}=<column>" for r in missing)
    raise V.DataValidationError(
      name,
      None,
      columns[missing[0]],
      V.MISSING_FIELD,
      f"no column {names}; the source has columns {list(column_names)}: set {keys}",
    )


def _is_tfds_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "dataset_info.json")) and os.path.isfile(
    os.path.join(path, "features.json")
  )


def _is_hf_disk_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(
    os.path.join(path, "dataset_dict.json")
  )


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
  """Line-by-line jsonl reader that reports undecodable or unparsable lines per row."""
  with open(path, "rb") as f:
    index = 0
    for line in f:
      if not line.strip():
        continue
      try:
        text = line.decode("utf-8")
      except UnicodeDecodeError:  # Keep bad bytes as lone surrogates: check_text names the field.
        text = line.decode("utf-8", errors="surrogateescape")
      try:
        row = json.loads(text)
      except json.JSONDecodeError as e:
        row = V._RowProblem(None, V.INVALID_JSON, str(e))
      else:
        if not isinstance(row, dict):
          row = V._RowProblem(
            None, V.INVALID_JSON, f"expected a JSON object, found {type(row).__name__}"
          )
      yield index, row
      index += 1


def _dataset_rows(ds) -> Iterator[tuple[int, dict]]:
  """Rows of a `datasets.Dataset`, read column-wise (much faster than row iteration).

  The columns are read here, eagerly, so decoding errors surface in `read_rows`.
  """
  names = list(ds.column_names)
  table = ds[:] if len(ds) else {n: [] for n in names}  # Decoded by the features (e.g. Json).
  cols = [table[n] for n in names]

  def rows():
    for i in range(len(ds)):
      yield i, {n: c[i] for n, c in zip(names, cols)}

  return rows()


def _tfds_rows(spec: str, *, split: str, data_dir: str | None) -> Iterator[tuple[int, dict]]:
  import tensorflow_datasets as tfds

  if os.path.isdir(spec):
    source = tfds.builder_from_directory(spec).as_data_source(split=split)
  else:
    source = tfds.data_source(spec, split=split, data_dir=data_dir)
  for i in range(len(source)):
    yield i, dict(source[i])


def read_rows(
  source: str | os.PathLike,
  *,
  split: str = "train",
  data_dir: str | None = None,
  cache_dir: str | None = None,
) -> tuple[str, Iterator[tuple[int, Any]], list[str]]:
  """Opens ``source``; returns ``(name, rows, column_names)``.

  ``rows`` yields ``(row_index, row_dict)``; a row the reader could not decode yields a row
  problem in place of the dict, for the validation policy to handle.
  """
  import datasets

  source = os.fspath(source)
  check_source_exists(source)
  if source.startswith("tfds:"):
    spec = source[len("tfds:") :]
    first, rows = _peek(_tfds_rows(spec, split=split, data_dir=data_dir))
    return source, rows, list(first or ())
  if os.path.isdir(source):
    if _is_hf_disk_dir(source):
      ds = datasets.load_from_disk(source)
      if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
          raise ValueError(f"{source}: split {split!r} not found; available: {list(ds)}")
        ds = ds[split]
    elif _is_tfds_dir(source):
      first, rows = _peek(_tfds_rows(source, split=split, data_dir=None))
      return source, rows, list(first or ())
    else:
      try:
        ds = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
      except Exception as e:  # noqa: BLE001 - EmptyDatasetError, no loader for the files, ...
        raise DataError(
          f"{source}: not a dataset directory `datasets` can read "
          f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    return source, _dataset_rows(ds), list(ds.column_names)
  if os.path.isfile(source):
    ext = os.path.splitext(source)[1].lower()
    if ext not in _EXT_BUILDERS:
      raise ValueError(
        f"{source}: unsupported file extension {ext!r}; expected one of {sorted(_EXT_BUILDERS)}"
      )
    try:
      ds = datasets.load_dataset(
        _EXT_BUILDERS[ext], data_files=source, split="train", cache_dir=cache_dir
      )
      return source, _dataset_rows(ds), list(ds.column_names)
    except Exception as e:  # noqa: BLE001 - undecodable bytes, bad JSON, mixed types...
      if ext == ".jsonl":  # Re-read line by line so the bad row is named.
        first, rows = _peek(_jsonl_rows(source))
        return source, rows, list(first or ())
      if isinstance(e, UnicodeDecodeError):
        raise V.DataValidationError(
          source, None, None, V.INVALID_UTF8, f"byte offset {e.start}"
        ) from None
      raise ValueError(f"{source}: could not be read as {_EXT_BUILDERS[ext]}: {e}") from e
  try:
    ds = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
  except Exception as e:  # noqa: BLE001 - not on the hub or in its cache, offline, bad name...
    raise DataError(
      f"{source}: no such file or directory, and `datasets` could not load it as "
      f"a dataset name ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    ) from None
  return source, _dataset_rows(ds), list(ds.column_names)


def detect_format(column_names, columns: Mapping[str, str], first_row: Mapping | None) -> str:
  """``ultrafeedback`` if chosen holds message lists, ``plain`` if text, ``prompt`` if absent."""
  cc = columns["chosen"]
  if cc not in column_names:
    return "prompt"
  value = None if first_row is None else first_row.get(cc)
  if isinstance(value, (list, tuple)) or (isinstance(value, Mapping) and "role" in value):
    return "ultrafeedback"
  return "plain"


def _columns(prompt_column, chosen_column, rejected_column) -> dict[str, str]:
  return {"prompt": prompt_column, "chosen": chosen_column, "rejected": rejected_column}


def _peek(rows):
  first = None
  buffered = []
  for item in rows:
    buffered.append(item)
    if isinstance(item[1], Mapping):
      first = item[1]
      break

  def chained():
    yield from buffered
    yield from rows

  return first, chained()


def load_preferences(
  source: str | os.PathLike,
  *,
  format: str = "auto",
  split: str = "train",
  data_dir: str | None = None,
  prompt_column: str = "prompt",
  chosen_column: str = "chosen",
  rejected_column: str = "rejected",
  policy: str | Mapping[str, str] = "error",
  cache_dir: str | None = None,
  verbose: bool = True,
  duplicates: str = "drop",
) -> V.Records:
  """Loads and validates labelled preference pairs.

  Args:
    source: local file or directory, ``"tfds:<name or dir>"``, or a `datasets` name.
    format: ``"auto"`` (detected from the first row), ``"ultrafeedback"`` (chosen/rejected
      are message lists ending in the assistant reply; the prompt is the conversation before
      it, or the prompt column when that is empty), or ``"plain"`` (prompt text or messages,
      chosen/rejected texts).
    split: split for `datasets`/tfds sources.
    data_dir: tfds data directory.
    prompt_column, chosen_column, rejected_column: column names in the source.
    policy: ``"error"`` (default), ``"skip"``, or a mapping reason -> policy (see
      `ssapo_jax.data.validate.REASONS`); skipped rows are counted and printed.
    cache_dir: `datasets` cache directory.
    verbose: print the validation summary.
    duplicates: ``"drop"`` (default) rows whose prompt an earlier row had, counted as
      ``duplicate_prompt`` in the report, or ``"keep"`` them (still counted).

  Returns:
    `Records` (a list) of `PreferencePair`, with ``.report`` and ``.source``.

  Raises:
    DataValidationError: a bad row whose reason has policy ``"error"``.
  """
  if format not in ("auto", "ultrafeedback", "plain"):
    raise ValueError(f"format must be 'auto', 'ultrafeedback' or 'plain', got {format!r}")
  columns = _columns(prompt_column, chosen_column, rejected_column)
  name, rows, column_names = read_rows(source, split=split, data_dir=data_dir, cache_dir=cache_dir)
  first, rows = _peek(rows)
  _require_columns(name, column_names, columns, ("chosen", "rejected"))
  fmt = detect_format(column_names, columns, first) if format == "auto" else format
  if fmt == "plain":  # ultrafeedback rows carry their prompt in the conversation
    _require_columns(name, column_names, columns, ("prompt",))
  return V.validate_rows(
    rows,
    source=name,
    kind="pair",
    fmt=fmt,
    columns=columns,
    policy=policy,
    verbose=verbose,
    duplicates=duplicates,
  )


def load_prompts(
  source: str | os.PathLike,
  *,
  split: str = "train",
  data_dir: str | None = None,
  prompt_column: str = "prompt",
  policy: str | Mapping[str, str] = "error",
  cache_dir: str | None = None,
  verbose: bool = True,
  duplicates: str = "drop",
) -> V.Records:
  """Loads and validates unlabelled prompts (text or message lists) -> `Records` of `PromptRecord`.

  Works on prompt-only sources and on preference sources (only the prompt column is read).
  Arguments as in `load_preferences`.
  """
  columns = _columns(prompt_column, "chosen", "rejected")
  name, rows, column_names = read_rows(source, split=split, data_dir=data_dir, cache_dir=cache_dir)
  _require_columns(name, column_names, columns, ("prompt",))
  return V.validate_rows(
    rows,
    source=name,
    kind="prompt",
    fmt="prompt",
    columns=columns,
    policy=policy,
    verbose=verbose,
    duplicates=duplicates,
  )
