"""The publish journal: which volume is mounted where, so a restarted agent knows what is in use.

One table, ``publishes``, in the store's SQLite index (``<store root>/index.db``, WAL). The store
creates and migrates it with its own tables (``cacheagent.store.schema``), so the journal only
opens an index the store has opened first; this module reads and writes the table over its own
connection (SQLite serialises the writers; ``busy_timeout`` absorbs the rare overlap).

Write-ahead rule: a row is written *before* its mount is made and deleted *after* its mount is
gone. A crash therefore leaves at worst a row without a mount, never a mount without a row.

Reconcile on start (``plan_reconcile``, pure, over the rows and /proc/self/mountinfo):

- a row whose target is still a mount point is kept, and its lease re-taken (leases are
  idempotent per holder), so the model cannot be evicted from under a running pod;
- a row whose mount is gone (node reboot, someone unmounted it) is dropped and its lease released;
  kubelet calls NodePublishVolume again for pods that still need it;
- a bind mount under the kubelet directory whose source is one of the store's model directories
  but which has no row (the journal was lost) is *adopted*: recorded with an empty volume id and
  leased, not unmounted. Unmounting it would not take the files away from the running container
  (its mount namespace keeps its own copy) but would drop the lease, so the store could evict the
  model while the pod reads it. The next NodePublishVolume or NodeUnpublishVolume for that target
  fills in or removes the row.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cacheagent.errors import CacheAgentError
from cacheagent.mountinfo import MountInfo

_COLUMNS = "volume_id, target_path, manifest_digest, ref, mode, namespace, pod, created"
_MODEL_DIR_RE = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")


class JournalError(CacheAgentError):
    """The publish journal cannot be used (its table is missing: the store was not opened)."""


def lease_holder(volume_id: str, target_path: str) -> str:
    """The store lease holder for one publish: unique per (volume, target)."""
    return f"csi:{volume_id}:{target_path}"


@dataclass(frozen=True)
class Publish:
    volume_id: str  # "" for a mount adopted without a journal row
    target_path: str
    manifest_digest: str
    ref: str
    mode: str
    namespace: str = ""
    pod: str = ""
    created: float = 0.0

    @property
    def holder(self) -> str:
        return lease_holder(self.volume_id, self.target_path)

    @property
    def adopted(self) -> bool:
        return not self.volume_id


class PublishJournal:
    """Thread-safe access to the ``publishes`` table (callers on the loop use to_thread)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def open(cls, db_path: Path) -> PublishJournal:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'publishes'"
        ).fetchone()
        if found is None:
            conn.close()
            raise JournalError(
                f"{db_path} has no publishes table: open the store there first "
                "(its schema migrations create the journal's table)"
            )
        return cls(conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def get(self, target_path: str) -> Publish | None:
        rows = self._select("WHERE target_path = ?", (target_path,))
        return rows[0] if rows else None

    def for_volume(self, volume_id: str) -> list[Publish]:
        """Every target ``volume_id`` is published at (a static PV shared by pods: several)."""
        return self._select("WHERE volume_id = ?", (volume_id,))

    def all(self) -> list[Publish]:
        return self._select("ORDER BY created, target_path", ())

    def put(self, row: Publish) -> None:
        with self._lock:
            self._conn.execute(
                f"INSERT OR REPLACE INTO publishes ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    row.volume_id,
                    row.target_path,
                    row.manifest_digest,
                    row.ref,
                    row.mode,
                    row.namespace,
                    row.pod,
                    row.created,
                ),
            )

    def remove(self, target_path: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM publishes WHERE target_path = ?", (target_path,))

    def count_by_mode(self) -> dict[str, int]:
        """Published volumes per mode (bind, lazy), for the cacheagent_csi_volumes gauge."""
        with self._lock:
            cur = self._conn.execute("SELECT mode, COUNT(*) FROM publishes GROUP BY mode")
            return {str(mode): int(n) for mode, n in cur.fetchall()}

    def _select(self, clause: str, args: tuple[str, ...]) -> list[Publish]:
        with self._lock:
            cur = self._conn.execute(f"SELECT {_COLUMNS} FROM publishes {clause}", args)  # noqa: S608
            return [_row(r) for r in cur.fetchall()]


def _row(values: tuple[Any, ...]) -> Publish:
    vid, target, digest, ref, mode, ns, pod, created = values
    return Publish(
        volume_id=str(vid),
        target_path=str(target),
        manifest_digest=str(digest),
        ref=str(ref),
        mode=str(mode),
        namespace=str(ns),
        pod=str(pod),
        created=float(created),
    )


@dataclass(frozen=True)
class ReconcilePlan:
    keep: tuple[Publish, ...] = ()
    drop: tuple[Publish, ...] = ()
    adopt: tuple[Publish, ...] = ()


def digest_of_model_dir(name: str) -> str | None:
    """``models/<name>`` -> manifest digest; accepts ``sha256:<hex>`` and bare ``<hex>``."""
    match = _MODEL_DIR_RE.match(name)
    return f"sha256:{match.group(1)}" if match else None


def plan_reconcile(
    rows: Iterable[Publish],
    mounts: Sequence[MountInfo],
    *,
    kubelet_dirs: Sequence[str],
    models_location: tuple[str, str] | None,
    now: float | None = None,
) -> ReconcilePlan:
    """Decide what to keep, drop and adopt; see the module docstring for the rules.

    ``kubelet_dirs`` are the real directories volumes are mounted under (the kubelet directory
    and, where it is a symlink, its ``pods/``); ``models_location`` is the store's
    ``models/`` directory as (device, path inside its filesystem), from ``mounts.fs_location``.
    """
    mounted = {m.mount_point for m in mounts}
    rows = list(rows)
    keep = tuple(r for r in rows if r.target_path in mounted)
    drop = tuple(r for r in rows if r.target_path not in mounted)
    journaled = {r.target_path for r in rows}
    adopt: dict[str, Publish] = {}
    for m in mounts:
        if m.mount_point in journaled or m.mount_point in adopt:
            continue
        if not any(m.mount_point.startswith(d.rstrip("/") + "/") for d in kubelet_dirs):
            continue
        digest = model_digest_of_mount(m, models_location)
        if digest is not None:
            adopt[m.mount_point] = Publish(
                volume_id="",
                target_path=m.mount_point,
                manifest_digest=digest,
                ref="",
                mode="bind",
                created=time.time() if now is None else now,
            )
    return ReconcilePlan(keep=keep, drop=drop, adopt=tuple(adopt.values()))


def model_digest_of_mount(m: MountInfo, models_location: tuple[str, str] | None) -> str | None:
    if models_location is None:
        return None
    device, models_root = models_location
    prefix = models_root.rstrip("/") + "/"
    if m.major_minor != device or not m.root.startswith(prefix):
        return None
    rest = m.root[len(prefix) :]
    if os.sep in rest:  # a subdirectory of a model was mounted: not something we publish
        return None
    return digest_of_model_dir(rest)
