"""Tests for ssapo_jax.data: sources, validation, tokenisation, DataConfig, round IO.

Loader, seed/pool and farthest-point tests are in tests/test_data_loader.py.
"""

import json

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from ssapo_jax import data as D
from ssapo_jax.models import tokenizer as tk

datasets.disable_progress_bars()

WORDS = (
  "hello world how are you fine thanks . ? sort the digits one two three four five six "
  "seven eight nine zero please good bad answer is"
).split()


def uf_row(i, prompt="sort the digits", chosen="one two", rejected="two one"):
  """A row in the argilla UltraFeedback-binarized layout."""
  return {
    "source": "toy",
    "prompt": f"{prompt} {i}",
    "chosen": [
      {"role": "user", "content": f"{prompt} {i}"},
      {"role": "assistant", "content": chosen},
    ],
    "rejected": [
      {"role": "user", "content": f"{prompt} {i}"},
      {"role": "assistant", "content": rejected},
    ],
    "chosen-rating": 5.0,
    "rejected-rating": 1.0,
  }


def plain_row(i):
  return {"prompt": f"please sort {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}


def write_jsonl(path, rows):
  with open(path, "wb") as f:
    for r in rows:
      f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
  return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  tk.build_word_tokenizer(path, WORDS)
  return tk.load_tokenizer(path)


# ----------------------------------------------------------------------------- sources


def test_jsonl_plain(tmp_path):
  path = write_jsonl(tmp_path / "p.jsonl", [plain_row(i) for i in range(4)])
  recs = D.load_preferences(path)
  assert recs.source == path and recs.report.num_kept == 4
  assert recs[2] == D.PreferencePair(
    prompt=[{"role": "user", "content": "please sort 2"}],
    chosen="good answer 2",
    rejected="bad answer 2",
    row=2,
  )


def test_parquet_ultrafeedback_and_prompts(tmp_path):
  path = str(tmp_path / "uf.parquet")
  datasets.Dataset.from_list([uf_row(i) for i in range(5)]).to_parquet(path)
  recs = D.load_preferences(path)  # Format detected from the message lists.
  assert [r.row for r in recs] == list(range(5))
  assert recs[3].prompt == [{"role": "user", "content": "sort the digits 3"}]
  assert (recs[3].chosen, recs[3].rejected) == ("one two", "two one")
  prompts = D.load_prompts(path)  # A preference source used as a prompt pool.
  assert prompts[4] == D.PromptRecord(
    prompt=[{"role": "user", "content": "sort the digits 4"}], row=4
  )


def test_save_to_disk_dir_with_split_and_custom_columns(tmp_path):
  rows = [{"question": f"how are you {i}", "good": "fine", "bad": "bad"} for i in range(3)]
  dd = datasets.DatasetDict(
    {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
  )
  dd.save_to_disk(str(tmp_path / "disk"))
  recs = D.load_preferences(
    tmp_path / "disk",
    split="test",
    prompt_column="question",
    chosen_column="good",
    rejected_column="bad",
  )
  assert len(recs) == 1 and recs[0].chosen == "fine"
  with pytest.raises(ValueError, match="split 'dev' not found"):
    D.load_preferences(tmp_path / "disk", split="dev")


def test_prompt_only_jsonl_with_system_messages(tmp_path):
  rows = [
    {"prompt": "hello"},
    {"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": "how"}]},
  ]
  recs = D.load_prompts(write_jsonl(tmp_path / "q.jsonl", rows))
  assert recs[1].prompt[0] == {"role": "system", "content": ""}
  with pytest.raises(
    D.DataValidationError,
    match=r"no column 'chosen', 'rejected'; the source has columns \['prompt'\]",
  ):
    D.load_preferences(tmp_path / "q.jsonl")


def test_wrong_column_names_the_columns_and_the_config_keys(tmp_path):
  path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
  with pytest.raises(D.DataValidationError) as e:
    D.load_preferences(path, chosen_column="good")
  message = str(e.value)
  assert "no column 'rejected'" in message and "['question', 'good', 'bad']" in message
  assert "set data.rejected_column=<column>" in message and "load_prompts" not in message
  with pytest.raises(D.DataValidationError, match=r"no column 'prompt'.*set data.prompt_column="):
    D.load_preferences(path, chosen_column="good", rejected_column="bad")
  with pytest.raises(D.DataValidationError, match=r"no column 'prompt'.*set data.prompt_column="):
    D.load_prompts(path)
  recs = D.load_preferences(
    path, prompt_column="question", chosen_column="good", rejected_column="bad"
  )
  assert recs[0].prompt == [{"role": "user", "content": "q"}]


