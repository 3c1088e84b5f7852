"""One blob into its partial file: parallel Range requests, resume, size limits, verification.

Crash safety rests on write order. Bytes are ``pwrite``n into a preallocated partial file and
only then added to the in-memory ``held`` set; a background recorder (rate limited) snapshots
``held``, ``fdatasync``s the file and only then atomically replaces the ``<partial>.ranges``
sidecar. The sidecar therefore never claims a byte a crash could lose, and a restarted pull
trusts it (after checking it names this digest and size) and fetches only the rest. Whatever a
record claims is still hashed before the blob is committed, so even a lying disk cannot make a
wrong blob visible.

Memory stays flat: the chunks a source yields are gathered up to ``batch_bytes`` (1 MiB) per
connection and written with one ``pwritev`` (one thread hop per batch, never per network chunk,
and no copy on the way) while the connection goes on receiving the next batch; hashing re-reads
through one reused buffer. A pull therefore holds about two batches per connection, whatever
the blob's size. Each download has one writer thread (parallel writers to one file only spin
on its inode lock) and one hash thread, so neither waits behind the other or behind unrelated
work in the loop's default executor. A thread operation is never abandoned half way:
cancelling a download waits for its in-flight writes before the file descriptor is closed.

Two verification modes (``HashMode``): ``running`` hashes the contiguous prefix from the file
while the rest downloads (the page cache makes the re-read cheap), ``final`` re-reads the whole
file once at the end. ``bench/pull.py`` measures both; ``running`` won (a 2 GiB blob from a
loopback registry on the 2-core dev VM: 2.94 s against 3.28 s, best of 5), so it is the default:
only what the hash thread has not caught up with is left when the last byte lands, and the
data is written back (``fdatasync``) meanwhile, so the commit's fsync finds little to do.
Hashing batches straight from the received chunks (when they continue the hashed prefix) was
measured too and dropped: on that VM it cost more CPU than re-reading a 1 MiB buffer that
stays in cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, ParamSpec, TypeVar

import aiohttp

from cacheagent.aio import Signal, ThreadWork, all_or_nothing, closing_stream, see_through
from cacheagent.errors import (
    DigestMismatchError,
    OriginUnavailableError,
    SizeMismatchError,
    SourceError,
)
from cacheagent.pull.partial_file import PartialFile
from cacheagent.pull.ranges import RangeSet, split
from cacheagent.sources.base import BlobRef, Source
from cacheagent.sources.retry import MIN_PROGRESS_BYTES, RetryBudget, RetryPolicy
from cacheagent.sources.streaming import stalled_error
from cacheagent.store.crashpoints import crashpoint

log = logging.getLogger(__name__)

HashMode = Literal["running", "final"]

_HASH_STEP = 8 << 20
_IDLE_SLACK = 1 / 16  # how late (a share of the idle timeout) a stall may be noticed
_MAX_IOVECS = 512  # well under IOV_MAX (1024), however small the chunks a source yields
_P = ParamSpec("_P")
_T = TypeVar("_T")

# Failures a later attempt may not see again. OriginUnavailableError is absent on purpose: a
# source raises it after its own retries are spent, and retrying that again only multiplies waits.
_TRANSIENT: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    aiohttp.ClientError,
    asyncio.IncompleteReadError,
)


@dataclass(frozen=True)
class DownloadSettings:
    range_threshold_bytes: int = 64 << 20
    range_chunk_bytes: int = 16 << 20
    ranges_per_blob: int = 8
    batch_bytes: int = 1 << 20
    idle_timeout_seconds: float = 60.0
    record_interval_seconds: float = 1.0
    hash_mode: HashMode = "running"
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def chunk_for(self, size: int) -> int:
        """Blobs under the threshold are one piece (one request); larger ones are cut up."""
        if size < self.range_threshold_bytes:
            return max(size, 1)
        return self.range_chunk_bytes


class Limits:
    """Connection slots shared by every download: per origin and per node."""

    def __init__(self, per_origin: int, total: int) -> None:
        self._per_origin = per_origin
        self._node = asyncio.Semaphore(total)
        self._origins: dict[str, asyncio.Semaphore] = {}

    @contextlib.asynccontextmanager
    async def slot(self, origin: str, *, reader: bool = False) -> AsyncIterator[None]:
        """A connection slot; ``reader`` (a range a lazy FUSE read waits for) takes none: it
        must not queue behind background ranges that hold every slot for seconds. Those extra
        connections are bounded by the reads that may wait (``fuse.max_threads``)."""
        if reader:
            yield
            return
        # Always origin first, then node: one order everywhere, so no two waits can deadlock.
        sem = self._origins.setdefault(origin, asyncio.Semaphore(self._per_origin))
        async with sem, self._node:
            yield


@dataclass
class _Batch:
    """Chunks received for ``[start, end)`` and not written yet (bounded by ``batch_bytes``)."""

    start: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def full(self) -> bool:
        return len(self.chunks) >= _MAX_IOVECS

    def add(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)

    def clear(self) -> None:
        self.start = self.end
        self.chunks = []
        self.size = 0


@dataclass
class _Pending:
    """A batch handed to the writer thread, not yet known to have landed."""

    start: int
    end: int
    write: asyncio.Future[None]


@dataclass
class _Cursor:
    """Where a piece's bytes have landed so far (survives the exception that ends an attempt)."""

    pos: int


