"""Tiny offline worlds for tests and benchmarks (no hub downloads).

* `ssapo_jax.testing.tiny`: `write_tiny_model` (a random Llama in Hugging Face format with a
  word-level tokenizer) and `write_tiny_preferences` (a preference jsonl file): what a real run
  reads.
* `ssapo_jax.testing.hf_torch`: tiny random transformers PyTorch checkpoints to compare against;
  it needs torch (the test extra) and is imported only by tests and benchmarks.
"""

from ssapo_jax.testing.tiny import WORDS, write_tiny_model, write_tiny_preferences

__all__ = ["WORDS", "write_tiny_model", "write_tiny_preferences"]