def test_missing_source_file_is_a_data_error(tmp_path):
  from ssapo_jax.errors import DataError

  for source in (tmp_path / "nope.jsonl", "relative/dir/prefs.jsonl", "./nope"):
    with pytest.raises(DataError, match="no such file or directory") as e:
      D.load_preferences(source)
    assert e.value.exit_code == 3
  with pytest.raises(DataError, match="nope.jsonl: no such file or directory"):
    D.load_prompts(tmp_path / "nope.jsonl")


def test_empty_or_unreadable_sources_are_data_errors(tmp_path):
  from ssapo_jax.errors import DataError

  (tmp_path / "empty_dir").mkdir()
  (tmp_path / "empty.jsonl").write_text("")
  (tmp_path / "odd_dir").mkdir()
  (tmp_path / "odd_dir" / "notes.bin").write_bytes(b"\x00\x01")
  cases = [
    (tmp_path / "empty_dir", "empty directory (no data files)"),
    (tmp_path / "empty.jsonl", "empty file (no rows)"),
    (tmp_path / "odd_dir", "not a dataset directory `datasets` can read"),
  ]
  for source, words in cases:
    for load in (D.load_preferences, D.load_prompts):
      with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load(str(source))


def test_duplicate_prompts_are_counted_and_dropped_by_default(tmp_path, capsys):
  rows = [
    plain_row(0),
    plain_row(1),
    plain_row(0),  # row 2 repeats row 0 entirely
    {**plain_row(1), "chosen": "another answer"},  # row 3: row 1's prompt, other pair
    plain_row(2),
  ]
  path = write_jsonl(tmp_path / "dups.jsonl", rows)
  recs = D.load_preferences(path)
  assert [r.row for r in recs] == [0, 1, 4]
  r = recs.report
  assert (r.num_rows, r.num_kept, r.duplicate_prompts, r.identical_rows) == (5, 3, 2, 1)
  assert dict(r.skipped) == {"duplicate_prompt": 2}
  assert (
    "kept 3 of 5 rows; skipped 2 (duplicate_prompt=2); 2 rows repeat an earlier prompt "
    "(1 identical rows)"
  ) in capsys.readouterr().out
  prompts = D.load_prompts(path, verbose=False)
  assert [p.row for p in prompts] == [0, 1, 4]
  kept = D.load_preferences(path, duplicates="keep", verbose=False)
  assert [p.row for p in kept] == [0, 1, 2, 3, 4] and kept.report.duplicate_prompts == 2
  # So a split of the records cannot put one prompt into two of seed, pools and held-out.
  split = D.split_rows([p.row for p in recs], seed_size=1, pool_sizes=(1,), seed=0)
  groups = [set(split.seed_rows), set(split.pool_rows[0]), set(split.rest_rows)]
  texts = [{json.dumps(rows[i]["prompt"]) for i in g} for g in groups]
  assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


