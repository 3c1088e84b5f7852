"""Bounds on FUSE reads that wait for an origin, so one stalled origin cannot freeze the mount.

A FUSE worker thread answers each request it takes (``session``), so a read
waiting for bytes from the network holds a worker until the bytes come or the wait times out.
With every worker held by reads of one stalled model, reads of fully cached models queue in the
kernel (or in the session's queue) behind them. Two bounds keep workers free:

* at most ``total`` reads wait for origins at once, ``total`` being the worker count less
  ``RESERVED_WORKERS``, so that many workers are always free for reads of bytes on disk;
* at most ``per_model`` of them wait for one model, so one stalled model leaves room for
  others that are still downloading.

A read over either bound is refused at once (``OriginBusyError``, EIO) rather than queued: a
queued read would hold a worker just the same. Each admitted wait is bounded in time by the
caller (``fuse.origin_wait_seconds``), after which it fails with ``LazyReadTimeoutError``
(ETIMEDOUT).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from cacheagent.errors import CacheAgentError, OriginUnavailableError

RESERVED_WORKERS = 8
"""FUSE workers never given to reads that wait for an origin: they serve cached bytes."""


class OriginBusyError(CacheAgentError):
    """Too many reads already wait for an origin; this one is refused instead of queued."""


class LazyReadTimeoutError(OriginUnavailableError):
    """A read waited ``fuse.origin_wait_seconds`` for bytes from the origin and gave up."""


def origin_wait_limit(max_threads: int) -> int:
    """How many FUSE workers may wait for origins at once, out of ``max_threads``."""
    return max(1, max_threads - RESERVED_WORKERS)


@dataclass
class OriginWaits:
    """Counts the reads waiting for an origin, in total and per model (thread-safe)."""

    total: int
    per_model: int
    _waiting: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def admit(self, model: str) -> Iterator[None]:
        """Hold one waiting slot for ``model`` while the block runs, or raise OriginBusyError."""
        with self._lock:
            if self._waiting.total() >= self.total:
                raise OriginBusyError(
                    f"{self.total} reads already wait for origins (fuse.max_threads less "
                    f"{RESERVED_WORKERS} kept for cached reads); read of {model} refused"
                )
            if self._waiting[model] >= self.per_model:
                raise OriginBusyError(
                    f"{self.per_model} reads of {model} already wait for its origin "
                    "(fuse.origin_waits_per_model); this one is refused"
                )
            self._waiting[model] += 1
        try:
            yield
        finally:
            with self._lock:
                self._waiting[model] -= 1
                if self._waiting[model] <= 0:
                    del self._waiting[model]

    def waiting(self) -> int:
        with self._lock:
            return self._waiting.total()
