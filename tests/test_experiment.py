"""Tests for ssapo_jax/experiment.py: the experiment schema, the rules between sections, the shipped
configs and the named seed streams."""

from __future__ import annotations

import dataclasses
import pathlib
import typing
import zlib

import jax
import numpy as np
import pytest
import yaml

from ssapo_jax import config as cfg_lib
from ssapo_jax.config import ConfigError
from ssapo_jax.dro import DroConfig
from ssapo_jax.experiment import (
  SEED_STREAMS,
  ExperimentConfig,
  ModelConfig,
  load_experiment,
  stream_key,
  stream_seed,
)
from ssapo_jax.train import TrainConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"

# --------------------------------------------------------------------------------------------
# The experiment schema and the shipped configs.
# --------------------------------------------------------------------------------------------

CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_directory_has_the_three_experiments():
  names = {p.name for p in CONFIG_FILES}
  assert {
    "tiny_cpu.yaml",
    "zephyr_7b_ultrafeedback.yaml",
    "llama3_8b_instruct_ultrafeedback.yaml",
  } <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads_and_round_trips(path, tmp_path):
  config = load_experiment(path)
  # Every key written in the file is used (no silently ignored keys): the file is a subset of
  # the resolved config.
  raw = yaml.safe_load(path.read_text())
  resolved = cfg_lib.to_dict(config)

  def assert_subset(part, full, where):
    for key, value in part.items():
      assert key in full, f"{where}{key}"
      if isinstance(value, dict):
        assert_subset(value, full[key], f"{where}{key}.")

  assert_subset(raw, resolved, "")
  written = cfg_lib.save_resolved(config, tmp_path)
  assert load_experiment(written) == config


def test_paper_settings_in_the_7b_configs():
  zephyr = load_experiment(REPO / "configs" / "zephyr_7b_ultrafeedback.yaml")
  assert zephyr.train.beta == 0.1 and zephyr.rounds.num_rounds == 3
  assert zephyr.data.pool_sizes == (8000, 20000, 30000) and zephyr.data.seed_size == 2000
  assert zephyr.train.global_batch_size == 32 and zephyr.train.schedule == "cosine"
  assert zephyr.train.warmup_ratio == 0.1
  assert (zephyr.data.max_length, zephyr.data.max_prompt_length) == (2048, 1024)
  seed, later = zephyr.train_for_round(0), zephyr.train_for_round(1)
  assert (seed.learning_rate, seed.epochs) == (5e-7, 3)
  assert (later.learning_rate, later.epochs) == (3e-7, 1)
  llama = load_experiment(REPO / "configs" / "llama3_8b_instruct_ultrafeedback.yaml")
  assert (zephyr.dro.epsilon, zephyr.dro.num_pieces, zephyr.dro.group_size) == (0.01, 6, 100)
  assert llama.train.beta == 0.05 and llama.rounds.num_rounds == 2
  assert (llama.dro.epsilon, llama.dro.num_pieces) == (0.01, 6)
  assert llama.train_for_round(0).learning_rate == 1e-6 and llama.train_for_round(0).epochs == 1


def test_experiment_overrides_and_cross_checks():
  path = REPO / "configs" / "tiny_cpu.yaml"
  config = load_experiment(
    path,
    ["train.learning_rate=3e-5", "mesh.fsdp=2", "mesh.data=-1", "rounds.follower_refresh_steps=5"],
  )
  assert config.train.learning_rate == 3e-5 and config.mesh.shape == (-1, 2, 1)
  assert config.rounds.follower_refresh_steps == 5
  config = load_experiment(
    path, ["dro.epsilon=0.05", "dro.window_method=fixed", "dro.window=[0.0, 1.0]"]
  )
  assert config.dro.epsilon == 0.05 and config.dro.window == (0.0, 1.0)
  with pytest.raises(ConfigError, match=r"Did you mean `dro.epsilon`\?"):
    load_experiment(path, ["dro.epsilom=0.05"])
  with pytest.raises(ConfigError, match=r"Did you mean `train.learning_rate`"):
    load_experiment(path, ["train.learning_rat=1"])
  with pytest.raises(ConfigError, match=r"needs one prompt pool per round"):
    load_experiment(path, ["rounds.num_rounds=3"])
  with pytest.raises(ConfigError, match=r"invalid `rounds` \(RoundsConfig\): rounds.seed_epochs"):
    load_experiment(path, ["rounds.seed_epochs=0"])
  with pytest.raises(ConfigError, match=r"`rounds.annotation_reference`: expected one of 'sft'"):
    load_experiment(path, ["rounds.annotation_reference=policy"])
  with pytest.raises(ValueError, match=r"round_index must be in \[0, 2\]"):
    config.train_for_round(3)


