"""The documented examples run: code blocks the docs say are tested."""

from __future__ import annotations

import os
import re

from ssapo_jax.models import load_hf
from ssapo_jax.models.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_block(doc: str, heading: str) -> str:
  text = open(os.path.join(REPO, doc)).read()
  section = text[text.index(heading):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_own_small_model_without_torch(tmp_path, monkeypatch):
  """docs/models.md: a random LlamaConfig plus a local tokenizer, saved with save_hf."""
  monkeypatch.chdir(tmp_path)
  exec(_python_block("docs/models.md", "## A small model of your own, without torch"), {})
  model = load_hf("runs/my_model")
  tokenizer = load_tokenizer("runs/my_model")
  assert model.config.vocab_size == len(tokenizer) and model.config.num_layers == 2
  assert tokenizer.apply_chat_template([{"role": "user", "content": "sort 3 1 2"}],
                                       tokenize=False, add_generation_prompt=True)
