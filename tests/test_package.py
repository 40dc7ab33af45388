"""The package surface: every lazily re-exported name resolves to the defining module's object."""

import importlib
import sys

import ssapo_jax


def test_lazy_names_resolve_to_their_modules():
  for name, module in ssapo_jax._LAZY.items():
    assert getattr(ssapo_jax, name) is getattr(importlib.import_module(module), name), name
    assert name in dir(ssapo_jax)


def test_pure_functions_do_not_import_heavy_dependencies():
  code = "import ssapo_jax, sys; print('transformers' in sys.modules or 'datasets' in sys.modules)"
  import subprocess
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
