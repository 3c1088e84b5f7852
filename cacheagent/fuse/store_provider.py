"""The FUSE content provider over the model service (the lazy mode's read path).

It sees the agent through ``cacheagent.volumes.LazyBackend`` (``ModelService``), never the
store or the pull engine themselves. FUSE requests run in the session's worker threads; the
backend's sync methods are thread-safe and are called directly, while
anything that waits for the network is handed to the agent's event loop with
``run_coroutine_threadsafe`` and awaited with a bound (``fuse.origin_wait_seconds``, one
deadline for the whole wait), so a dead origin turns into ETIMEDOUT, never a hung reader. Such
waits hold a FUSE worker, so ``OriginWaits`` caps how many may wait at once, in total and per
model, keeping workers free for reads of bytes already on disk (see ``waits.py``).

Reads of a blob already committed come from the blob file through a descriptor kept per open
file. Reads of a blob still downloading ask the pull engine for exactly that range first
(``PullEngine.ensure_range``: ahead of the background order, shared between concurrent readers),
then read it from the partial file. Tar-layer members only exist once their layer is unpacked,
so a read of one waits for that. If the finished blob fails verification the engine discards it
and every later read of it raises, which the filesystem answers with EIO.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cacheagent.errors import CacheAgentError, ModelNotFoundError
from cacheagent.fuse.provider import FuseFile, ModelListing
from cacheagent.fuse.stats import FuseStats
from cacheagent.fuse.waits import LazyReadTimeoutError, OriginWaits
from cacheagent.volumes import LazyBackend, TreeFile

T = TypeVar("T")
log = logging.getLogger(__name__)

LEASE_KIND = "fuse"
READ_TIMEOUT_SECONDS = 30.0


@dataclass
class _Open:
    digest: str
    file: TreeFile
    holder: str
    fd: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class StoreProvider:
    def __init__(
        self,
        backend: LazyBackend,
        loop: asyncio.AbstractEventLoop,
        *,
        stats: FuseStats | None = None,
        read_timeout: float = READ_TIMEOUT_SECONDS,
        waits: OriginWaits | None = None,
    ) -> None:
        self.backend = backend
        self.loop = loop
        self.stats = stats
        self.read_timeout = read_timeout
        # Unbounded unless the mount passes its bounds (fuse.max_threads and friends).
        self.waits = waits if waits is not None else OriginWaits(1 << 30, 1 << 30)
        # Told (model, path) of each file served before its blob was verified, once that blob
        # failed: the FUSE mount drops the kernel's cached pages of it.
        self.on_unverified: Callable[[str, str], object] | None = None
        self._unverified: dict[str, set[tuple[str, str]]] = {}  # model -> {(path, blob)}
        self._watchers: set[asyncio.Task[None]] = set()
        self._handles: dict[int, _Open] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # -- tree ----------------------------------------------------------------------------------

    def models(self) -> Sequence[str]:
        return self.backend.model_digests()

    def _files(self, digest: str) -> tuple[Sequence[TreeFile], float]:
        return self.backend.model_files(digest)

    def listing(self, digest: str) -> ModelListing:
        files, created = self._files(digest)
        return ModelListing(
            files=tuple(FuseFile(f.path, f.size, f.mode, f.blob) for f in files), created=created
        )

    # -- files ---------------------------------------------------------------------------------

    def open_file(self, digest: str, path: str) -> int:
        files, _ = self._files(digest)
        match = next((f for f in files if f.path == path), None)
        if match is None:
            raise FileNotFoundError(path)
        handle = next(self._ids)
        holder = f"fuse:{os.getpid()}:{handle}"
        self.backend.add_lease(digest, holder, LEASE_KIND)
        with self._lock:
            self._handles[handle] = _Open(digest, match, holder)
        if self.on_unverified is not None and self.backend.committed_blob(match.blob) is None:
            self._watch(digest, match)
        return handle

    # -- bytes served before verification ------------------------------------------------------

    def _watch(self, digest: str, file: TreeFile) -> None:
        with self._lock:
            watched = digest in self._unverified
            self._unverified.setdefault(digest, set()).add((file.path, file.blob))
        if not watched:
            self.loop.call_soon_threadsafe(self._start_watcher, digest)

    def _start_watcher(self, digest: str) -> None:
        task = self.loop.create_task(self._drop_unverified(digest))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _drop_unverified(self, digest: str) -> None:
        """Once the model's pull ends, drop the cached pages of files whose blob it did not
        commit: the kernel would otherwise keep serving bytes that failed their digest."""
        try:
            await self.backend.wait_model(digest)
        except CacheAgentError:
            pass  # the pull failed: the case this watch is for
        finally:
            with self._lock:
                files = self._unverified.pop(digest, set())
        for path, blob in sorted(files):
            committed = await asyncio.to_thread(self.backend.committed_blob, blob)
            if self.on_unverified is None or committed is not None:
                continue
            log.warning("fuse: %s/%s failed verification; dropping its cached pages", digest, path)
            await asyncio.to_thread(self.on_unverified, digest, path)

    async def aclose(self) -> None:
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

    def release(self, handle: int) -> None:
        with self._lock:
            opened = self._handles.pop(handle, None)
        if opened is None:
            return
        if opened.fd is not None:
            os.close(opened.fd)
        self.backend.release_lease(opened.holder)
        self.backend.touch(opened.digest)

    def read(self, handle: int, offset: int, size: int) -> bytes:
        with self._lock:
            opened = self._handles.get(handle)
        if opened is None:
            raise OSError(9, "bad file handle")
        size = max(0, min(size, opened.file.size - offset))
        if size == 0:
            return b""
        fd = self._committed_fd(opened)
        if fd is not None:
            return _pread_exact(fd, size, offset)
        return self._lazy_read(opened, offset, size)

    def _committed_fd(self, opened: _Open) -> int | None:
        with opened.lock:
            if opened.fd is None:
                path = self.backend.committed_blob(opened.file.blob)
                if path is not None:
                    opened.fd = os.open(path, os.O_RDONLY)
            return opened.fd

    def _lazy_read(self, opened: _Open, offset: int, size: int) -> bytes:
        blob = opened.file.blob
        with self.waits.admit(opened.digest):
            path = self._wait(self._fetch(opened, offset, size))
        if path is None:
            fd = self._committed_fd(opened)
            if fd is None:
                raise ModelNotFoundError(f"blob {blob} of {opened.digest} is not in the store")
            return _pread_exact(fd, size, offset)
        data = _read_path(path, self.backend.blob_path(blob), size, offset)
        if self.stats is not None:
            self.stats.record_lazy_fetch(len(data))
        return data

    async def _fetch(self, opened: _Open, offset: int, size: int) -> Path | None:
        """Wait (under one deadline) until the bytes can be read: the file to read them from,
        or None for a tar member, which is read from its blob once its layer has unpacked."""
        try:
            return await self.backend.ensure_range(opened.file.blob, offset, offset + size)
        except ModelNotFoundError:
            await self.backend.wait_model(opened.digest)
            return None

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.read_timeout)
        except FutureTimeout:
            future.cancel()
            raise LazyReadTimeoutError(
                f"lazy read timed out after {self.read_timeout:g}s waiting for the origin "
                "(fuse.origin_wait_seconds)"
            ) from None


def _read_path(path: Path, committed: Path, size: int, offset: int) -> bytes:
    """Read from the partial file, or from the blob if the commit renamed it meanwhile."""
    for candidate in (path, committed):
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(candidate, os.O_RDONLY)
            try:
                return _pread_exact(fd, size, offset)
            finally:
                os.close(fd)
    raise CacheAgentError(f"{committed.name} vanished while being read (verification failed?)")


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    chunks = [data]
    done = len(data)
    while done < size:
        more = os.pread(fd, size - done, offset + done)
        if not more:
            raise CacheAgentError(f"short read at offset {offset + done}: file is truncated")
        chunks.append(more)
        done += len(more)
    return b"".join(chunks)
