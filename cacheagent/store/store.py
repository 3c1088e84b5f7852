"""The Store facade: the single owner of the store directory (see paths.py for the layout).

Thread-safe: one SQLite connection and every change to the directory are serialised behind one
re-entrant lock; only hashing a blob (the slow part of a commit) runs outside it. Async callers
use ``asyncio.to_thread``.

Protocol for a pull (so eviction cannot free a blob between its commit and ``put_model``):
record the model with ``put_pending`` holding a ``pull`` lease (one step), ``reserve`` the bytes
still to land (capacity, see evict.py), commit its blobs under that reservation, ``put_model``,
then ``release`` the reservation and the lease. A pull that fails calls ``drop_pending``: no
pending row outlives its pull. Blobs used by any model record (ready or pending) are never
freed, and a pending model with a pull lease is never evicted. Blobs used by no model at all
are freed by eviction once no live reservation committed them and either a pull gave them up
or they are a day old (``ORPHAN_GRACE_SECONDS``: blobs committed outside any reservation).

Removing a model (rm, eviction, a failed pull's record, a repair) goes through removal.py: the
index transaction and the renames into a trash directory under the lock, the deletes outside
it, then the removal observers (``add_removal_observer``) are told. Removal never drops a
lease: ``force`` overrides a pin, never a lease.

``lock=False`` opens a read-only view for offline inspection (the CLI's ``ls`` with no agent
running, or beside a running one): no flock, no reconciliation, and every method that would
change the store raises StoreError. SQLite WAL lets it read while the agent writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from cacheagent.config import StoreConfig
from cacheagent.digest import check_digest, hex_of, sha256_digest
from cacheagent.errors import (
    CacheAgentError,
    DigestMismatchError,
    ModelInUseError,
    ModelNotFoundError,
    SizeMismatchError,
    StoreError,
)
from cacheagent.store import blobs, tree
from cacheagent.store.crashpoints import crashpoint
from cacheagent.store.evict import Reservation
from cacheagent.store.fsck import FsckReport, quarantine, reconcile
from cacheagent.store.index import Index, ModelRow
from cacheagent.store.lock import StoreLock
from cacheagent.store.lru import EvictionPlan
from cacheagent.store.paths import Layout, TreeShape
from cacheagent.store.records import LEASE_KINDS, Model, ModelFile
from cacheagent.store.removal import RemovalObserver
from cacheagent.store.scrub import ScrubPass, hash_batch
from cacheagent.store.validate import check_capacity, checked_files
from cacheagent.store.view import StoreView

log = logging.getLogger(__name__)


class Store(StoreView):
    """A content-addressed model store on local disk; see the module docstring."""

    @classmethod
    def open_configured(cls, config: StoreConfig) -> Store:
        """The store as the config describes it (a percentage capacity resolved against the
        filesystem it lives on). The agent and the offline CLI both open it this way."""
        config.root.mkdir(parents=True, exist_ok=True)
        stats = os.statvfs(config.root)
        return cls.open(
            config.root,
            capacity_bytes=config.capacity.resolve(stats.f_blocks * stats.f_frsize),
            high_watermark=config.high_watermark,
            low_watermark=config.low_watermark,
        )

    @classmethod
    def open(
        cls,
        root: Path,
        *,
        capacity_bytes: int | None = None,
        high_watermark: float = 0.9,
        low_watermark: float = 0.8,
        lock: bool = True,
    ) -> Store:
        """Take the agent lock, create the layout, migrate the index and reconcile it with the
        disk (``last_reconcile`` says what was fixed). ``lock=False``: read-only view."""
        check_capacity(capacity_bytes, high_watermark, low_watermark)
        layout = Layout(Path(root).resolve())

        def make(index: Index, flock: StoreLock | None) -> Store:
            return cls(
                layout,
                index,
                flock,
                capacity_bytes=capacity_bytes,
                high_watermark=high_watermark,
                low_watermark=low_watermark,
            )

        if not lock:
            return make(Index.open(layout.index_path, readonly=True), None)
        layout.root.mkdir(parents=True, exist_ok=True)
        flock = StoreLock.acquire(layout.lock_path, layout.root)
        try:
            for directory in (layout.blobs_dir, layout.models_dir, layout.partial_dir):
                blobs.make_dirs(directory)
            store = make(Index.open(layout.index_path), flock)
        except BaseException:
            flock.release()
            raise
        store._reserve.ensure()
        try:
            with store._lock:
                store.last_reconcile = reconcile(
                    store._index, layout, rehash=False, now=time.time(), at_start=True
                )
        except BaseException:
            store.close()
            raise
        return store

    # blobs

    def commit_blob(
        self,
        digest: str,
        size: int,
        src: Path,
        *,
        verified: bool = False,
        reservation: Reservation | None = None,
    ) -> Path:
        """Publish ``src`` as blob ``digest``; see blobs.py for the steps. ``src`` is consumed:
        renamed into place, or deleted when it is a duplicate or fails verification. Under a
        ``reservation`` its bytes move from reserved to committed in one step."""
        self._writable()
        check_digest(digest)
        if size < 0:
            raise ValueError(f"blob {digest}: negative size {size}")
        dest = self.blob_path(digest)
        if self.has_blob(digest):  # no need to hash a duplicate
            blobs.discard(Path(src))
            return dest
        try:
            src = self._local_copy(Path(src), digest)
            blobs.verify(digest, size, src, hashed=verified)
            crashpoint("blob.after_verify")
            blobs.seal(src)
            crashpoint("blob.after_fsync")
        except (DigestMismatchError, SizeMismatchError):
            blobs.discard(src)
            if src == self.partial_path(digest):
                blobs.discard(self._layout.ranges_path(digest))
            raise
        except FileNotFoundError:
            if self.has_blob(digest):  # a concurrent commit of the same blob won
                return dest
            raise
        if reservation is not None:
            try:
                self._capacity.grow(reservation, size)
            except CacheAgentError:
                blobs.discard(src)
                raise
        with self._lock:
            if self._index.blob_size(digest) is not None:
                blobs.discard(src)
                return dest
            blobs.publish(src, dest)
            with self._index.transaction():
                self._index.insert_blob(digest, size, time.time())
            if reservation is not None:
                self._ledger.consume(reservation, digest, size)
            crashpoint("blob.after_index")
        blobs.discard(self._layout.ranges_path(digest))
        return dest

    def add_blob_bytes(self, data: bytes) -> str:
        """Commit a small in-memory blob (a synthesised manifest); returns its digest."""
        self._writable()
        digest = sha256_digest(data)
        if not self.has_blob(digest):
            tmp = blobs.write_temp(self._layout.partial_dir, f"{hex_of(digest)}.tmp-", data)
            self.commit_blob(digest, len(data), tmp, verified=True)
        return digest

    # models

    def put_model(
        self,
        manifest_digest: str,
        files: Sequence[ModelFile],
        *,
        ref: str | None,
        source_kind: str,
        manifest: bytes,
    ) -> Model:
        """Materialise a model whose blobs are all committed (idempotent): build the hard-link
        tree aside, rename it to ``model_path``, then record it. ``manifest`` must hash to
        ``manifest_digest``."""
        self._writable()
        clean, shape = checked_files(manifest_digest, files, manifest)
        with self._lock:
            existing = self._index.get_model(manifest_digest)
            if existing is not None:
                return existing
            self._check_blobs(manifest_digest, clean)
            self._build_tree(manifest_digest, clean, shape)
            with self._index.transaction():
                self._index.insert_model(
                    ModelRow(
                        manifest_digest, "ready", ref, source_kind, manifest, clean, time.time()
                    )
                )
            crashpoint("tree.after_index")
            model = self._index.get_model(manifest_digest)
        assert model is not None
        return model

    def remove_model(self, manifest_digest: str, *, force: bool = False) -> int:
        """Delete a model (ready or pending) and the blobs no other model uses; returns the
        bytes freed. ModelInUseError if leased (a published volume, an open FUSE file, a
        pull), or pinned unless ``force``: force overrides a pin, never a lease."""
        self._writable()
        check_digest(manifest_digest)
        with self._lock:
            if self._index.model_state(manifest_digest) is None:
                raise ModelNotFoundError(f"model {manifest_digest} is not in the store")
            leased = bool(self._index.leases(manifest_digest))
            if leased or (not force and self._index.is_pinned(manifest_digest)):
                advice = "wait until it is released" if leased else "unpin it (or force)"
                raise ModelInUseError(
                    f"model {manifest_digest} is {self._in_use_reason(manifest_digest)}; {advice}"
                )
            trash = self._remover.drop_models([manifest_digest], "rm")
        self._remover.dispose(trash)
        return trash.nbytes

    def drop_pending(self, manifest_digest: str, holder: str) -> bool:
        """Forget the pending record of a pull that failed (no ghost outlives its pull):
        release ``holder``'s lease and, unless someone else holds one or the model became
        ready, delete the record. Its committed blobs stay as orphans, evictable at once and
        reused by the next pull. True if the record was deleted."""
        self._writable()
        with self._lock:
            with self._index.transaction():
                self._index.release_lease(holder)
            state = self._index.model_state(manifest_digest)
            if state != "pending" or self._index.leases(manifest_digest):
                return False
            trash = self._remover.drop_models([manifest_digest], "failed-pull", free_blobs=False)
        self._remover.dispose(trash)
        return True

    def add_removal_observer(self, observer: RemovalObserver) -> None:
        """Call ``observer`` after every removal of a model, whatever removed it (from the
        thread that removed it: observers must be thread-safe and quick)."""
        self._remover.observe(observer)

    # pending models

    def put_pending(
        self,
        manifest_digest: str,
        files: Sequence[ModelFile],
        *,
        ref: str | None,
        source_kind: str,
        manifest: bytes,
        holder: str | None = None,
    ) -> None:
        """Record a model whose blobs are still arriving (no tree yet); with ``holder``, take
        its pull lease in the same step, so no eviction can come in between. The record is
        not replaced if the model is known."""
        self._writable()
        clean, _ = checked_files(manifest_digest, files, manifest)
        with self._lock, self._index.transaction():
            if holder is not None:
                self._index.add_lease(manifest_digest, holder, "pull", time.time())
            if self._index.model_state(manifest_digest) is None:
                self._index.insert_model(
                    ModelRow(
                        manifest_digest, "pending", ref, source_kind, manifest, clean, time.time()
                    )
                )

    # tags

    def set_tag(self, ref: str, manifest_digest: str, ttl_seconds: float) -> None:
        """Cache a tag resolution; ``resolve_tag`` returns it until ``ttl_seconds`` pass."""
        self._writable()
        check_digest(manifest_digest)
        if not ref:
            raise ValueError("empty reference")
        now = time.time()
        with self._lock, self._index.transaction():
            self._index.set_tag(ref, manifest_digest, now, now + ttl_seconds)

    # use tracking

    def touch(self, manifest_digest: str) -> None:
        """Mark a model used now. Unknown digests are ignored: a read can race an eviction."""
        self._writable()
        with self._lock:
            self._index.touch(manifest_digest, time.time())

    def pin(self, manifest_digest: str) -> None:
        self._writable()
        check_digest(manifest_digest)
        with self._lock:
            if self._index.model_state(manifest_digest) is None:
                raise ModelNotFoundError(f"cannot pin model {manifest_digest}: not in the store")
            self._index.pin(manifest_digest, time.time())

    def unpin(self, manifest_digest: str) -> None:
        self._writable()
        with self._lock:
            self._index.unpin(manifest_digest)

    def add_lease(self, manifest_digest: str, holder: str, kind: str) -> None:
        """Protect a model from eviction while ``holder`` uses it (the model need not exist yet:
        a pull leases the digest it is fetching). Idempotent per (holder, model)."""
        self._writable()
        check_digest(manifest_digest)
        if kind not in LEASE_KINDS:
            raise ValueError(f"lease kind {kind!r}: must be one of {', '.join(LEASE_KINDS)}")
        if not holder:
            raise ValueError("lease holder must not be empty")
        with self._lock:
            self._index.add_lease(manifest_digest, holder, kind, time.time())

    def release_lease(self, holder: str) -> None:
        """Drop every lease ``holder`` has; unknown holders are fine."""
        self._writable()
        with self._lock:
            self._index.release_lease(holder)

    # capacity (see capacity.py)

    def reserve(
        self,
        nbytes: int,
        *,
        holder: str = "",
        blobs: Collection[str] = (),
        protect: Collection[str] = (),
    ) -> Reservation:
        """Reserve room for ``nbytes`` a pull is about to write, evicting in the same step if
        need be; CacheFullError naming the sizes if it cannot fit (``Capacity.reserve``)."""
        self._writable()
        return self._capacity.reserve(nbytes, holder=holder, blobs=blobs, protect=protect)

    def release(self, reservation: Reservation, nbytes: int | None = None) -> None:
        """Give back ``nbytes`` of a reservation (a tar archive unpacked), or all of it."""
        self._capacity.release(reservation, nbytes, age_orphans=self._flock is not None)

    def ensure_room(self, nbytes: int, *, protect: Collection[str] = ()) -> EvictionPlan:
        """Evict as ``reserve`` would for ``nbytes``, without keeping the reservation;
        returns the executed plan."""
        reservation = self.reserve(nbytes, protect=protect)
        self.release(reservation)
        return reservation.plan

    def execute(self, plan: EvictionPlan) -> int:
        """Carry out a plan; returns the bytes freed. Models that became pinned or leased
        since the plan was made are kept, and only blobs still unused are freed."""
        self._writable()
        with self._lock:
            trash = self._remover.evict(plan, [], 0)
        self._remover.dispose(trash)
        return trash.nbytes

    # maintenance

    def problem(self) -> str | None:
        """Why the store cannot write now, or None (health.py): its index or lock file gone
        (latched: only a restart clears it; the lock is taken again at once so offline
        commands stay out), or its disk full (the index reserve is then released)."""
        if self._flock is None:
            return None
        if self._lost is None:
            self._lost = self._broken()
            if self._lost is not None:
                log.error("store %s: %s", self.root, self._lost)
                self._retake_lock()
        if self._lost is not None:
            return self._lost
        if self._reserve.release_if_full():
            return f"the disk of {self.root} is full: no new model can be stored"
        self._reserve.ensure()
        return None

    def scrub(self, budget_bytes: int) -> tuple[ScrubPass, FsckReport]:
        """Re-hash the next blobs (about ``budget_bytes``) and quarantine those that fail
        (scrub.py); returns what was hashed and what was repaired."""
        self._writable()
        with self._lock:
            batch = self._scrub_cursor.next_batch(self._index.all_blobs(), budget_bytes)
        result = hash_batch(batch, self.blob_path)
        report = FsckReport(rehashed=True)
        if result.failed:
            with self._lock:
                quarantine(self._index, self._layout, result.failed, report)
            log.error("scrub: %s", "; ".join(report.actions))
            self._remover.repaired(report.reset)
        return result, report

    def _retake_lock(self) -> None:
        with contextlib.suppress(StoreError, OSError):
            self._spare_lock = StoreLock.acquire(self._layout.lock_path, self.root)

    def fsck(self, *, rehash: bool = False) -> FsckReport:
        """Reconcile the index with the disk now; with ``rehash``, re-hash every blob."""
        self._writable()
        with self._lock:
            report = reconcile(
                self._index, self._layout, rehash=rehash, now=time.time(), at_start=False
            )
            self.last_reconcile = report
        self._remover.repaired(report.reset)
        return report

    # internals

    def _local_copy(self, src: Path, digest: str) -> Path:
        """``src`` itself if it can be renamed into the store, else a copy in partial/."""
        if blobs.same_filesystem(src, self._layout.partial_dir):
            return src
        copy = blobs.copy_into(src, self._layout.partial_dir, f"{hex_of(digest)}.tmp-")
        blobs.discard(src)
        return copy

    def _check_blobs(self, manifest_digest: str, files: Sequence[ModelFile]) -> None:
        sizes = self._index.blob_sizes(sorted({f.blob for f in files}))
        for f in files:
            if f.blob not in sizes:
                raise StoreError(
                    f"model {manifest_digest}: {f.path!r} needs blob {f.blob}, "
                    "which is not committed"
                )
            if sizes[f.blob] != f.size:
                raise SizeMismatchError(f.blob, f.size, sizes[f.blob])

    def _build_tree(self, digest: str, files: Sequence[ModelFile], shape: TreeShape) -> None:
        sources = {f.path: self.blob_path(f.blob) for f in files}
        final = self.model_path(digest)
        if final.is_dir():  # kept by a repair because a pod uses it: fix it where it stands
            replaced = tree.repair(final, shape, sources)
            log.warning("model %s repaired in place (%d files replaced)", digest, replaced)
            return
        tmp = self._layout.tmp_tree_path(digest, self._tmp_tag())
        try:
            tree.build(tmp, self.model_path(digest), shape, sources)
        except BaseException:
            tree.remove(tmp)
            raise

    def _in_use_reason(self, digest: str) -> str:
        reasons = ["pinned"] if self._index.is_pinned(digest) else []
        reasons += [
            f"leased by {lease.kind}:{lease.holder}" for lease in self._index.leases(digest)
        ]
        return ", ".join(reasons)
