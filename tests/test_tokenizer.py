"""Tests for ssapo_jax.models.tokenizer: offline test tokenizer, chat templates, BOS/EOS."""

import os
import subprocess
import sys

import pytest

from ssapo_jax.models import tokenizer as tk

WORDS = "hello world how are you fine thanks . ? sort the digits".split()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  tk.build_word_tokenizer(path, WORDS)
  return path


def test_build_and_reload_roundtrip(tok_dir):
  tok = tk.load_tokenizer(tok_dir)
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
  assert tok.convert_tokens_to_ids(list(tk.ROLE_TOKENS)) == [4, 5, 6]
  ids = tok("hello world , you", add_special_tokens=False)["input_ids"]
  assert ids == [7, 8, 3, 11]  # "," is not in the vocabulary -> <unk>.
  assert tok.decode(tok("how are you ?", add_special_tokens=False)["input_ids"]) == "how are you ?"
  assert len(tok) == 7 + len(WORDS)


def test_chat_prompt_ids_matches_template_tokens(tok_dir):
  tok = tk.load_tokenizer(tok_dir)
  ids = tk.chat_prompt_ids(tok, "hello world")
  expected = ["<s>", "<|user|>", "hello", "world", "</s>", "<|assistant|>"]
  assert ids == tok.convert_tokens_to_ids(expected)
  # Independent reference: transformers' own tokenising apply_chat_template, plus BOS.
  ref = tok.apply_chat_template(
    [{"role": "user", "content": "hello world"}], tokenize=True, add_generation_prompt=True
  )
  ref = ref["input_ids"] if hasattr(ref, "keys") else ref
  assert ids == [tok.bos_token_id] + list(ref)


def test_system_message_inserted_empty_for_zephyr(tok_dir):
  tok = tk.load_tokenizer(tok_dir)
  ids = tk.chat_prompt_ids(tok, [{"role": "user", "content": "how are you"}], system_message="")
  assert tok.convert_ids_to_tokens(ids) == [
    "<s>",
    "<|system|>",
    "</s>",
    "<|user|>",
    "how",
    "are",
    "you",
    "</s>",
    "<|assistant|>",
  ]
  # An existing system message is kept, not duplicated.
  msgs = [{"role": "system", "content": "fine"}, {"role": "user", "content": "hello"}]
  ids2 = tk.chat_prompt_ids(tok, msgs, system_message="")
  assert tok.convert_ids_to_tokens(ids2)[:4] == ["<s>", "<|system|>", "fine", "</s>"]
  assert tk.chat_prompt_ids(tok, "hello", add_bos=False)[0] == tok.convert_tokens_to_ids("<|user|>")


def test_multi_turn_and_batch_equals_single(tok_dir):
  tok = tk.load_tokenizer(tok_dir)
  prompts = [
    "hello",
    [
      {"role": "user", "content": "hello"},
      {"role": "assistant", "content": "fine thanks"},
      {"role": "user", "content": "how are you ?"},
    ],
  ]
  batch = tk.chat_prompt_ids_batch(tok, prompts)
  assert batch == [tk.chat_prompt_ids(tok, p) for p in prompts]
  assert tok.convert_ids_to_tokens(batch[1]).count("</s>") == 3


def test_no_chat_template_error_names_path(tmp_path):
  path = tmp_path / "plain"
  tk.build_word_tokenizer(path, WORDS, chat_template=None)
  tok = tk.load_tokenizer(path)
  with pytest.raises(ValueError, match="has no chat template") as info:
    tk.chat_prompt_ids(tok, "hello")
  assert str(path) in str(info.value)


def test_response_ids_eos_and_fingerprint(tok_dir, tmp_path):
  tok = tk.load_tokenizer(tok_dir)
  assert tk.response_ids_batch(tok, ["fine thanks", "."]) == [[12, 13, 2], [14, 2]]
  assert tk.response_ids_batch(tok, ["fine"], add_eos=False) == [[12]]
  other = tk.build_word_tokenizer(tmp_path / "other", WORDS[::-1])
  assert tk.tokenizer_fingerprint(tok) == tk.tokenizer_fingerprint(tk.load_tokenizer(tok_dir))
  assert tk.tokenizer_fingerprint(tok) != tk.tokenizer_fingerprint(other)


def test_bad_words_and_missing_dir(tmp_path):
  with pytest.raises(ValueError, match="without whitespace"):
    tk.build_word_tokenizer(tmp_path / "x", ["two words"])
  with pytest.raises(ValueError, match="not a directory"):
    tk.load_tokenizer(tmp_path / "missing")


def test_encode_batch_matches_tokenizer_call(tok_dir):
  tok = tk.load_tokenizer(tok_dir)
  texts = ["hello world", "<|user|> how are you ? </s>", "", "unknown words here"]
  assert tk.encode_batch(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]


_HIDE_TORCH = """
import importlib.util, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] == 'torch' else find_spec(name, *a)
import {module}
"""


@pytest.mark.parametrize("module", ["transformers", "ssapo_jax.models.tokenizer"])
def test_no_pytorch_notice_when_torch_is_absent(module):
  """transformers prints a notice without torch; importing it through the package does not."""
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
  proc = subprocess.run(
    [sys.executable, "-c", _HIDE_TORCH.format(module=module)],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert ("PyTorch was not found" in proc.stderr) == (module == "transformers"), proc.stderr