def test_leader_space_follows_the_follower_space():
  for space in ("probability", "margin"):
    config = load_experiment(TINY, [f"dro.space={space}"])
    assert config.dro.space == config.train.robust_space == space
    assert all(config.train_for_round(t).robust_space == space for t in range(3))
  # The leader's space cannot be written: not in YAML, not as an override, not in the saved file.
  with pytest.raises(
    ConfigError,
    match=r"`train.robust_space` is not a config key: it follows "
    r"`dro.space`",
  ):
    load_experiment(TINY, ["train.robust_space=margin"])
  assert "robust_space" not in cfg_lib.to_dict(load_experiment(TINY))["train"]
  # Built in code, a disagreeing leader space is overridden by the follower's.
  config = ExperimentConfig(
    model=ModelConfig(path="m"),
    output_dir="o",
    train=TrainConfig(robust_space="margin"),
    dro=DroConfig(),
  )
  assert config.train.robust_space == "probability"


def test_margin_scale_defaults_to_beta_and_shows_resolved(tmp_path):
  raw = yaml.safe_load(TINY.read_text())
  assert raw["dro"]["margin_scale"] is None and raw["train"]["beta"] == 0.1
  config = load_experiment(TINY, ["train.beta=0.05"])
  assert config.dro.margin_scale == 0.05
  printed = yaml.safe_load(cfg_lib.dump_yaml(config))
  assert printed["dro"]["margin_scale"] == 0.05 and printed["train"]["beta"] == 0.05
  explicit = load_experiment(
    TINY, ["train.beta=0.05", "dro.margin_scale=1.0", "dro.allow_scale_mismatch=true"]
  )
  assert explicit.dro.margin_scale == 1.0
  # The saved resolved config reloads to the same values (the scale is then explicit).
  assert load_experiment(cfg_lib.save_resolved(config, tmp_path)) == config


def test_contradictory_reference_settings_are_rejected_in_one_line():
  with pytest.raises(ConfigError) as err:
    load_experiment(TINY, ["rounds.train_reference=sft", "train.reference=in_step"])
  message = str(err.value)
  assert "\n" not in message and "rounds.train_reference=sft" in message
  assert "train.reference=precomputed" in message
  config = load_experiment(TINY, ["rounds.train_reference=previous", "train.reference=in_step"])
  assert config.train.reference == "in_step"


def _sections():
  config = load_experiment(TINY)
  return [
    (f.name, getattr(config, f.name))
    for f in dataclasses.fields(config)
    if dataclasses.is_dataclass(getattr(config, f.name))
  ]


def test_every_choice_field_is_a_literal_with_one_error_format():
  """Each Literal field of each section rejects a bad value, naming the key and every choice,
  both when loaded from YAML and when the section is built in code."""
  checked = 0
  for section, value in _sections():
    hints = typing.get_type_hints(type(value))
    for field in dataclasses.fields(value):
      tp = hints[field.name]
      members = [tp] + list(typing.get_args(tp))
      literal = next((m for m in members if typing.get_origin(m) is typing.Literal), None)
      if literal is None:
        continue
      choices = typing.get_args(literal)
      listed = ", ".join(repr(c) for c in choices)
      with pytest.raises(
        ValueError,
        match=f"^{section}.{field.name} must be one of {listed}; got 'nope'$".replace("(", r"\("),
      ):
        dataclasses.replace(value, **{field.name: "nope"})
      if cfg_lib.DERIVED not in field.metadata:
        with pytest.raises(ConfigError, match=f"expected one of {listed}"):
          load_experiment(TINY, [f"{section}.{field.name}=nope"])
      checked += 1
  assert checked >= 15


def test_seed_streams_are_named_fold_ins():
  keys = {(s, t): stream_key(7, s, t) for s in SEED_STREAMS for t in range(3)}
  data = {k: tuple(np.asarray(jax.random.key_data(v)).tolist()) for k, v in keys.items()}
  assert len(set(data.values())) == len(data)  # every (stream, round) has its own key
  expected = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), zlib.crc32(b"follower")), 2)
  np.testing.assert_array_equal(
    jax.random.key_data(keys["follower", 2]), jax.random.key_data(expected)
  )
  # Unlike `seed + 1` offsets, neighbouring seeds share no stream.
  other = {
    tuple(np.asarray(jax.random.key_data(stream_key(8, s, t))).tolist())
    for s in SEED_STREAMS
    for t in range(3)
  }
  assert not other & set(data.values())
  config = load_experiment(TINY)
  np.testing.assert_array_equal(
    jax.random.key_data(config.key("generate", 1)),
    jax.random.key_data(stream_key(config.seed, "generate", 1)),
  )
  seeds = [stream_seed(0, "shuffle", t) for t in range(4)]
  assert len(set(seeds)) == 4 and all(0 <= s < 2**31 for s in seeds)
  with pytest.raises(ValueError, match="unknown seed stream 'sampling'"):
    stream_key(0, "sampling", 0)
