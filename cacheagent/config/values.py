"""Config value types: how a raw value (YAML scalar, environment text, flag) becomes a typed one.

The parsers are public (the CLI parses flags with them too). ``Parser`` and ``Range`` are the
``Annotated`` metadata the loader reads: the first says how to convert, the second which values
are allowed. ``Parser.show`` turns a typed value back into what a config file would say, so the
effective configuration prints in the same notation the file takes (``0660`` for a mode).
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, Literal, TypeVar, Union, cast, get_args, get_origin

_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_SIZE_UNITS = {"": 1, "b": 1} | {
    key: value
    for power, letter in enumerate("kmgtpe", start=1)
    for key, value in (
        (letter, 1000**power),
        (f"{letter}b", 1000**power),
        (f"{letter}i", 1024**power),
        (f"{letter}ib", 1024**power),
    )
}
_NUMBER_RE = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_DURATION_RE = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|s|m|h|d))+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_BYTE_SIZE_EXAMPLE = "a byte size like 500Gi, 10G or 1048576"


def parse_byte_size(value: object) -> int:
    """Bytes from an int or a string with an IEC (Ki, Mi, Gi...) or SI (k, M, G...) suffix.

    Suffixes are case-insensitive and may end in ``B``/``iB``; fractions are allowed when the
    result is a whole number of bytes (``1.5TiB``).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {_BYTE_SIZE_EXAMPLE}, got {value!r}")
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip().lower())
        if match is None or match.group(2) not in _SIZE_UNITS:
            raise ValueError(f"expected {_BYTE_SIZE_EXAMPLE}, got {value!r}")
        amount = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2)]
    elif not math.isfinite(value) or value < 0:
        raise ValueError(f"expected {_BYTE_SIZE_EXAMPLE}, got {value!r}")
    else:
        amount = Fraction(value)
    if amount.denominator != 1:
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(amount)


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like ``30s``, ``5m``, ``1h30m``, ``250ms``, ``2d``."""
    expected = f"expected a duration like 30s, 5m, 1h or a number of seconds, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(expected)
    if isinstance(value, str):
        text = value.strip().lower()
        if _NUMBER_RE.fullmatch(text):
            return float(text)
        if not _DURATION_RE.fullmatch(text):
            raise ValueError(expected)
        return sum(
            float(amount) * _DURATION_UNITS[unit]
            for amount, unit in _DURATION_PART_RE.findall(text)
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(expected)
    return float(value)


def parse_listen_address(value: object) -> str:
    """``host:port``, ``[v6]:port`` or ``:port`` (all interfaces) for a TCP listener."""
    expected = f"expected host:port like 0.0.0.0:9464, got {value!r}"
    if not isinstance(value, str):
        raise ValueError(expected)
    host, colon, port = value.rpartition(":")
    if not colon or not port.isascii() or not port.isdigit():
        raise ValueError(expected)
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {int(port)} out of range 1-65535 in {value!r}")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ValueError(expected)
    return f"{host}:{int(port)}"


def parse_http_url(value: object) -> str:
    """An ``http(s)://host[...]`` base URL, without a trailing ``/``."""
    expected = f"expected an http:// or https:// URL, got {value!r}"
    if not isinstance(value, str):
        raise ValueError(expected)
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.split("/", 1)[0]:
        raise ValueError(expected)
    return value.rstrip("/")


def parse_csi_driver_name(value: object) -> str:
    """A CSI driver name: at most 63 characters, alphanumerics with ``-`` and ``.`` inside."""
    if not isinstance(value, str) or not re.fullmatch(
        r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,61}[A-Za-z0-9])?", value
    ):
        raise ValueError(
            "expected a CSI driver name (at most 63 characters, letters, digits, '-' and '.', "
            f"starting and ending with a letter or digit), got {value!r}"
        )
    return value


def parse_socket_mode(value: object) -> int:
    """An octal file mode for the API socket: owner read-write, group optional, others none.

    YAML reads an unquoted ``0660`` as the octal number it is; text is read as octal too
    (``"660"``, ``"0660"``, ``"0o660"``).
    """
    expected = f"expected an octal mode like 0660 or 0600, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(expected)
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        if not re.fullmatch(r"[0-7]{1,4}", text):
            raise ValueError(expected)
        value = int(text, 8)
    if not 0 <= value <= 0o777:
        raise ValueError(expected)
    if value & 0o600 != 0o600:
        raise ValueError(f"the owner (the agent) needs read and write, got {value:04o}")
    if value & 0o007:
        raise ValueError(
            f"others must get no access to the privileged agent's socket, got {value:04o}; "
            "grant a group instead (agent.socket_group)"
        )
    if value & 0o111:
        raise ValueError(f"execute bits mean nothing on a socket, got {value:04o}")
    return value


