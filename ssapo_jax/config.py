"""Experiment configuration: nested frozen dataclasses loaded from YAML with dotted overrides.

The loader is generic (style.md §7): any frozen dataclass whose fields are annotated with
``int``/``float``/``bool``/``str``, ``Optional``/unions, ``Literal``, ``tuple``/``list``/``dict``
or nested dataclasses can be built from a YAML file of the same shape plus command-line
overrides such as ``dro.epsilon=0.05``::

    cfg = load_config(ExperimentConfig, "configs/tiny_cpu.yaml", ["dro.epsilon=0.05"])

Every problem (unknown key, wrong type, value rejected by a ``__post_init__``, key overridden twice)
raises `ConfigError` naming the dotted path, the value found and what was expected; unknown keys
list the valid keys at that level with a close-match suggestion.

The second half of the module is the experiment schema: `ExperimentConfig` nests the configs that
live beside the code they configure (`DataConfig`, `SamplingConfig`, `TrainConfig`, `DroConfig`,
`MeshConfig`) and three defined here (`ModelConfig`, `RoundsConfig`, `CheckpointConfig`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal, Mapping, Optional, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")

CONFIG_FILENAME = "config.yaml"


class ConfigError(ValueError):
  """A configuration problem, with the dotted path of the offending key in the message."""


# --------------------------------------------------------------------------------------------
# Generic loader.
# --------------------------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
  return f"{path}.{key}" if path else str(key)


def _where(path: str) -> str:
  return f"`{path}`" if path else "the top level"


def _type_name(tp: Any) -> str:
  """Readable name of a type annotation, e.g. ``Optional[int]`` -> ``int | None``."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if tp is type(None):
    return "None"
  if origin is Literal:
    return "one of " + ", ".join(repr(a) for a in args)
  if origin in (Union, types.UnionType):
    return " | ".join(_type_name(a) for a in args)
  if origin in (tuple, list, dict, collections.abc.Mapping):
    inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
    return f"{origin.__name__}[{inner}]" if args else origin.__name__
  if dataclasses.is_dataclass(tp):
    return f"mapping for {tp.__name__}"
  return getattr(tp, "__name__", repr(tp))


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
  """Dataclass fields of `cls` with resolved (non-string) type hints, in declaration order."""
  hints = typing.get_type_hints(cls)
  return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _unknown_key(path: str, key: Any, valid: Sequence[str]) -> ConfigError:
  suggestion = difflib.get_close_matches(str(key), list(valid), n=1)
  hint = f" Did you mean `{_join(path, suggestion[0])}`?" if suggestion else ""
  return ConfigError(
      f"unknown config key `{_join(path, str(key))}`.{hint} "
      f"Valid keys at {_where(path)}: {', '.join(valid)}")


def _bad_value(path: str, value: Any, tp: Any, extra: str = "") -> ConfigError:
  return ConfigError(
      f"bad value for `{path}`: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
      + (f" ({extra})" if extra else ""))