def _tfds_builder_cls():
  import tensorflow_datasets as tfds

  class SsapoTinyPrefs(tfds.core.GeneratorBasedBuilder):
    """Tiny preference dataset for tests."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      text = tfds.features.Text()
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({"prompt": text, "chosen": text, "rejected": text}),
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        yield i, plain_row(i)

  return SsapoTinyPrefs


def test_tfds_data_source(tmp_path):
  builder = _tfds_builder_cls()(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  recs = D.load_preferences("tfds:ssapo_tiny_prefs", data_dir=str(tmp_path))
  got = sorted((r.prompt[0]["content"], r.chosen, r.rejected) for r in recs)
  want = sorted((r["prompt"], r["chosen"], r["rejected"]) for r in map(plain_row, range(6)))
  assert got == want  # tfds bytes were decoded; order is the data source's.
  again = D.load_preferences(f"tfds:{builder.data_dir}")  # A prepared directory.
  assert [r.chosen for r in again] == [r.chosen for r in recs]


# ----------------------------------------------------------------------------- validation

GOOD = plain_row(0)
BAD_CASES = [  # (row, format, field, reason)
  ({"prompt": "p", "chosen": "c"}, "plain", "rejected", "missing_field"),
  ({"prompt": "p", "chosen": 3, "rejected": "r"}, "plain", "chosen", "wrong_type"),
  ({"prompt": " \n\t", "chosen": "c", "rejected": "r"}, "plain", "prompt", "empty_text"),
  (
    {"prompt": "p", "chosen": "same", "rejected": "same "},
    "plain",
    "rejected",
    "identical_responses",
  ),
  (b'{"prompt": "p", "chosen": "c\xff\xfe", "rejected": "r"}\n', "plain", "chosen", "invalid_utf8"),
  (
    {**uf_row(0), "chosen": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
    "ultrafeedback",
    "chosen[1].role",
    "unknown_role",
  ),
  (
    {**uf_row(0), "rejected": [{"role": "user", "content": "x"}]},
    "ultrafeedback",
    "rejected[0].role",
    "last_not_assistant",
  ),
  (
    {**uf_row(0), "chosen": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
    "ultrafeedback",
    "chosen[1].content",
    "missing_field",
  ),
  ({**uf_row(0), "chosen": "text"}, "ultrafeedback", "chosen", "wrong_type"),
]


@pytest.mark.parametrize(
  "bad,fmt,field,reason", BAD_CASES, ids=[c[3] + "-" + c[2] for c in BAD_CASES]
)
def test_bad_row_error_names_row_and_field(tmp_path, bad, fmt, field, reason):
  good = GOOD if fmt == "plain" else uf_row(1)
  path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
  with pytest.raises(D.DataValidationError) as info:
    D.load_preferences(path, format=fmt)
  e = info.value
  assert (e.source, e.row, e.field, e.reason) == (path, 2, field, reason)
  assert path in str(e) and "row 2 (0-based)" in str(e)


def test_skip_policy_counts_and_prints(tmp_path, capsys):
  rows = [
    GOOD,
    BAD_CASES[0][0],
    GOOD,
    BAD_CASES[2][0],
    BAD_CASES[4][0],
    BAD_CASES[3][0],
    BAD_CASES[2][0],
    GOOD,
    b"{not json\n",
  ]
  path = write_jsonl(tmp_path / "mixed.jsonl", rows)
  recs = D.load_preferences(path, format="plain", policy="skip", duplicates="keep")
  assert [r.row for r in recs] == [0, 2, 7]
  assert dict(recs.report.skipped) == {
    "missing_field": 1,
    "empty_text": 2,
    "invalid_utf8": 1,
    "identical_responses": 1,
    "invalid_json": 1,
  }
  assert (recs.report.duplicate_prompts, recs.report.identical_rows) == (2, 2)  # rows 2 and 7
  out = capsys.readouterr().out
  assert "kept 3 of 9 rows; skipped 6" in out and "empty_text=2" in out
  assert "2 rows repeat an earlier prompt (2 identical rows, kept)" in out
  # Per-reason policy: skipping only empty text still errors on the first other problem.
  with pytest.raises(D.DataValidationError) as info:
    D.load_preferences(path, format="plain", policy={"empty_text": "skip"})
  assert (info.value.row, info.value.reason) == (1, "missing_field")
  with pytest.raises(ValueError, match="unknown reason"):
    D.load_preferences(path, policy={"nonsense": "skip"})


def test_prompt_mismatch_and_all_skipped(tmp_path):
  row = uf_row(0)
  row["rejected"][0]["content"] = "another prompt"
  path = write_jsonl(tmp_path / "m.jsonl", [row])
  with pytest.raises(D.DataValidationError, match="prompt_mismatch"):
    D.load_preferences(path)
  with pytest.raises(ValueError, match="no valid rows"):
    D.load_preferences(path, policy="skip", verbose=False)


# ----------------------------------------------------------------------------- tokenisation


def _pairs(prompt_words, chosen="good answer", rejected="bad answer is bad"):
  return [
    D.PreferencePair(
      prompt=[{"role": "user", "content": prompt_words}], chosen=chosen, rejected=rejected, row=7
    )
  ]


def _reference_full_ids(tok, prompt, response):
  """Independent reference: the whole conversation through transformers' chat template."""
  msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
  text = tok.apply_chat_template(msgs, tokenize=False)
  return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]


