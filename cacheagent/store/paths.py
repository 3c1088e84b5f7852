"""Where everything lives in a store directory, and which model-relative paths are allowed. Pure.

Layout (``root`` is the store directory)::

    blobs/sha256/<2 hex>/<64 hex>     verified blobs, mode 0444
    models/sha256/<64 hex>/<path>     model trees: hard links to blobs, directories 0555
    models/sha256/.tmp-<hex>-<tag>    a tree being built or deleted (never a bind-mount source)
    partial/<hex>                     a download in progress (``<hex>.ranges`` sidecar: the pull
                                      engine's record of the ranges held; ``<hex>.tmp-*``: small
                                      blobs being written)
    index.db                          the SQLite index (WAL)
    .lock                             flock held by the one agent that owns the store

Model trees are named ``models/sha256/<hex>`` rather than ``models/sha256:<hex>``: the path is
used as a bind-mount source and handed to tools that split on ':' (``docker -v src:dst``, PATH-like
lists), and it mirrors the blob layout. Temporary trees live in the same parent directory as the
final ones, so renaming a read-only (0555) tree into place never needs to rewrite its ``..``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cacheagent.digest import ALGORITHM, hex_of
from cacheagent.errors import UnsafePathError

MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
TMP_PREFIX = ".tmp-"

_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_PARTIAL_RE = re.compile(r"^(?P<hex>[0-9a-f]{64})(?:\.ranges|\.tmp-.*)?$")


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def safe_relpath(path: str) -> str:
    """Normalise a model-relative file path, or raise UnsafePathError saying why it is refused.

    ``.`` components are dropped (tar members often start with ``./``); anything that could
    leave the tree or is ambiguous (absolute, ``..``, ``a//b``, trailing ``/``, NUL) is refused.
    """
    if not path:
        raise UnsafePathError(path, "empty path")
    if "\x00" in path:
        raise UnsafePathError(path, "contains a NUL byte")
    if path.startswith("/"):
        raise UnsafePathError(path, "absolute path")
    if _nbytes(path) > MAX_PATH_BYTES:
        raise UnsafePathError(path, f"longer than {MAX_PATH_BYTES} bytes")
    parts: list[str] = []
    for part in path.split("/"):
        if part == "":
            raise UnsafePathError(path, "empty path component ('//' or a trailing '/')")
        if part == "..":
            raise UnsafePathError(path, "'..' component")
        if _nbytes(part) > MAX_COMPONENT_BYTES:
            raise UnsafePathError(path, f"a component is longer than {MAX_COMPONENT_BYTES} bytes")
        if part != ".":
            parts.append(part)
    if not parts:
        raise UnsafePathError(path, "names the model root, not a file")
    return "/".join(parts)


@dataclass(frozen=True)
class TreeShape:
    """The directories and files of a model tree, parents before children."""

    dirs: tuple[str, ...]
    files: tuple[str, ...]


def tree_shape(paths: Iterable[str]) -> TreeShape:
    """Check that already-normalised paths form a tree: no path twice, no file where a
    directory must be."""
    files: set[str] = set()
    dirs: set[str] = set()
    for path in paths:
        if path in files:
            raise UnsafePathError(path, "two files at the same path")
        files.add(path)
        parent = PurePosixPath(path).parent
        while str(parent) != ".":
            dirs.add(str(parent))
            parent = parent.parent
    clash = sorted(files & dirs)
    if clash:
        raise UnsafePathError(clash[0], "is a file, but other files need it to be a directory")
    return TreeShape(
        dirs=tuple(sorted(dirs, key=lambda d: (d.count("/"), d))), files=tuple(sorted(files))
    )


def digest_of_hex(hex_digest: str) -> str | None:
    return f"{ALGORITHM}:{hex_digest}" if _HEX_RE.match(hex_digest) else None


def digest_of_partial(name: str) -> str | None:
    """The blob digest a file in partial/ belongs to, or None for a name the store never makes."""
    match = _PARTIAL_RE.match(name)
    return f"{ALGORITHM}:{match['hex']}" if match else None


@dataclass(frozen=True)
class Layout:
    """Path arithmetic for one store root; touches no file."""

    root: Path

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs" / ALGORITHM

    @property
    def models_dir(self) -> Path:
        return self.root / "models" / ALGORITHM

    @property
    def partial_dir(self) -> Path:
        return self.root / "partial"

    @property
    def index_path(self) -> Path:
        return self.root / "index.db"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def blob_path(self, digest: str) -> Path:
        hex_digest = hex_of(digest)
        return self.blobs_dir / hex_digest[:2] / hex_digest

    def partial_path(self, digest: str) -> Path:
        return self.partial_dir / hex_of(digest)

    def ranges_path(self, digest: str) -> Path:
        return self.partial_dir / f"{hex_of(digest)}.ranges"

    def model_path(self, digest: str) -> Path:
        return self.models_dir / hex_of(digest)

    def tmp_tree_path(self, digest: str, tag: str) -> Path:
        return self.models_dir / f"{TMP_PREFIX}{hex_of(digest)}-{tag}"
