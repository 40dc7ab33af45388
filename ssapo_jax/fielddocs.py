"""Field docs of config dataclasses from their source comments, for ``help()`` and the API docs.

The config sections document each field with a ``#`` comment (on the field's line, or the
comment lines right above it), which is also what ``docs/running.md`` quotes. Comments are
invisible to ``help()`` and to pdoc, so `document_fields` appends them to the class docstring
as an ``Attributes:`` section, one entry per field with its default.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize


def field_comments(cls) -> dict[str, str]:
  """``{field: comment}`` for a dataclass, from the ``#`` comments in its source.

  A field's comment is the block of comment lines directly above it joined with its trailing
  comment; fields without any comment are left out.
  """
  source = textwrap.dedent(inspect.getsource(cls))
  names = {f.name for f in dataclasses.fields(cls)}
  lines = source.splitlines()
  comments: dict[int, str] = {}  # line number (1-based) -> comment text
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip("#").strip()
  start = next(i for i, l in enumerate(lines) if l.lstrip().startswith("class "))
  body = min(len(l) - len(l.lstrip()) for l in lines[start + 1 :] if l.strip())  # body indent
  docs = {}
  for number, line in enumerate(lines, start=1):
    stripped = line.strip()
    name = stripped.split(":", 1)[0].strip()
    if name not in names or len(line) - len(line.lstrip()) != body or ":" not in stripped:
      continue
    above = []
    previous = number - 1
    while previous in comments and lines[previous - 1].strip().startswith("#"):
      above.insert(0, comments[previous])
      previous -= 1
    parts = above + ([comments[number]] if number in comments else [])
    if parts and name not in docs:
      docs[name] = " ".join(parts)
  return docs


def document_fields(cls):
  """Class decorator: appends an ``Attributes:`` section built from `field_comments`.

  Each entry reads ``name (default ...): comment``; a field without a comment gets
  ``(undocumented)``, which the API-reference test rejects.
  """
  docs = field_comments(cls)
  entries = []
  for field in dataclasses.fields(cls):
    if dataclasses.is_dataclass(field.default):
      default = f" (default: {type(field.default).__name__}'s defaults)"
    elif field.default is not dataclasses.MISSING:
      default = f" (default {field.default!r})"
    elif field.default_factory is not dataclasses.MISSING:
      default = " (default: built)"
    else:
      default = " (required)"
    text = docs.get(field.name, "(undocumented)")
    entries.append(
      textwrap.fill(
        f"{field.name}{default}: {text}", width=96, initial_indent="  ", subsequent_indent="    "
      )
    )
  base = inspect.cleandoc(cls.__doc__ or "")
  cls.__doc__ = base + "\n\nAttributes:\n" + "\n".join(entries) + "\n"
  return cls
