"""The store's read side and shared state: everything a read-only view can answer
(``Store.open(lock=False)``), and the objects the writing ``Store`` shares behind one lock
(the index, the capacity ledger, the remover)."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from cacheagent.digest import check_digest, is_digest
from cacheagent.errors import StoreError
from cacheagent.store.capacity import Capacity, Limits
from cacheagent.store.evict import Ledger
from cacheagent.store.fsck import FsckReport
from cacheagent.store.health import RESERVE_NAME, Reserve, Watched, identity
from cacheagent.store.index import Index
from cacheagent.store.lock import StoreLock
from cacheagent.store.lru import EvictionPlan
from cacheagent.store.paths import Layout
from cacheagent.store.records import Lease, Model, PendingModel, Usage
from cacheagent.store.remover import Remover
from cacheagent.store.scrub import ScrubCursor


class StoreView:
    """Queries over one store directory; ``Store`` adds every change."""

    def __init__(
        self,
        layout: Layout,
        index: Index,
        lock: StoreLock | None,
        *,
        capacity_bytes: int | None,
        high_watermark: float,
        low_watermark: float,
    ) -> None:
        self.root = layout.root
        self.capacity_bytes = capacity_bytes
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.last_reconcile = FsckReport()
        self._layout = layout
        self._index = index
        self._flock = lock
        self._watched: list[Watched] = []
        if lock is not None:
            self._watched = [
                Watched(layout.index_path, identity(layout.index_path), "the store index"),
                Watched(lock.path, identity(lock.path), "the agent's store lock"),
            ]
        self._lost: str | None = None
        self._scrub_cursor = ScrubCursor()
        self._spare_lock: StoreLock | None = None
        self._reserve = Reserve(layout.root / RESERVE_NAME)
        self._lock = threading.RLock()
        self._tmp_names = itertools.count()
        self._ledger = Ledger()
        self._remover = Remover(index, layout, self._ledger, self._lock, self._tmp_tag)
        self._capacity = Capacity(
            index,
            layout,
            self._ledger,
            self._lock,
            self._remover,
            Limits(capacity_bytes, high_watermark, low_watermark),
        )

    @property
    def removed_models(self) -> int:
        """Models removed by rm or eviction since open (a failed pull's record not counted)."""
        return self._remover.removed_models

    @property
    def removed_bytes(self) -> int:
        return self._remover.removed_bytes

    def close(self) -> None:
        with self._lock:
            self._index.close()
            if self._flock is not None:
                self._flock.release()
            if self._spare_lock is not None:
                self._spare_lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def has_blob(self, digest: str) -> bool:
        check_digest(digest)
        with self._lock:
            return self._index.blob_size(digest) is not None

    def blob_path(self, digest: str) -> Path:
        return self._layout.blob_path(digest)

    def partial_path(self, digest: str) -> Path:
        return self._layout.partial_path(digest)

    def get_model(self, manifest_digest: str) -> Model | None:
        """The ready model, or None (also for a string that is not a digest at all)."""
        if not is_digest(manifest_digest):
            return None
        with self._lock:
            return self._index.get_model(manifest_digest)

    def list_models(self) -> list[Model]:
        """Every ready model, most recently used first."""
        with self._lock:
            return self._index.list_models()

    def model_digests(self) -> list[str]:
        """Digests of every model the store knows, ready or still pending."""
        with self._lock:
            return self._index.model_digests()

    def model_path(self, manifest_digest: str) -> Path:
        return self._layout.model_path(manifest_digest)

    def get_manifest(self, manifest_digest: str) -> bytes | None:
        """The manifest bytes recorded with a ready or pending model."""
        if not is_digest(manifest_digest):
            return None
        with self._lock:
            return self._index.manifest(manifest_digest)

    def get_pending(self, manifest_digest: str) -> PendingModel | None:
        if not is_digest(manifest_digest):
            return None
        with self._lock:
            if self._index.model_state(manifest_digest) != "pending":
                return None
            meta = self._index.model_meta(manifest_digest)
            assert meta is not None
            ref, source_kind, size, created = meta
            return PendingModel(
                digest=manifest_digest,
                ref=ref,
                size=size,
                files=self._index.model_files(manifest_digest),
                created=created,
                source_kind=source_kind,
                missing=self._index.missing_blobs(manifest_digest),
            )

    def resolve_tag(self, ref: str) -> str | None:
        with self._lock:
            return self._index.resolve_tag(ref, time.time())

    def lookup_ref(self, ref: str) -> str | None:
        """Any digest known for ``ref``, expired or not (for running without the origin)."""
        with self._lock:
            return self._index.lookup_ref(ref)

    def leases(self, manifest_digest: str | None = None) -> list[Lease]:
        with self._lock:
            return self._index.leases(manifest_digest)

    def usage(self) -> Usage:
        with self._lock:
            used, nblobs, nmodels = self._index.usage()
            room, _ = self._capacity.room(used)
        return Usage(
            capacity=self.capacity_bytes,
            used=used,
            models=nmodels,
            blobs=nblobs,
            high_watermark=self.high_watermark,
            low_watermark=self.low_watermark,
            reserved=room.reserved,
            abandoned=room.abandoned + room.freeing,
            disk_free=room.disk_free,
        )

    def plan_eviction(self, need_bytes: int) -> EvictionPlan:
        """What evicting ``need_bytes`` would delete, without deleting it."""
        with self._lock:
            return self._capacity.plan(need_bytes, ())

    def check_sizes(self, manifest_digest: str) -> str | None:
        """What is wrong with a ready model's files on disk (a blob truncated or grown since
        it was committed: its size is checked, not its hash), or None."""
        model = self.get_model(manifest_digest)
        if model is None:
            return f"model {manifest_digest} is not in the store"
        root = self.model_path(manifest_digest)
        for f in model.files:
            try:
                size = (root / f.path).stat().st_size
            except OSError as err:
                return f"{f.path}: {err.strerror}"
            if size != f.size:
                return f"{f.path}: {size} bytes, want {f.size}"
        return None

    def _writable(self) -> None:
        if self._flock is None:
            raise StoreError(f"store {self.root} was opened read-only (lock=False)")
        broken = self._broken()
        if broken is not None:
            raise StoreError(f"store {self.root} refuses to write: {broken}")

    def _broken(self) -> str | None:
        """Why writing would lose data (the index or the lock file gone), or None."""
        for watched in self._watched:
            problem = watched.problem()
            if problem is not None:
                return problem
        return None

    def _tmp_tag(self) -> str:
        return f"{os.getpid()}-{next(self._tmp_names)}"
