"""Typed TOML config loading with errors that name the file and the key.

Each component describes its config as nested frozen dataclasses whose field
defaults are *the* defaults (there is no second copy). ``load_config`` reads a
TOML file into them and refuses, with a one-line :class:`ConfigError`:

* unknown keys (with a "did you mean" hint: a typo must not silently fall back
  to a default),
* values of the wrong type,
* values that a dataclass's ``__post_init__`` rejects by raising :class:`Invalid`.

Supported field types: ``str``, ``int``, ``float`` (an int is accepted), ``bool``,
``Literal[...]`` of strings, ``X | None``, nested dataclasses, ``list[str]`` and
``list[<dataclass>]`` (TOML arrays of tables).
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from shared.errors import ConfigError

T = TypeVar("T")


class Invalid(Exception):
    """Raised by a config dataclass's ``__post_init__`` for a bad value."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


def load_config(cls: type[T], path: str | Path | None) -> T:
    """Read ``path`` (TOML) into ``cls``; ``None`` gives the defaults."""
    if path is None:
        return _build(cls, {}, "<defaults>", "")
    return _build(cls, read_toml(path), str(path), "")


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's tables, unchecked; ConfigError if it cannot be read as TOML."""
    name = str(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(name, None, "file not found") from None
    except OSError as exc:
        raise ConfigError(name, None, f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(name, None, f"invalid TOML: {exc}") from None


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>") -> T:
    """Build a config from an already parsed mapping (tests, CLI overrides)."""
    return _build(cls, data, source, "")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _build(cls: type[T], data: Any, path: str, prefix: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(path, prefix or None, f"must be a table, got {_tname(data)}")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(path, _join(prefix, key), f"unknown key{extra}")
    kwargs: dict[str, Any] = {}
    for name in fields:
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], path, _join(prefix, name))
    try:
        return cls(**kwargs)
    except Invalid as exc:
        raise ConfigError(path, _join(prefix, exc.key), exc.message) from None


def _tname(value: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a float",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _convert(tp: Any, value: Any, path: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union type {tp!r} for {key}")
        return _convert(args[0], value, path, key)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(path, key, f"must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(path, key, f"must be an array, got {_tname(value)}")
        return tuple(_convert(item_tp, item, path, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise ConfigError(path, key, f"must be an array, got {_tname(value)}")
        return tuple(_convert(item_tp, item, path, f"{key}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, path, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, key, f"must be true or false, got {_tname(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, key, f"must be an integer, got {_tname(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, key, f"must be a number, got {_tname(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, key, f"must be a string, got {_tname(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def positive(key: str, value: float) -> None:
    """Raise :class:`Invalid` unless ``value`` > 0 (for ``__post_init__``)."""
    if not value > 0:
        raise Invalid(key, f"must be > 0, got {value!r}")


def port(key: str, value: int) -> None:
    if not 1 <= value <= 65535:
        raise Invalid(key, f"must be a TCP port 1-65535, got {value!r}")
