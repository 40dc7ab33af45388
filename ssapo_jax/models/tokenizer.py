"""Tokenizer helpers on top of ``transformers.AutoTokenizer``.

* `load_tokenizer` reads a tokenizer from a local model directory (no hub access).
* `chat_prompt_ids` applies the chat template with the generation prompt, optionally
  inserting a system message first (the paper inserts an empty one for zephyr).
* `build_word_tokenizer` builds a small word-level ``PreTrainedTokenizerFast`` with the
  ``tokenizers`` library and a zephyr-like Jinja chat template, and saves it with
  ``save_pretrained`` (the offline demo's tokenizer, and the tests').
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import transformers

from ssapo_jax.storage import local_copy

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Zephyr's template (alignment-handbook/zephyr-7b-sft-full) written for a word-level
# vocabulary: each message is `<|role|>` then its content then EOS; the generation prompt
# is `<|assistant|>`. Newlines in zephyr's template are dropped by the whitespace
# pre-tokenizer anyway.
ZEPHYR_LIKE_TEMPLATE = (
  "{% for message in messages %}"
  "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

Message = Mapping[str, str]


def load_tokenizer(path: str | os.PathLike, **kwargs: Any) -> transformers.PreTrainedTokenizerBase:
  """Loads a tokenizer from a local directory (``local_files_only``; never the hub), or from a
  ``gs://`` folder through this host's copy of it (`ssapo_jax.storage.local_copy`).

  A pad token is set to the EOS token when the tokenizer has none (Llama-style
  tokenizers), because batching needs one; the sequences are masked, so its id only fills
  padding.
  """
  path = local_copy(path)
  if not os.path.isdir(path):
    raise ValueError(
      f"tokenizer path {path!r} is not a directory; expected a local model "
      "directory containing tokenizer files"
    )
  tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
  if tok.pad_token_id is None and tok.eos_token is not None:
    tok.pad_token = tok.eos_token
  return tok


def _tokenizer_name(tokenizer) -> str:
  return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def as_messages(
  messages_or_prompt: str | Sequence[Message], *, system_message: str | None = None
) -> list[dict[str, str]]:
  """Normalises a prompt string or message list to a message list.

  A string becomes one user message. With ``system_message`` not None and no system
  message already first, ``{"role": "system", "content": system_message}`` is prepended
  (``system_message=""`` gives the empty system message the paper uses for zephyr).
  """
  if isinstance(messages_or_prompt, str):
    messages = [{"role": "user", "content": messages_or_prompt}]
  else:
    messages = [{"role": m["role"], "content": m["content"]} for m in messages_or_prompt]
  if system_message is not None and not (messages and messages[0]["role"] == "system"):
    messages.insert(0, {"role": "system", "content": system_message})
  return messages


def chat_prompt_text(
  tokenizer, messages_or_prompt: str | Sequence[Message], *, system_message: str | None = None
) -> str:
  """The chat-templated prompt text, ending with the generation prompt."""
  if getattr(tokenizer, "chat_template", None) is None:
    raise ValueError(
      f"tokenizer {_tokenizer_name(tokenizer)!r} has no chat template; set "
      "tokenizer.chat_template or use a tokenizer that defines one"
    )
  messages = as_messages(messages_or_prompt, system_message=system_message)
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _maybe_bos(tokenizer, ids: list[int], add_bos: bool | None) -> list[int]:
  bos = tokenizer.bos_token_id
  if add_bos is None:  # Add BOS unless the template already wrote it (Llama 3 does).
    add_bos = bos is not None and not (ids and ids[0] == bos)
  if add_bos:
    if bos is None:
      raise ValueError(
        f"add_bos=True but tokenizer {_tokenizer_name(tokenizer)!r} has no BOS token"
      )
    if not (ids and ids[0] == bos):
      ids = [bos] + ids
  return ids


def chat_prompt_ids(
  tokenizer,
  messages_or_prompt: str | Sequence[Message],
  *,
  system_message: str | None = None,
  add_bos: bool | None = None,
) -> list[int]:
  """Token ids of the chat-templated prompt with the generation prompt.

  Args:
    tokenizer: a ``transformers`` tokenizer with a chat template.
    messages_or_prompt: a prompt string (one user turn) or a list of
      ``{"role", "content"}`` messages.
    system_message: if not None, a system message inserted first (``""`` for zephyr).
    add_bos: prepend the BOS token; None (default) prepends it when the tokenizer has one
      and the template did not already start with it.

  Returns:
    A list of int token ids.
  """
  return chat_prompt_ids_batch(
    tokenizer, [messages_or_prompt], system_message=system_message, add_bos=add_bos
  )[0]


def encode_batch(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Token ids of ``texts`` without added special tokens, in one batched call.

  Fast tokenizers go straight to the Rust ``encode_batch`` (what ``tokenizer(texts)`` calls,
  without building Python encodings); slow ones use ``tokenizer(texts)``.
  """
  if not texts:
    return []
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
  return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def chat_prompt_ids_batch(
  tokenizer,
  prompts: Sequence[str | Sequence[Message]],
  *,
  system_message: str | None = None,
  add_bos: bool | None = None,
) -> list[list[int]]:
  """`chat_prompt_ids` for many prompts, tokenised in one batched (Rust) call."""
  texts = [chat_prompt_text(tokenizer, p, system_message=system_message) for p in prompts]
  return [_maybe_bos(tokenizer, x, add_bos) for x in encode_batch(tokenizer, texts)]


