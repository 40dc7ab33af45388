"""Tests for ssapo_jax/config.py: the generic dataclass loader and the shipped configs."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal, Optional

import pytest
import yaml

from ssapo_jax import config as cfg_lib
from ssapo_jax.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Inner:
  epsilon: float = 0.01
  num_pieces: int = 6
  solver: Literal["lp", "slsqp"] = "lp"

  def __post_init__(self):
    if self.epsilon < 0:
      raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")


@dataclasses.dataclass(frozen=True)
class Leaf:
  name: str = "x"


@dataclasses.dataclass(frozen=True)
class Outer:
  path: str
  inner: Inner = Inner()
  maybe: Optional[int] = None
  shape: tuple[int, ...] = (1, 2)
  pair: tuple[str, float] = ("a", 1.0)
  names: list[str] = dataclasses.field(default_factory=list)
  flag: bool = False
  leaf: Optional[Leaf] = None
  table: dict[str, int] = dataclasses.field(default_factory=dict)


def test_from_dict_builds_nested_and_defaults():
  out = cfg_lib.from_dict(Outer, {"path": "/m", "inner": {"epsilon": 0.5}, "shape": [3, 4],
                                  "leaf": {"name": "y"}, "table": {"a": 1}})
  assert out == Outer(path="/m", inner=Inner(epsilon=0.5), shape=(3, 4), leaf=Leaf("y"),
                      table={"a": 1})
  assert isinstance(out.shape, tuple) and isinstance(out.inner.epsilon, float)


def test_coercions_are_lossless_only():
  # PyYAML reads 5e-7 as a string; ints become floats; integral floats become ints.
  out = cfg_lib.from_dict(Outer, {"path": 7, "inner": {"epsilon": "5e-7", "num_pieces": 6.0},
                                  "pair": ["b", 2]})
  assert out.path == "7" and out.inner.epsilon == 5e-7 and out.inner.num_pieces == 6
  assert out.pair == ("b", 2.0)
  for data, fragment in [
      ({"path": "p", "inner": {"num_pieces": 2.5}}, "`inner.num_pieces`: expected int"),
      ({"path": "p", "inner": {"num_pieces": True}}, "`inner.num_pieces`: expected int"),
      ({"path": "p", "flag": "yes please"}, "`flag`: expected bool"),
      ({"path": "p", "flag": 1}, "`flag`: expected bool"),
      ({"path": "p", "inner": {"solver": "cvx"}}, "`inner.solver`: expected one of 'lp', 'slsqp'"),
      ({"path": "p", "shape": 3}, "`shape`: expected tuple[int, ...]"),
      ({"path": "p", "shape": [1, "a"]}, "`shape[1]`: expected int"),
      ({"path": "p", "pair": ["a"]}, "expected 2 items, got 1"),
      ({"path": "p", "maybe": "abc"}, "`maybe`: expected int"),
      ({"path": ["a"]}, "`path`: expected str"),
      ({"path": "p", "inner": 3}, "expected a mapping for Inner"),
  ]:
    with pytest.raises(ConfigError) as e:
      cfg_lib.from_dict(Outer, data)
    assert fragment in str(e.value), (data, str(e.value))


def test_unknown_key_lists_valid_keys_and_suggests():
  with pytest.raises(ConfigError) as e:
    cfg_lib.from_dict(Outer, {"path": "p", "inner": {"epsilom": 0.1}})
  msg = str(e.value)
  assert "`inner.epsilom`" in msg and "Did you mean `inner.epsilon`?" in msg
  assert "epsilon, num_pieces, solver" in msg


def test_missing_required_and_post_init_errors_name_the_path():
  with pytest.raises(ConfigError, match=r"missing required config key `path`"):
    cfg_lib.from_dict(Outer, {})
  with pytest.raises(ConfigError, match=r"invalid `inner` \(Inner\): epsilon must be >= 0"):
    cfg_lib.from_dict(Outer, {"path": "p", "inner": {"epsilon": -1}})


def test_to_dict_round_trip_through_yaml():
  out = Outer(path="/m", inner=Inner(epsilon=0.2, solver="slsqp"), maybe=3, shape=(5,),
              names=["a"], leaf=Leaf("z"), table={"k": 2})
  data = yaml.safe_load(cfg_lib.dump_yaml(out))
  assert data["shape"] == [5] and data["inner"] == {"epsilon": 0.2, "num_pieces": 6,
                                                    "solver": "slsqp"}
  assert cfg_lib.from_dict(Outer, data) == out


def test_overrides_dotted_yaml_values(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("path: /m\ninner:\n  epsilon: 0.01\n")
  out = cfg_lib.load_config(Outer, path, [
      "inner.epsilon=0.05", "inner.solver=slsqp", "shape=[4, 8]", "maybe=null", "flag=true",
      "leaf.name=q", "names=[a, b]", "table={x: 1}"])
  assert out == Outer(path="/m", inner=Inner(epsilon=0.05, solver="slsqp"), shape=(4, 8),
                      flag=True, leaf=Leaf("q"), names=["a", "b"], table={"x": 1})
  assert cfg_lib.load_config(Outer, path, ["maybe=None"]).maybe is None
  assert cfg_lib.load_config(Outer, path, ["maybe=3"]).maybe == 3
  # The file is not modified by overrides.
  assert yaml.safe_load(path.read_text())["inner"] == {"epsilon": 0.01}


def test_override_errors(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("path: /m\n")
  cases = [
      (["inner.epsilom=1"], "Did you mean `inner.epsilon`?"),
      (["inner.epsilon=1", "inner.epsilon=2"], "overridden twice"),
      (["leaf={name: a}", "leaf.name=b"], "overridden twice"),
      (["nope=1"], "Valid keys at the top level: path, inner, maybe"),
      (["flag.x=1"], "`flag` is a bool, not a section"),
      (["inner.epsilon"], "expected key=value"),
      (["=3"], "expected key=value"),
      (["inner..epsilon=3"], "expected key=value"),
      (["inner.epsilon=abc"], "bad value for `inner.epsilon`: expected float, got str 'abc'"),
      (["inner.epsilon=[1"], "not valid YAML"),
  ]
  for overrides, fragment in cases:
    with pytest.raises(ConfigError) as e:
      cfg_lib.load_config(Outer, path, overrides)
    assert fragment in str(e.value), (overrides, str(e.value))


def test_bad_files(tmp_path):
  with pytest.raises(ConfigError, match="config file not found"):
    cfg_lib.load_config(Outer, tmp_path / "missing.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("path: [unclosed\n")
  with pytest.raises(ConfigError, match="not valid YAML"):
    cfg_lib.load_config(Outer, bad)
  listy = tmp_path / "list.yaml"
  listy.write_text("- 1\n- 2\n")
  with pytest.raises(ConfigError, match="mapping at the top level"):
    cfg_lib.load_config(Outer, listy)


def test_save_resolved_reloads_identically(tmp_path):
  out = Outer(path="/m", inner=Inner(epsilon=3e-7), shape=(2, 2), leaf=Leaf("w"))
  written = cfg_lib.save_resolved(out, tmp_path / "run")
  assert pathlib.Path(written) == tmp_path / "run" / "config.yaml"
  assert cfg_lib.load_config(Outer, written) == out


# --------------------------------------------------------------------------------------------
# The experiment schema and the shipped configs.
# --------------------------------------------------------------------------------------------

CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_directory_has_the_three_experiments():
  names = {p.name for p in CONFIG_FILES}
  assert {"tiny_cpu.yaml", "zephyr_7b_ultrafeedback.yaml",
          "llama3_8b_instruct_ultrafeedback.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads_and_round_trips(path, tmp_path):
  config = cfg_lib.load_experiment(path)
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
  assert cfg_lib.load_experiment(written) == config


def test_paper_settings_in_the_7b_configs():
  zephyr = cfg_lib.load_experiment(REPO / "configs" / "zephyr_7b_ultrafeedback.yaml")
  assert zephyr.train.beta == 0.1 and zephyr.rounds.num_rounds == 3
  assert zephyr.data.pool_sizes == (8000, 20000, 30000) and zephyr.data.seed_size == 2000
  assert zephyr.train.global_batch_size == 32 and zephyr.train.schedule == "cosine"
  assert zephyr.train.warmup_ratio == 0.1
  assert (zephyr.data.max_length, zephyr.data.max_prompt_length) == (2048, 1024)
  seed, later = zephyr.train_for_round(0), zephyr.train_for_round(1)
  assert (seed.learning_rate, seed.epochs) == (5e-7, 3)
  assert (later.learning_rate, later.epochs) == (3e-7, 1)
  llama = cfg_lib.load_experiment(REPO / "configs" / "llama3_8b_instruct_ultrafeedback.yaml")
  assert (zephyr.dro.epsilon, zephyr.dro.num_pieces, zephyr.dro.group_size) == (0.01, 6, 100)
  assert llama.train.beta == 0.05 and llama.rounds.num_rounds == 2
  assert (llama.dro.epsilon, llama.dro.num_pieces) == (0.01, 6)
  assert llama.train_for_round(0).learning_rate == 1e-6 and llama.train_for_round(0).epochs == 1


def test_experiment_overrides_and_cross_checks():
  path = REPO / "configs" / "tiny_cpu.yaml"
  config = cfg_lib.load_experiment(path, ["train.learning_rate=3e-5", "mesh.fsdp=2",
                                          "mesh.data=-1", "rounds.follower_refresh_steps=5"])
  assert config.train.learning_rate == 3e-5 and config.mesh.shape == (-1, 2, 1)
  assert config.rounds.follower_refresh_steps == 5
  config = cfg_lib.load_experiment(path, ["dro.epsilon=0.05", "dro.window_method=fixed",
                                          "dro.window=[0.0, 1.0]"])
  assert config.dro.epsilon == 0.05 and config.dro.window == (0.0, 1.0)
  with pytest.raises(ConfigError, match=r"Did you mean `dro.epsilon`\?"):
    cfg_lib.load_experiment(path, ["dro.epsilom=0.05"])
  with pytest.raises(ConfigError, match=r"Did you mean `train.learning_rate`"):
    cfg_lib.load_experiment(path, ["train.learning_rat=1"])
  with pytest.raises(ConfigError, match=r"needs one prompt pool per round"):
    cfg_lib.load_experiment(path, ["rounds.num_rounds=3"])
  with pytest.raises(ConfigError, match=r"invalid `rounds` \(RoundsConfig\): rounds.seed_epochs"):
    cfg_lib.load_experiment(path, ["rounds.seed_epochs=0"])
  with pytest.raises(ConfigError, match=r"`rounds.annotation_reference`: expected one of 'sft'"):
    cfg_lib.load_experiment(path, ["rounds.annotation_reference=policy"])
  with pytest.raises(ValueError, match=r"round_index must be in \[0, 2\]"):
    config.train_for_round(3)


def test_union_keeps_a_value_of_a_member_type():
  # data.seed_size is `int | float`: 1.0 is "all rows" (a fraction), 1 is one row.
  from ssapo_jax.data import DataConfig
  assert repr(cfg_lib.from_dict(DataConfig, {"seed_size": 1.0}).seed_size) == "1.0"
  assert repr(cfg_lib.from_dict(DataConfig, {"seed_size": 1}).seed_size) == "1"
  assert repr(cfg_lib.from_dict(DataConfig, {"seed_size": "0.5"}).seed_size) == "0.5"
