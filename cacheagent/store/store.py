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

import itertools
import os
import threading
import time
from collections.abc import Collection, Sequence
from contextlib import closing
from pathlib import Path
from types import TracebackType

from cacheagent.config import StoreConfig
from cacheagent.digest import check_digest, hex_of, is_digest, sha256_digest
from cacheagent.errors import (
    CacheFullError,
    ConfigError,
    DigestMismatchError,
    ModelInUseError,
    ModelNotFoundError,
    SizeMismatchError,
    StoreError,
)
from cacheagent.store import blobs, evict, tree
from cacheagent.store.crashpoints import crashpoint
from cacheagent.store.evict import Ledger, Reservation
from cacheagent.store.fsck import FsckReport, reconcile
from cacheagent.store.index import Index, ModelRow
from cacheagent.store.lock import StoreLock
from cacheagent.store.lru import EvictionPlan, plan_eviction_ordered
from cacheagent.store.paths import Layout, TreeShape, safe_relpath, tree_shape
from cacheagent.store.records import LEASE_KINDS, Lease, Model, ModelFile, PendingModel, Usage
from cacheagent.store.removal import Removal, RemovalObserver, Trash, notify

ORPHAN_GRACE_SECONDS = 24 * 3600


class Store:
    """A content-addressed model store on local disk; see the module docstring."""

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
        # Models removed (by rm or by eviction) and the bytes that freed, since open.
        self.removed_models = 0
        self.removed_bytes = 0
        self._layout = layout
        self._index = index
        self._flock = lock
        self._lock = threading.RLock()
        self._tmp_names = itertools.count()
        self._ledger = Ledger()
        self._observers: list[RemovalObserver] = []

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
        _check_capacity(capacity_bytes, high_watermark, low_watermark)
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
        try:
            with store._lock:
                store.last_reconcile = reconcile(
                    store._index, layout, rehash=False, now=time.time(), at_start=True
                )
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        with self._lock:
            self._index.close()
            if self._flock is not None:
                self._flock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # blobs

    def has_blob(self, digest: str) -> bool:
        check_digest(digest)
        with self._lock:
            return self._index.blob_size(digest) is not None

    def blob_path(self, digest: str) -> Path:
        return self._layout.blob_path(digest)

    def partial_path(self, digest: str) -> Path:
        return self._layout.partial_path(digest)

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
        clean, shape = _checked_files(manifest_digest, files, manifest)
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
            trash = self._drop_models([manifest_digest], "rm")
        self._dispose(trash)
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
            trash = self._drop_models([manifest_digest], "failed-pull", free_blobs=False)
        self._dispose(trash)
        return True

    def add_removal_observer(self, observer: RemovalObserver) -> None:
        """Call ``observer`` after every removal of a model, whatever removed it (from the
        thread that removed it: observers must be thread-safe and quick)."""
        with self._lock:
            self._observers.append(observer)

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
        clean, _ = _checked_files(manifest_digest, files, manifest)
        with self._lock, self._index.transaction():
            if holder is not None:
                self._index.add_lease(manifest_digest, holder, "pull", time.time())
            if self._index.model_state(manifest_digest) is None:
                self._index.insert_model(
                    ModelRow(
                        manifest_digest, "pending", ref, source_kind, manifest, clean, time.time()
                    )
                )

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

    def resolve_tag(self, ref: str) -> str | None:
        with self._lock:
            return self._index.resolve_tag(ref, time.time())

    def lookup_ref(self, ref: str) -> str | None:
        """Any digest known for ``ref``, expired or not (for running without the origin)."""
        with self._lock:
            return self._index.lookup_ref(ref)

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

    def leases(self, manifest_digest: str | None = None) -> list[Lease]:
        with self._lock:
            return self._index.leases(manifest_digest)

    # capacity (see evict.py)

    def usage(self) -> Usage:
        with self._lock:
            used, nblobs, nmodels = self._index.usage()
            room, _ = self._room(used)
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

    def reserve(
        self,
        nbytes: int,
        *,
        holder: str = "",
        blobs: Collection[str] = (),
        protect: Collection[str] = (),
    ) -> Reservation:
        """Reserve room for ``nbytes`` a pull is about to write (``blobs``: the digests whose
        partial files they are), evicting in the same step if that crosses the high watermark
        (LRU models, never those in ``protect``, down to the low watermark less the request,
        abandoned partial downloads first). CacheFullError naming the sizes, with nothing
        evicted, if the request cannot fit in the capacity or on the disk even then. Give it
        back with ``release``."""
        self._writable()
        if nbytes < 0:
            raise ValueError(f"negative byte count {nbytes}")
        trash: Trash | None = None
        with self._lock:
            room, partials = self._room(self._index.usage()[0])
            need = evict.shortfall(room, nbytes, self.high_watermark, self.low_watermark)
            plan = EvictionPlan(need_bytes=0)
            if need > 0:
                stale, stale_bytes = evict.take_partials(partials, need)
                plan = self._plan(need - stale_bytes, protect)
                freeable = stale_bytes + plan.bytes_freed
                if not evict.fits(room, nbytes, freeable):
                    raise CacheFullError(
                        nbytes,
                        evict.available(room, freeable),
                        detail=evict.refusal(room, nbytes, freeable),
                    )
                trash = self._evict(plan, stale, stale_bytes)
            reservation = Reservation(holder, nbytes, frozenset(blobs), plan)
            reservation.awaiting = 0 if trash is None else trash.nbytes
            self._ledger.add(reservation)
        if trash is not None:
            self._dispose(trash, reservation)
        return reservation

    def release(self, reservation: Reservation, nbytes: int | None = None) -> None:
        """Give back ``nbytes`` of a reservation (a tar archive unpacked and deleted), or all
        of it. Blobs committed under it that no model uses become evictable at once."""
        with self._lock:
            if nbytes is not None:
                reservation.remaining -= min(max(nbytes, 0), reservation.remaining)
                return
            self._ledger.drop(reservation)
            if reservation.committed and self._flock is not None:
                with self._index.transaction():
                    self._index.age_orphans(sorted(reservation.committed))

    def ensure_room(self, nbytes: int, *, protect: Collection[str] = ()) -> EvictionPlan:
        """Evict as ``reserve`` would for ``nbytes``, without keeping the reservation;
        returns the executed plan."""
        reservation = self.reserve(nbytes, protect=protect)
        self.release(reservation)
        return reservation.plan

    def plan_eviction(self, need_bytes: int) -> EvictionPlan:
        """What evicting ``need_bytes`` would delete, without deleting it."""
        with self._lock:
            return self._plan(need_bytes, ())

    def execute(self, plan: EvictionPlan) -> int:
        """Carry out a plan; returns the bytes freed. Models that became pinned or leased
        since the plan was made are kept, and only blobs still unused are freed."""
        self._writable()
        with self._lock:
            trash = self._evict(plan, [], 0)
        self._dispose(trash)
        return trash.nbytes

    # maintenance

    def fsck(self, *, rehash: bool = False) -> FsckReport:
        """Reconcile the index with the disk now; with ``rehash``, re-hash every blob."""
        self._writable()
        with self._lock:
            self.last_reconcile = reconcile(
                self._index, self._layout, rehash=rehash, now=time.time(), at_start=False
            )
            return self.last_reconcile

    # internals

    def _writable(self) -> None:
        if self._flock is None:
            raise StoreError(f"store {self.root} was opened read-only (lock=False)")

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
        tmp = self._layout.tmp_tree_path(digest, self._tmp_tag())
        sources = {f.path: self.blob_path(f.blob) for f in files}
        try:
            tree.build(tmp, self.model_path(digest), shape, sources)
        except BaseException:
            tree.remove(tmp)
            raise

    def _room(self, committed: int) -> tuple[evict.Room, evict.Partials]:
        partials = evict.scan_partials(self._layout.partial_dir, self._ledger.covered())
        free = evict.disk_free(self.root)
        return evict.room_of(self.capacity_bytes, committed, self._ledger, partials, free), partials

    def _drop_models(
        self, digests: Sequence[str], reason: str, *, free_blobs: bool = True
    ) -> Trash:
        """The locked half of a removal: index change, then the renames into a trash
        directory (removal.py). The caller then calls ``_dispose`` outside the lock."""
        trash = Trash.for_layout(self._layout, self._tmp_tag())
        freed: dict[str, int] = {}
        with self._index.transaction():
            for digest in digests:
                gone = self._index.delete_model(digest, free_blobs=free_blobs)
                freed.update(gone)
                trash.removals.append(Removal(digest, reason, sum(gone.values())))
        crashpoint("remove.after_index")
        self._trash_models(trash, freed)
        return trash

    def _evict(self, plan: EvictionPlan, stale: Sequence[Path], stale_bytes: int) -> Trash:
        """Carry out ``plan`` (models still evictable, blobs still orphans) and delete the
        abandoned partial files ``stale``; the locked half, like ``_drop_models``."""
        trash = Trash.for_layout(self._layout, self._tmp_tag())
        freed: dict[str, int] = {}
        with self._index.transaction():
            for digest in plan.models:
                if self._index.model_state(digest) is not None and self._index.is_evictable(digest):
                    gone = self._index.delete_model(digest)
                    freed.update(gone)
                    trash.removals.append(Removal(digest, "evict", sum(gone.values())))
            orphans = self._orphans()
            doomed = {d: orphans[d] for d in plan.blobs if d in orphans}
            self._index.delete_blobs(doomed)
            freed.update(doomed)
        crashpoint("remove.after_index")
        sidecars = [p.with_name(p.name + ".ranges") for p in stale]
        if stale:
            trash.take_files([*stale, *sidecars], stale_bytes)
        self._trash_models(trash, freed)
        return trash

    def _trash_models(self, trash: Trash, freed: dict[str, int]) -> None:
        for removal in trash.removals:
            trash.take_tree(self.model_path(removal.digest), hex_of(removal.digest))
        if freed:
            trash.take_files([self.blob_path(d) for d in freed], sum(freed.values()))
        crashpoint("remove.after_rename")
        self._ledger.freeing += trash.nbytes

    def _dispose(self, trash: Trash, reservation: Reservation | None = None) -> None:
        """The unlocked half of a removal: delete the trash, then tell the observers (and
        count in full the reservation this eviction made room for)."""
        try:
            trash.empty()
        finally:
            with self._lock:
                self._ledger.freeing -= trash.nbytes
                if reservation is not None:
                    reservation.awaiting = 0
                removed = [r for r in trash.removals if r.reason != "failed-pull"]
                self.removed_models += len(removed)
                self.removed_bytes += sum(r.freed_bytes for r in removed)
                observers = list(self._observers)
        notify(observers, trash.removals)

    def _orphans(self) -> dict[str, int]:
        stale = self._index.orphans(time.time() - ORPHAN_GRACE_SECONDS)
        return evict.without(stale, self._ledger.protected())

    def _plan(self, need_bytes: int, protect: Collection[str]) -> EvictionPlan:
        if need_bytes <= 0:
            return EvictionPlan(need_bytes=need_bytes)
        refcounts: dict[str, int] = {}
        orphans = self._orphans()
        with closing(self._index.candidates(refcounts, set(protect))) as candidates:
            return plan_eviction_ordered(candidates, refcounts, need_bytes, orphans=orphans)

    def _in_use_reason(self, digest: str) -> str:
        reasons = ["pinned"] if self._index.is_pinned(digest) else []
        reasons += [
            f"leased by {lease.kind}:{lease.holder}" for lease in self._index.leases(digest)
        ]
        return ", ".join(reasons)

    def _tmp_tag(self) -> str:
        return f"{os.getpid()}-{next(self._tmp_names)}"


