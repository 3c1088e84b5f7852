"""Counters the FUSE filesystem keeps for the metrics module (no Prometheus import here).

The composition root creates one ``FuseStats``, gives it to the filesystem (reads, errors) and to
the content provider (lazy-fetched bytes), and exports ``snapshot()`` as the
``cacheagent_fuse_*`` counters. Error kinds are a small fixed set (see ``errmap.ErrorKind``) so
the label stays bounded.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FuseStatsSnapshot:
    reads: int
    read_bytes: int
    lazy_fetched_bytes: int
    errors: dict[str, int]


@dataclass
class FuseStats:
    """Monotonic counters, safe to update from every FUSE worker thread."""

    reads: int = 0
    read_bytes: int = 0
    lazy_fetched_bytes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_read(self, nbytes: int) -> None:
        with self._guard:
            self.reads += 1
            self.read_bytes += nbytes

    def record_lazy_fetch(self, nbytes: int) -> None:
        """Called by the provider for bytes it fetched because a reader was waiting for them."""
        with self._guard:
            self.lazy_fetched_bytes += nbytes

    def record_error(self, kind: str) -> None:
        with self._guard:
            self.errors[kind] += 1

    def snapshot(self) -> FuseStatsSnapshot:
        with self._guard:
            return FuseStatsSnapshot(
                reads=self.reads,
                read_bytes=self.read_bytes,
                lazy_fetched_bytes=self.lazy_fetched_bytes,
                errors=dict(self.errors),
            )
