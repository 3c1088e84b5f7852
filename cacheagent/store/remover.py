"""The store's removals, both halves (see removal.py for the protocol): ``drop_models`` and
``evict`` run under the store lock (index change, renames into a trash directory);
``dispose`` runs outside it (deletes, then the observers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cacheagent.digest import hex_of
from cacheagent.store import evict
from cacheagent.store.crashpoints import crashpoint
from cacheagent.store.evict import Ledger, Reservation
from cacheagent.store.index import Index
from cacheagent.store.lru import EvictionPlan
from cacheagent.store.paths import Layout
from cacheagent.store.removal import Removal, RemovalObserver, Trash, notify

ORPHAN_GRACE_SECONDS = 24 * 3600


class Remover:
    """Removes models and blobs for one store; shares its index, lock and ledger."""

    def __init__(
        self,
        index: Index,
        layout: Layout,
        ledger: Ledger,
        lock: threading.RLock,
        tag: Callable[[], str],
    ) -> None:
        self._index = index
        self._layout = layout
        self._ledger = ledger
        self._lock = lock
        self._tag = tag
        self._observers: list[RemovalObserver] = []
        self.removed_models = 0
        self.removed_bytes = 0

    def observe(self, observer: RemovalObserver) -> None:
        with self._lock:
            self._observers.append(observer)

    def orphans(self) -> dict[str, int]:
        """Blobs no model uses that eviction may free: a pull gave them up (or they are a day
        old) and no live pull committed them."""
        stale = self._index.orphans(time.time() - ORPHAN_GRACE_SECONDS)
        return evict.without(stale, self._ledger.protected())

    def drop_models(self, digests: Sequence[str], reason: str, *, free_blobs: bool = True) -> Trash:
        """Locked half: delete the records (and, with ``free_blobs``, the blobs only they
        used), then move their trees and blob files into the trash."""
        trash = Trash.for_layout(self._layout, self._tag())
        freed: dict[str, int] = {}
        with self._index.transaction():
            for digest in digests:
                gone = self._index.delete_model(digest, free_blobs=free_blobs)
                freed.update(gone)
                trash.removals.append(Removal(digest, reason, sum(gone.values())))
        crashpoint("remove.after_index")
        self._take(trash, freed)
        return trash

    def evict(self, plan: EvictionPlan, stale: Sequence[Path], stale_bytes: int) -> Trash:
        """Locked half of an eviction: the plan's models still evictable, its blobs still
        orphans, and the abandoned partial files ``stale``."""
        trash = Trash.for_layout(self._layout, self._tag())
        freed: dict[str, int] = {}
        with self._index.transaction():
            for digest in plan.models:
                if self._index.model_state(digest) is not None and self._index.is_evictable(digest):
                    gone = self._index.delete_model(digest)
                    freed.update(gone)
                    trash.removals.append(Removal(digest, "evict", sum(gone.values())))
            orphans = self.orphans()
            doomed = {d: orphans[d] for d in plan.blobs if d in orphans}
            self._index.delete_blobs(doomed)
            freed.update(doomed)
        crashpoint("remove.after_index")
        if stale:
            sidecars = [p.with_name(p.name + ".ranges") for p in stale]
            trash.take_files([*stale, *sidecars], stale_bytes)
        self._take(trash, freed)
        return trash

    def dispose(self, trash: Trash, reservation: Reservation | None = None) -> None:
        """Unlocked half: delete the trash, then tell the observers (and count in full the
        reservation this eviction made room for)."""
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

    def repaired(self, digests: Sequence[str]) -> None:
        """Tell the observers about models a repair reset to pending (their trees were
        removed, or are to be repaired in place): what they hold of them is stale."""
        with self._lock:
            observers = list(self._observers)
        notify(observers, [Removal(digest, "repair", 0) for digest in digests])

    def _take(self, trash: Trash, freed: dict[str, int]) -> None:
        for removal in trash.removals:
            trash.take_tree(self._layout.model_path(removal.digest), hex_of(removal.digest))
        if freed:
            trash.take_files([self._layout.blob_path(d) for d in freed], sum(freed.values()))
        crashpoint("remove.after_rename")
        self._ledger.freeing += trash.nbytes
