"""examples/ run at tiny size, and the README's "Using the pure functions" snippet is the first
example verbatim."""

from __future__ import annotations

import pathlib
import re
import runpy

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _readme_snippet() -> str:
  text = (REPO / "README.md").read_text()
  section = text[text.index("## Using the pure functions") :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_is_the_first_example_verbatim():
  assert _readme_snippet() == (EXAMPLES / "01_pure_functions.py").read_text()


def test_pure_functions_example_runs(capsys):
  scope = runpy.run_path(str(EXAMPLES / "01_pure_functions.py"))
  out = capsys.readouterr().out
  assert out.startswith("dpo ") and "robust" in out
  atoms = scope["atoms"]
  assert atoms.weights.shape[0] == 8 and atoms.space == "probability"
  np.testing.assert_allclose(np.asarray(atoms.weights).sum(1), 1.0, rtol=1e-5)
  assert np.isfinite(float(scope["robust"])) and float(scope["robust"]) >= float(scope["loss"])


def test_research_loop_compiles_once_and_learns():
  example = runpy.run_path(str(EXAMPLES / "02_research_loop.py"))
  result = example["main"](
    steps=4, num_prompts=8, num_samples=3, prompt_len=4, response_len=4, vocab=16, dim=16
  )
  assert result["traces"] == 1 and result["compiles"] == 1
  # Step 1: policy = reference, so every reward is 0 and no pair is usable: the loss is 0.
  assert result["losses"][0] == 0.0
  assert all(np.isfinite(result["losses"])) and any(loss > 0 for loss in result["losses"][1:])


def test_sharded_train_step_example_runs_on_the_8_device_mesh():
  example = runpy.run_path(str(EXAMPLES / "03_sharded_train_step.py"))
  result = example["main"](steps=2, batch=8, seq_len=12, mesh_shape=(2, 2, 2))
  assert result["devices"] == 8 and len(result["losses"]) == 2
  # Robust loss at the initial policy: shifted atoms only raise it above log 2.
  assert result["losses"][0] >= np.log(2) - 1e-6 and np.all(np.isfinite(result["losses"]))
