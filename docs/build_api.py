"""Renders the API reference (HTML, pdoc) from the docstrings and checks that none is missing.

    python docs/build_api.py [OUTPUT_DIR]      # default: docs/api (not committed)

Why pdoc: it renders straight from the docstrings and type annotations with no configuration
file or extra source (mkdocs + mkdocstrings needs a site config and a Markdown stub per page),
it honours ``__all__``, and it reads Google-style ``Args:``/``Returns:`` sections, which is
how this package writes docstrings. It documents ``ssapo_jax`` (the public API, ``__all__``)
and the modules research code imports from: ``losses``, ``dro``, ``annotate``.

Exits 1, listing them, when a public name (in ``__all__`` or public in those modules), or a
public method or config field of a public class, has no docstring.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pathlib
import sys

MODULES = ("ssapo_jax", "ssapo_jax.losses", "ssapo_jax.dro", "ssapo_jax.annotate")


def _public_names(module) -> list[str]:
  names = getattr(module, "__all__", None)
  if names is None:
    names = [
      n
      for n, v in vars(module).items()
      if not n.startswith("_")
      and getattr(v, "__module__", None) == module.__name__
      and (inspect.isfunction(v) or inspect.isclass(v))
    ]
  return list(names)


def missing_docstrings() -> list[str]:
  """Public names (and their public methods and config fields) without documentation."""
  missing = []
  for module_name in MODULES:
    module = importlib.import_module(module_name)
    if not (module.__doc__ or "").strip():
      missing.append(module_name)
    for name in _public_names(module):
      obj = getattr(module, name)
      if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        continue  # constants (LOSS_TYPES, ...) are described by their module
      if not (inspect.getdoc(obj) or "").strip():
        missing.append(f"{module_name}.{name}")
      if not inspect.isclass(obj):
        continue
      for attr, value in vars(obj).items():
        if attr.startswith("_") or not (
          inspect.isfunction(value) or isinstance(value, (classmethod, staticmethod, property))
        ):
          continue
        func = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        if not (inspect.getdoc(func) or "").strip():
          missing.append(f"{module_name}.{name}.{attr}")
      if dataclasses.is_dataclass(obj) and obj.__name__.endswith("Config"):
        for line in (obj.__doc__ or "").splitlines():
          if "(undocumented)" in line:
            missing.append(f"{module_name}.{name}.{line.strip().split(' ')[0]}")
  return sorted(set(missing))


def build(output_dir: str) -> list[str]:
  """Renders the reference into ``output_dir``; returns the missing docstrings."""
  import pdoc  # the test extra

  import ssapo_jax

  for name in ssapo_jax.__all__:  # resolve the lazy names so pdoc sees plain attributes
    getattr(ssapo_jax, name)
  pdoc.render.configure(
    docformat="google", show_source=False, footer_text="ssapo_jax API reference"
  )
  pdoc.pdoc(*MODULES, output_directory=pathlib.Path(output_dir))
  return missing_docstrings()


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  out = argv[0] if argv else os.path.join(os.path.dirname(os.path.abspath(__file__)), "api")
  missing = build(out)
  if missing:
    print("missing docstrings:\n  " + "\n  ".join(missing), file=sys.stderr)
    return 1
  print(f"API reference: {os.path.join(out, 'ssapo_jax.html')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
