"""Blob files: verify, make durable, publish by rename. The index side lives in store.py.

Commit order: check size, hash (unless the caller already hashed every byte), chmod 0444,
fsync the file, rename into blobs/, fsync the directory. Until the rename the bytes are only in
partial/, which nothing reads as a blob; after the directory fsync the blob survives a power cut.
A crash anywhere leaves either no blob or a whole verified one (plus, at worst, a blob file the
index does not know yet, which reconciliation adopts).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from cacheagent.digest import ALGORITHM
from cacheagent.errors import DigestMismatchError, SizeMismatchError
from cacheagent.store.crashpoints import crashpoint

BLOB_MODE = 0o444
_CHUNK = 1 << 20


def hash_file(path: Path) -> tuple[str, int]:
    """(digest, size) of a file, streamed through one reused buffer."""
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            digest.update(view[:n])
            size += n
    return f"{ALGORITHM}:{digest.hexdigest()}", size


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """mkdir -p that fsyncs each parent it adds an entry to, so new directories survive a crash."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o755)
        fsync_dir(directory.parent)


def verify(digest: str, size: int, src: Path, *, hashed: bool) -> None:
    """Raise SizeMismatchError / DigestMismatchError unless ``src`` holds exactly this blob."""
    actual_size = src.stat().st_size
    if actual_size != size:
        raise SizeMismatchError(digest, size, actual_size)
    if hashed:
        return
    actual, _ = hash_file(src)
    if actual != digest:
        raise DigestMismatchError(digest, actual)


def seal(src: Path) -> None:
    """Make a verified file read-only and durable before it is published."""
    src.chmod(BLOB_MODE)
    fsync_file(src)


def publish(src: Path, dest: Path) -> None:
    """Rename a sealed file into blobs/ and make the new directory entry durable."""
    make_dirs(dest.parent)
    src.rename(dest)
    crashpoint("blob.after_rename")
    fsync_dir(dest.parent)
    crashpoint("blob.after_dir_fsync")


def same_filesystem(src: Path, directory: Path) -> bool:
    return src.stat().st_dev == directory.stat().st_dev


def copy_into(src: Path, directory: Path, prefix: str) -> Path:
    """Copy a file from another filesystem next to where it will be renamed."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix)
    with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out, _CHUNK)
    return Path(name)


def write_temp(directory: Path, prefix: str, data: bytes) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return Path(name)


def discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
