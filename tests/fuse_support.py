"""A content provider that simulates a model still downloading, for FUSE tests and benchmarks.

``LazyTestProvider`` serves each file from a partial file that a background thread fills in
order, slowly (``rate`` bytes/s), from a source file standing in for the origin. A read of bytes
not held yet fetches that range at once (ahead of the background copy, as the real pull engine
does), records it as lazy-fetched, then answers. When the copy is complete the blob is
"verified" and renamed; a blob marked ``corrupt`` fails that verification, after which every
read raises DigestMismatchError. The held ranges are a ``cacheagent.pull.ranges.RangeSet``.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from cacheagent.errors import DigestMismatchError, ModelNotFoundError
from cacheagent.fuse.provider import FuseFile, ModelListing
from cacheagent.fuse.stats import FuseStats
from cacheagent.pull.ranges import RangeSet
from tests.files import MiB, fake_digest


class LazyBlob:
    """One file being "downloaded": background copy in order plus priority fetches.

    Both copy whole ``chunk``-sized pieces (the unit of one ranged request), so the held
    ranges are always whole chunks.
    """

    def __init__(
        self,
        source: Path,
        workdir: Path,
        *,
        rate: float,
        chunk: int,
        stats: FuseStats,
        corrupt: bool = False,
        fetch_delay_s: float = 0.0,
    ) -> None:
        self.source = source
        self.size = source.stat().st_size
        name = hashlib.sha256(str(source).encode()).hexdigest()[:16]
        self.partial = workdir / f"{name}.partial"
        self.complete = workdir / name
        self.rate = rate
        self.chunk = chunk
        self.corrupt = corrupt
        self.fetch_delay_s = fetch_delay_s
        self.held = RangeSet()
        self.background_end = 0  # how far the in-order background copy has got
        self.lazy_bytes = 0  # copied because a reader was waiting
        self.background_bytes = 0  # copied by the background pull itself
        self.done = threading.Event()
        self.failure: Exception | None = None
        self._stats = stats
        self._guard = threading.Lock()
        self._in_flight: dict[int, threading.Event] = {}  # chunk start -> set when copied
        self._stop = threading.Event()
        self._src = os.open(source, os.O_RDONLY)
        self._fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.size)
        self._thread = threading.Thread(target=self._copy_in_order, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        os.close(self._src)
        os.close(self._fd)

    def read(self, offset: int, size: int) -> bytes:
        if self.failure is not None:
            raise self.failure
        if not self.done.is_set():
            first = offset - offset % self.chunk
            for chunk_start in range(first, offset + size, self.chunk):
                self._fetch_chunk(chunk_start, lazy=True)
        return os.pread(self._fd, size, offset)

    def _fetch_chunk(self, start: int, *, lazy: bool) -> int:
        """Make the chunk at ``start`` held; returns the bytes this call copied.

        One copy per chunk at a time: a reader that finds the chunk in flight (fetched by
        another reader or by the background copy) waits for it instead of fetching it again.
        """
        end = min(self.size, start + self.chunk)
        with self._guard:
            if self.held.covered(start, end):
                return 0
            in_flight = self._in_flight.get(start)
            if in_flight is None:
                self._in_flight[start] = mine = threading.Event()
        if in_flight is not None:
            in_flight.wait()
            return 0
        try:
            if lazy and self.fetch_delay_s:
                time.sleep(self.fetch_delay_s)
            os.pwrite(self._fd, os.pread(self._src, end - start, start), start)
            with self._guard:
                self.held.add(start, end)
                if lazy:
                    self.lazy_bytes += end - start
        finally:
            with self._guard:
                del self._in_flight[start]
            mine.set()
        if lazy:
            self._stats.record_lazy_fetch(end - start)
        return end - start

    def _copy_in_order(self) -> None:
        """The background pull: chunks in order at ``rate``, skipping what readers fetched."""
        began = time.monotonic()
        copied = 0
        while self.background_end < self.size and not self._stop.is_set():
            copied += self._fetch_chunk(self.background_end, lazy=False)
            self.background_bytes = copied
            self.background_end = min(self.size, self.background_end + self.chunk)
            delay = began + copied / self.rate - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
        if self.background_end >= self.size:
            self._finish()

    def _finish(self) -> None:
        if self.corrupt:
            self.failure = DigestMismatchError(fake_digest(str(self.source)), fake_digest("junk"))
        else:
            self.partial.rename(self.complete)  # the open descriptor follows the inode
        self.done.set()


class LazyTestProvider:
    """``ContentProvider`` over ``LazyBlob``s; counts leases per model like the store would."""

    def __init__(
        self,
        workdir: Path,
        stats: FuseStats,
        *,
        rate: float = 64 * MiB,
        chunk: int = MiB,
        fetch_delay_s: float = 0.0,
    ) -> None:
        self.workdir = workdir
        self.stats = stats
        self.rate = rate
        self.chunk = chunk
        self.fetch_delay_s = fetch_delay_s
        self.created = time.time()
        self.leases: dict[str, int] = {}
        self._models: dict[str, dict[str, LazyBlob]] = {}
        self._handles: dict[int, tuple[str, LazyBlob]] = {}
        self._next = 1
        self._guard = threading.Lock()
        workdir.mkdir(parents=True, exist_ok=True)

    def add_model(
        self, digest: str, files: Mapping[str, Path], *, corrupt: frozenset[str] = frozenset()
    ) -> None:
        self._models[digest] = {
            path: LazyBlob(
                source,
                self.workdir,
                rate=self.rate,
                chunk=self.chunk,
                stats=self.stats,
                corrupt=path in corrupt,
                fetch_delay_s=self.fetch_delay_s,
            )
            for path, source in files.items()
        }

    def blob(self, digest: str, path: str) -> LazyBlob:
        return self._models[digest][path]

    def start(self) -> None:
        for blobs in self._models.values():
            for blob in blobs.values():
                blob.start()

    def close(self) -> None:
        for blobs in self._models.values():
            for blob in blobs.values():
                blob.close()

    # ContentProvider

    def models(self) -> list[str]:
        return sorted(self._models)

    def listing(self, digest: str) -> ModelListing:
        blobs = self._blobs(digest)
        files = tuple(FuseFile(path, blob.size) for path, blob in blobs.items())
        return ModelListing(files=files, created=self.created)

    def open_file(self, digest: str, path: str) -> int:
        blob = self._blobs(digest).get(path)
        if blob is None:
            raise FileNotFoundError(path)
        with self._guard:
            handle = self._next
            self._next += 1
            self._handles[handle] = (digest, blob)
            self.leases[digest] = self.leases.get(digest, 0) + 1
        return handle

    def read(self, handle: int, offset: int, size: int) -> bytes:
        return self._handles[handle][1].read(offset, size)

    def release(self, handle: int) -> None:
        with self._guard:
            digest, _ = self._handles.pop(handle)
            self.leases[digest] -= 1

    def _blobs(self, digest: str) -> dict[str, LazyBlob]:
        blobs = self._models.get(digest)
        if blobs is None:
            raise ModelNotFoundError(f"no model {digest}")
        return blobs


@contextmanager
def running(provider: LazyTestProvider) -> Iterator[LazyTestProvider]:
    """Start the background copies; stop them and close every file on the way out."""
    provider.start()
    try:
        yield provider
    finally:
        provider.close()
