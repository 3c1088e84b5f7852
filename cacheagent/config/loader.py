"""Loading the configuration: defaults, then a YAML file, then environment, then flags.

``load_config(path, env, overrides)`` layers, later wins:

1. the dataclass defaults (``cacheagent.config.schema``);
2. the YAML file, ``section: {key: value}``;
3. environment variables ``CACHEAGENT_<SECTION>__<KEY>`` (``CACHEAGENT_PULL__RETRIES=3``).
   Lists are comma-separated (``a,b``), mappings are YAML flow text (``{docker.io: [m.local]}``),
   an empty value unsets an optional setting. Variables without the ``__`` separator
   (``CACHEAGENT_CONFIG``...) are not settings and are ignored;
4. ``overrides`` with dotted keys (``{"store.root": "/x"}``), typically command-line flags;
   a ``None`` value means "flag not given" and is skipped.

A layer replaces a whole setting (a mapping is replaced, not merged key by key).
``load_layered`` also returns where each setting came from (``Origin``), which is what
``cacheagent config`` prints. Every error is a ``ConfigError`` whose key is the dotted path and
whose message says what was expected and where the value came from.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, TypeVar, cast

import yaml

from cacheagent.config.convert import convert
from cacheagent.config.schema import Config, Section, hints, section_types
from cacheagent.errors import ConfigError

ENV_PREFIX = "CACHEAGENT_"
_T = TypeVar("_T")

OriginKind = Literal["default", "file", "environment", "flag"]


@dataclass(frozen=True)
class Origin:
    """Where a setting's value came from: ``kind`` and the file, variable or flag (``detail``)."""

    kind: OriginKind
    detail: str = ""

    def __str__(self) -> str:
        return {
            "default": "default",
            "file": f"file {self.detail}",
            "environment": f"environment variable {self.detail}",
            "flag": self.detail or "flag",
        }[self.kind]


DEFAULT = Origin("default")


@dataclass(frozen=True)
class Layered:
    """A loaded configuration and the origin of every setting that is not a default."""

    config: Config
    origins: Mapping[str, Origin]

    def origin(self, key: str) -> Origin:
        return self.origins.get(key, DEFAULT)


def load_config(
    path: Path | None,
    env: Mapping[str, str],
    overrides: Mapping[str, object],
    *,
    labels: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration from its layers; raises ``ConfigError`` naming the bad key."""
    return load_layered(path, env, overrides, labels=labels).config


def load_layered(
    path: Path | None,
    env: Mapping[str, str],
    overrides: Mapping[str, object],
    *,
    labels: Mapping[str, str] | None = None,
) -> Layered:
    """``load_config`` plus each setting's origin. ``labels`` names the flag behind an
    override key (``--set store.root=/x``, ``--socket``) for messages and ``cacheagent config``."""
    layers = _Layers()
    if path is not None:
        layers.add_file(path)
    for name in sorted(env):
        layers.add_env(name, env[name])
    for key, value in overrides.items():
        if value is not None:
            label = (labels or {}).get(key, f"--set {key}")
            layers.set(key, value, Origin("flag", label))
    return Layered(layers.build(), dict(layers.origins))


class _Layers:
    """Raw values per dotted key, with where each came from (for error messages)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, object]] = {}
        self.origins: dict[str, Origin] = {}

    def add_file(self, path: Path) -> None:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read the config file: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), f"not valid YAML: {exc}") from None
        if data is None:
            return
        if not isinstance(data, dict):
            raise ConfigError(
                str(path), f"expected a mapping of sections, got {type(data).__name__}"
            )
        origin = Origin("file", str(path))
        for section, settings in data.items():
            _section_class(str(section), str(section), origin)
            if not isinstance(settings, dict | None):
                raise ConfigError(
                    str(section),
                    f"expected a mapping of settings, got {type(settings).__name__} "
                    f"(from {origin})",
                )
            for key, value in (settings or {}).items():
                self.set(f"{section}.{key}", value, origin)

    def add_env(self, name: str, value: str) -> None:
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            return
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2:
            raise ConfigError(
                name.lower(), f"environment variable {name} is not {ENV_PREFIX}<SECTION>__<KEY>"
            )
        self.set(".".join(parts), value, Origin("environment", name))

    def set(self, key: str, value: object, origin: Origin) -> None:
        section, _, field_name = key.partition(".")
        names = [f.name for f in fields(_section_class(section, key, origin))]
        if field_name not in names:
            raise ConfigError(
                key, f"unknown key; {section} has: {', '.join(names)} (from {origin})"
            )
        self.values.setdefault(section, {})[field_name] = value
        self.origins[key] = origin

    def build(self) -> Config:
        built: dict[str, Section] = {}
        for section, cls in section_types().items():
            try:
                built[section] = _build_section(cls, self.values.get(section, {}))
            except ConfigError as exc:
                setting = _SETTING_RE.match(exc.key)
                origin = self.origins.get(setting.group(0)) if setting else None
                if origin is None:
                    raise
                raise ConfigError(exc.key, f"{exc.problem} (from {origin})") from None
        return cast(Callable[..., Config], Config)(**built)


_SETTING_RE = re.compile(r"[^.\[]+\.[^.\[]+")


def _section_class(section: str, key: str, origin: Origin) -> type[Section]:
    sections = section_types()
    if section not in sections:
        raise ConfigError(
            key, f"unknown section {section!r}; known: {', '.join(sections)} (from {origin})"
        )
    return sections[section]


def _build_section(cls: type[_T], raw: Mapping[str, object]) -> _T:
    section = cast(type[Section], cls).section
    annotations = hints(cls)
    kwargs = {
        name: convert(annotations[name], value, f"{section}.{name}") for name, value in raw.items()
    }
    return cast(Callable[..., _T], cls)(**kwargs)
