"""The package's layering: no import cycle, and no import from a lower floor to a higher one.

Every ``import`` of an ``ssapo_jax`` module (at module level or inside a function) is an edge.
A module may import modules on its own floor or below; the package root (the public facade)
is left out.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ssapo_jax")

# Floor of each module (by its longest matching prefix): the pure core and the run directory's
# plumbing, then models and data, the train step and sampler, the experiment schema and the
# tools built on it, the pipeline, and the entry points.
FLOORS = {
  "ssapo_jax.errors": 0,
  "ssapo_jax.config": 0,
  "ssapo_jax.rundir": 0,
  "ssapo_jax.metrics": 0,
  "ssapo_jax.runlock": 0,
  "ssapo_jax.runrecord": 0,
  "ssapo_jax.sharding": 0,
  "ssapo_jax.batch": 0,
  "ssapo_jax.losses": 0,
  "ssapo_jax.annotate": 0,
  "ssapo_jax.dro": 0,
  "ssapo_jax.checkpoint": 0,
  "ssapo_jax.fielddocs": 0,
  "ssapo_jax.compilation": 0,
  "ssapo_jax.storage": 0,
  "ssapo_jax.models": 1,
  "ssapo_jax.data": 1,
  "ssapo_jax.train": 2,
  "ssapo_jax.sampling": 2,
  "ssapo_jax.lora": 2,
  "ssapo_jax.experiment": 3,
  "ssapo_jax.plan": 3,
  "ssapo_jax.preflight": 3,
  "ssapo_jax.pipeline": 4,
  # What each phase holds on the chip: arithmetic over the config, shared by the run and the
  # plan (which sits below the pipeline), so it imports nothing.
  "ssapo_jax.pipeline.residency": 0,
  "ssapo_jax.cli": 5,
  "ssapo_jax.demo": 5,
  "ssapo_jax.testing": 5,
}


def _modules() -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path[:-3], os.path.dirname(PACKAGE)).replace(os.sep, ".")
        out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def import_graph() -> dict[str, set[str]]:
  """``module -> the ssapo_jax modules it imports`` (the package root left out)."""
  modules = _modules()
  graph = {m: set() for m in modules if m != "ssapo_jax"}
  for module in graph:
    for node in ast.walk(ast.parse(open(modules[module]).read())):
      targets = []
      if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [
          f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
          for a in node.names
        ]
      elif isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      graph[module] |= {t for t in targets if t in modules and t not in ("ssapo_jax", module)}
  return graph


def floor(module: str) -> int:
  prefixes = [p for p in FLOORS if module == p or module.startswith(p + ".")]
  if not prefixes:
    raise KeyError(f"{module} has no floor in tests/test_structure.py's FLOORS")
  return FLOORS[max(prefixes, key=len)]


def test_every_module_has_a_floor_and_imports_none_above_it():
  graph = import_graph()
  upward = sorted(
    f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
    for m, targets in graph.items()
    for t in targets
    if floor(t) > floor(m)
  )
  assert not upward, "\n".join(upward)


def test_no_import_cycle():
  graph = import_graph()
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for t in sorted(graph[m]):
      if state.get(t) == "open":
        cycles.append(stack[stack.index(t) :] + [t])
      elif t not in state:
        visit(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_can_fail(monkeypatch):
  """An upward edge and a cycle, planted, are found."""
  real = import_graph()
  planted = {m: set(t) for m, t in real.items()}
  planted["ssapo_jax.losses"].add("ssapo_jax.pipeline.run")
  monkeypatch.setitem(globals(), "import_graph", lambda: planted)
  with pytest.raises(AssertionError, match="ssapo_jax.losses .floor 0. imports"):
    test_every_module_has_a_floor_and_imports_none_above_it()
  with pytest.raises(AssertionError, match="ssapo_jax.losses"):
    test_no_import_cycle()
