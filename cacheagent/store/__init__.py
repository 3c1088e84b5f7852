"""The content-addressed on-disk store: verified blobs, hard-link model trees, a SQLite index,
LRU eviction under a byte capacity, pins, leases, tag cache and fsck.

Modules: ``paths`` (layout and safe paths, pure), ``lru`` (eviction planner, pure), ``index``
(SQLite), ``blobs`` (commit), ``tree`` (model trees), ``fsck`` (reconciliation), ``lock`` (one
agent per store), ``crashpoints`` (fault injection for tests), ``store`` (the facade).
"""

from __future__ import annotations

from cacheagent.store.fsck import FsckReport
from cacheagent.store.lru import Candidate, EvictionPlan
from cacheagent.store.records import Lease, Model, ModelFile, PendingModel, Usage
from cacheagent.store.store import Store

__all__ = [
    "Candidate",
    "EvictionPlan",
    "FsckReport",
    "Lease",
    "Model",
    "ModelFile",
    "PendingModel",
    "Store",
    "Usage",
]