class BlobDownload:
    """Fills ``partial`` with ``blob``'s bytes and verifies them; the caller commits the file.

    One object per blob being pulled; the engine makes sure there is never a second one for the
    same digest. ``ensure_range`` lets a reader (FUSE lazy mode) jump the queue.
    """

    def __init__(
        self,
        blob: BlobRef,
        source: Source,
        origin: str,
        partial: Path,
        settings: DownloadSettings,
        limits: Limits,
    ) -> None:
        self.blob = blob
        self.source = source
        self.origin = origin
        self.partial = partial
        self.settings = settings
        self._limits = limits
        self.held = RangeSet()
        self.resumed_bytes = 0
        self.fetched_bytes = 0
        self._recorded = RangeSet()
        self._claimed = RangeSet()
        self._todo: deque[tuple[int, int]] = deque()
        self._priority: set[asyncio.Task[None]] = set()
        self._file = PartialFile(partial, blob)
        self._opened = False
        self._error: BaseException | None = None
        self._changed = Signal()
        self._threads = ThreadWork()

    @property
    def done_bytes(self) -> int:
        return self.held.total()

    # -- the whole download ------------------------------------------------------------------

    async def run(self) -> None:
        """Download what is missing and verify every byte. On success the partial file holds
        exactly the blob; on a digest or size mismatch it is deleted; on any other failure it
        is kept with an up-to-date ranges record, so the next attempt resumes."""
        size = self.blob.size
        try:
            try:
                self.held = await self._threads.run(None, self._file.open)
                self._recorded = self.held.copy()
                self.resumed_bytes = self.held.total()
                self._opened = True
                self._changed.fire()
                digest = await self._fill_and_hash()
                if digest != self.blob.digest:
                    raise DigestMismatchError(self.blob.digest, digest)
                if self.held.total() != size:  # pragma: no cover - guarded by the fill loop
                    raise SizeMismatchError(self.blob.digest, size, self.held.total())
            except (DigestMismatchError, SizeMismatchError) as exc:
                self._fail(exc)
                await self._threads.run(None, self._file.discard)
                raise
            except BaseException as exc:
                self._fail(exc)
                if self._file.fd >= 0:
                    await self._checkpoint()
                raise
        finally:
            await self._stop_priority()
            await self._close()

    async def ensure_range(self, start: int, end: int) -> None:
        """Return once bytes ``[start, end)`` are in the partial file, fetching them first
        (ahead of the background order) if no one is fetching them yet."""
        end = min(end, self.blob.size)
        if not 0 <= start <= end:
            raise ValueError(f"blob {self.blob.digest}: bad range [{start}, {end})")
        await self._changed.wait_until(lambda: self._opened or self._error is not None)
        self._raise_if_failed()
        if self._ranged():
            pieces = self._claim(start, end, self.settings.range_chunk_bytes)
            if pieces:
                task = asyncio.create_task(self._fetch_pieces(pieces, reader=True))
                self._priority.add(task)
                task.add_done_callback(self._priority_done)
        await self._changed.wait_until(
            lambda: self.held.covered(start, end) or self._error is not None
        )
        self._raise_if_failed()

    # -- filling -------------------------------------------------------------------------------

    async def _fill_and_hash(self) -> str:
        hasher = hashlib.sha256()
        hashing: asyncio.Task[None] | None = None
        if self.settings.hash_mode == "running":
            hashing = asyncio.create_task(self._hash_running(hasher))
        recorder = asyncio.create_task(self._record_periodically())
        try:
            await self._fill()
            # Write the data back while the hash catches up, so the commit's fsync is short.
            flushing = self._threads.submit(None, self._file.flush)
            if hashing is not None:
                await hashing
            else:
                lane = self._file.hasher
                await self._threads.run(lane, self._file.hash_span, hasher, 0, self.blob.size)
            await see_through(flushing)
        finally:
            for task in (hashing, recorder):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(*(t for t in (hashing, recorder) if t), return_exceptions=True)
        return f"sha256:{hasher.hexdigest()}"

    async def _fill(self) -> None:
        size = self.blob.size
        if self._ranged():
            self._claimed = self.held.copy()
            self._todo = deque(split(self.held.missing(0, size), self.settings.chunk_for(size)))
            workers = min(self.settings.ranges_per_blob, len(self._todo))
            await all_or_nothing([self._worker() for _ in range(workers)])
            while self._priority:
                await all_or_nothing([asyncio.shield(t) for t in list(self._priority)])
        # Whatever is still missing: a source that cannot do ranges (or stopped honouring them
        # mid-way) gets one stream from the first gap to the end.
        gaps = self.held.missing(0, size)
        if gaps:
            self._claimed.add(gaps[0][0], size)
            await self._fetch_piece(gaps[0][0], size)

    def _ranged(self) -> bool:
        return self.source.supports_ranges

    def _claim(self, start: int, end: int, piece: int) -> list[tuple[int, int]]:
        """Mark the unclaimed parts of ``[start, end)`` as ours; return them cut into requests
        of at most ``piece`` bytes."""
        gaps = self._claimed.missing(start, end)
        for s, e in gaps:
            self._claimed.add(s, e)
        return split(gaps, piece)

    async def _worker(self) -> None:
        piece = self.settings.chunk_for(self.blob.size)
        while self._todo and self._ranged():
            start, end = self._todo.popleft()
            await self._fetch_pieces(self._claim(start, end, piece))

    async def _fetch_pieces(self, pieces: list[tuple[int, int]], *, reader: bool = False) -> None:
        for start, end in pieces:
            await self._fetch_piece(start, end, reader=reader)

    def _priority_done(self, task: asyncio.Task[None]) -> None:
        self._priority.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())

    async def _fetch_piece(self, start: int, end: int, *, reader: bool = False) -> None:
        """Bytes ``[start, end)`` into the file; a dropped connection keeps what landed and asks
        again for the rest, with backoff, a bounded number of times."""
        cursor = _Cursor(start)
        budget = RetryBudget(self.settings.retry, position=start)
        while cursor.pos < end:
            self._raise_if_failed()
            try:
                limit = self.source.limit_key(self.blob, self.origin)
                async with self._limits.slot(limit, reader=reader):
                    await self._stream(cursor, end)
                if cursor.pos < end:
                    raise ConnectionError(f"body ended at byte {cursor.pos}, wanted {end}")
            except _TRANSIENT as exc:
                delay = budget.failed(cursor.pos)  # a slowloris's few bytes renew nothing
                if delay is None:
                    raise OriginUnavailableError(
                        f"origin {self.origin}: blob {self.blob.digest}: giving up after "
                        f"{budget.failures} attempt(s) at byte {cursor.pos} of {self.blob.size}; "
                        f"last: {type(exc).__name__}: {exc}"
                    ) from exc
                log.info(
                    "origin %s: blob %s: retrying at byte %d in %.2fs after %s",
                    *(self.origin, self.blob.digest, cursor.pos, delay, exc),
                )
                await asyncio.sleep(delay)

    async def _stream(self, cursor: _Cursor, end: int) -> None:
        """One request for ``[cursor.pos, end)``, written as it arrives: the chunks the source
        yields are gathered up to ``batch_bytes`` and written with one ``pwritev`` (one thread
        hop, no copy in between) while the next batch arrives; a batch waits for the one before
        it to land, so a connection holds at most two. Bytes past ``end`` are never written.

        A source without range support still honours ``start`` (it skips bytes itself); the
        engine only avoids asking it for many pieces."""
        loop = asyncio.get_running_loop()
        idle = self.settings.idle_timeout_seconds
        slack = idle * _IDLE_SLACK
        batch = _Batch(cursor.pos)
        stream = self.source.fetch(self.blob, cursor.pos, end)
        timer: asyncio.Timeout | None = None
        writing: _Pending | None = None
        progress = 0
        try:
            async with closing_stream(stream), asyncio.timeout_at(loop.time() + idle) as timer:
                async for data in stream:
                    # Progress is MIN_PROGRESS_BYTES, not any byte: a slowloris origin that
                    # drips a byte at a time times out like a silent one. The deadline stays
                    # between idle and idle + slack after the last progress: it is moved only
                    # once it has drifted by the slack, not for every chunk.
                    progress += len(data)
                    if progress >= MIN_PROGRESS_BYTES:
                        progress = 0
                        now, deadline = loop.time(), timer.when()
                        if deadline is not None and deadline - now < idle:
                            timer.reschedule(now + idle + slack)
                    self._check_overflow(batch.end + len(data), end)
                    self.fetched_bytes += len(data)
                    batch.add(data)
                    if batch.size >= self.settings.batch_bytes or batch.full:
                        landing, writing = writing, None
                        await self._land(landing, cursor)
                        writing = self._start_write(batch)
            landing, writing = writing, None
            await self._land(landing, cursor)
            await self._land(self._start_write(batch), cursor)
        except Exception as exc:
            # Keep what arrived before the failure (a drop, a timeout, a source that gave up):
            # those bytes lie within the range asked for, and the final hash checks them anyway.
            landing, writing = writing, None
            await self._land(landing, cursor)
            await self._land(self._start_write(batch), cursor)
            if timer is not None and timer.expired():
                raise stalled_error(idle) from exc
            raise

    def _check_overflow(self, reach: int, end: int) -> None:
        if reach > self.blob.size:
            raise SizeMismatchError(self.blob.digest, self.blob.size, reach)
        if reach > end:
            raise SourceError(
                f"origin {self.origin}: blob {self.blob.digest}: sent bytes past {end}, "
                "the end of the range asked for"
            )

    def _start_write(self, batch: _Batch) -> _Pending | None:
        """Hand the batch's chunks to the writer thread and start a new batch after them."""
        if not batch.size:
            return None
        write = self._threads.submit(
            self._file.writer, self._file.pwrite_all, batch.chunks, batch.start
        )
        pending = _Pending(batch.start, batch.end, write)
        batch.clear()
        return pending

    async def _land(self, pending: _Pending | None, cursor: _Cursor) -> None:
        """Wait until a batch is written; only then do its bytes count as held."""
        if pending is None:
            return
        await see_through(pending.write)
        crashpoint("pull.range_written")
        self.held.add(pending.start, pending.end)
        cursor.pos = pending.end
        self._changed.fire()

    # -- hashing ---------------------------------------------------------------------------------

    async def _hash_running(self, hasher: hashlib._Hash) -> None:
        hashed = 0
        size = self.blob.size
        while hashed < size:
            await self._changed.wait_until(self._prefix_reaches(min(size, hashed + _HASH_STEP)))
            upto = self.held.prefix_end()
            await self._threads.run(self._file.hasher, self._file.hash_span, hasher, hashed, upto)
            hashed = upto

    def _prefix_reaches(self, target: int) -> Callable[[], bool]:
        return lambda: self.held.prefix_end() >= target

    # -- ranges record -----------------------------------------------------------------------

    async def _record_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.record_interval_seconds)
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        """Make ``held`` durable: fdatasync the data first, then replace the record."""
        if self.held == self._recorded or self._file.fd < 0:
            return
        snapshot = self.held.copy()
        await self._threads.run(None, self._file.sync_and_record, snapshot)
        self._recorded = snapshot
        crashpoint("pull.ranges_recorded")

    async def _stop_priority(self) -> None:
        for task in self._priority:
            task.cancel()
        await asyncio.gather(*self._priority, return_exceptions=True)

    async def _close(self) -> None:
        """Close the file once no thread can still be using it (even if we are cancelled)."""
        cancelled = await self._threads.drain()
        self._file.close()
        self._file.shutdown()
        if cancelled:
            raise asyncio.CancelledError

    # -- failure -----------------------------------------------------------------------------

    def _fail(self, exc: BaseException | None) -> None:
        if self._error is None and exc is not None:
            self._error = exc
        self._changed.fire()

    def _raise_if_failed(self) -> None:
        error = self._error
        if isinstance(error, Exception):
            raise error
        if error is not None:  # cancelled: tell waiters plainly rather than cancel them too
            raise SourceError(f"the download of blob {self.blob.digest} was stopped")
