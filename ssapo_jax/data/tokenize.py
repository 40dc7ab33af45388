"""Tokenisation of pairs and prompts with the model's chat template.

A tokenised pair dataset (a `datasets.Dataset`) has one row per pair and the columns

* ``row`` int64: the source row index;
* ``prompt_ids``: chat-templated prompt (with the generation prompt, BOS when the tokenizer
  has one), after truncation to ``max_prompt_length``;
* ``chosen_ids`` / ``rejected_ids``: response tokens followed by EOS (EOS is lost when the
  response itself had to be truncated, as in TRL);
* ``prompt_truncated`` / ``response_truncated`` bool: what truncation did;
* optional per-pair columns: ``weights``, ``ref_chosen_logps``, ``ref_rejected_logps``
  (float32) and ``atom_weights``, ``atom_shifts`` (``[K]`` float32 lists).

The loader builds ``prompt + response`` sequences from it; the loss mask covers the response
tokens (EOS included).

Truncation (TRL-like): a prompt longer than ``max_prompt_length`` keeps its start
(``keep_start``) or its end (``keep_end``, TRL's default; a leading BOS is kept); then if
``prompt + longer response`` exceeds ``max_length`` both responses are cut to the room left.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from ssapo_jax.data import validate as V
from ssapo_jax.models import tokenizer as tk

TruncationMode = Literal["keep_start", "keep_end"]
OnTruncation = Literal["truncate", "skip", "error"]
TRUNCATION_MODES, ON_TRUNCATION = typing.get_args(TruncationMode), typing.get_args(OnTruncation)
PAIR_EXTRAS = ("weights", "ref_chosen_logps", "ref_rejected_logps", "atom_weights", "atom_shifts")


def truncate_prompt(
  ids: Sequence[int], *, max_prompt_length: int, truncation_mode: str, bos_id: int | None = None
) -> list[int]:
  """Cuts a prompt to ``max_prompt_length`` tokens, keeping its start or its end.

  With ``keep_end`` a leading ``bos_id`` stays in front of the kept tail.
  """
  ids = list(ids)
  if len(ids) <= max_prompt_length:
    return ids
  if truncation_mode == "keep_start":
    return ids[:max_prompt_length]
  if truncation_mode != "keep_end":
    raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
  if bos_id is not None and ids[0] == bos_id and max_prompt_length > 1:
    return [bos_id] + ids[len(ids) - (max_prompt_length - 1) :]
  return ids[len(ids) - max_prompt_length :]


def _check_lengths(max_length: int, max_prompt_length: int, truncation_mode: str):
  if not 0 < max_prompt_length < max_length:
    raise ValueError(
      f"need 0 < max_prompt_length < max_length, got max_prompt_length="
      f"{max_prompt_length}, max_length={max_length}"
    )
  if truncation_mode not in TRUNCATION_MODES:
    raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")


def _truncate_pairs(
  prompts, chosens, rejecteds, *, max_length, max_prompt_length, truncation_mode, bos_id
):
  out_p, out_c, out_r, p_trunc, r_trunc = [], [], [], [], []
  for p, c, r in zip(prompts, chosens, rejecteds):
    p2 = truncate_prompt(
      p, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode, bos_id=bos_id
    )
    room = max_length - len(p2)
    out_p.append(p2)
    out_c.append(list(c[:room]))
    out_r.append(list(r[:room]))
    p_trunc.append(len(p2) < len(p))
    r_trunc.append(len(c) > room or len(r) > room)
  return out_p, out_c, out_r, p_trunc, r_trunc


def _check_extras(extras: Mapping[str, Any] | None, n: int) -> dict[str, np.ndarray]:
  out = {}
  for name, value in (extras or {}).items():
    if name not in PAIR_EXTRAS:
      raise ValueError(f"unknown pair column {name!r}; expected one of {PAIR_EXTRAS}")
    arr = np.asarray(value, np.float32)
    want = 2 if name.startswith("atom_") else 1
    if arr.ndim != want or arr.shape[0] != n:
      raise ValueError(
        f"pair column {name!r} has shape {arr.shape}; expected "
        f"{'[N, K]' if want == 2 else '[N]'} with N = {n}"
      )
    out[name] = arr
  if ("atom_weights" in out) != ("atom_shifts" in out):
    raise ValueError("atom_weights and atom_shifts must be given together")
  if "atom_weights" in out and out["atom_weights"].shape != out["atom_shifts"].shape:
    raise ValueError(
      f"atom_weights {out['atom_weights'].shape} and atom_shifts "
      f"{out['atom_shifts'].shape} must have the same shape"
    )
  return out


def _build_dataset(
  rows,
  prompts,
  chosens,
  rejecteds,
  p_trunc,
  r_trunc,
  extras,
  *,
  on_truncation: str,
  source: str,
  verbose: bool,
):
  import datasets

  if on_truncation not in ON_TRUNCATION:
    raise ValueError(f"on_truncation must be one of {ON_TRUNCATION}, got {on_truncation!r}")
  keep = np.ones(len(rows), bool)
  if on_truncation != "truncate":
    for i, t in enumerate(r_trunc):
      if t:
        if on_truncation == "error":
          raise V.DataValidationError(
            source, int(rows[i]), "chosen/rejected", V.TOO_LONG, "response does not fit max_length"
          )
        keep[i] = False
  idx = np.flatnonzero(keep)
  pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
  data = {
    "row": np.asarray(rows, np.int64)[idx].tolist(),
    "prompt_ids": pick(prompts),
    "chosen_ids": pick(chosens),
    "rejected_ids": pick(rejecteds),
    "prompt_truncated": pick(p_trunc),
    "response_truncated": pick(r_trunc),
  }
  features = {
    "row": datasets.Value("int64"),
    "prompt_ids": datasets.Sequence(datasets.Value("int32")),
    "chosen_ids": datasets.Sequence(datasets.Value("int32")),
    "rejected_ids": datasets.Sequence(datasets.Value("int32")),
    "prompt_truncated": datasets.Value("bool"),
    "response_truncated": datasets.Value("bool"),
  }
  for name, arr in extras.items():
    data[name] = arr[idx].tolist()
    features[name] = (
      datasets.Sequence(datasets.Value("float32")) if arr.ndim == 2 else datasets.Value("float32")
    )
  ds = datasets.Dataset.from_dict(data, features=datasets.Features(features))
  counts = {
    "pairs": len(rows),
    "prompt_truncated": int(np.sum(p_trunc)),
    "response_truncated": int(np.sum(r_trunc)),
    "skipped": len(rows) - len(idx),
  }
  if verbose:
    _say_truncations(source, counts)
  return ds, counts


_COUNTS_FILE = "ssapo_truncations.json"  # beside a cached dataset: its truncation counts


def _say_truncations(source: str, counts: Mapping[str, int], cached: str | None = None) -> None:
  """The truncation summary of a tokenisation (`runrecord.say`)."""
  from ssapo_jax.runrecord import say

  where = f" (from cache {cached})" if cached else ""
  say(
    f"[ssapo_jax.data] {source}: tokenised {counts['pairs']} pairs{where}; prompt truncated "
    f"in {counts['prompt_truncated']}, responses truncated ({V.TOO_LONG}) in "
    f"{counts['response_truncated']}; skipped {counts['skipped']} ({V.TOO_LONG})"
  )


def _records_fingerprint(pairs) -> str:
  h = hashlib.sha256()
  for p in pairs:
    h.update(json.dumps([p.row, p.prompt, p.chosen, p.rejected], ensure_ascii=False).encode())
  return h.hexdigest()


def tokenize_pairs(
  pairs: Sequence[V.PreferencePair],
  tokenizer,
  *,
  max_length: int,
  max_prompt_length: int,
  truncation_mode: str = "keep_end",
  system_message: str | None = None,
  add_bos: bool | None = None,
  add_eos: bool = True,
  on_truncation: str = "truncate",
  extras: Mapping[str, Any] | None = None,
  cache_dir: str | None = None,
  batch_size: int = 1024,
  verbose: bool = True,
  source: str | None = None,
):
  """Tokenises preference pairs in batches into a pair dataset (module docstring).

  Args:
    pairs: `PreferencePair` records (e.g. from `load_preferences`).
    tokenizer: a ``transformers`` tokenizer with a chat template.
    max_length: longest ``prompt + response`` sequence.
    max_prompt_length: longest prompt (``< max_length``).
    truncation_mode: ``"keep_end"`` (TRL default) or ``"keep_start"`` of the prompt.
    system_message: if not None, a system message inserted first (``""`` for zephyr).
    add_bos: see `ssapo_jax.models.tokenizer.chat_prompt_ids`.
    add_eos: end each response with EOS (included in the loss mask).
    on_truncation: ``"truncate"`` (count and report), ``"skip"`` (drop and report) or
      ``"error"`` for pairs whose responses do not fit ``max_length``.
    extras: per-pair columns (`PAIR_EXTRAS`), arrays ``[N]`` or ``[N, K]`` aligned with ``pairs``.
    cache_dir: if set, the result is saved under a key of (records, tokenizer, options) and
      reloaded from there next time.
    batch_size: texts per batched tokenizer call.
    verbose: print the truncation summary (to the run's log inside `runrecord.run_log`).
    source: what the summary calls the pairs (default: their ``.source``, else "pairs").

  Returns:
    A `datasets.Dataset` with the columns of the module docstring.
  """
  import datasets

  _check_lengths(max_length, max_prompt_length, truncation_mode)
  source = source or getattr(pairs, "source", "") or "pairs"
  extras = _check_extras(extras, len(pairs))
  key = None
  if cache_dir is not None:
    h = hashlib.sha256()
    h.update(_records_fingerprint(pairs).encode())
    h.update(tk.tokenizer_fingerprint(tokenizer).encode())
    h.update(
      json.dumps(
        [
          max_length,
          max_prompt_length,
          truncation_mode,
          system_message,
          add_bos,
          add_eos,
          on_truncation,
        ]
      ).encode()
    )
    for name in sorted(extras):
      h.update(name.encode())
      h.update(np.ascontiguousarray(extras[name]).tobytes())
    key = os.path.join(cache_dir, f"pairs-{h.hexdigest()[:24]}")
    if os.path.isdir(key):
      ds = datasets.load_from_disk(key)
      counts_file = os.path.join(key, _COUNTS_FILE)
      if verbose and os.path.isfile(counts_file):  # a resumed run's log says them too
        with open(counts_file) as f:
          _say_truncations(source, json.load(f), cached=key)
      return ds
  prompts, chosens, rejecteds = [], [], []
  for start in range(0, len(pairs), batch_size):
    chunk = pairs[start : start + batch_size]
    prompts += tk.chat_prompt_ids_batch(
      tokenizer, [p.prompt for p in chunk], system_message=system_message, add_bos=add_bos
    )
    chosens += tk.response_ids_batch(tokenizer, [p.chosen for p in chunk], add_eos=add_eos)
    rejecteds += tk.response_ids_batch(tokenizer, [p.rejected for p in chunk], add_eos=add_eos)
  p, c, r, pt, rt = _truncate_pairs(
    prompts,
    chosens,
    rejecteds,
    max_length=max_length,
    max_prompt_length=max_prompt_length,
    truncation_mode=truncation_mode,
    bos_id=tokenizer.bos_token_id,
  )
  ds, counts = _build_dataset(
    [x.row for x in pairs],
    p,
    c,
    r,
    pt,
    rt,
    extras,
    on_truncation=on_truncation,
    source=source,
    verbose=verbose,
  )
  if key is not None:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".tmp-")
    ds.save_to_disk(tmp)
    with open(os.path.join(tmp, _COUNTS_FILE), "w") as f:
      json.dump(counts, f)
    try:
      os.rename(tmp, key)
    except OSError:  # Another process wrote it first.
      shutil.rmtree(tmp, ignore_errors=True)
    ds = datasets.load_from_disk(key)
  return ds


def tokenize_prompts(
  prompts: Sequence[V.PromptRecord | Sequence[Mapping[str, str]] | str],
  tokenizer,
  *,
  max_prompt_length: int,
  truncation_mode: str = "keep_end",
  system_message: str | None = None,
  add_bos: bool | None = None,
  batch_size: int = 1024,
  report: str | None = None,
) -> list[list[int]]:
  """Chat-templated prompt ids (with generation prompt) for sampling, truncated like pairs.

  With ``report`` (what the prompts are, e.g. ``"round 1 prompts"``) the number of prompts
  cut to ``max_prompt_length`` is said (`runrecord.say`: the run's log inside a run).
  """
  if max_prompt_length <= 0:
    raise ValueError(f"max_prompt_length must be > 0, got {max_prompt_length}")
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = [
      p.prompt if isinstance(p, V.PromptRecord) else p for p in prompts[start : start + batch_size]
    ]
    out += tk.chat_prompt_ids_batch(
      tokenizer, chunk, system_message=system_message, add_bos=add_bos
    )
  if report is not None:
    from ssapo_jax.runrecord import say

    cut = sum(len(x) > max_prompt_length for x in out)
    say(
      f"[ssapo_jax.data] {report}: {len(out)} prompts, truncated ({truncation_mode}) to "
      f"max_prompt_length={max_prompt_length} in {cut}"
    )
  return [
    truncate_prompt(
      x,
      max_prompt_length=max_prompt_length,
      truncation_mode=truncation_mode,
      bos_id=tokenizer.bos_token_id,
    )
    for x in out
  ]


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def fixed_size_batches(num_rows: int, batch_size: int) -> Iterator[tuple[list[int], int]]:
  """Row indices in batches of exactly ``batch_size``, so a jitted pass compiles once.

  Yields ``(indices, num_real)``: a short last batch repeats its last row; keep the first
  ``num_real`` results of each batch.
  """
  for start in range(0, num_rows, batch_size):
    chunk = list(range(start, min(start + batch_size, num_rows)))
    yield chunk + [chunk[-1]] * (batch_size - len(chunk)), len(chunk)


def left_pad(
  sequences: Sequence[Sequence[int]], *, pad_id: int, multiple: int = 1, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token sequences for the sampler.

  Returns:
    ``(prompt_ids [P, Tp] int32, prompt_mask [P, Tp] int32)`` with ``Tp`` the longest length
    rounded up to ``multiple`` (or ``length`` when given).
  """
  longest = max((len(s) for s in sequences), default=0)
  tp = length if length is not None else round_up(max(longest, 1), multiple)
  if longest > tp:
    raise ValueError(f"a sequence has {longest} tokens; longer than length={tp}")
  ids = np.full((len(sequences), tp), pad_id, np.int32)
  mask = np.zeros((len(sequences), tp), np.int32)
  for i, s in enumerate(sequences):
    if len(s):
      ids[i, tp - len(s) :] = s
      mask[i, tp - len(s) :] = 1
  return ids, mask


def strip_response(
  ids: Sequence[int], *, eos_id: int, length: int | None = None, add_eos: bool = True
) -> list[int]:
  """A generated response up to and including its first EOS.

  ``length`` (if given) is the number of generated tokens to keep instead. A response that
  has no EOS (cut at the token budget) gets one appended when ``add_eos`` (as re-tokenising
  the text, the authors' pipeline, would do).
  """
  ids = [int(x) for x in (ids if length is None else list(ids)[:length])]
  if length is None and eos_id in ids:
    ids = ids[: ids.index(eos_id) + 1]
  if add_eos and (not ids or ids[-1] != eos_id):
    ids.append(eos_id)
  return ids


def pairs_from_token_ids(
  prompt_ids: Sequence[Sequence[int]],
  chosen_response_ids: Sequence[Sequence[int]],
  rejected_response_ids: Sequence[Sequence[int]],
  *,
  eos_id: int,
  max_length: int,
  max_prompt_length: int,
  truncation_mode: str = "keep_end",
  bos_id: int | None = None,
  chosen_lengths: Sequence[int] | None = None,
  rejected_lengths: Sequence[int] | None = None,
  add_eos: bool = True,
  rows: Sequence[int] | None = None,
  extras: Mapping[str, Any] | None = None,
  on_truncation: str = "truncate",
  source: str = "generated",
  verbose: bool = True,
):
  """A pair dataset from token ids (after self-annotation), without re-tokenising text.

  Args:
    prompt_ids: per pair, the prompt's token ids without padding (as given to the sampler).
    chosen_response_ids, rejected_response_ids: generated ids per pair (padding after EOS is
      removed by `strip_response`; ``*_lengths`` give exact lengths instead).
    eos_id: EOS token id.
    max_length, max_prompt_length, truncation_mode: as in `tokenize_pairs`.
    bos_id: BOS id kept in front under ``keep_end`` truncation.
    add_eos: append EOS to responses that do not end with one.
    rows: source row per pair (default ``0..N-1``).
    extras: per-pair columns (`PAIR_EXTRAS`).
    on_truncation: as in `tokenize_pairs`.

  Returns:
    A pair `datasets.Dataset` in the format `tokenize_pairs` produces.
  """
  _check_lengths(max_length, max_prompt_length, truncation_mode)
  n = len(prompt_ids)
  if len(chosen_response_ids) != n or len(rejected_response_ids) != n:
    raise ValueError(
      f"prompt_ids has {n} rows but chosen_response_ids has "
      f"{len(chosen_response_ids)} and rejected_response_ids "
      f"{len(rejected_response_ids)}"
    )
  cl = [None] * n if chosen_lengths is None else list(chosen_lengths)
  rl = [None] * n if rejected_lengths is None else list(rejected_lengths)
  chosens = [
    strip_response(x, eos_id=eos_id, length=l, add_eos=add_eos)
    for x, l in zip(chosen_response_ids, cl)
  ]
  rejecteds = [
    strip_response(x, eos_id=eos_id, length=l, add_eos=add_eos)
    for x, l in zip(rejected_response_ids, rl)
  ]
  prompts = [[int(t) for t in p] for p in prompt_ids]
  p, c, r, pt, rt = _truncate_pairs(
    prompts,
    chosens,
    rejecteds,
    max_length=max_length,
    max_prompt_length=max_prompt_length,
    truncation_mode=truncation_mode,
    bos_id=bos_id,
  )
  rows = list(range(n)) if rows is None else [int(x) for x in rows]
  return _build_dataset(
    rows,
    p,
    c,
    r,
    pt,
    rt,
    _check_extras(extras, n),
    on_truncation=on_truncation,
    source=source,
    verbose=verbose,
  )[0]


def with_pair_columns(dataset, **columns):
  """Returns ``dataset`` with per-pair columns (`PAIR_EXTRAS`) added or replaced.

  E.g. ``with_pair_columns(ds, ref_chosen_logps=a, ref_rejected_logps=b)`` after computing
  reference log-probs once per round, or ``weights=N * p`` after the DRO step.
  """
  import datasets

  extras = _check_extras(columns, len(dataset))
  for name, arr in extras.items():
    if name in dataset.column_names:
      dataset = dataset.remove_columns(name)
    feature = (
      datasets.Sequence(datasets.Value("float32")) if arr.ndim == 2 else datasets.Value("float32")
    )
    dataset = dataset.add_column(name, arr.tolist(), feature=feature)
  return dataset