def _convert(value: Any, tp: Any, path: str) -> Any:
  """Checks `value` against annotation `tp`, coercing where lossless; raises `ConfigError`."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)

  if tp is Any:
    return value
  if tp is type(None):
    if value is None:
      return None
    raise _bad_value(path, value, tp)
  if origin is Literal:
    for option in args:
      if type(option) is type(value) and option == value:
        return option
    raise _bad_value(path, value, tp)
  if origin in (Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    # A value whose type is itself a member keeps it: `int | float` must not turn 1.0 into 1.
    if any(isinstance(m, type) and type(value) is m for m in args):
      return value
    errors = []
    for member in args:
      if member is type(None):
        continue
      try:
        return _convert(value, member, path)
      except ConfigError as e:
        errors.append(e)
    # `key=None` on the command line arrives as the string "None".
    if type(None) in args and isinstance(value, str) and value in ("None", "none", "null"):
      return None
    # A single non-None member (Optional[X]) has the more specific message.
    if len(errors) == 1:
      raise errors[0]
    raise _bad_value(path, value, tp)
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    return from_dict(tp, value, path)
  if origin in (tuple, list) or tp in (tuple, list):
    if not isinstance(value, (list, tuple)):
      raise _bad_value(path, value, tp)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
      if len(value) != len(args):
        raise _bad_value(path, value, tp, f"expected {len(args)} items, got {len(value)}")
      items = [_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
    else:
      item_tp = args[0] if args else Any
      items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if (origin is tuple or tp is tuple) else items
  if origin in (dict, collections.abc.Mapping) or tp in (dict, collections.abc.Mapping):
    if not isinstance(value, Mapping):
      raise _bad_value(path, value, tp)
    key_tp, val_tp = args if args else (Any, Any)
    return {_convert(k, key_tp, f"{path}.<key>"): _convert(v, val_tp, _join(path, str(k)))
            for k, v in value.items()}
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise _bad_value(path, value, tp, "use true or false")
  if tp is int:
    if isinstance(value, bool):
      raise _bad_value(path, value, tp)
    if isinstance(value, int):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    if isinstance(value, str):
      try:
        number = float(value)
      except ValueError:
        raise _bad_value(path, value, tp) from None
      if number.is_integer():
        return int(number)
    raise _bad_value(path, value, tp)
  if tp is float:
    if isinstance(value, bool):
      raise _bad_value(path, value, tp)
    if isinstance(value, (int, float)):
      return float(value)
    if isinstance(value, str):
      # PyYAML (YAML 1.1) reads `5e-7` as a string; accept anything float() accepts.
      try:
        return float(value)
      except ValueError:
        raise _bad_value(path, value, tp) from None
    raise _bad_value(path, value, tp)
  if tp is str:
    if isinstance(value, str):
      return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return str(value)
    raise _bad_value(path, value, tp, "quote the value to pass a string")
  if isinstance(tp, type):
    if isinstance(value, tp):
      return value
    raise _bad_value(path, value, tp)
  raise ConfigError(f"`{path}`: unsupported annotation {tp!r} in the config schema")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
  """Builds dataclass `cls` from a (nested) mapping, checking keys and types.

  Args:
    cls: a dataclass type; nested dataclass fields are built recursively.
    data: the mapping (``None`` means all defaults).
    path: dotted prefix used in error messages (the position of `data` in a larger config).

  Returns:
    An instance of `cls`. Missing keys take the field defaults.

  Raises:
    ConfigError: unknown keys (with the valid keys listed), missing required keys, values of the
      wrong type, or a ``ValueError``/``TypeError`` raised by the class's ``__post_init__``.
  """
  if data is None:
    data = {}
  if not isinstance(data, Mapping):
    raise ConfigError(f"bad value for {_where(path)}: expected a mapping for {cls.__name__}, "
                      f"got {type(data).__name__} {data!r}")
  fields = _fields(cls)
  for key in data:
    if key not in fields:
      raise _unknown_key(path, key, list(fields))
  kwargs = {}
  for name, (field, tp) in fields.items():
    if name in data:
      kwargs[name] = _convert(data[name], tp, _join(path, name))
    elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
      raise ConfigError(f"missing required config key `{_join(path, name)}` "
                        f"(expected {_type_name(tp)})")
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"invalid {_where(path)} ({cls.__name__}): {e}") from None


def to_dict(config: Any) -> Any:
  """Converts a (nested) config dataclass to plain YAML-safe data: dicts, lists and scalars."""
  if dataclasses.is_dataclass(config) and not isinstance(config, type):
    return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
  if isinstance(config, (list, tuple)):
    return [to_dict(v) for v in config]
  if isinstance(config, Mapping):
    return {k: to_dict(v) for k, v in config.items()}
  return config


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
  """Parses ``key.sub=value`` strings; values are YAML scalars or flow lists/mappings.

  Raises:
    ConfigError: an item without ``=``, an empty key, unparsable YAML, or a key given twice (or
      a key and one of its sub-keys, such as ``mesh={...}`` and ``mesh.data=2``).
  """
  parsed: list[tuple[str, Any]] = []
  seen: dict[str, str] = {}
  for item in overrides:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
      raise ConfigError(f"bad override {item!r}: expected key=value with a dotted key, "
                        "e.g. dro.epsilon=0.05")
    for other, other_item in seen.items():
      if other == key or other.startswith(key + ".") or key.startswith(other + "."):
        raise ConfigError(f"config key `{key}` is overridden twice on the command line: "
                          f"{other_item!r} and {item!r}")
    seen[key] = item
    if raw.strip() == "":
      value: Any = ""
    else:
      try:
        value = yaml.safe_load(raw)
      except yaml.YAMLError as e:
        raise ConfigError(f"bad override {item!r}: value is not valid YAML ({e})") from None
    parsed.append((key, value))
  return parsed


def _field_type(cls: type, path: str, key: str) -> Any:
  fields = _fields(cls)
  if key not in fields:
    raise _unknown_key(path, key, list(fields))
  return fields[key][1]


def _dataclass_member(tp: Any) -> type | None:
  """The dataclass in `tp` (itself, or the dataclass member of an Optional), else None."""
  if dataclasses.is_dataclass(tp):
    return tp
  if typing.get_origin(tp) in (Union, types.UnionType):
    members = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
    if len(members) == 1:
      return members[0]
  return None


def apply_overrides(data: Mapping[str, Any] | None, overrides: Sequence[str],
                    cls: type | None = None) -> dict[str, Any]:
  """Returns a copy of nested mapping `data` with dotted ``key=value`` overrides applied.

  With `cls` given, each dotted key is checked against the dataclass schema as it is walked, so an
  unknown key is reported with the valid keys at its level (type checks happen in `from_dict`).
  """
  result = _deep_copy(dict(data or {}))
  for key, value in parse_overrides(overrides):
    parts = key.split(".")
    node = result
    node_cls = cls
    for depth, part in enumerate(parts):
      path = ".".join(parts[:depth])
      last = depth == len(parts) - 1
      if node_cls is not None:
        tp = _field_type(node_cls, path, part)
        next_cls = _dataclass_member(tp)
        if not last and next_cls is None:
          raise ConfigError(f"bad override {key}=...: `{_join(path, part)}` is a "
                            f"{_type_name(tp)}, not a section with sub-keys")
        node_cls = next_cls
      if last:
        node[part] = value
      else:
        child = node.get(part)
        if child is None:
          child = node[part] = {}
        elif not isinstance(child, dict):
          raise ConfigError(f"bad override {key}=...: `{_join(path, part)}` holds "
                            f"{child!r}, not a section with sub-keys")
        node = child
  return result


def _deep_copy(data: Any) -> Any:
  if isinstance(data, Mapping):
    return {k: _deep_copy(v) for k, v in data.items()}
  if isinstance(data, list):
    return [_deep_copy(v) for v in data]
  return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a YAML mapping; a missing file, bad YAML or a non-mapping raise `ConfigError`."""
  try:
    with open(path) as f:
      data = yaml.safe_load(f)
  except FileNotFoundError:
    raise ConfigError(f"config file not found: {path}") from None
  except IsADirectoryError:
    raise ConfigError(f"config path is a directory, expected a YAML file: {path}") from None
  except yaml.YAMLError as e:
    raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ConfigError(f"config file {path} must hold a mapping at the top level, "
                      f"got {type(data).__name__}")
  return data


