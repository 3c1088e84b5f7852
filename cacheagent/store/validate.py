"""Checks the store runs on what it is given before anything is written. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from cacheagent.digest import check_digest, sha256_digest
from cacheagent.errors import ConfigError, DigestMismatchError
from cacheagent.store.paths import TreeShape, safe_relpath, tree_shape
from cacheagent.store.records import ModelFile


def checked_files(
    manifest_digest: str, files: Sequence[ModelFile], manifest: bytes
) -> tuple[tuple[ModelFile, ...], TreeShape]:
    """Validate a model record: digests, sizes, safe paths that form a tree. Returns the files
    with normalised paths, sorted by path."""
    check_digest(manifest_digest)
    actual = sha256_digest(manifest)
    if actual != manifest_digest:
        raise DigestMismatchError(manifest_digest, actual, what="manifest")
    clean: list[ModelFile] = []
    for f in files:
        check_digest(f.blob)
        if f.size < 0:
            raise ValueError(f"file {f.path!r}: negative size {f.size}")
        clean.append(ModelFile(safe_relpath(f.path), f.blob, f.size, f.mode))
    shape = tree_shape(f.path for f in clean)
    return tuple(sorted(clean, key=lambda f: f.path)), shape


def check_capacity(capacity: int | None, high: float, low: float) -> None:
    if capacity is not None and capacity < 0:
        raise ConfigError("store.capacity", f"must not be negative (got {capacity})")
    if not 0 < high <= 1:
        raise ConfigError("store.high_watermark", f"must be in (0, 1] (got {high})")
    if not 0 < low <= high:
        raise ConfigError("store.low_watermark", f"must be in (0, high_watermark] (got {low})")
