"""A ``ContentProvider`` over plain directories: ``<root>/<model>/<file path>``.

For demos, tests and benchmarks, and for serving models that are already complete (the store's
``models/`` tree has exactly this shape). Everything is on disk, so reads never block on a
download; there are no leases (nothing here evicts). Symbolic links and special files are not
shown, and a path is opened without following links, so nothing outside ``root`` is reachable.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from cacheagent.errors import ModelNotFoundError
from cacheagent.fuse.provider import FuseFile, ModelListing
from cacheagent.fuse.tree import is_model_name, split_relpath


class DirectoryProvider:
    """Each subdirectory of ``root`` is a model; its regular files are the model's files."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._fds: dict[int, int] = {}  # handle -> file descriptor
        self._next = 1
        self._guard = threading.Lock()

    def models(self) -> list[str]:
        with os.scandir(self.root) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))

    def listing(self, digest: str) -> ModelListing:
        top = self._model_dir(digest)
        files = tuple(_walk(top, ""))
        return ModelListing(files=files, created=top.stat().st_mtime)

    def open_file(self, digest: str, path: str) -> int:
        fd = _open_beneath(self._model_dir(digest), split_relpath(path))
        with self._guard:
            handle = self._next
            self._next += 1
            self._fds[handle] = fd
        return handle

    def read(self, handle: int, offset: int, size: int) -> bytes:
        return os.pread(self._fds[handle], size, offset)

    def release(self, handle: int) -> None:
        with self._guard:
            fd = self._fds.pop(handle)
        os.close(fd)

    def _model_dir(self, digest: str) -> Path:
        top = self.root / digest
        if not is_model_name(digest) or not top.is_dir() or top.is_symlink():
            raise ModelNotFoundError(f"model {digest!r} is not a directory under {self.root}")
        return top


def _walk(directory: Path, prefix: str) -> list[FuseFile]:
    files: list[FuseFile] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                files.extend(_walk(Path(entry.path), f"{rel}/"))
            elif stat.S_ISREG(st.st_mode):
                files.append(FuseFile(path=rel, size=st.st_size, mode=stat.S_IMODE(st.st_mode)))
    return files


def _open_beneath(top: Path, parts: list[str]) -> int:
    """Open ``top/<parts>`` read-only, refusing a symbolic link at every step."""
    nofollow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(top, nofollow | os.O_DIRECTORY)
    try:
        for name in parts[:-1]:
            child = os.open(name, nofollow | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        return os.open(parts[-1], nofollow, dir_fd=fd)
    finally:
        os.close(fd)
