"""Records, the validation error, and per-row normalisation with an error/skip policy.

Every input format is normalised to one record type before anything else happens:

* `PreferencePair`: ``prompt`` (list of ``{"role", "content"}`` messages, may start with a
  system message), ``chosen`` and ``rejected`` (assistant response texts), ``row`` (the
  row index in the source, for errors and manifests).
* `PromptRecord`: ``prompt`` and ``row``.

Problems found in a row raise `DataValidationError` naming the source, row and field, or are
skipped and counted when the policy for that reason is ``"skip"``. Nothing is dropped
silently: `ValidationReport` holds the counts and is printed.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ssapo_jax.errors import DataError

# Reasons a row can be rejected; each can be given its own policy.
MISSING_FIELD = "missing_field"  # Column absent or value None.
WRONG_TYPE = "wrong_type"  # E.g. a number where text or messages are expected.
EMPTY_TEXT = "empty_text"  # Empty or whitespace-only text.
IDENTICAL_RESPONSES = "identical_responses"  # chosen == rejected (after stripping).
UNKNOWN_ROLE = "unknown_role"  # Message role not system/user/assistant.
LAST_NOT_ASSISTANT = "last_not_assistant"  # Response message list not ending in assistant.
LAST_NOT_USER = "last_not_user"  # Prompt message list not ending in a user turn.
PROMPT_MISMATCH = "prompt_mismatch"  # chosen/rejected conversations differ before the reply.
INVALID_UTF8 = "invalid_utf8"  # Bytes that are not UTF-8 (or lone surrogates).
INVALID_JSON = "invalid_json"  # A jsonl line that is not a JSON object.
TOO_LONG = "too_long"  # Needed response truncation (see tokenize.py).
# The prompt of an earlier row again: dropped (counted) so that one prompt cannot land in two
# of seed, pools and held-out set; not a policy reason (``duplicates="keep"`` keeps them).
DUPLICATE_PROMPT = "duplicate_prompt"
REASONS = (
  MISSING_FIELD,
  WRONG_TYPE,
  EMPTY_TEXT,
  IDENTICAL_RESPONSES,
  UNKNOWN_ROLE,
  LAST_NOT_ASSISTANT,
  LAST_NOT_USER,
  PROMPT_MISMATCH,
  INVALID_UTF8,
  INVALID_JSON,
)
ROLES = ("system", "user", "assistant")
POLICIES = ("error", "skip")
FORMATS = ("auto", "ultrafeedback", "plain", "prompt")


class DataValidationError(DataError):
  """A bad row: ``source`` (file or dataset), ``row`` (index), ``field``, ``reason``."""

  def __init__(
    self, source: str, row: int | None, field: str | None, reason: str, detail: str = ""
  ):
    self.source, self.row, self.field, self.reason, self.detail = source, row, field, reason, detail
    # Rows count from 0 over the records (a jsonl file's non-blank lines): say so, since
    # editors number lines from 1.
    where = f"{source}: row {row} (0-based)" if row is not None else f"{source}"
    if field is not None:
      where += f", field {field!r}"
    super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))


class _RowProblem(Exception):
  def __init__(self, field: str | None, reason: str, detail: str = ""):
    super().__init__(reason)
    self.field, self.reason, self.detail = field, reason, detail


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """A labelled pair: prompt messages, chosen and rejected assistant texts, source row."""

  prompt: list[dict[str, str]]
  chosen: str
  rejected: str
  row: int


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """An unlabelled prompt (message list) and its source row."""

  prompt: list[dict[str, str]]
  row: int


@dataclasses.dataclass
class ValidationReport:
  """Counts of one validation pass; ``skipped`` maps reason -> number of rows.

  ``duplicate_prompts`` counts valid rows whose prompt an earlier valid row already had
  (dropped as ``skipped["duplicate_prompt"]`` unless kept), ``identical_rows`` those of them
  that repeat the earlier row entirely.
  """

  source: str
  num_rows: int = 0
  num_kept: int = 0
  skipped: Counter = dataclasses.field(default_factory=Counter)
  duplicate_prompts: int = 0
  identical_rows: int = 0

  def summary(self) -> str:
    parts = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
    dups = ""
    if self.duplicate_prompts:
      kept = "" if self.skipped.get(DUPLICATE_PROMPT) else ", kept"
      dups = (
        f"; {self.duplicate_prompts} rows repeat an earlier prompt "
        f"({self.identical_rows} identical rows{kept})"
      )
    return (
      f"[ssapo_jax.data] {self.source}: kept {self.num_kept} of {self.num_rows} rows; "
      f"skipped {sum(self.skipped.values())} ({parts}){dups}"
    )


class Records(list):
  """A list of records with the ``source`` name and the `ValidationReport` attached."""

  def __init__(self, items=(), *, source: str = "", report: ValidationReport | None = None):
    super().__init__(items)
    self.source = source
    self.report = report


def resolve_policy(policy: str | Mapping[str, str]) -> dict[str, str]:
  """``"error"``/``"skip"`` for all reasons, or a mapping reason -> policy (others: error).

  The mapping may hold ``"default"`` for reasons it does not name.
  """
  if isinstance(policy, str):
    if policy not in POLICIES:
      raise ValueError(f"policy must be one of {POLICIES} or a mapping, got {policy!r}")
    return {r: policy for r in REASONS}
  default = policy.get("default", "error")
  out = {}
  for key, value in policy.items():
    if key != "default" and key not in REASONS:
      raise ValueError(f"policy names unknown reason {key!r}; expected one of {REASONS}")
    if value not in POLICIES:
      raise ValueError(f"policy for {key!r} must be one of {POLICIES}, got {value!r}")
  if default not in POLICIES:
    raise ValueError(f"policy default must be one of {POLICIES}, got {default!r}")
  for r in REASONS:
    out[r] = policy.get(r, default)
  return out


def check_text(value: Any, field: str, *, allow_empty: bool = False) -> str:
  """Returns ``value`` as str, decoding UTF-8 bytes; raises a row problem otherwise."""
  if value is None:
    raise _RowProblem(field, MISSING_FIELD)
  if isinstance(value, (bytes, bytearray)) or type(value).__name__ == "bytes_":
    try:
      value = bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      raise _RowProblem(field, INVALID_UTF8, str(e)) from None
  if not isinstance(value, str):
    raise _RowProblem(field, WRONG_TYPE, f"expected text, found {type(value).__name__}")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:  # Lone surrogates from undecodable bytes or JSON escapes.
    raise _RowProblem(field, INVALID_UTF8, str(e)) from None
  if not allow_empty and not value.strip():
    raise _RowProblem(field, EMPTY_TEXT)
  return value


def check_messages(value: Any, field: str, *, last_role: str | None) -> list[dict[str, str]]:
  """Validates a message list (``[{"role", "content"}, ...]``; a tfds dict of columns works).

  System messages may be empty (zephyr's empty system prompt); others may not.
  """
  if value is None:
    raise _RowProblem(field, MISSING_FIELD)
  if isinstance(value, Mapping) and "role" in value and "content" in value:
    roles, contents = list(value["role"]), list(value["content"])  # tfds Sequence(dict).
    value = [{"role": r, "content": c} for r, c in zip(roles, contents)]
  if (
    isinstance(value, (str, bytes))
    or not isinstance(value, Sequence)
    and not hasattr(value, "tolist")
  ):
    raise _RowProblem(field, WRONG_TYPE, f"expected a message list, found {type(value).__name__}")
  value = list(value)
  if not value:
    raise _RowProblem(field, EMPTY_TEXT, "empty message list")
  out = []
  for j, m in enumerate(value):
    where = f"{field}[{j}]"
    if not isinstance(m, Mapping):
      raise _RowProblem(where, WRONG_TYPE, f"expected a message dict, found {type(m).__name__}")
    for key in ("role", "content"):
      if m.get(key) is None:
        raise _RowProblem(f"{where}.{key}", MISSING_FIELD)
    role = check_text(m["role"], f"{where}.role")
    if role not in ROLES:
      raise _RowProblem(f"{where}.role", UNKNOWN_ROLE, f"found {role!r}, expected one of {ROLES}")
    content = check_text(m["content"], f"{where}.content", allow_empty=role == "system")
    out.append({"role": role, "content": content})
  if last_role is not None and out[-1]["role"] != last_role:
    reason = LAST_NOT_ASSISTANT if last_role == "assistant" else LAST_NOT_USER
    raise _RowProblem(f"{field}[{len(out) - 1}].role", reason, f"found {out[-1]['role']!r}")
  return out


def _prompt_messages(value: Any, field: str) -> list[dict[str, str]]:
  if isinstance(value, (str, bytes, bytearray)) or type(value).__name__ == "bytes_":
    return [{"role": "user", "content": check_text(value, field)}]
  return check_messages(value, field, last_role="user")


def normalise_pair(
  row: Mapping[str, Any], index: int, fmt: str, columns: Mapping[str, str]
) -> PreferencePair:
  """One row -> `PreferencePair`; raises `_RowProblem` (field, reason) on a bad row."""
  pc, cc, rc = columns["prompt"], columns["chosen"], columns["rejected"]
  if fmt == "ultrafeedback":
    chosen = check_messages(row.get(cc), cc, last_role="assistant")
    rejected = check_messages(row.get(rc), rc, last_role="assistant")
    if chosen[:-1] != rejected[:-1]:
      raise _RowProblem(rc, PROMPT_MISMATCH, "chosen and rejected differ before the last message")
    if len(chosen) > 1:
      prompt = chosen[:-1]
      if prompt[-1]["role"] != "user":
        raise _RowProblem(
          f"{cc}[{len(chosen) - 2}].role", LAST_NOT_USER, f"found {prompt[-1]['role']!r}"
        )
    else:
      prompt = _prompt_messages(row.get(pc), pc)
    chosen_text, rejected_text = chosen[-1]["content"], rejected[-1]["content"]
  elif fmt == "plain":
    prompt = _prompt_messages(row.get(pc), pc)
    chosen_text = check_text(row.get(cc), cc)
    rejected_text = check_text(row.get(rc), rc)
  else:
    raise ValueError(
      f"format {fmt!r} is not a preference format; expected 'ultrafeedback' or 'plain'"
    )
  if chosen_text.strip() == rejected_text.strip():
    raise _RowProblem(rc, IDENTICAL_RESPONSES)
  return PreferencePair(prompt=prompt, chosen=chosen_text, rejected=rejected_text, row=index)


def normalise_prompt(
  row: Mapping[str, Any], index: int, columns: Mapping[str, str]
) -> PromptRecord:
  """One row -> `PromptRecord`; raises `_RowProblem` on a bad row."""
  pc = columns["prompt"]
  return PromptRecord(prompt=_prompt_messages(row.get(pc), pc), row=index)


def validate_rows(
  rows,
  *,
  source: str,
  kind: str,
  fmt: str,
  columns: Mapping[str, str],
  policy: str | Mapping[str, str] = "error",
  verbose: bool = True,
  duplicates: str = "drop",
) -> Records:
  """Normalises and validates ``rows`` (an iterable of ``(index, row dict or problem)``).

  A problem already found by the reader (``_RowProblem`` in place of the dict) goes through
  the same policy. Raises `DataValidationError` for a reason whose policy is ``"error"``.
  A row whose prompt (messages, stripped) an earlier valid row had is counted and, with
  ``duplicates="drop"`` (default), dropped, so a prompt is in one of seed, pools and
  held-out set; ``"keep"`` keeps it. The summary line goes to `runrecord.say` when verbose.
  """
  from ssapo_jax.data.seed import prompt_key  # one definition of "the same prompt"

  if duplicates not in ("drop", "keep"):
    raise ValueError(f"duplicates must be 'drop' or 'keep', got {duplicates!r}")
  policies = resolve_policy(policy)
  report = ValidationReport(source=source)
  seen: dict[tuple, object] = {}
  out = []
  for index, row in rows:
    report.num_rows += 1
    try:
      if isinstance(row, _RowProblem):
        raise row
      rec = (
        normalise_prompt(row, index, columns)
        if kind == "prompt"
        else normalise_pair(row, index, fmt, columns)
      )
    except _RowProblem as p:
      if policies[p.reason] == "error":
        raise DataValidationError(source, index, p.field, p.reason, p.detail) from None
      report.skipped[p.reason] += 1
      continue
    key = prompt_key(rec.prompt)
    first = seen.setdefault(key, rec)
    if first is not rec:
      report.duplicate_prompts += 1
      report.identical_rows += dataclasses.replace(first, row=rec.row) == rec
      if duplicates == "drop":
        report.skipped[DUPLICATE_PROMPT] += 1
        continue
    out.append(rec)
  report.num_kept = len(out)
  if verbose:
    from ssapo_jax.runrecord import say  # the run's log when inside one, else stdout

    say(report.summary())
  if not out:
    raise ValueError(f"{source}: no valid rows remain ({report.summary()})")
  return Records(out, source=source, report=report)
