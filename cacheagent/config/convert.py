"""Conversion of raw config values (YAML, environment text, flags) driven by field annotations.

``convert(hint, raw, key)`` raises ``ConfigError(key, ...)``; list items and mapping values get
keys like ``registries.insecure[1]`` and ``registries.mirrors.docker.io``.
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Literal, Union, cast, get_args, get_origin

import yaml

from cacheagent.config.values import Parser, metadata
from cacheagent.errors import ConfigError


def convert(hint: object, raw: object, key: str) -> object:
    try:
        return _convert_value(hint, raw, key)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def _convert_value(hint: object, raw: object, key: str) -> object:
    origin = get_origin(hint)
    if origin is Annotated:
        parsers = metadata(hint, Parser)
        if parsers:
            return parsers[0].parse(raw)
        return _convert_value(get_args(hint)[0], raw, key)
    if origin in (Union, types.UnionType):
        return _convert_optional(hint, raw, key)
    if origin is Literal:
        return _convert_literal(get_args(hint), raw)
    if origin is tuple:
        return _convert_list(get_args(hint)[0], raw, key)
    if origin is Mapping or origin is dict:
        return _convert_mapping(get_args(hint)[1], raw, key)
    converter = _SCALARS.get(cast(type, hint))
    if converter is None:
        raise TypeError(f"config field {key} has an unsupported type {hint!r}")
    return converter(raw)


def _convert_optional(hint: object, raw: object, key: str) -> object:
    args = [arg for arg in get_args(hint) if arg is not type(None)]
    if len(args) != 1:
        raise TypeError(f"config field {key}: only 'X | None' unions are supported")
    if raw is None or raw == "":
        return None
    return _convert_value(args[0], raw, key)


def _convert_literal(choices: tuple[object, ...], raw: object) -> object:
    if isinstance(raw, str):
        for choice in choices:
            if isinstance(choice, str) and choice.lower() == raw.strip().lower():
                return choice
    raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {raw!r}")


def _convert_list(item: object, raw: object, key: str) -> tuple[object, ...]:
    if isinstance(raw, str):
        items: list[object] = [part.strip() for part in raw.split(",") if part.strip()]
    elif isinstance(raw, list | tuple):
        items = list(raw)
    else:
        raise ValueError(f"expected a list (or comma-separated text), got {raw!r}")
    return tuple(convert(item, value, f"{key}[{index}]") for index, value in enumerate(items))


def _convert_mapping(value_hint: object, raw: object, key: str) -> dict[str, object]:
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw) or {}
        except yaml.YAMLError:
            raise ValueError(f"expected a mapping in YAML flow syntax, got {raw!r}") from None
    if not isinstance(raw, Mapping):
        raise ValueError(f"expected a mapping, got {raw!r}")
    result: dict[str, object] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(key, f"expected text keys, got {name!r}")
        result[name] = convert(value_hint, value, f"{key}.{name}")
    return result


def _to_int(raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"[+-]?\d+", raw.strip()):
        return int(raw)
    raise ValueError(f"expected a whole number, got {raw!r}")


def _to_float(raw: object) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        number = float(raw)
    elif isinstance(raw, str):
        try:
            number = float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    else:
        raise ValueError(f"expected a number, got {raw!r}")
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {raw!r}")
    return number


def _to_str(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"expected text, got {type(raw).__name__} {raw!r} (quote it in YAML)")
    if not raw:
        raise ValueError("must not be empty")
    return raw


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _to_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {raw!r}")


def to_path(raw: object) -> Path:
    if not isinstance(raw, str | Path) or not Path(raw).is_absolute():
        raise ValueError(f"expected an absolute path, got {raw!r}")
    return Path(raw)


_SCALARS: dict[type, Callable[[object], object]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    Path: to_path,
}