def show_mode(value: object) -> object:
    return f"{cast(int, value):04o}"


_GROUP_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|\d+")


def parse_group(value: object) -> str:
    """A group name (``cacheagent-ops``) or a numeric GID (``1500``), resolved at bind time."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if not isinstance(value, str) or not _GROUP_RE.fullmatch(value):
        raise ValueError(f"expected a group name or a numeric GID, got {value!r}")
    return value


@dataclass(frozen=True)
class Capacity:
    """A store size limit: a byte count or a percentage of the store's filesystem."""

    bytes: int | None = None
    percent: float | None = None

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.percent is None):
            raise ValueError("Capacity takes exactly one of bytes or percent")
        if self.bytes is not None and self.bytes <= 0:
            raise ValueError(f"capacity must be positive, got {self.bytes} bytes")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise ValueError(f"capacity percentage must be in (0, 100], got {self.percent}%")

    @classmethod
    def parse(cls, value: object) -> Capacity:
        if isinstance(value, Capacity):
            return value
        if isinstance(value, str) and value.strip().endswith("%"):
            number = value.strip()[:-1].strip()
            if _NUMBER_RE.fullmatch(number):
                return cls(percent=float(number))
        try:
            size = parse_byte_size(value)
        except ValueError:
            raise ValueError(
                f"expected a byte size like 500Gi or a percentage like 80%, got {value!r}"
            ) from None
        return cls(bytes=size)

    def resolve(self, fs_total: int) -> int:
        """The limit in bytes for a filesystem of ``fs_total`` bytes."""
        if self.bytes is not None:
            return self.bytes
        return int(fs_total * cast(float, self.percent) / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.bytes)


# --- annotation metadata that drives validation -----------------------------------------------


@dataclass(frozen=True)
class Parser:
    """``Annotated`` metadata: how a raw value becomes this field's value (raises ValueError)."""

    parse: Callable[[object], object]
    show: Callable[[object], object] | None = None


@dataclass(frozen=True)
class Range:
    """``Annotated`` metadata: numeric bounds; ``open_low``/``open_high`` exclude the bound."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def problem(self, value: float) -> str | None:
        too_low = self.low is not None and (
            value < self.low or (self.open_low and value == self.low)
        )
        too_high = self.high is not None and (
            value > self.high or (self.open_high and value == self.high)
        )
        return f"expected a value in {self}, got {value!r}" if too_low or too_high else None

    def __str__(self) -> str:
        left = "(" if self.open_low or self.low is None else "["
        right = ")" if self.open_high or self.high is None else "]"
        low = "-inf" if self.low is None else _number(self.low)
        high = "inf" if self.high is None else _number(self.high)
        return f"{left}{low}, {high}{right}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


ByteSize = Annotated[int, Parser(parse_byte_size)]
Seconds = Annotated[float, Parser(parse_duration)]
Ratio = Annotated[float, Range(0.0, 1.0, open_low=True)]
ListenAddress = Annotated[str, Parser(parse_listen_address)]
HttpUrl = Annotated[str, Parser(parse_http_url)]
CsiDriverName = Annotated[str, Parser(parse_csi_driver_name)]
CapacitySetting = Annotated[Capacity, Parser(Capacity.parse, show=str)]
SocketMode = Annotated[int, Parser(parse_socket_mode, show=show_mode)]
GroupName = Annotated[str, Parser(parse_group)]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]

MiB = 1024 * 1024

_T = TypeVar("_T")


def metadata(hint: object, kind: type[_T]) -> list[_T]:
    """The ``kind`` metadata of an ``Annotated`` hint, looking inside ``X | None``."""
    if get_origin(hint) in (Union, types.UnionType):
        inner = [arg for arg in get_args(hint) if arg is not type(None)]
        return metadata(inner[0], kind) if len(inner) == 1 else []
    if get_origin(hint) is not Annotated:
        return []
    return [meta for meta in get_args(hint)[1:] if isinstance(meta, kind)]
