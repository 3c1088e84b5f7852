"""Reconciliation of the index with the disk (Store.open and Store.fsck)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cacheagent.digest import sha256_digest
from cacheagent.store import ModelFile, Store
from tests.unit.store_helpers import add_model, manifest_for, mode_of, visible_blobs

DAY = 24 * 3600


def test_clean_store_reports_no_problems(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        add_model(store, "m", {"a/b": b"1", "c": b"2"})
        report = store.fsck(rehash=True)
    assert report.clean
    assert report.blobs_checked == 2 and report.models_checked == 1
    assert "no problems" in str(report)
    assert "with re-hash" in str(report)


def test_unindexed_blob_file_is_adopted(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        digest = sha256_digest(b"orphan bytes")
        path = store.blob_path(digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"orphan bytes")
    with Store.open(tmp_path) as store:
        assert store.last_reconcile.blobs_adopted == 1
        assert store.last_reconcile.modes_fixed == 1
        assert store.has_blob(digest)
        assert mode_of(path) == 0o444
        assert store.usage().used == len(b"orphan bytes")
        assert f"adopted {digest}" in str(store.last_reconcile)


def test_misnamed_files_under_blobs_are_deleted(tmp_path: Path) -> None:
    with Store.open(tmp_path):
        pass
    blobs = tmp_path / "blobs" / "sha256"
    (blobs / "zz").mkdir()
    (blobs / "ab").mkdir()
    (blobs / "ab" / "not-a-digest").write_bytes(b"x")
    (blobs / "ab" / ("cd" + "0" * 62)).write_bytes(b"x")  # wrong fan-out directory
    with Store.open(tmp_path) as store:
        assert store.last_reconcile.stray_files_removed == 3
        assert store.last_reconcile.blobs_adopted == 0
    assert sorted(p.name for p in blobs.iterdir()) == ["ab"]
    assert list((blobs / "ab").iterdir()) == []


def test_missing_blob_drops_the_row_and_resets_models_that_need_it(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        keep = add_model(store, "keep", {"w": b"keep"})
        hit = add_model(store, "hit", {"w": b"lost", "x": b"kept blob"})
        store.pin(hit.digest)
        lost = sha256_digest(b"lost")
        store.blob_path(lost).unlink()
        report = store.fsck()
        assert report.blob_rows_dropped == 1 and report.models_reset == 1
        assert not store.has_blob(lost)
        assert store.get_model(hit.digest) is None
        assert not store.model_path(hit.digest).exists()
        pending = store.get_pending(hit.digest)
        assert pending is not None and pending.missing == (lost,)
        assert store.has_blob(sha256_digest(b"kept blob"))  # re-pull fetches only what is lost
        assert store.get_model(keep.digest) is not None
        assert store.get_model(hit.digest) is None


def test_repulled_model_keeps_its_pin(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        files = {"w": b"lost"}
        model = add_model(store, "m", files)
        store.pin(model.digest)
        store.blob_path(sha256_digest(b"lost")).unlink()
        store.fsck()
        assert store.get_model(model.digest) is None
        again = add_model(store, "m", files)
        assert again.pinned
        assert (store.model_path(model.digest) / "w").read_bytes() == b"lost"


def test_broken_tree_resets_the_model(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        model = add_model(store, "m", {"d/w": b"weights", "x": b"x"})
        root = store.model_path(model.digest)
        (root / "d").chmod(0o755)
        (root / "d" / "w").unlink()
        report = store.fsck()
        assert report.models_reset == 1
        assert "file missing" in str(report)
        assert store.get_model(model.digest) is None
        assert not root.exists()


def test_extra_file_in_a_tree_resets_the_model(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        model = add_model(store, "m", {"w": b"weights"})
        root = store.model_path(model.digest)
        root.chmod(0o755)
        (root / "planted").write_text("x")
        report = store.fsck()
        assert report.models_reset == 1
        assert "not part of the model" in str(report)


def test_wrong_modes_are_fixed(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        model = add_model(store, "m", {"d/w": b"weights"})
        root = store.model_path(model.digest)
        (root / "d").chmod(0o755)
        store.blob_path(model.files[0].blob).chmod(0o644)
        report = store.fsck()
        assert report.modes_fixed == 2 and report.models_reset == 0
        assert mode_of(root / "d") == 0o555
        assert mode_of(root / "d" / "w") == 0o444
        assert store.get_model(model.digest) is not None


def test_tmp_trees_and_unindexed_model_dirs_are_deleted(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        model = add_model(store, "m", {"w": b"w"})
        models_dir = store.model_path(model.digest).parent
    tmp_tree = models_dir / f".tmp-{'a' * 64}-1-0"
    (tmp_tree / "sub").mkdir(parents=True)
    (tmp_tree / "sub" / "f").write_text("x")
    (tmp_tree / "sub").chmod(0o555)
    stray = models_dir / ("b" * 64)
    stray.mkdir()
    (models_dir.parent / "junk").write_text("x")
    with Store.open(tmp_path) as store:
        report = store.last_reconcile
        assert report.tmp_trees_removed == 1 and report.stray_trees_removed == 2
        assert sorted(p.name for p in models_dir.iterdir()) == [model.digest.split(":")[1]]
        assert [p.name for p in models_dir.parent.iterdir()] == ["sha256"]


def test_partials_stale_or_committed_are_deleted_recent_kept(tmp_path: Path) -> None:
    recent = sha256_digest(b"recent")
    stale = sha256_digest(b"stale")
    leased = sha256_digest(b"leased")
    with Store.open(tmp_path) as store:
        done = store.add_blob_bytes(b"done")
        for digest in (recent, stale, leased, done):
            store.partial_path(digest).write_bytes(b"part")
            store.partial_path(digest).with_name(digest[7:] + ".ranges").write_text("[]")
        old = time.time() - 2 * DAY
        for name in (stale[7:], stale[7:] + ".ranges", leased[7:], leased[7:] + ".ranges"):
            os.utime(tmp_path / "partial" / name, (old, old))
        (tmp_path / "partial" / "unknown-old").write_text("x")
        os.utime(tmp_path / "partial" / "unknown-old", (old, old))
        manifest, pulling = manifest_for("pulling")
        store.put_pending(
            pulling, [ModelFile("w", leased, 6)], ref=None, source_kind="oci", manifest=manifest
        )
        store.add_lease(pulling, "pull-1", "pull")
        report = store.fsck()
    left = sorted(p.name for p in (tmp_path / "partial").iterdir())
    assert left == sorted([recent[7:], recent[7:] + ".ranges", leased[7:], leased[7:] + ".ranges"])
    assert report.partials_removed == 5


def test_rehash_finds_corrupt_blobs(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        model = add_model(store, "m", {"w": b"good bytes", "x": b"other"})
        blob = store.blob_path(sha256_digest(b"good bytes"))
        blob.chmod(0o644)
        blob.write_bytes(b"evil bytes")  # same size: only a re-hash can tell
        blob.chmod(0o444)
        assert store.fsck().clean
        report = store.fsck(rehash=True)
        assert report.corrupt_blobs_removed == 1 and report.models_reset == 1
        assert "content hashes to" in str(report)
        assert store.get_model(model.digest) is None
        assert sha256_digest(b"good bytes") not in visible_blobs(tmp_path)


def test_size_change_is_found_without_rehash(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        add_model(store, "m", {"w": b"12345"})
        blob = store.blob_path(sha256_digest(b"12345"))
        blob.chmod(0o644)
        with open(blob, "ab") as f:
            f.write(b"6")
        report = store.fsck()
        assert report.corrupt_blobs_removed == 1
        assert "size 6, index says 5" in str(report)
        assert store.list_models() == []
