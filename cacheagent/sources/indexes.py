"""Choosing the one manifest of an image index a pull follows. Pure.

Image indexes (``select_from_index``): an entry whose descriptor carries a ModelPack
``artifactType`` (or an annotation naming a ModelPack media type, or an ``org.cncf.model.*``
annotation) wins over every platform entry, because modelcar builders publish one index
holding both a runnable image for ``linux/amd64`` (the model under ``/models``) and the ModelPack
manifest (platform ``unknown/unknown``); the ModelPack one is the model itself, with per-file
layers the pull can share and verify file by file.
"""

from __future__ import annotations

from cacheagent.errors import SourceError
from cacheagent.sources.manifest import (
    ANNOTATION_DOCKER_REF_TYPE,
    MODELPACK_ARTIFACTS,
    MODELPACK_CONFIGS,
    Descriptor,
    ParsedIndex,
)


def select_from_index(index: ParsedIndex, platform: tuple[str, str] | None) -> Descriptor:
    """Pick the index entry to follow.

    An entry whose descriptor says it is a ModelPack artifact wins (module docstring); else an
    entry whose platform is ``(os, architecture)``; else the one entry without a platform
    (a plain artifact); else the only entry. Anything else is ambiguous and refused, naming the
    choices, rather than guessed.
    """
    entries = [e for e in index.manifests if ANNOTATION_DOCKER_REF_TYPE not in e.annotations]
    if not entries:
        raise SourceError("image index lists no manifests")
    modelpacks = [e for e in entries if _says_modelpack(e)]
    if len(modelpacks) == 1:
        return modelpacks[0]
    if modelpacks:
        raise SourceError(
            f"image index lists {len(modelpacks)} ModelPack manifests: {_choices(modelpacks)}"
        )
    if platform is not None:
        matching = [
            e
            for e in entries
            if e.platform and (e.platform.os, e.platform.architecture) == platform
        ]
        if len(matching) == 1:
            return matching[0]
        if matching:
            raise SourceError(
                f"image index has {len(matching)} entries for platform {_plat(platform)}: "
                f"{_choices(matching)}"
            )
    artifacts = [e for e in entries if e.platform is None]
    if len(artifacts) == 1:
        return artifacts[0]
    if len(entries) == 1:
        return entries[0]
    wanted = f"platform {_plat(platform)}" if platform else "no platform given"
    raise SourceError(f"image index entry is ambiguous ({wanted}): {_choices(entries)}")


def _says_modelpack(entry: Descriptor) -> bool:
    """The index entry declares a ModelPack manifest: by its ``artifactType`` (OCI 1.1), or by
    an annotation naming a ModelPack media type or an ``org.cncf.model.*`` key."""
    if entry.artifact_type in MODELPACK_ARTIFACTS:
        return True
    return any(
        key.startswith(("org.cncf.model.", "org.cnai.model."))
        or value in MODELPACK_ARTIFACTS
        or value in MODELPACK_CONFIGS
        for key, value in entry.annotations.items()
    )


def _plat(platform: tuple[str, str]) -> str:
    return f"{platform[0]}/{platform[1]}"


def _choices(entries: list[Descriptor]) -> str:
    def one(e: Descriptor) -> str:
        if e.platform is None:
            return f"{e.digest} (no platform)"
        variant = f"/{e.platform.variant}" if e.platform.variant else ""
        return f"{e.digest} ({e.platform.os}/{e.platform.architecture}{variant})"

    return ", ".join(one(e) for e in entries)
