"""The index's schema and its migrations: ``PRAGMA user_version`` says which have run.

Every table in ``index.db`` is created here, the CSI publish journal's included, so one
numbered sequence upgrades a store whatever its age and a downgrade is refused with a message
(a newer schema than this cacheagent knows). Migrations are appended, never edited.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

from cacheagent.errors import StoreError

_V1 = """
CREATE TABLE blobs (
    digest  TEXT PRIMARY KEY,
    size    INTEGER NOT NULL CHECK (size >= 0),
    created REAL NOT NULL,
    refs    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX blobs_orphans ON blobs (created) WHERE refs = 0;

CREATE TABLE models (
    digest      TEXT PRIMARY KEY,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'ready')),
    ref         TEXT,
    source_kind TEXT NOT NULL,
    size        INTEGER NOT NULL,
    created     REAL NOT NULL,
    last_used   REAL NOT NULL,
    files       TEXT NOT NULL,  -- JSON [[path, blob, size, mode], ...]: Model.files in one read
    manifest    BLOB NOT NULL
);
CREATE INDEX models_lru ON models (last_used, digest);

CREATE TABLE model_files (
    model TEXT NOT NULL REFERENCES models (digest) ON DELETE CASCADE,
    path  TEXT NOT NULL,
    blob  TEXT NOT NULL,
    size  INTEGER NOT NULL,
    mode  INTEGER NOT NULL,
    PRIMARY KEY (model, path)
) WITHOUT ROWID;
CREATE INDEX model_files_blob ON model_files (blob, model);

CREATE TABLE tags (
    ref      TEXT PRIMARY KEY,
    digest   TEXT NOT NULL,
    resolved REAL NOT NULL,
    expires  REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX tags_digest ON tags (digest);

CREATE TABLE pins (
    digest  TEXT PRIMARY KEY REFERENCES models (digest) ON DELETE CASCADE,
    created REAL NOT NULL
) WITHOUT ROWID;

CREATE TABLE leases (
    holder  TEXT NOT NULL,
    digest  TEXT NOT NULL,
    kind    TEXT NOT NULL CHECK (kind IN ('csi', 'fuse', 'pull')),
    created REAL NOT NULL,
    PRIMARY KEY (holder, digest)
) WITHOUT ROWID;
CREATE INDEX leases_digest ON leases (digest, kind);

CREATE VIEW model_summaries AS
SELECT m.digest, m.ref, m.size, m.created, m.last_used, m.source_kind,
       EXISTS (SELECT 1 FROM pins p WHERE p.digest = m.digest) AS pinned,
       (SELECT group_concat(t.ref, char(10)) FROM tags t WHERE t.digest = m.digest) AS refs,
       m.files
FROM models m WHERE m.state = 'ready';

-- refs counts distinct models: a model using one blob at two paths holds one reference.
CREATE TRIGGER model_files_ref AFTER INSERT ON model_files
WHEN NOT EXISTS (SELECT 1 FROM model_files
                 WHERE blob = NEW.blob AND model = NEW.model AND path != NEW.path)
BEGIN
    UPDATE blobs SET refs = refs + 1 WHERE digest = NEW.blob;
END;
CREATE TRIGGER model_files_unref AFTER DELETE ON model_files
WHEN NOT EXISTS (SELECT 1 FROM model_files WHERE blob = OLD.blob AND model = OLD.model)
BEGIN
    UPDATE blobs SET refs = refs - 1 WHERE digest = OLD.blob;
END;
CREATE TRIGGER blobs_count_refs AFTER INSERT ON blobs
BEGIN
    UPDATE blobs SET refs = (SELECT COUNT(DISTINCT model) FROM model_files WHERE blob = NEW.digest)
    WHERE digest = NEW.digest;
END;
"""

_V2 = """
CREATE TABLE IF NOT EXISTS publishes (
    target_path     TEXT PRIMARY KEY,
    volume_id       TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    ref             TEXT NOT NULL,
    mode            TEXT NOT NULL,
    namespace       TEXT NOT NULL DEFAULT '',
    pod             TEXT NOT NULL DEFAULT '',
    created         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS publishes_volume ON publishes (volume_id);
CREATE INDEX IF NOT EXISTS publishes_digest ON publishes (manifest_digest);
"""
"""The CSI publish journal's table (``cacheagent.csi.journal``). ``IF NOT EXISTS``: agents
before this migration created it themselves, on first use."""

MIGRATIONS: tuple[str, ...] = (_V1, _V2)
"""Migration N (1-based) brings ``PRAGMA user_version`` from N-1 to N. Append, never edit."""

SCHEMA_VERSION = len(MIGRATIONS)


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def check_version(conn: sqlite3.Connection) -> int:
    version = _version(conn)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"index.db schema version {version} is newer than this cacheagent "
            f"understands ({SCHEMA_VERSION}); upgrade cacheagent"
        )
    return version


def migrate(conn: sqlite3.Connection) -> None:
    version = check_version(conn)
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


def statements(script: str) -> Iterator[str]:
    """Split a migration into statements (``executescript`` would commit mid-migration)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise StoreError(f"incomplete statement in index migration: {pending.strip()[:80]!r}")
