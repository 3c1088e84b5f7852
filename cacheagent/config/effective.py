"""The effective configuration as a config file would say it, with each setting's origin.

``effective_values(config)`` gives plain YAML/JSON values (a mode as ``0660``, a capacity as
``90%``, paths as text), so its output is itself a valid config file: ``cacheagent config >
f.yaml; cacheagent config --check f.yaml`` passes and loads the same configuration.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from pathlib import PurePath
from typing import Any

import yaml

from cacheagent.config.loader import Layered
from cacheagent.config.schema import Config, Section, hints
from cacheagent.config.values import Parser, metadata


def effective_values(config: Config) -> dict[str, dict[str, Any]]:
    """``{section: {key: plain value}}`` for every setting, defaults included."""
    result: dict[str, dict[str, Any]] = {}
    for section_field in fields(config):
        section: Section = getattr(config, section_field.name)
        section_hints = hints(type(section))
        result[section_field.name] = {
            f.name: _plain(getattr(section, f.name), section_hints[f.name]) for f in fields(section)
        }
    return result


def effective_json(layered: Layered) -> dict[str, Any]:
    """``{"config": {...}, "sources": {"section.key": kind}, "details": {"section.key": text}}``
    where kind is ``default``, ``file``, ``environment`` or ``flag``."""
    values = effective_values(layered.config)
    keys = [f"{s}.{k}" for s, settings in values.items() for k in settings]
    return {
        "config": values,
        "sources": {key: layered.origin(key).kind for key in keys},
        "details": {key: str(layered.origin(key)) for key in keys},
    }


def effective_yaml(layered: Layered) -> str:
    """The effective configuration as YAML, each setting followed by ``# <origin>``."""
    lines: list[str] = []
    for section, settings in effective_values(layered.config).items():
        lines.append(f"{section}:")
        for key, value in settings.items():
            text = _flow(value)
            lines.append(f"  {key}: {text}  # {layered.origin(f'{section}.{key}')}")
    return "\n".join(lines) + "\n"


def _flow(value: Any) -> str:
    """One-line YAML for a plain value (JSON is valid YAML flow syntax and always one line)."""
    if isinstance(value, str):
        dumped = yaml.safe_dump(value, default_flow_style=True, width=1 << 16)
        return dumped.removesuffix("\n...\n").strip()
    return json.dumps(value)


def _plain(value: object, hint: object) -> Any:
    parsers = metadata(hint, Parser)
    if value is not None and parsers and parsers[0].show is not None:
        return parsers[0].show(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(item, None) for item in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, None) for k, v in value.items()}
    return value
