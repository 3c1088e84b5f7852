"""The SQLite index: every query the store runs (the schema and its migrations: schema.py).

Not thread-safe on its own: the Store serialises all use of one Index behind its lock.

Durability: WAL with ``synchronous=NORMAL``. In WAL mode NORMAL never corrupts the database;
an OS crash or power cut can only lose the last few committed transactions. The store always
makes the disk change durable (fsync of the file and its directory) before it commits the
matching row, so a lost transaction leaves the disk ahead of the index, which is exactly what
start-up reconciliation repairs (adopt the blob, delete the unindexed tree). FULL would add an
fsync to every ``touch`` on the read path for no gain in what survives.

Blob reference counts (``blobs.refs``: how many models, ready or pending, use a blob) are kept
by triggers so that eviction planning and orphan lookups are index reads, not scans.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Generator, Iterable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cacheagent.errors import StoreError
from cacheagent.store.lru import Candidate
from cacheagent.store.records import Lease, Model, ModelFile, ModelFiles
from cacheagent.store.schema import check_version, migrate


@dataclass(frozen=True)
class ModelRow:
    """What ``put_model`` / ``put_pending`` record about a model."""

    digest: str
    state: str
    ref: str | None
    source_kind: str
    manifest: bytes
    files: Sequence[ModelFile]
    now: float


def _json(items: Iterable[str]) -> str:
    """Pass a list as one parameter (``IN (SELECT value FROM json_each(?))``): static SQL."""
    return json.dumps(list(items))


class Index:
    """One SQLite connection to ``index.db``; see the module docstring for the rules."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> Index:
        if readonly and not path.exists():
            raise StoreError(f"no store index at {path}")
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            if readonly:
                check_version(conn)
                conn.execute("PRAGMA query_only=ON")
            else:
                migrate(conn)
        except BaseException:
            conn.close()
            raise
        return cls(conn)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # blobs

    def blob_size(self, digest: str) -> int | None:
        row = self._conn.execute("SELECT size FROM blobs WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else int(row[0])

    def blob_sizes(self, digests: Iterable[str]) -> dict[str, int]:
        return dict(
            self._conn.execute(
                "SELECT digest, size FROM blobs WHERE digest IN (SELECT value FROM json_each(?))",
                (_json(digests),),
            ).fetchall()
        )

    def all_blobs(self) -> dict[str, int]:
        return dict(self._conn.execute("SELECT digest, size FROM blobs").fetchall())

    def insert_blob(self, digest: str, size: int, now: float) -> None:
        self._conn.execute(
            "INSERT OR IGNORE INTO blobs (digest, size, created) VALUES (?, ?, ?)",
            (digest, size, now),
        )

    def delete_blobs(self, digests: Iterable[str]) -> None:
        self._conn.executemany("DELETE FROM blobs WHERE digest = ?", ((d,) for d in digests))

    def unreferenced(self, digests: Iterable[str]) -> dict[str, int]:
        """Those of ``digests`` that are committed and used by no model, with their sizes."""
        return dict(
            self._conn.execute(
                "SELECT digest, size FROM blobs WHERE refs = 0 "
                "AND digest IN (SELECT value FROM json_each(?))",
                (_json(digests),),
            ).fetchall()
        )

    def orphans(self, created_before: float) -> dict[str, int]:
        return dict(
            self._conn.execute(
                "SELECT digest, size FROM blobs WHERE refs = 0 AND created < ?", (created_before,)
            ).fetchall()
        )

    def recount_refs(self) -> int:
        """Recompute every blob's reference count; returns how many were wrong."""
        cur = self._conn.execute(
            """UPDATE blobs
               SET refs = (SELECT COUNT(DISTINCT model) FROM model_files WHERE blob = blobs.digest)
               WHERE refs != (SELECT COUNT(DISTINCT model) FROM model_files
                              WHERE blob = blobs.digest)"""
        )
        return cur.rowcount

    def usage(self) -> tuple[int, int, int]:
        """(bytes of committed blobs, blob count, ready model count)."""
        used, blobs = self._conn.execute(
            "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM blobs"
        ).fetchone()
        (models,) = self._conn.execute(
            "SELECT COUNT(*) FROM models WHERE state = 'ready'"
        ).fetchone()
        return int(used), int(blobs), int(models)

    # models

    def model_digests(self) -> list[str]:
        """Every model, ready or pending (the FUSE root lists both)."""
        return [str(r[0]) for r in self._conn.execute("SELECT digest FROM models ORDER BY digest")]

    def model_state(self, digest: str) -> str | None:
        row = self._conn.execute("SELECT state FROM models WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else str(row[0])

    def insert_model(self, row: ModelRow) -> None:
        """Record a model, replacing a pending record of the same digest."""
        self._conn.execute("DELETE FROM model_files WHERE model = ?", (row.digest,))
        self._conn.execute(
            """INSERT INTO models (digest, state, ref, source_kind, size, created, last_used,
                                   files, manifest)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (digest) DO UPDATE SET state = excluded.state,
                   ref = COALESCE(models.ref, excluded.ref), size = excluded.size,
                   last_used = excluded.last_used, files = excluded.files""",
            (
                row.digest,
                row.state,
                row.ref,
                row.source_kind,
                sum(f.size for f in row.files),
                row.now,
                row.now,
                ModelFiles.encode(row.files),
                row.manifest,
            ),
        )
        self._conn.executemany(
            "INSERT INTO model_files (model, path, blob, size, mode) VALUES (?, ?, ?, ?, ?)",
            ((row.digest, f.path, f.blob, f.size, f.mode) for f in row.files),
        )

    def delete_model(self, digest: str, *, free_blobs: bool = True) -> dict[str, int]:
        """Delete a model (pins cascade) and the blob rows only it used; returns those blobs
        with their sizes, for the caller to delete the files. With ``free_blobs=False`` those
        blobs stay, as orphans evictable at once (``age_orphans``), and none is returned."""
        blobs = [
            r[0]
            for r in self._conn.execute(
                "SELECT DISTINCT blob FROM model_files WHERE model = ?", (digest,)
            )
        ]
        self._conn.execute("DELETE FROM model_files WHERE model = ?", (digest,))
        self._conn.execute("DELETE FROM models WHERE digest = ?", (digest,))
        if not free_blobs:
            self.age_orphans(blobs)
            return {}
        freed = self.unreferenced(blobs)
        self.delete_blobs(freed)
        return freed

    def age_orphans(self, digests: Iterable[str]) -> None:
        """Make those of ``digests`` that no model uses evictable at once (no grace period)."""
        self._conn.execute(
            "UPDATE blobs SET created = 0 WHERE refs = 0 "
            "AND digest IN (SELECT value FROM json_each(?))",
            (_json(digests),),
        )

    def get_model(self, digest: str) -> Model | None:
        row = self._conn.execute(
            "SELECT * FROM model_summaries WHERE digest = ?",
            (digest,),
        ).fetchone()
        return None if row is None else _model(row)

    def list_models(self) -> list[Model]:
        return [
            _model(row)
            for row in self._conn.execute(
                "SELECT * FROM model_summaries ORDER BY last_used DESC, digest DESC"
            )
        ]

    def model_files(self, digest: str) -> tuple[ModelFile, ...]:
        return tuple(
            ModelFile(path, blob, size, mode)
            for path, blob, size, mode in self._conn.execute(
                "SELECT path, blob, size, mode FROM model_files WHERE model = ? ORDER BY path",
                (digest,),
            )
        )

    def model_meta(self, digest: str) -> tuple[str | None, str, int, float] | None:
        """(ref, source_kind, size, created) of a model in any state."""
        row = self._conn.execute(
            "SELECT ref, source_kind, size, created FROM models WHERE digest = ?", (digest,)
        ).fetchone()
        return None if row is None else (row[0], str(row[1]), int(row[2]), float(row[3]))

    def manifest(self, digest: str) -> bytes | None:
        row = self._conn.execute(
            "SELECT manifest FROM models WHERE digest = ?", (digest,)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def ready_models(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT digest FROM models WHERE state = 'ready'")]

    def models_using(self, blobs: Iterable[str]) -> set[str]:
        """Ready models that need any of ``blobs``."""
        return {
            r[0]
            for r in self._conn.execute(
                "SELECT DISTINCT f.model FROM model_files f JOIN models m ON m.digest = f.model "
                "WHERE m.state = 'ready' AND f.blob IN (SELECT value FROM json_each(?))",
                (_json(blobs),),
            )
        }

    def missing_blobs(self, digest: str) -> tuple[str, ...]:
        return tuple(
            r[0]
            for r in self._conn.execute(
                "SELECT DISTINCT f.blob FROM model_files f LEFT JOIN blobs b ON b.digest = f.blob "
                "WHERE f.model = ? AND b.digest IS NULL ORDER BY f.blob",
                (digest,),
            )
        )

    def set_state(self, digest: str, state: str) -> None:
        self._conn.execute("UPDATE models SET state = ? WHERE digest = ?", (state, digest))

    def touch(self, digest: str, now: float) -> None:
        self._conn.execute("UPDATE models SET last_used = ? WHERE digest = ?", (now, digest))

    # eviction inputs

    def candidates(
        self, refcounts: MutableMapping[str, int], protect: Collection[str]
    ) -> Generator[Candidate, None, None]:
        """Every model in LRU order, read lazily; fills ``refcounts`` for each yielded
        evictable candidate's blobs before yielding it (see ``lru.plan_eviction_ordered``)."""
        cursor = self._conn.execute(
            """SELECT m.digest, m.size, m.last_used,
                   EXISTS (SELECT 1 FROM pins p WHERE p.digest = m.digest),
                   EXISTS (SELECT 1 FROM leases l WHERE l.digest = m.digest AND l.kind != 'pull'),
                   EXISTS (SELECT 1 FROM leases l WHERE l.digest = m.digest AND l.kind = 'pull')
               FROM models m ORDER BY m.last_used, m.digest"""
        )
        try:
            yield from self._candidates(cursor, refcounts, protect)
        finally:
            cursor.close()

    def _candidates(
        self,
        cursor: sqlite3.Cursor,
        refcounts: MutableMapping[str, int],
        protect: Collection[str],
    ) -> Iterator[Candidate]:
        for digest, size, last_used, pinned, leased, pulling in cursor:
            candidate = Candidate(
                digest=digest,
                last_used=last_used,
                size=size,
                pinned=bool(pinned),
                leased=bool(leased),
                pulling=bool(pulling) or digest in protect,
            )
            if candidate.evictable:
                blobs: dict[str, int] = {}
                for blob, blob_size, refs in self._conn.execute(
                    "SELECT DISTINCT b.digest, b.size, b.refs FROM model_files f "
                    "JOIN blobs b ON b.digest = f.blob WHERE f.model = ?",
                    (digest,),
                ):
                    blobs[blob] = blob_size
                    refcounts[blob] = refs
                candidate = Candidate(
                    digest=digest,
                    last_used=last_used,
                    blobs=blobs,
                    size=size,
                )
            yield candidate

    def is_evictable(self, digest: str) -> bool:
        row = self._conn.execute(
            "SELECT NOT EXISTS (SELECT 1 FROM pins WHERE digest = ?) "
            "AND NOT EXISTS (SELECT 1 FROM leases WHERE digest = ?)",
            (digest, digest),
        ).fetchone()
        return bool(row[0])

    # tags

    def set_tag(self, ref: str, digest: str, now: float, expires: float) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO tags (ref, digest, resolved, expires) VALUES (?, ?, ?, ?)",
            (ref, digest, now, expires),
        )

    def resolve_tag(self, ref: str, now: float) -> str | None:
        row = self._conn.execute(
            "SELECT digest FROM tags WHERE ref = ? AND expires > ?", (ref, now)
        ).fetchone()
        return None if row is None else str(row[0])

    def lookup_ref(self, ref: str) -> str | None:
        row = self._conn.execute(
            """SELECT digest FROM tags WHERE ref = ?
               UNION ALL
               SELECT * FROM (SELECT digest FROM models WHERE ref = ? AND state = 'ready'
                              ORDER BY last_used DESC LIMIT 1)
               LIMIT 1""",
            (ref, ref),
        ).fetchone()
        return None if row is None else str(row[0])

    # pins

    def is_pinned(self, digest: str) -> bool:
        row = self._conn.execute("SELECT 1 FROM pins WHERE digest = ?", (digest,)).fetchone()
        return row is not None

    def pin(self, digest: str, now: float) -> None:
        self._conn.execute(
            "INSERT OR IGNORE INTO pins (digest, created) VALUES (?, ?)", (digest, now)
        )

    def unpin(self, digest: str) -> None:
        self._conn.execute("DELETE FROM pins WHERE digest = ?", (digest,))

    # leases

    def add_lease(self, digest: str, holder: str, kind: str, now: float) -> None:
        self._conn.execute(
            """INSERT INTO leases (holder, digest, kind, created) VALUES (?, ?, ?, ?)
               ON CONFLICT (holder, digest) DO UPDATE SET kind = excluded.kind""",
            (holder, digest, kind, now),
        )

    def release_lease(self, holder: str) -> None:
        self._conn.execute("DELETE FROM leases WHERE holder = ?", (holder,))

    def drop_leases(self, *, digest: str | None = None, kinds: Sequence[str] = ()) -> int:
        """Delete the leases on one model, or every lease of the given kinds."""
        if digest is not None:
            return self._conn.execute("DELETE FROM leases WHERE digest = ?", (digest,)).rowcount
        return self._conn.execute(
            "DELETE FROM leases WHERE kind IN (SELECT value FROM json_each(?))", (_json(kinds),)
        ).rowcount

    def leases(self, digest: str | None) -> list[Lease]:
        query = "SELECT digest, holder, kind, created FROM leases"
        args: tuple[str, ...] = ()
        if digest is not None:
            query += " WHERE digest = ?"
            args = (digest,)
        return [
            Lease(*row) for row in self._conn.execute(query + " ORDER BY created, holder", args)
        ]

    def pulling_blobs(self) -> set[str]:
        """Blobs of models that a pull holds a lease on (their partial downloads are live)."""
        return {
            r[0]
            for r in self._conn.execute(
                "SELECT DISTINCT f.blob FROM leases l JOIN model_files f ON f.model = l.digest "
                "WHERE l.kind = 'pull'"
            )
        }


def _model(row: tuple[Any, ...]) -> Model:
    # Column types are fixed by the schema; this runs 10,000 times per listing, so no casts.
    digest, ref, size, created, last_used, source_kind, pinned, refs, files = row
    return Model(
        digest,
        ref,
        tuple(sorted(refs.split("\n"))) if refs else (),
        size,
        ModelFiles(files),
        created,
        last_used,
        bool(pinned),
        source_kind,
    )