def load_config(cls: type[T], yaml_path: str | os.PathLike | None,
                overrides: Sequence[str] = ()) -> T:
  """Loads `cls` from a YAML file (or defaults when `yaml_path` is None) plus dotted overrides."""
  data = read_yaml(yaml_path) if yaml_path is not None else {}
  data = apply_overrides(data, overrides, cls)
  return from_dict(cls, data)


def dump_yaml(config: Any) -> str:
  """The YAML text of a config dataclass (the format `load_config` reads back)."""
  return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def save_resolved(config: Any, output_dir: str | os.PathLike) -> str:
  """Writes the resolved config to ``<output_dir>/config.yaml`` (local or ``gs://``); returns the path."""
  from etils import epath  # orbax's path library; handles gs:// as well as local paths.
  directory = epath.Path(output_dir)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / CONFIG_FILENAME
  path.write_text(dump_yaml(config))
  return os.fspath(path)


# --------------------------------------------------------------------------------------------
# Experiment schema.
# --------------------------------------------------------------------------------------------

# Imported here (not at the top) so the generic loader above stays usable on its own.
from ssapo_jax.checkpoint import CheckpointConfig  # noqa: E402
from ssapo_jax.data.config import DataConfig  # noqa: E402
from ssapo_jax.dro import DroConfig  # noqa: E402
from ssapo_jax.sampling import SamplingConfig  # noqa: E402
from ssapo_jax.sharding import MeshConfig  # noqa: E402
from ssapo_jax.train import TrainConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The initial (SFT) policy: a local Hugging Face model directory.

  Compute dtype, parameter dtype and rematerialisation are training choices and live in
  `TrainConfig` (``train.compute_dtype``, ``train.param_dtype``, ``train.remat``); the chat
  template's system message is ``data.system_message``.
  """

  path: str  # local HF model directory (config.json, *.safetensors, tokenizer files)
  tokenizer_path: Optional[str] = None  # tokenizer directory; None = `path`
  # Attention kernel (LlamaConfig.attention): auto = splash on TPU, cudnn on GPU (bf16), else xla.
  attention: Literal["auto", "xla", "splash", "cudnn"] = "auto"

  def __post_init__(self):
    if not self.path:
      raise ValueError("model.path must name a local Hugging Face model directory, got ''")

  @property
  def resolved_tokenizer_path(self) -> str:
    """The tokenizer directory (`tokenizer_path`, else the model `path`)."""
    return self.tokenizer_path or self.path


@dataclasses.dataclass(frozen=True)
class RoundsConfig:
  """The SSAPO loop: round 0 trains on the seed pairs, rounds 1..num_rounds self-annotate.

  Per-round learning rates and epochs override ``train.learning_rate`` / ``train.epochs`` when set
  (see `ExperimentConfig.train_for_round`).
  """

  # Self-annotation rounds after the seed round (paper: 3 Mistral, 2 Llama 3); round t draws its
  # prompts from pool t of ``data.pool_sizes``.
  num_rounds: int = 3
  seed_epochs: Optional[int] = None  # epochs of round 0 (seed DPO); None = train.epochs
  round_epochs: Optional[int] = None  # epochs of rounds >= 1; None = train.epochs
  seed_learning_rate: Optional[float] = None  # peak lr of round 0; None = train.learning_rate
  round_learning_rate: Optional[float] = None  # peak lr of rounds >= 1; None = train.learning_rate
  # Reference of the implicit-reward judge: the SFT model (authors' code) or the previous policy.
  annotation_reference: Literal["sft", "previous"] = "sft"
  # Reference of the DPO loss in rounds >= 1: the previous round's policy (authors' code) or SFT.
  train_reference: Literal["previous", "sft"] = "previous"
  # Train round t on all pairs so far (Algorithm 1) instead of only its new pairs (authors' code).
  accumulate: bool = False
  # Re-solve the follower (worst-case atoms) every this many leader steps; None = once per round.
  follower_refresh_steps: Optional[int] = None
  num_eval_prompts: int = 0  # held-out prompts scored after every round; 0 = no evaluation
  log_every_steps: int = 1  # train metrics logged (and the non-finite guard checked) every k steps

  def __post_init__(self):
    if self.num_rounds < 0:
      raise ValueError(f"rounds.num_rounds must be >= 0, got {self.num_rounds}")
    for name in ("seed_epochs", "round_epochs", "follower_refresh_steps"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"rounds.{name} must be >= 1 or null, got {value}")
    for name in ("seed_learning_rate", "round_learning_rate"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"rounds.{name} must be > 0 or null, got {value}")
    if self.log_every_steps < 1:
      raise ValueError(f"rounds.log_every_steps must be >= 1, got {self.log_every_steps}")
    if self.num_eval_prompts < 0:
      raise ValueError(f"rounds.num_eval_prompts must be >= 0, got {self.num_eval_prompts}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A whole SSAPO run; ``configs/*.yaml`` files have exactly this nesting."""

  model: ModelConfig  # the initial policy (and SFT reference)
  output_dir: str  # run directory: config.yaml, metrics.jsonl, checkpoints/, phase outputs (local or gs://)
  data: DataConfig = DataConfig()  # seed preferences, prompt pools, tokenisation, batching
  sampling: SamplingConfig = SamplingConfig()  # response generation of rounds >= 1
  train: TrainConfig = TrainConfig()  # the leader (policy) update
  dro: DroConfig = DroConfig()  # the follower: worst-case distribution in the Wasserstein ball
  mesh: MeshConfig = MeshConfig()  # device mesh and multi-host set-up
  rounds: RoundsConfig = RoundsConfig()  # the SSAPO loop
  checkpoint: CheckpointConfig = CheckpointConfig()  # save interval and retention
  seed: int = 42  # global seed: data shuffling, sampling and train keys derive from it

  def __post_init__(self):
    if not self.output_dir:
      raise ValueError("output_dir must be set (a local directory or gs://bucket/path)")
    if len(self.data.pool_sizes) < self.rounds.num_rounds:
      raise ValueError(f"rounds.num_rounds={self.rounds.num_rounds} needs one prompt pool per "
                       f"round, but data.pool_sizes={list(self.data.pool_sizes)} has "
                       f"{len(self.data.pool_sizes)}")

  def train_for_round(self, round_index: int) -> TrainConfig:
    """`TrainConfig` of one round: the seed round (0) or a later one, with per-round lr/epochs."""
    if round_index < 0 or round_index > self.rounds.num_rounds:
      raise ValueError(f"round_index must be in [0, {self.rounds.num_rounds}], got {round_index}")
    seed_round = round_index == 0
    lr = self.rounds.seed_learning_rate if seed_round else self.rounds.round_learning_rate
    epochs = self.rounds.seed_epochs if seed_round else self.rounds.round_epochs
    return dataclasses.replace(
        self.train,
        learning_rate=self.train.learning_rate if lr is None else lr,
        epochs=self.train.epochs if epochs is None else epochs)


def load_experiment(yaml_path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
  """`load_config` for `ExperimentConfig`."""
  return load_config(ExperimentConfig, yaml_path, overrides)
