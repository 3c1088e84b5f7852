"""The directory tree of one model, built from its manifest's file list. Pure: no I/O.

The filesystem answers lookups, ``stat`` and listings from this tree alone, so a model whose
blobs are still downloading already shows every file with its final size.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

from cacheagent.errors import UnsafePathError
from cacheagent.fuse.provider import FuseFile

DIR_MODE = 0o555
NAME_MAX = 255
_BLOCK = 512  # st_blocks unit


@dataclass(frozen=True)
class Directory:
    children: tuple[str, ...]  # sorted entry names
    subdirs: int  # how many children are directories (for st_nlink)


Node = FuseFile | Directory


@dataclass(frozen=True)
class ModelTree:
    """Nodes by model-relative path ("" is the model's root directory)."""

    nodes: dict[str, Node]
    total_bytes: int
    file_count: int

    @classmethod
    def build(cls, files: Iterable[FuseFile]) -> ModelTree:
        """Index ``files``; raises UnsafePathError for a path that is unsafe or clashes."""
        found: dict[str, FuseFile] = {}
        children: dict[str, set[str]] = {"": set()}
        for file in files:
            parts = split_relpath(file.path)
            if file.path in found or file.path in children:
                raise UnsafePathError(file.path, "declared twice (or as a file and a directory)")
            found[file.path] = file
            _add_parents(children, parts)
        clash = children.keys() & found.keys()
        if clash:
            raise UnsafePathError(min(clash), "is both a file and a directory")
        nodes: dict[str, Node] = dict(found)
        for path, names in children.items():
            ordered = tuple(sorted(names))
            subdirs = sum(1 for name in ordered if _join(path, name) in children)
            nodes[path] = Directory(ordered, subdirs)
        total = sum(file.size for file in found.values())
        return cls(nodes, total, len(found))

    def lookup(self, relpath: str) -> Node | None:
        return self.nodes.get(relpath)


def _add_parents(children: dict[str, set[str]], parts: list[str]) -> None:
    parent = ""
    for name in parts:
        children.setdefault(parent, set()).add(name)
        parent = _join(parent, name)


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def split_relpath(path: str) -> list[str]:
    """The components of a model-relative path; raises UnsafePathError if it could escape."""
    if not path:
        raise UnsafePathError(path, "empty path")
    if path.startswith("/"):
        raise UnsafePathError(path, "absolute path")
    if "\0" in path:
        raise UnsafePathError(path, "contains NUL")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePathError(path, f"bad component {part!r}")
        if len(part.encode()) > NAME_MAX:
            raise UnsafePathError(path, f"component longer than {NAME_MAX} bytes")
    return parts


def is_model_name(name: str) -> bool:
    """Whether a provider's model name can be a directory name at the mount root."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def dir_attrs(subdirs: int, time_ns: int) -> dict[str, int]:
    return _attrs(stat.S_IFDIR | DIR_MODE, 2 + subdirs, 0, time_ns)


def file_attrs(file: FuseFile, time_ns: int) -> dict[str, int]:
    """Regular file, always readable; execute bits survive (scripts shipped with a model)."""
    mode = stat.S_IFREG | 0o444 | (file.mode & 0o111)
    return _attrs(mode, 1, file.size, time_ns)


def _attrs(mode: int, nlink: int, size: int, time_ns: int) -> dict[str, int]:
    return {
        "st_mode": mode,
        "st_nlink": nlink,
        "st_size": size,
        "st_blocks": (size + _BLOCK - 1) // _BLOCK,
        "st_uid": 0,
        "st_gid": 0,
        "st_atime": time_ns,
        "st_mtime": time_ns,
        "st_ctime": time_ns,
    }
