"""What a real SSAPO run reads, tiny: a random-weight Llama in Hugging Face format with a
word-level tokenizer and chat template (`write_tiny_model`), and a preference jsonl file
(`write_tiny_preferences`)."""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from ssapo_jax.models import Llama, LlamaConfig, save_hf
from ssapo_jax.models.tokenizer import build_word_tokenizer

WORDS = tuple(f"w{i}" for i in range(48))


def write_tiny_model(
  path: str, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, words=WORDS
) -> str:
  """A random 2-layer Llama with the test tokenizer, saved in HF format at ``path``."""
  tokenizer = build_word_tokenizer(path, words)
  config = LlamaConfig(
    vocab_size=len(tokenizer),
    hidden_size=hidden_size,
    intermediate_size=2 * hidden_size,
    num_layers=num_layers,
    num_heads=4,
    num_kv_heads=2,
    head_dim=hidden_size // 4,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_ids=(tokenizer.eos_token_id,),
    pad_token_id=tokenizer.pad_token_id,
    max_position_embeddings=512,
  )
  save_hf(Llama(config, rngs=nnx.Rngs(seed)), path, tokenizer=tokenizer)
  return path


def write_tiny_preferences(path: str, num_rows: int, *, seed: int = 0, words=WORDS) -> str:
  """``num_rows`` plain-format preference rows (prompt, chosen, rejected) as jsonl; no two
  rows share a prompt."""
  rng = np.random.default_rng(seed)
  text = lambda n: " ".join(rng.choice(words, size=n))  # noqa: E731
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  prompts = set()
  with open(path, "w") as f:
    for _ in range(num_rows):
      prompt = text(int(rng.integers(2, 8)))
      while prompt in prompts:  # distinct prompts: loaders drop repeated ones
        prompt = text(int(rng.integers(2, 8)))
      prompts.add(prompt)
      chosen = text(int(rng.integers(2, 6)))
      rejected = text(int(rng.integers(2, 6)))
      while rejected == chosen:
        rejected = text(int(rng.integers(2, 6)))
      f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
  return path
