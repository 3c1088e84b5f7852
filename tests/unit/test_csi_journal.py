"""The publish journal on real SQLite, and the reconcile planner (pure)."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest

from cacheagent.csi.journal import (
    JournalError,
    Publish,
    PublishJournal,
    digest_of_model_dir,
    lease_holder,
    plan_reconcile,
)
from cacheagent.mountinfo import parse_mountinfo
from cacheagent.store import schema
from cacheagent.store.index import Index

HEX = "ab" * 32
DIGEST = f"sha256:{HEX}"
KUBELET = "/var/lib/kubelet"
T1 = f"{KUBELET}/pods/u1/volumes/kubernetes.io~csi/model/mount"
T2 = f"{KUBELET}/pods/u2/volumes/kubernetes.io~csi/model/mount"
T3 = f"{KUBELET}/pods/u3/volumes/kubernetes.io~csi/model/mount"


def row(volume: str, target: str, digest: str = DIGEST) -> Publish:
    return Publish(volume, target, digest, "example.com/m:v1", "bind", "ns", "pod", 1.0)


def test_rows_round_trip_and_share_index_db_with_other_tables(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    Index.open(db).close()  # the store migrates the journal's table with its own
    journal = PublishJournal.open(db)
    try:
        journal.put(row("v1", T1))
        journal.put(row("v2", T2))
        assert journal.get(T1) == row("v1", T1)
        assert journal.get("/nowhere") is None
        journal.put(row("v1b", T1))  # a target holds one publish: replaced
        assert sorted(r.volume_id for r in journal.all()) == ["v1b", "v2"]
        assert journal.count_by_mode() == {"bind": 2}
        journal.remove(T1)
        journal.remove(T1)
        assert [r.target_path for r in journal.all()] == [T2]
    finally:
        journal.close()
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert check.execute("SELECT volume_id FROM publishes").fetchall() == [("v2",)]
        assert check.execute("SELECT COUNT(*) FROM models").fetchone() == (0,)


def test_the_journal_needs_a_store_migrated_index(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    sqlite3.connect(db).close()
    with pytest.raises(JournalError, match="no publishes table: open the store there first"):
        PublishJournal.open(db)


def test_a_store_from_before_the_journal_migration_keeps_its_publishes(tmp_path: Path) -> None:
    """A version-1 index whose table the old journal created ad hoc upgrades in place."""
    db = tmp_path / "index.db"
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        for statement in schema.statements(schema.MIGRATIONS[0]):
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "CREATE TABLE publishes (target_path TEXT PRIMARY KEY, volume_id TEXT NOT NULL, "
            "manifest_digest TEXT NOT NULL, ref TEXT NOT NULL, mode TEXT NOT NULL, "
            "namespace TEXT NOT NULL DEFAULT '', pod TEXT NOT NULL DEFAULT '', "
            "created REAL NOT NULL)"
        )
        conn.execute(
            "INSERT INTO publishes VALUES (?, 'v1', ?, 'example.com/m:v1', 'bind', '', '', 1.0)",
            (T1, DIGEST),
        )
    Index.open(db).close()
    journal = PublishJournal.open(db)
    try:
        assert [r.volume_id for r in journal.all()] == ["v1"]
    finally:
        journal.close()
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (schema.SCHEMA_VERSION,)


def test_journal_survives_reopen_and_concurrent_writers(tmp_path: Path) -> None:
    Index.open(tmp_path / "index.db").close()
    journal = PublishJournal.open(tmp_path / "index.db")
    threads = [
        threading.Thread(target=lambda i=i: journal.put(row(f"v{i}", f"{T1}-{i}")))
        for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    journal.close()
    reopened = PublishJournal.open(tmp_path / "index.db")
    try:
        assert len(reopened.all()) == 16
    finally:
        reopened.close()


def test_lease_holder_and_adopted_rows() -> None:
    assert row("v1", T1).holder == lease_holder("v1", T1) == f"csi:v1:{T1}"
    assert Publish("", T1, DIGEST, "", "bind").adopted
    assert not row("v1", T1).adopted


def test_model_dir_names() -> None:
    assert digest_of_model_dir(HEX) == DIGEST
    assert digest_of_model_dir(DIGEST) == DIGEST
    assert digest_of_model_dir(".tmp-" + HEX) is None
    assert digest_of_model_dir(HEX.upper()) is None


MOUNTINFO = "\n".join(
    [
        "27 1 254:0 / / rw - ext4 /dev/vda rw",
        "40 27 259:1 / /mnt/nvme rw - xfs /dev/nvme0n1 rw",
        # T1: journalled and mounted.
        f"41 27 259:1 /store/models/sha256/{HEX} {T1} ro,nosuid,nodev - xfs /dev/nvme0n1 rw",
        # T3: a model mount without a row (lost journal) -> adopted, once despite being stacked.
        f"42 27 259:1 /store/models/sha256/{HEX} {T3} ro,nosuid,nodev - xfs /dev/nvme0n1 rw",
        f"43 42 259:1 /store/models/sha256/{HEX} {T3} ro,nosuid,nodev - xfs /dev/nvme0n1 rw",
        # Not ours: another volume plugin, a subdirectory of a model, a mount outside kubelet.
        f"44 27 0:50 / {KUBELET}/pods/u4/volumes/kubernetes.io~empty-dir/x rw - tmpfs t rw",
        f"45 27 259:1 /store/models/sha256/{HEX}/sub {KUBELET}/pods/u5/m ro - xfs /dev/n rw",
        f"46 27 259:1 /store/models/sha256/{HEX} /mnt/elsewhere ro - xfs /dev/nvme0n1 rw",
        f"47 27 254:0 /store/models/sha256/{HEX} {KUBELET}/pods/u6/m ro - ext4 /dev/vda rw",
    ]
)


def test_reconcile_keeps_drops_and_adopts() -> None:
    plan = plan_reconcile(
        [row("v1", T1), row("v2", T2)],
        parse_mountinfo(MOUNTINFO),
        kubelet_dirs=(KUBELET,),
        models_location=("259:1", "/store/models/sha256"),
        now=5.0,
    )
    assert plan.keep == (row("v1", T1),)
    assert plan.drop == (row("v2", T2),)
    assert plan.adopt == (Publish("", T3, DIGEST, "", "bind", created=5.0),)


def test_reconcile_without_a_models_location_adopts_nothing() -> None:
    plan = plan_reconcile(
        [], parse_mountinfo(MOUNTINFO), kubelet_dirs=(KUBELET,), models_location=None
    )
    assert plan.adopt == () and plan.keep == () and plan.drop == ()
