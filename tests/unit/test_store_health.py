"""A running store notices what would make it lose data, and refuses to write."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheagent.config import load_config
from cacheagent.csi.journal import Publish, PublishJournal
from cacheagent.errors import ConfigError, StoreError, StoreLockedError
from cacheagent.store import Store
from cacheagent.store.health import RESERVE_NAME
from cacheagent.store.scrub import ScrubCursor
from tests.support import require_binary, require_root
from tests.unit.store_helpers import add_model

MiB = 1 << 20


def test_a_deleted_index_is_noticed_and_writes_refused(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        model = add_model(store, "m", {"w": b"w" * 10})
        assert store.problem() is None
        (tmp_path / "s" / "index.db").unlink()
        problem = store.problem()
        assert problem is not None and "index.db was deleted" in problem
        with pytest.raises(StoreError, match=r"refuses to write: .*index.db was deleted"):
            store.pin(model.digest)
        assert store.problem() == problem  # latched: only a restart clears it


def test_a_removed_lock_file_is_noticed_and_offline_commands_stay_out(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with Store.open(root) as store:
        (root / ".lock").unlink()
        problem = store.problem()
        assert problem is not None and ".lock was deleted" in problem
        with pytest.raises(StoreLockedError):  # an offline command finds the lock taken again
            Store.open(root)
        with pytest.raises(StoreError, match="refuses to write"):
            store.touch("sha256:" + "0" * 64)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    require_root()
    mount, umount = require_binary("mount"), require_binary("umount")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], check=True, timeout=30
    )
    try:
        yield disk
    finally:
        subprocess.run([umount, str(disk)], check=True, timeout=30)


def fill(path: Path) -> None:
    """Write until the filesystem is full."""
    with open(path, "wb") as f:
        block = b"\0" * MiB
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError:
            pass


def test_a_cached_model_still_publishes_with_the_disk_full(small_disk: Path) -> None:
    root = small_disk / "store"
    with Store.open(root) as store:
        model = add_model(store, "m", {"w": b"w" * MiB})
        assert (root / RESERVE_NAME).exists()
        fill(small_disk / "filler")
        problem = store.problem()
        assert problem is not None and "is full" in problem
        assert not (root / RESERVE_NAME).exists()  # its room went to the index
        journal = PublishJournal.open(root / "index.db")
        try:
            for i in range(50):  # the bookkeeping of fifty publishes of the cached model
                target = f"/var/lib/kubelet/pods/p{i}/volumes/v"
                journal.put(Publish(f"v{i}", target, model.digest, "m", "bind", "ns", "p", 1.0))
                store.add_lease(model.digest, f"csi:v{i}:{target}", "csi")
                store.touch(model.digest)
        finally:
            journal.close()
        assert len(store.leases(model.digest)) == 50
        (small_disk / "filler").unlink()
        assert store.problem() is None
        assert (root / RESERVE_NAME).exists()  # taken again once there is room


def test_the_scrub_cursor_walks_every_blob_within_its_budget_and_wraps() -> None:
    blobs = {f"sha256:{c * 64}": 10 for c in "abcde"}
    cursor = ScrubCursor()
    batches = [[d for d, _ in cursor.next_batch(blobs, 25)] for _ in range(4)]
    order = sorted(blobs)
    assert batches == [order[0:2], order[2:4], order[4:5], order[0:2]]  # then around again
    assert cursor.rounds == 1
    assert len(cursor.next_batch(blobs, 1)) == 1  # at least one blob, whatever the budget


def test_the_scrub_rate_is_configured_and_checked() -> None:
    assert load_config(None, {}, {}).store.scrub_bytes_per_second == 16 * MiB
    config = load_config(None, {}, {"store.scrub_bytes_per_second": "64Mi"})
    assert config.store.scrub_bytes_per_second == 64 * MiB
    with pytest.raises(ConfigError) as caught:
        load_config(None, {}, {"store.scrub_bytes_per_second": "fast"})
    assert caught.value.key == "store.scrub_bytes_per_second"
