"""Generic config machinery: frozen dataclasses loaded from YAML with dotted overrides.

Any frozen dataclass whose fields are annotated with ``int``/``float``/``bool``/``str``,
``Optional``/unions, ``Literal``, ``tuple``/``list``/``dict`` or nested dataclasses can be built from
a YAML file of the same shape plus command-line overrides such as ``dro.epsilon=0.05``::

    cfg = load_config(ExperimentConfig, "configs/tiny_cpu.yaml", ["dro.epsilon=0.05"])

Every problem (unknown key, wrong type, value rejected by a ``__post_init__``, key overridden twice)
raises `ConfigError` naming the dotted path, the value found and what was expected; unknown keys
list the valid keys at that level with a close-match suggestion.

Choices are ``Literal`` annotations, checked in one place: the loader checks them while it reads,
and `check_choices` (called by each section's ``__post_init__``) checks a config built in code.
A `derived` field is set from another section when the enclosing config resolves and is not a
config key, so each setting has one source of truth. The experiment schema is in
`ssapo_jax.experiment`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import os
import types
import typing
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from ssapo_jax.errors import ConfigError  # re-exported

T = TypeVar("T")

CONFIG_FILENAME = "config.yaml"

DERIVED = "derived_from"  # field metadata key: the config key a derived field follows


def derived(default: Any, source: str) -> Any:
  """A dataclass field that is not a config key: the enclosing config sets it from `source`.

  The field keeps a default so the section can be built on its own in code (tests, benchmarks);
  YAML files and overrides cannot set it, and `to_dict` leaves it out.
  """
  return dataclasses.field(default=default, metadata={DERIVED: source})


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


@functools.cache
def _all_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
  """Init fields of dataclass `cls` with resolved (non-string) type hints, in declaration order."""
  hints = typing.get_type_hints(cls)
  return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
  """The config keys of `cls`: its init fields except `derived` ones."""
  return {k: v for k, v in _all_fields(cls).items() if DERIVED not in v[0].metadata}


def _literal_choices(tp: Any) -> tuple[tuple, bool] | None:
  """``(choices, none_allowed)`` of a ``Literal`` or ``Optional[Literal]`` annotation, else None."""
  if typing.get_origin(tp) is Literal:
    return typing.get_args(tp), False
  if typing.get_origin(tp) in (Union, types.UnionType):
    members = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(members) == 1 and typing.get_origin(members[0]) is Literal:
      return typing.get_args(members[0]), type(None) in typing.get_args(tp)
  return None


def check_choices(config: Any, section: str) -> None:
  """Raises ValueError unless every ``Literal`` field of dataclass `config` holds a valid choice.

  The message names ``<section>.<field>`` and lists the choices, e.g.
  ``train.schedule must be one of 'cosine', 'linear', 'constant'; got 'step'``.
  """
  for name, (_, tp) in _all_fields(type(config)).items():
    found = _literal_choices(tp)
    if found is None:
      continue
    choices, none_allowed = found
    value = getattr(config, name)
    if value is None and none_allowed:
      continue
    if not any(type(c) is type(value) and c == value for c in choices):
      raise ValueError(
        f"{_join(section, name)} must be one of "
        f"{', '.join(repr(c) for c in choices)}; got {value!r}"
      )


def _unknown_key(path: str, key: Any, valid: Sequence[str], cls: type | None = None) -> ConfigError:
  field = _all_fields(cls).get(str(key)) if cls is not None else None
  if field is not None and DERIVED in field[0].metadata:
    return ConfigError(
      f"`{_join(path, str(key))}` is not a config key: it follows "
      f"`{field[0].metadata[DERIVED]}`; set that instead"
    )
  suggestion = difflib.get_close_matches(str(key), list(valid), n=1)
  hint = f" Did you mean `{_join(path, suggestion[0])}`?" if suggestion else ""
  return ConfigError(
    f"unknown config key `{_join(path, str(key))}`.{hint} "
    f"Valid keys at {_where(path)}: {', '.join(valid)}"
  )


def _bad_value(path: str, value: Any, tp: Any, extra: str = "") -> ConfigError:
  return ConfigError(
    f"bad value for `{path}`: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
    + (f" ({extra})" if extra else "")
  )


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
    return {
      _convert(k, key_tp, f"{path}.<key>"): _convert(v, val_tp, _join(path, str(k)))
      for k, v in value.items()
    }
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
    raise ConfigError(
      f"bad value for {_where(path)}: expected a mapping for {cls.__name__}, "
      f"got {type(data).__name__} {data!r}"
    )
  fields = _fields(cls)
  for key in data:
    if key not in fields:
      raise _unknown_key(path, key, list(fields), cls)
  kwargs = {}
  for name, (field, tp) in fields.items():
    if name in data:
      kwargs[name] = _convert(data[name], tp, _join(path, name))
    elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
      raise ConfigError(
        f"missing required config key `{_join(path, name)}` (expected {_type_name(tp)})"
      )
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    where = f"`{path}` ({cls.__name__})" if path else f"{cls.__name__}"
    raise ConfigError(f"invalid {where}: {e}") from None


def to_dict(config: Any) -> Any:
  """Converts a (nested) config dataclass to plain YAML-safe data: dicts, lists and scalars.

  `derived` fields are left out: they are not config keys.
  """
  if dataclasses.is_dataclass(config) and not isinstance(config, type):
    return {
      f.name: to_dict(getattr(config, f.name))
      for f in dataclasses.fields(config)
      if DERIVED not in f.metadata
    }
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
      raise ConfigError(
        f"bad override {item!r}: expected key=value with a dotted key, e.g. dro.epsilon=0.05"
      )
    for other, other_item in seen.items():
      if other == key or other.startswith(key + ".") or key.startswith(other + "."):
        raise ConfigError(
          f"config key `{key}` is overridden twice on the command line: {other_item!r} and {item!r}"
        )
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
    raise _unknown_key(path, key, list(fields), cls)
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


def apply_overrides(
  data: Mapping[str, Any] | None, overrides: Sequence[str], cls: type | None = None
) -> dict[str, Any]:
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
          raise ConfigError(
            f"bad override {key}=...: `{_join(path, part)}` is a "
            f"{_type_name(tp)}, not a section with sub-keys"
          )
        node_cls = next_cls
      if last:
        node[part] = value
      else:
        child = node.get(part)
        if child is None:
          child = node[part] = {}
        elif not isinstance(child, dict):
          raise ConfigError(
            f"bad override {key}=...: `{_join(path, part)}` holds "
            f"{child!r}, not a section with sub-keys"
          )
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
    raise ConfigError(
      f"config file {path} must hold a mapping at the top level, got {type(data).__name__}"
    )
  return data


def load_config(
  cls: type[T], yaml_path: str | os.PathLike | None, overrides: Sequence[str] = ()
) -> T:
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
