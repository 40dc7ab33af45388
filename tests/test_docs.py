"""The documented examples run: code blocks the docs say are tested."""

from __future__ import annotations

import os
import re

from ssapo_jax.models import load_hf
from ssapo_jax.models.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_block(doc: str, heading: str) -> str:
  text = open(os.path.join(REPO, doc)).read()
  section = text[text.index(heading) :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_own_small_model_without_torch(tmp_path, monkeypatch):
  """docs/models.md: a random LlamaConfig plus a local tokenizer, saved with save_hf."""
  monkeypatch.chdir(tmp_path)
  exec(_python_block("docs/models.md", "## A small model of your own, without torch"), {})
  model = load_hf("runs/my_model")
  tokenizer = load_tokenizer("runs/my_model")
  assert model.config.vocab_size == len(tokenizer) and model.config.num_layers == 2
  assert tokenizer.apply_chat_template(
    [{"role": "user", "content": "sort 3 1 2"}], tokenize=False, add_generation_prompt=True
  )


def _config_keys(cls, prefix=""):
  """Every config key of a config dataclass (dotted), as the YAML loader accepts them."""
  import dataclasses

  from ssapo_jax import config as cfg_lib

  for name, (_, tp) in cfg_lib._fields(cls).items():
    if dataclasses.is_dataclass(tp):
      yield from _config_keys(tp, f"{prefix}{name}.")
    else:
      yield prefix + name


def test_every_config_key_is_documented_with_its_reader():
  """docs/running.md: one table row per key, naming the component that reads it."""
  from ssapo_jax.experiment import ExperimentConfig

  text = open(os.path.join(REPO, "docs", "running.md")).read()
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 4 and cells[0].startswith("`") and cells[0].endswith("`"):
      rows[cells[0].strip("`")] = cells
  keys = list(_config_keys(ExperimentConfig))
  assert len(keys) > 60
  missing = [k for k in keys if k not in rows]
  assert not missing, missing
  assert all(rows[k][2] and "`" in rows[k][2] for k in keys)  # a named module or function