def response_ids_batch(
  tokenizer, responses: Sequence[str], *, add_eos: bool = True
) -> list[list[int]]:
  """Token ids of response texts (no special tokens added), each followed by EOS if asked."""
  ids = encode_batch(tokenizer, responses)
  eos = tokenizer.eos_token_id
  if add_eos and eos is None:
    raise ValueError(f"add_eos=True but tokenizer {_tokenizer_name(tokenizer)!r} has no EOS token")
  return [x + [eos] for x in ids] if add_eos else ids


def tokenizer_fingerprint(tokenizer) -> str:
  """A sha256 hex digest of the vocabulary, normaliser/pre-tokeniser, specials and template."""
  import hashlib
  import json

  h = hashlib.sha256()
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    h.update(backend.to_str().encode())
  else:
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
  h.update(str(getattr(tokenizer, "chat_template", None)).encode())
  specials = [
    tokenizer.bos_token_id,
    tokenizer.eos_token_id,
    tokenizer.pad_token_id,
    tokenizer.unk_token_id,
  ]
  h.update(json.dumps(specials).encode())
  return h.hexdigest()


def build_word_tokenizer(
  path: str | os.PathLike,
  words: Iterable[str],
  *,
  chat_template: str | None = ZEPHYR_LIKE_TEMPLATE,
  lowercase: bool = False,
  model_max_length: int = 4096,
) -> transformers.PreTrainedTokenizerFast:
  """Builds and saves a word-level tokenizer over ``words`` (the offline demo's and the tests').

  Vocabulary: ids 0-3 are ``<pad>``, ``<s>``, ``</s>``, ``<unk>``; then the role tokens
  ``<|system|>``, ``<|user|>``, ``<|assistant|>``; then ``words`` in first-seen order
  (duplicates dropped). Text is split on whitespace and punctuation (``\\w+|[^\\w\\s]+``);
  unknown words map to ``<unk>``. Decoding joins tokens with spaces.

  Args:
    path: directory to ``save_pretrained`` into (created).
    words: the vocabulary words.
    chat_template: a Jinja chat template (default: zephyr-like), or None for none.
    lowercase: lowercase text before splitting.
    model_max_length: recorded in the tokenizer config.

  Returns:
    The tokenizer (also reloadable with `load_tokenizer(path)`).
  """
  import tokenizers
  from tokenizers import decoders, models, normalizers, pre_tokenizers

  specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS]
  vocab: dict[str, int] = {}
  for w in [*specials, *words]:
    if not isinstance(w, str) or not w or any(c.isspace() for c in w):
      raise ValueError(f"vocabulary words must be non-empty strings without whitespace, got {w!r}")
    vocab.setdefault(w, len(vocab))
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
  if lowercase:
    tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # Joins with spaces.
  tok.add_special_tokens(
    [tokenizers.AddedToken(s, special=True, normalized=False) for s in specials]
  )
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token=BOS_TOKEN,
    eos_token=EOS_TOKEN,
    pad_token=PAD_TOKEN,
    unk_token=UNK_TOKEN,
    model_max_length=model_max_length,
    padding_side="right",
  )
  if chat_template is not None:
    fast.chat_template = chat_template
  os.makedirs(path, exist_ok=True)
  fast.save_pretrained(os.fspath(path))
  return fast
