"""Reading one config section: a TOML table (or `SHOAL_<SECTION>_<KEY>` strings) into its frozen dataclass,
with errors that name `[section] key`. Every package's section (`[api]`, `[policy]`, `[split]`, ...) is built
through `section_from_mapping`; it sits below every package so each may use it (`PolicyConfig.updated`)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """The configuration (file, environment or flags) is invalid; the message says where and why."""


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def _coerce(value: Any, hint: Any) -> Any:
    """Turn a string (from env/flags) into the field's type; leave other values to type checks."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
            return None
        return _coerce(value, args[0]) if len(args) == 1 else value
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if not isinstance(value, str):
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if hint is Path:
            raise ValueError("expected a path string")
        return value
    if hint is bool:
        return _parse_bool(value)
    if hint is str:
        return value
    if hint is int:
        return int(value)
    if hint is float:
        return float(value)
    if hint is Path:
        return Path(value)
    if origin in (list, tuple):
        return origin(item.strip() for item in value.split(",") if item.strip())
    return value


def _check_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, hint) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint) if isinstance(hint, type) else True


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}


def section_from_mapping(cls: type, values: Mapping[str, Any], section: str, coerce: bool = True) -> Any:
    """Build section dataclass `cls` from `values`, with errors that name `[section] key`."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"[{section}] has unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        hint = hints[key]
        expected = _TYPE_NAMES.get(hint, str(hint))
        try:
            converted = _coerce(value, hint) if coerce else value
        except ValueError:
            raise ConfigError(f"[{section}] {key} must be {expected}, got {value!r}") from None
        if not coerce and hint is float and isinstance(value, int) and not isinstance(value, bool):
            converted = float(value)
        if not _check_type(converted, hint):
            raise ConfigError(f"[{section}] {key} must be {expected}, got {value!r}")
        kwargs[key] = converted
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{section}] {exc}") from None
