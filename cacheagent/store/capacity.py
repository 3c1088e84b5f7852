"""The store's capacity, applied: reservations made atomically with the eviction they need
(the accounting itself is in evict.py, the removals in remover.py)."""

from __future__ import annotations

import threading
from collections.abc import Collection
from contextlib import closing
from dataclasses import dataclass

from cacheagent.errors import CacheFullError, DiskFullError
from cacheagent.store import evict
from cacheagent.store.evict import Ledger, Reservation
from cacheagent.store.index import Index
from cacheagent.store.lru import EvictionPlan, plan_eviction_ordered
from cacheagent.store.paths import Layout
from cacheagent.store.removal import Trash
from cacheagent.store.remover import Remover


@dataclass(frozen=True)
class Limits:
    capacity_bytes: int | None
    high_watermark: float
    low_watermark: float


class Capacity:
    """Reserve, release and plan for one store; shares its index, lock, ledger and remover.
    Callers other than ``reserve`` and ``release`` hold the store lock."""

    def __init__(
        self,
        index: Index,
        layout: Layout,
        ledger: Ledger,
        lock: threading.RLock,
        remover: Remover,
        limits: Limits,
    ) -> None:
        self._index = index
        self._layout = layout
        self._ledger = ledger
        self._lock = lock
        self._remover = remover
        self.limits = limits

    def room(self, committed: int) -> tuple[evict.Room, evict.Partials]:
        partials = evict.scan_partials(self._layout.partial_dir, self._ledger.covered())
        free = evict.disk_free(self._layout.root)
        room = evict.room_of(self.limits.capacity_bytes, committed, self._ledger, partials, free)
        return room, partials

    def plan(self, need_bytes: int, protect: Collection[str]) -> EvictionPlan:
        if need_bytes <= 0:
            return EvictionPlan(need_bytes=need_bytes)
        refcounts: dict[str, int] = {}
        orphans = self._remover.orphans()
        with closing(self._index.candidates(refcounts, set(protect))) as candidates:
            return plan_eviction_ordered(candidates, refcounts, need_bytes, orphans=orphans)

    def reserve(
        self,
        nbytes: int,
        *,
        holder: str,
        blobs: Collection[str],
        protect: Collection[str],
    ) -> Reservation:
        """Reserve room for ``nbytes`` (``blobs``: the digests whose partial files they are),
        evicting in the same step if that crosses the high watermark (abandoned partial
        downloads first, then LRU models, never those in ``protect``, down to the low
        watermark less the request). CacheFullError naming the sizes, with nothing evicted,
        if the request cannot fit in the capacity even then; DiskFullError if it fits the
        capacity but not the filesystem (another tenant, or a capacity above the disk)."""
        if nbytes < 0:
            raise ValueError(f"negative byte count {nbytes}")
        limits = self.limits
        trash: Trash | None = None
        with self._lock:
            room, partials = self.room(self._index.usage()[0])
            need = evict.shortfall(room, nbytes, limits.high_watermark, limits.low_watermark)
            plan = EvictionPlan(need_bytes=0)
            if need > 0:
                stale, stale_bytes = evict.take_partials(partials, need)
                plan = self.plan(need - stale_bytes, protect)
                freeable = stale_bytes + plan.bytes_freed
                if evict.fits_capacity(room, nbytes, freeable) and not evict.fits(
                    room, nbytes, freeable
                ):
                    raise DiskFullError(self._layout.root, evict.refusal(room, nbytes, freeable))
                if not evict.fits(room, nbytes, freeable):
                    raise CacheFullError(
                        nbytes,
                        evict.available(room, freeable),
                        detail=evict.refusal(room, nbytes, freeable),
                    )
                trash = self._remover.evict(plan, stale, stale_bytes)
            reservation = Reservation(holder, nbytes, frozenset(blobs), plan)
            reservation.awaiting = 0 if trash is None else trash.nbytes
            self._ledger.add(reservation)
        if trash is not None:
            self._remover.dispose(trash, reservation)
        return reservation

    def release(self, reservation: Reservation, nbytes: int | None, *, age_orphans: bool) -> None:
        """Give back ``nbytes`` of a reservation, or all of it; then the blobs committed
        under it that no model uses become evictable at once."""
        with self._lock:
            if nbytes is not None:
                reservation.remaining -= min(max(nbytes, 0), reservation.remaining)
                return
            self._ledger.drop(reservation)
            if reservation.committed and age_orphans:
                with self._index.transaction():
                    self._index.age_orphans(sorted(reservation.committed))

    def grow(self, reservation: Reservation, size: int) -> None:
        """Make sure ``reservation`` covers a blob of ``size`` bytes about to be committed
        under it (a compressed tar layer may unpack to more than was reserved): reserve the
        difference as ``reserve`` would, evicting if need be; CacheFullError if it cannot."""
        with self._lock:
            extra = size - reservation.remaining
            if extra <= 0 or reservation.released:
                return
            more = self.reserve(extra, holder=reservation.holder, blobs=(), protect=())
            self._ledger.drop(more)
            reservation.remaining += extra
