"""The one way files leave the store: ``rm``, capacity eviction, a failed pull's record and a
repair all end here, so every removal tells the same observers (the memory locker, the FUSE
view, the metrics).

Two halves, so a big eviction never stalls publishes and FUSE reads behind the store lock:

1. under the lock (``Store``): commit the index change, then ``Trash.take`` renames the model
   trees and freed blob files into one ``models/.tmp-trash-*`` directory (a rename per entry:
   cheap whatever the sizes; after it, a re-pull of the same model or blob cannot collide with
   the files being deleted);
2. outside it: ``Trash.empty`` deletes that directory (the slow part: freeing the extents),
   then the observers are told.

A crash between the two leaves only a ``.tmp-*`` directory, which start-up reconciliation
deletes; a crash before the renames leaves files the index no longer knows, which it adopts
(blobs) or deletes (trees).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from cacheagent.store import tree
from cacheagent.store.blobs import make_dirs
from cacheagent.store.crashpoints import crashpoint
from cacheagent.store.paths import TMP_PREFIX, Layout

log = logging.getLogger(__name__)

REASONS = ("rm", "evict", "repair", "failed-pull")


@dataclass(frozen=True)
class Removal:
    """A model that left the store, and why (one of ``REASONS``)."""

    digest: str
    reason: str
    freed_bytes: int


RemovalObserver = Callable[[Removal], None]


@dataclass
class Trash:
    """Files taken out of the store under its lock, to be deleted outside it."""

    directory: Path
    removals: list[Removal] = field(default_factory=list)
    nbytes: int = 0
    used: bool = False

    @classmethod
    def for_layout(cls, layout: Layout, tag: str) -> Trash:
        return cls(layout.models_dir / f"{TMP_PREFIX}trash-{tag}")

    def _open(self) -> None:
        if not self.used:
            make_dirs(self.directory)
            self.directory.chmod(0o700)
            self.used = True

    def take_tree(self, path: Path, name: str) -> None:
        self._open()
        try:
            path.rename(self.directory / name)
        except FileNotFoundError:
            return

    def take_files(self, paths: Collection[Path], nbytes: int) -> None:
        """Move files (freed blobs, abandoned partials) in; ``nbytes`` is what they free."""
        self._open()
        for path in paths:
            try:
                path.rename(self.directory / f"f-{path.name}")
            except FileNotFoundError:
                continue
        self.nbytes += nbytes

    def empty(self) -> None:
        """Delete what was taken (outside the store lock)."""
        if self.used:
            tree.remove(self.directory)
            crashpoint("remove.after_blobs")


def notify(observers: Collection[RemovalObserver], removals: Collection[Removal]) -> None:
    """Tell every observer about every removal; one failing observer does not stop the rest."""
    for removal in removals:
        for observer in observers:
            try:
                observer(removal)
            except Exception:
                log.exception("removal observer failed for %s", removal.digest)