def test_masks_cover_exactly_the_response(tok):
  prompt = "please sort the digits three one two"
  ds = D.tokenize_pairs(_pairs(prompt), tok, max_length=64, max_prompt_length=32, verbose=False)
  loader = D.PreferenceLoader(
    ds, global_batch_size=1, bucket_size=8, pad_id=tok.pad_token_id, shuffle=False
  )
  batch = loader.batch_at(D.LoaderCursor(0, 0))
  for side, response in (("chosen", "good answer"), ("rejected", "bad answer is bad")):
    ref = _reference_full_ids(tok, prompt, response)
    ref_prompt = tk.chat_prompt_ids(tok, prompt)
    ids, mask = getattr(batch, f"{side}_ids")[0], getattr(batch, f"{side}_mask")[0]
    loss = getattr(batch, f"{side}_loss_mask")[0]
    n = len(ref)
    assert batch.seq_len % 8 == 0 and batch.seq_len >= n
    np.testing.assert_array_equal(ids[:n], ref)  # prompt + response + EOS.
    assert ids[n - 1] == tok.eos_token_id
    np.testing.assert_array_equal(mask, np.arange(batch.seq_len) < n)
    np.testing.assert_array_equal(
      loss, (np.arange(batch.seq_len) >= len(ref_prompt)) & (np.arange(batch.seq_len) < n)
    )
    assert np.all(ids[n:] == tok.pad_token_id)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_modes(tok, mode):
  prompt = "one two three four five six seven eight nine"
  full = tk.chat_prompt_ids(tok, prompt)  # <s> <|user|> one..nine </s> <|assistant|>
  ds = D.tokenize_pairs(
    _pairs(prompt), tok, max_length=9, max_prompt_length=5, truncation_mode=mode, verbose=False
  )
  p = ds[0]["prompt_ids"]
  want = full[:5] if mode == "keep_start" else [tok.bos_token_id] + full[-4:]
  assert p == want
  # Room left for responses: 9 - 5 = 4; "bad answer is bad" + EOS is 5 tokens -> cut, no EOS.
  assert ds[0]["chosen_ids"] == tok("good answer", add_special_tokens=False)["input_ids"] + [
    tok.eos_token_id
  ]
  assert ds[0]["rejected_ids"] == tok("bad answer is bad", add_special_tokens=False)["input_ids"]
  assert ds[0]["prompt_truncated"] and ds[0]["response_truncated"]
  loader = D.PreferenceLoader(ds, global_batch_size=1, bucket_size=4, shuffle=False, max_length=9)
  b = loader.batch_at(D.LoaderCursor())
  np.testing.assert_array_equal(b.rejected_loss_mask[0], [0] * 5 + [1] * 4 + [0] * 3)
  np.testing.assert_array_equal(b.chosen_loss_mask[0], [0] * 5 + [1] * 3 + [0] * 4)
  np.testing.assert_array_equal(b.rejected_ids[0, :5], want)


def test_on_truncation_policies_and_report(tok, capsys):
  pairs = _pairs("hello") + _pairs("hello world")
  pairs[1] = D.PreferencePair(pairs[1].prompt, "fine", "good", row=8)
  ds = D.tokenize_pairs(pairs, tok, max_length=8, max_prompt_length=5, on_truncation="skip")
  assert ds["row"] == [8]
  assert "responses truncated (too_long) in 1; skipped 1" in capsys.readouterr().out
  with pytest.raises(D.DataValidationError) as info:
    D.tokenize_pairs(pairs, tok, max_length=8, max_prompt_length=5, on_truncation="error")
  assert (info.value.row, info.value.reason) == (7, "too_long")
  with pytest.raises(ValueError, match="max_prompt_length < max_length"):
    D.tokenize_pairs(pairs, tok, max_length=8, max_prompt_length=8)


def test_system_message_and_cache(tok, tmp_path, capsys):
  pairs = _pairs("hello")
  ds = D.tokenize_pairs(
    pairs,
    tok,
    max_length=32,
    max_prompt_length=16,
    system_message="",
    cache_dir=str(tmp_path),
    verbose=False,
  )
  assert tok.convert_ids_to_tokens(ds[0]["prompt_ids"])[:3] == ["<s>", "<|system|>", "</s>"]
  again = D.tokenize_pairs(
    pairs, tok, max_length=32, max_prompt_length=16, system_message="", cache_dir=str(tmp_path)
  )
  assert "pairs (from cache" in capsys.readouterr().out
  assert again.to_dict() == ds.to_dict()
  other = D.tokenize_pairs(
    pairs, tok, max_length=32, max_prompt_length=16, cache_dir=str(tmp_path), verbose=False
  )
  assert other[0]["prompt_ids"] != ds[0]["prompt_ids"]
  assert len([p for p in tmp_path.iterdir() if p.name.startswith("pairs-")]) == 2


def test_prompt_truncations_are_counted_and_logged_inside_a_run(tok, tmp_path, capsys):
  from ssapo_jax import runrecord

  prompts = ["hello", "one two three four", "one two three four five six"]
  lengths = [len(tk.chat_prompt_ids(tok, p)) for p in prompts]
  cut = sum(n > 7 for n in lengths)
  assert 0 < cut < len(prompts)  # the case exercises both sides
  D.tokenize_prompts(prompts, tok, max_prompt_length=7, report="round 1 prompts")
  line = f"round 1 prompts: 3 prompts, truncated (keep_end) to max_prompt_length=7 in {cut}"
  assert line in capsys.readouterr().out
  with runrecord.run_log(str(tmp_path)):  # inside a run: stderr and run.log, not stdout
    D.tokenize_prompts(prompts, tok, max_prompt_length=7, report="round 1 prompts")
  captured = capsys.readouterr()
  assert line in captured.err and line not in captured.out
  assert line in (tmp_path / "run.log").read_text()


