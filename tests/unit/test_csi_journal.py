"""The publish journal on real SQLite, and the reconcile planner (pure)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from cacheagent.csi.journal import (
    Publish,
    PublishJournal,
    digest_of_model_dir,
    lease_holder,
    plan_reconcile,
)
from cacheagent.mountinfo import parse_mountinfo

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
    with sqlite3.connect(db) as other:  # the store's own table, created by another connection
        other.execute("CREATE TABLE models (digest TEXT PRIMARY KEY)")
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


def test_journal_survives_reopen_and_concurrent_writers(tmp_path: Path) -> None:
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
