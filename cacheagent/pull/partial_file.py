"""The partial file of one blob download and its ranges record: every blocking call a
download makes, run in its own threads (one writer, one hasher) so neither queues behind the
other or behind unrelated work in the loop's default executor.

Crash safety rests on write order: bytes are ``pwrite``n first; ``sync_and_record``
``fdatasync``s the file and only then atomically replaces the ``<partial>.ranges`` sidecar, so
the record never claims a byte a crash could lose. ``open`` trusts a record only if it names
this digest and size and the file has the blob's size; otherwise it starts afresh, forgetting
the record before the file changes under it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cacheagent.errors import DISK_FULL_ERRNOS, DiskFullError, StoreError
from cacheagent.pull.ranges import RangeSet, dump_sidecar, load_sidecar
from cacheagent.sources.base import BlobRef

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".ranges"
_HASH_BUFFER_BYTES = 1 << 20


def sidecar_path(partial: Path) -> Path:
    return partial.with_name(partial.name + SIDECAR_SUFFIX)


class PartialFile:
    """One blob's partial file. Every method but ``shutdown`` blocks: call it in a thread
    (``writer`` for writes, ``hasher`` for hashing, any other for the rest)."""

    def __init__(self, path: Path, blob: BlobRef) -> None:
        self.path = path
        self.blob = blob
        self.fd = -1
        self._hash_buf: bytearray | None = None
        # One thread writes (concurrent writers to one file only contend for its inode lock)
        # and one hashes, so neither queues behind the other.
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="cacheagent-write")
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="cacheagent-hash")

    def open(self) -> RangeSet:
        """Open (or create and preallocate) the file; returns the ranges a valid record says
        are already held (empty when starting afresh)."""
        size = self.blob.size
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._sidecar_tmp().unlink(missing_ok=True)  # a record being written when we died
        side = sidecar_path(self.path)
        held = RangeSet()
        if os.fstat(self.fd).st_size == size:
            with contextlib.suppress(FileNotFoundError):
                held = load_sidecar(side.read_text(), self.blob.digest, size)
        if held.total() == 0:
            # Forget any record before the file changes under it, or a crash right after the
            # truncate would leave a record that claims zeros.
            if side.exists():
                side.unlink()
                _fsync_dir(side.parent)
            os.ftruncate(self.fd, 0)
            _preallocate(self.fd, size, self.path)
        else:
            log.info(
                "blob %s: resuming with %d of %d bytes held",
                *(self.blob.digest, held.total(), size),
            )
        return held

    def pwrite_all(self, chunks: list[bytes], offset: int) -> None:
        views = [memoryview(c) for c in chunks]
        try:
            while views:
                n = os.pwritev(self.fd, views, offset)
                offset += n
                while views and n >= len(views[0]):
                    n -= len(views.pop(0))
                if views:
                    views[0] = views[0][n:]
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise DiskFullError(self.path, "writing a partial download") from exc
            raise StoreError(f"writing partial file {self.path}: {exc}") from exc

    def hash_span(self, hasher: hashlib._Hash, start: int, end: int) -> None:
        """Feed bytes ``[start, end)`` to ``hasher`` through one reused buffer."""
        if self._hash_buf is None:
            self._hash_buf = bytearray(_HASH_BUFFER_BYTES)
        buf = self._hash_buf
        view = memoryview(buf)
        pos = start
        while pos < end:
            want = min(len(buf), end - pos)
            n = os.preadv(self.fd, [view[:want]], pos)
            if n <= 0:
                raise StoreError(f"partial file {self.path} ends at byte {pos}, wanted {end}")
            hasher.update(view[:n])
            pos += n

    def flush(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise StoreError(f"flushing partial file {self.path}: {exc}") from exc

    def sync_and_record(self, snapshot: RangeSet) -> None:
        """Make ``snapshot`` the ranges record: data first, then the record, atomically."""
        os.fdatasync(self.fd)
        side = sidecar_path(self.path)
        tmp = self._sidecar_tmp()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, dump_sidecar(self.blob.digest, self.blob.size, snapshot).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(side)
        _fsync_dir(side.parent)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        sidecar_path(self.path).unlink(missing_ok=True)

    def close(self) -> None:
        """Close the descriptor (only once no thread can still be using it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def shutdown(self) -> None:
        self.writer.shutdown(wait=False)
        self.hasher.shutdown(wait=False)

    def _sidecar_tmp(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp-ranges")


def _preallocate(fd: int, size: int, path: Path) -> None:
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(path, f"preallocating {size} bytes for a partial download") from exc
        os.ftruncate(fd, size)  # filesystems without fallocate: a sparse file will do


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