def _checked_files(
    manifest_digest: str, files: Sequence[ModelFile], manifest: bytes
) -> tuple[tuple[ModelFile, ...], TreeShape]:
    """Validate a model record before anything is written: digests, sizes, safe paths that
    form a tree. Returns the files with normalised paths, sorted by path."""
    check_digest(manifest_digest)
    actual = sha256_digest(manifest)
    if actual != manifest_digest:
        raise DigestMismatchError(manifest_digest, actual, what="manifest")
    clean: list[ModelFile] = []
    for f in files:
        check_digest(f.blob)
        if f.size < 0:
            raise ValueError(f"file {f.path!r}: negative size {f.size}")
        clean.append(ModelFile(safe_relpath(f.path), f.blob, f.size, f.mode))
    shape = tree_shape(f.path for f in clean)
    return tuple(sorted(clean, key=lambda f: f.path)), shape


def _check_capacity(capacity: int | None, high: float, low: float) -> None:
    if capacity is not None and capacity < 0:
        raise ConfigError("store.capacity", f"must not be negative (got {capacity})")
    if not 0 < high <= 1:
        raise ConfigError("store.high_watermark", f"must be in (0, 1] (got {high})")
    if not 0 < low <= high:
        raise ConfigError("store.low_watermark", f"must be in (0, high_watermark] (got {low})")
