"""Repairs never pull the floor from under a pod: a model in use keeps its directory (same
inode) through start-up repair, and the next pull repairs it in place."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cacheagent.mountinfo import parse_mountinfo
from cacheagent.store import ModelFile, Store
from cacheagent.store.inuse import mounted_trees
from tests.support import require_binary, require_root
from tests.unit.store_helpers import add_model, manifest_for

DATA = b"w" * 1000


def break_blob(store: Store, blob: str) -> None:
    path = store.blob_path(blob)
    path.chmod(0o644)
    os.truncate(path, 10)


def repull(store: Store, name: str, model_files: list[ModelFile]) -> None:
    """What the next pull does: commit the missing blob again, then record the model."""
    store.add_blob_bytes(DATA)
    manifest, digest = manifest_for(name)
    store.put_model(digest, model_files, ref=None, source_kind="oci", manifest=manifest)


def test_a_leased_model_with_a_broken_blob_is_repaired_in_place(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with Store.open(root) as store:
        model = add_model(store, "m", {"w.bin": DATA, "sub/x.bin": DATA})
        store.add_lease(model.digest, "csi:vol:/pod/target", "csi")
        tree = store.model_path(model.digest)
        inode = tree.stat().st_ino
        break_blob(store, model.files[0].blob)
    with Store.open(root) as store:
        report = store.last_reconcile
        assert report.models_reset == 1
        assert any("in use, directory kept" in action for action in report.actions)
        assert tree.stat().st_ino == inode  # the pod's bind mount still points at it
        assert store.get_model(model.digest) is None  # not served as complete meanwhile
        repull(store, "m", list(model.files))
        assert store.get_model(model.digest) is not None
        assert tree.stat().st_ino == inode
        assert (tree / "w.bin").read_bytes() == DATA
        assert (tree / "sub" / "x.bin").read_bytes() == DATA
        assert oct(tree.stat().st_mode & 0o777) == oct(0o555)


def test_an_unleased_broken_model_is_still_removed(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with Store.open(root) as store:
        model = add_model(store, "m", {"w.bin": DATA})
        break_blob(store, model.files[0].blob)
    with Store.open(root) as store:
        assert not store.model_path(model.digest).exists()
        assert "tree removed" in " ".join(store.last_reconcile.actions)


def test_a_mounted_tree_survives_the_loss_of_the_index(tmp_path: Path) -> None:
    require_root()
    mount, umount = require_binary("mount"), require_binary("umount")
    root = tmp_path / "store"
    target = tmp_path / "pod-volume"
    target.mkdir()
    with Store.open(root) as store:
        model = add_model(store, "m", {"w.bin": DATA})
        tree = store.model_path(model.digest)
        inode = tree.stat().st_ino
    subprocess.run([mount, "--bind", str(tree), str(target)], check=True, timeout=30)
    try:
        for name in ("index.db", "index.db-wal", "index.db-shm"):
            (root / name).unlink(missing_ok=True)
        with Store.open(root) as store:
            assert tree.stat().st_ino == inode
            assert any("mounted by a pod" in action for action in store.last_reconcile.actions)
            assert (target / "w.bin").read_bytes() == DATA
            repull(store, "m", list(model.files))
            assert store.get_model(model.digest) is not None
            assert tree.stat().st_ino == inode
    finally:
        subprocess.run([umount, str(target)], check=True, timeout=30)


def test_a_repair_at_runtime_tells_the_removal_observers(tmp_path: Path) -> None:
    with Store.open(tmp_path / "store") as store:
        model = add_model(store, "m", {"w.bin": DATA})
        heard: list[tuple[str, str]] = []
        store.add_removal_observer(lambda r: heard.append((r.digest, r.reason)))
        break_blob(store, model.files[0].blob)
        report = store.fsck()
        assert report.reset == [model.digest]
        assert heard == [(model.digest, "repair")]


HEX_A, HEX_B = "a" * 64, "b" * 64
MOUNTINFO = f"""\
1 0 8:1 / / rw,relatime - ext4 /dev/sda1 rw
2 1 8:2 / /var/lib rw,relatime - ext4 /dev/sda2 rw
3 1 8:2 /cacheagent/models/sha256/{HEX_A} /var/lib/kubelet/pods/p/volumes/v ro - ext4 /dev/sda2 rw
4 1 8:1 /cacheagent/models/sha256/{HEX_B} /mnt/other ro - ext4 /dev/sda1 rw
5 1 8:2 /cacheagent/models/sha256/{HEX_B}/sub /var/lib/kubelet/pods/q/x ro - ext4 /dev/sda2 rw
"""


def test_mounted_trees_are_found_by_device_and_mount_root() -> None:
    """The store at /var/lib/cacheagent lives on 8:2 mounted at /var/lib: mounts of that
    device whose root is a tree (or under one) count; the same path on another device not."""
    found = mounted_trees(Path("/var/lib/cacheagent/models/sha256"), parse_mountinfo(MOUNTINFO))
    assert found == {f"sha256:{HEX_A}", f"sha256:{HEX_B}"}
    assert mounted_trees(Path("/elsewhere/models"), parse_mountinfo(MOUNTINFO)) == set()
