"""Tests for ssapo_jax/config.py: the generic dataclass loader (schema-agnostic)."""

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
  out = cfg_lib.from_dict(
    Outer,
    {
      "path": "/m",
      "inner": {"epsilon": 0.5},
      "shape": [3, 4],
      "leaf": {"name": "y"},
      "table": {"a": 1},
    },
  )
  assert out == Outer(
    path="/m", inner=Inner(epsilon=0.5), shape=(3, 4), leaf=Leaf("y"), table={"a": 1}
  )
  assert isinstance(out.shape, tuple) and isinstance(out.inner.epsilon, float)


def test_coercions_are_lossless_only():
  # PyYAML reads 5e-7 as a string; ints become floats; integral floats become ints.
  out = cfg_lib.from_dict(
    Outer, {"path": 7, "inner": {"epsilon": "5e-7", "num_pieces": 6.0}, "pair": ["b", 2]}
  )
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
  out = Outer(
    path="/m",
    inner=Inner(epsilon=0.2, solver="slsqp"),
    maybe=3,
    shape=(5,),
    names=["a"],
    leaf=Leaf("z"),
    table={"k": 2},
  )
  data = yaml.safe_load(cfg_lib.dump_yaml(out))
  assert data["shape"] == [5] and data["inner"] == {
    "epsilon": 0.2,
    "num_pieces": 6,
    "solver": "slsqp",
  }
  assert cfg_lib.from_dict(Outer, data) == out


def test_overrides_dotted_yaml_values(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("path: /m\ninner:\n  epsilon: 0.01\n")
  out = cfg_lib.load_config(
    Outer,
    path,
    [
      "inner.epsilon=0.05",
      "inner.solver=slsqp",
      "shape=[4, 8]",
      "maybe=null",
      "flag=true",
      "leaf.name=q",
      "names=[a, b]",
      "table={x: 1}",
    ],
  )
  assert out == Outer(
    path="/m",
    inner=Inner(epsilon=0.05, solver="slsqp"),
    shape=(4, 8),
    flag=True,
    leaf=Leaf("q"),
    names=["a", "b"],
    table={"x": 1},
  )
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


def test_union_keeps_a_value_of_a_member_type():
  # data.seed_size is `int | float`: 1.0 is "all rows" (a fraction), 1 is one row.
  from ssapo_jax.data import DataConfig

  assert repr(cfg_lib.from_dict(DataConfig, {"seed_size": 1.0}).seed_size) == "1.0"
  assert repr(cfg_lib.from_dict(DataConfig, {"seed_size": 1}).seed_size) == "1"
  assert repr(cfg_lib.from_dict(DataConfig, {"seed_size": "0.5"}).seed_size) == "0.5"


@dataclasses.dataclass(frozen=True)
class WithDerived:
  beta: float = 0.1
  space: Literal["probability", "margin"] = cfg_lib.derived("probability", "other.space")
  mode: Optional[Literal["a", "b"]] = None

  def __post_init__(self):
    cfg_lib.check_choices(self, "sec")


def test_derived_field_is_not_a_config_key():
  assert cfg_lib.from_dict(WithDerived, {"beta": 0.2}) == WithDerived(beta=0.2)
  assert cfg_lib.to_dict(WithDerived(space="margin")) == {"beta": 0.1, "mode": None}
  with pytest.raises(
    ConfigError,
    match=r"^`sec.space` is not a config key: it follows "
    r"`other.space`; set that instead$",
  ):
    cfg_lib.from_dict(WithDerived, {"space": "margin"}, "sec")
  with pytest.raises(ConfigError, match=r"`space` is not a config key: it follows `other.space`"):
    cfg_lib.apply_overrides({}, ["space=margin"], WithDerived)


def test_check_choices_lists_the_valid_choices():
  assert WithDerived(space="margin", mode="b").mode == "b"
  with pytest.raises(
    ValueError,
    match=r"^sec.space must be one of 'probability', 'margin'; "
    r"got 'logit'$",
  ):
    WithDerived(space="logit")
  with pytest.raises(ValueError, match=r"^sec.mode must be one of 'a', 'b'; got 'c'$"):
    WithDerived(mode="c")