def test_prompt_tokenisation_left_pad_and_pairs_from_ids(tok):
  prompts = [D.PromptRecord([{"role": "user", "content": "hello"}], 0), "one two three four"]
  ids = D.tokenize_prompts(prompts, tok, max_prompt_length=6)
  assert ids[0] == tk.chat_prompt_ids(tok, "hello")
  assert len(ids[1]) == 6 and ids[1][0] == tok.bos_token_id
  p, m = D.left_pad(ids, pad_id=tok.pad_token_id, multiple=4)
  assert p.shape == (2, 8) and p.dtype == np.int32
  np.testing.assert_array_equal(m[0], [0] * 3 + [1] * 5)
  np.testing.assert_array_equal(p[0, 3:], ids[0])
  eos = tok.eos_token_id
  gen_c = np.array([[20, 21, eos, 0, 0], [22, 23, 24, 25, 26]])  # second hit the budget
  gen_r = np.array([[21, eos, 0, 0, 0], [23, eos, eos, 0, 0]])
  ds = D.pairs_from_token_ids(
    [p[i][m[i] == 1] for i in range(2)],
    gen_c,
    gen_r,
    eos_id=eos,
    max_length=64,
    max_prompt_length=32,
    rows=[5, 9],
    extras={"weights": [0.5, 1.5]},
    verbose=False,
  )
  assert ds["row"] == [5, 9]
  assert ds[0]["chosen_ids"] == [20, 21, eos] and ds[1]["chosen_ids"] == [22, 23, 24, 25, 26, eos]
  assert ds[1]["rejected_ids"] == [23, eos] and ds[0]["prompt_ids"] == ids[0]
  np.testing.assert_allclose(ds["weights"], [0.5, 1.5])
  assert D.strip_response([1, 2, 3], eos_id=eos, length=2, add_eos=False) == [1, 2]


# ----------------------------------------------------------------------------- config, rounds


def test_data_config_validation():
  cfg = D.DataConfig(pool_sizes=[10, 0.5], policy={"empty_text": "skip"})
  assert cfg.pool_sizes == (10, 0.5) and cfg.max_length == 2048
  for bad, match in [
    ({"max_prompt_length": 4096}, "max_prompt_length"),
    ({"truncation_mode": "left"}, "truncation_mode"),
    ({"policy": "ignore"}, "policy"),
    ({"seed_size": -1}, "seed_size"),
    ({"pool_sizes": (8000, 1.5)}, r"pool_sizes\[1\]"),
    ({"bucket_size": 0}, "bucket_size"),
    ({"seed_method": "kmeans"}, "seed_method"),
    ({"format": "csv"}, "format"),
  ]:
    with pytest.raises(ValueError, match=match):
      D.DataConfig(**bad)


def test_round_save_load(tmp_path):
  cols = {
    "row": [3, 1],
    "prompt": [[{"role": "user", "content": "a"}]] * 2,
    "responses": [["x", "y"], ["z", "w"]],
    "rewards": np.array([[0.1, -0.2], [0.3, 0.0]]),
    "chosen_index": [0, 0],
    "rejected_index": [1, 1],
    "atom_weights": np.full((2, 3), 1 / 3),
    "atom_shifts": np.zeros((2, 3)),
    "ref_chosen_logps": np.array([-1.0, -2.0]),
    "ref_rejected_logps": np.array([-3.0, -4.0]),
  }
  card = D.save_round(
    tmp_path / "round1",
    cols,
    round_index=1,
    models={"policy": "p0"},
    settings={"beta": 0.1},
    counts={"prompts": 2},
  )
  ds, card2 = D.load_round(tmp_path / "round1")
  assert card2 == card and card.counts == {"num_rows": 2, "prompts": 2}
  np.testing.assert_allclose(ds["rewards"], cols["rewards"])
  assert ds[0]["prompt"] == cols["prompt"][0] and ds["responses"] == cols["responses"]
  table = pq.read_table(tmp_path / "round1" / "data.parquet")
  assert table.num_rows == 2 and set(table.column_names) == set(cols)
  D.save_round(tmp_path / "round1", {"row": [1]}, round_index=1)  # Replaces.
  assert len(D.load_round(tmp_path / "round1")[0]) == 1
  with pytest.raises(ValueError, match="different lengths"):
    D.save_round(tmp_path / "r2", {"a": [1], "b": [1, 2]}, round_index=2)
