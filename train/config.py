"""Typed configs: dataclasses documented per field, loaded from YAML plus ``key=value`` overrides.

Every recipe config is a dataclass whose fields carry ``metadata={"help": ...}``; nested
sections are dataclasses too (``train.lr=3e-4`` reaches ``cfg.train.lr``). Loading checks
every key and value and raises :class:`ConfigError` with a message that names the key and
what is allowed, so the CLI can print one paragraph instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value a user gave is wrong; the message says how to fix it."""


class CogcoreError(RuntimeError):
    """An error the user can fix (missing files, wrong ids, mismatched models...)."""


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a help string (shown by ``--help`` and in errors)."""
    kw: dict[str, Any] = {"metadata": {"help": help}}
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return dataclasses.field(**kw)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + " (or null)"
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if get_origin(tp) is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: got {value!r}, allowed values are {', '.join(repr(a) for a in allowed)}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `lora.layers=-1` on the command line: a list of one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
        (inner,) = get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected a section with keys {', '.join(_field_names(tp))}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}, expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}, expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: got {value!r}, expected a number") from None
        if not math.isfinite(number):  # nan slips through every `x <= 0` check after it
            raise ConfigError(f"{key}: got {value!r}, expected a finite number")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: got {value!r}, expected a string")
        return str(value)
    return value


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _section_defaults(f: dataclasses.Field) -> dict:
    """The default of a nested section as a mapping, so ``train.max_steps=7`` changes that one
    key of a section whose default is not its class's (e.g. ``default_factory=lambda: TrainConfig(lr=2e-3)``)."""
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:
        return {}
    if not dataclasses.is_dataclass(default):
        return {}
    return {g.name: getattr(default, g.name) for g in dataclasses.fields(default) if g.init}


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and dataclasses.is_dataclass(out.get(k)):
            sub = {g.name: getattr(out[k], g.name) for g in dataclasses.fields(out[k]) if g.init}
            out[k] = _merge(sub, v)
        else:
            out[k] = v
    return out


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'.{hint} Allowed keys here: {', '.join(prefix + n for n in names)}."
            )
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]):
            value = _merge(_section_defaults(fields[key]), value)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [n for n in names if n not in kwargs]
        raise ConfigError(f"{prefix or 'config'}: {e}; required keys: {', '.join(prefix + m for m in missing)}") from None


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' is not key=value (e.g. train.lr=3e-4)")
        key, raw = pair.split("=", 1)
        # YAML parses numbers, booleans, null and [lists] the way a config file would.
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from a YAML file (optional) and ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_path(data, key, value)
    try:
        return _build(cls, data)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # raised by a __post_init__ validation
        raise ConfigError(str(e)) from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, type, help) for every field, nested sections flattened — used by ``--help``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        rows.append((prefix + f.name, _type_name(tp), f"{f.metadata.get('help', '')} [default: {default}]"))
    return rows
