"""Capacity: watermarks, LRU eviction through the index, cache full, orphans."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheagent.digest import sha256_digest
from cacheagent.errors import CacheFullError, DiskFullError, ModelInUseError
from cacheagent.store import Model, ModelFile, Store
from cacheagent.store.lru import Candidate, plan_eviction
from cacheagent.store.removal import Removal
from tests.unit.store_helpers import (
    add_model,
    manifest_for,
    set_blob_created,
    set_last_used,
    visible_blobs,
)

CAPACITY = 1000


def open_store(root: Path) -> Store:
    return Store.open(root, capacity_bytes=CAPACITY, high_watermark=0.9, low_watermark=0.6)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(tmp_path / "store") as s:
        yield s


def five_models(store: Store) -> list[Model]:
    """m0 (least recently used) .. m4, 100 bytes each, 500 bytes in all."""
    models = [add_model(store, f"m{i}", {"w": bytes([i]) * 100}) for i in range(5)]
    for m in models:
        time.sleep(0.002)
        store.touch(m.digest)
    return models


def present(store: Store, models: list[Model]) -> list[bool]:
    return [store.get_model(m.digest) is not None for m in models]


def test_unlimited_capacity_never_evicts(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        models = five_models(store)
        plan = store.ensure_room(1 << 20)
        assert plan.models == () and plan.satisfied
        assert all(present(store, models))
        assert store.usage().capacity is None and store.usage().free is None


def test_the_disk_bounds_even_an_unlimited_store(tmp_path: Path) -> None:
    """statvfs cross-check: a request the filesystem cannot hold is refused before any write,
    naming what the disk can take, and nothing is evicted for it."""
    with Store.open(tmp_path / "s") as store:
        models = five_models(store)
        with pytest.raises(DiskFullError, match=r"disk full: .*the disk can take [0-9]+ more"):
            store.reserve(1 << 62)
        assert all(present(store, models))
        assert store.usage().reserved == 0


def test_below_the_high_watermark_nothing_is_evicted(store: Store) -> None:
    models = five_models(store)
    plan = store.ensure_room(400)  # 900 bytes: exactly at the mark
    assert plan.models == ()
    assert all(present(store, models))


def test_past_the_high_watermark_evicts_lru_down_to_low_minus_request(store: Store) -> None:
    models = five_models(store)
    plan = store.ensure_room(450)  # 950 > 900; target 600 - 450 = 150 used
    assert plan.models == tuple(m.digest for m in models[:4])
    assert plan.bytes_freed == 400
    assert present(store, models) == [False, False, False, False, True]
    assert store.usage().used == 100
    assert len(visible_blobs(store.root)) == 1


def test_touch_changes_the_order(store: Store) -> None:
    models = five_models(store)
    store.touch(models[0].digest)
    plan = store.ensure_room(450)
    assert models[0].digest not in plan.models
    assert present(store, models) == [True, False, False, False, False]


def test_pinned_leased_and_protected_models_survive(store: Store) -> None:
    models = five_models(store)
    store.pin(models[0].digest)
    store.add_lease(models[1].digest, "fuse-fh-3", "fuse")
    store.add_lease(models[2].digest, "pull-1", "pull")
    plan = store.ensure_room(350, protect=[models[3].digest])  # 850: fits; nothing to do
    assert plan.models == ()
    plan = store.ensure_room(420, protect=[models[3].digest])  # 920 > 900: need 320, 100 free
    assert plan.models == (models[4].digest,)
    assert present(store, models) == [True, True, True, True, False]


def test_cache_full_raises_before_anything_is_evicted(store: Store) -> None:
    models = five_models(store)
    for m in models[1:]:
        store.pin(m.digest)
    with pytest.raises(CacheFullError) as info:
        store.ensure_room(700)  # 1200 bytes, at most 100 can go
    assert info.value.needed == 700
    assert info.value.available == 600
    assert all(present(store, models))
    assert store.usage().used == 500


def test_larger_than_the_cache_is_full(store: Store) -> None:
    five_models(store)
    with pytest.raises(CacheFullError):
        store.ensure_room(CAPACITY + 1)


def test_when_the_low_watermark_is_out_of_reach_evict_what_may_go(store: Store) -> None:
    models = five_models(store)
    for m in models[2:]:
        store.pin(m.digest)
    plan = store.ensure_room(550)  # 1050: the low mark needs 450, only 200 may go; fits after
    assert not plan.satisfied
    assert plan.models == (models[0].digest, models[1].digest)
    assert present(store, models) == [False, False, True, True, True]
    assert store.usage().used == 300


def test_orphan_blobs_count_as_used_and_go_first_once_old(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with open_store(root) as store:
        models = five_models(store)
        orphan = store.add_blob_bytes(b"o" * 300)
        assert store.usage().used == 800
        plan = store.plan_eviction(100)
        assert orphan not in plan.blobs  # fresh: maybe a pull that has not recorded its model
    set_blob_created(root, orphan, time.time() - 2 * 24 * 3600)
    with open_store(root) as store:
        assert store.has_blob(orphan)
        plan = store.ensure_room(300)  # 1100 > 900: need 500 = the orphan + 2 models
        assert plan.blobs[0] == orphan
        assert plan.models == (models[0].digest, models[1].digest)
        assert not store.has_blob(orphan)
        assert not store.blob_path(orphan).exists()
        assert store.usage().used == 300


def test_blobs_of_a_pulling_pending_model_are_never_freed(store: Store) -> None:
    old = add_model(store, "old", {"shared": b"s" * 100, "own": b"x" * 50})
    manifest, pending = manifest_for("pending")
    files = [ModelFile("shared", old.files[1].blob, 100)]
    store.put_pending(pending, files, ref=None, source_kind="oci", manifest=manifest)
    store.add_lease(pending, "pull-7", "pull")
    plan = store.plan_eviction(120)
    assert plan.models == (old.digest,)
    assert plan.bytes_freed == 50
    assert store.execute(plan) == 50
    assert store.has_blob(old.files[1].blob)


def test_execute_skips_models_pinned_since_the_plan(store: Store) -> None:
    models = five_models(store)
    plan = store.plan_eviction(100)
    assert plan.models == (models[0].digest,)
    store.pin(models[0].digest)
    assert store.execute(plan) == 0
    assert store.get_model(models[0].digest) is not None


def test_index_planner_matches_the_pure_planner(tmp_path: Path) -> None:
    root = tmp_path / "s"
    rng = random.Random(7)
    shared = [bytes([200 + i]) * 30 for i in range(3)]
    with open_store(root) as store:
        models = []
        for i in range(20):
            files = {"own": bytes([i]) * (10 + i), "shared": rng.choice(shared)}
            models.append(add_model(store, f"m{i}", files))
        for m in models[::6]:
            store.pin(m.digest)
        store.add_lease(models[5].digest, "vol", "csi")
    for i, m in enumerate(models):
        set_last_used(root, m.digest, float(i // 3))  # groups of three share a timestamp
    with open_store(root) as store:
        listed = store.list_models()
        refcounts: dict[str, int] = {}
        candidates = []
        for m in listed:
            blobs = {f.blob: f.size for f in m.files}
            for blob in blobs:
                refcounts[blob] = refcounts.get(blob, 0) + 1
            leased = bool(store.leases(m.digest))
            candidates.append(Candidate(m.digest, m.last_used, blobs, m.size, m.pinned, leased))
        for need in (1, 50, 200, 400, 10_000):
            assert store.plan_eviction(need) == plan_eviction(candidates, refcounts, need)


def test_a_reservation_counts_until_its_blobs_commit_or_it_is_released(store: Store) -> None:
    five_models(store)  # 500 used
    data = b"r" * 300
    digest = sha256_digest(data)
    held = store.reserve(300, holder="pull:a", blobs=[digest])
    assert (store.usage().reserved, store.usage().held) == (300, 800)
    # A second pull sees the first one's room as taken: 800 + 200 > 900, evict down to 600-200.
    second = store.reserve(200, holder="pull:b")
    assert len(second.plan.models) == 4 and store.usage().held == 100 + 300 + 200
    tmp = store.partial_path(digest)
    tmp.write_bytes(data)
    store.commit_blob(digest, 300, tmp, verified=True, reservation=held)
    usage = store.usage()
    assert (usage.used, usage.reserved, usage.held) == (400, 200, 600)  # moved, not doubled
    store.release(held)
    store.release(second)
    assert store.usage().reserved == 0
    # The blob no model uses, committed under a released reservation, goes first.
    assert store.plan_eviction(1).blobs == (digest,)


def test_a_request_that_cannot_fit_is_refused_up_front_naming_the_sizes(store: Store) -> None:
    models = five_models(store)
    store.pin(models[0].digest)
    held = store.reserve(300, holder="pull:a")
    with pytest.raises(CacheFullError) as info:
        store.reserve(700)
    message = str(info.value)
    assert "need 700 bytes" in message and "capacity 1000" in message
    assert "used 500 by blobs + 300 reserved by pulls in flight" in message
    assert "at most 400 can be freed" in message
    assert all(present(store, models))  # nothing evicted for a request that was refused
    store.release(held)


def test_abandoned_partial_downloads_count_and_are_freed_first(store: Store) -> None:
    models = five_models(store)
    stale = store.partial_path(sha256_digest(b"gone"))
    with open(stale, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 64 << 10)
    assert store.usage().abandoned >= 64 << 10
    covered = store.reserve(0, blobs=[sha256_digest(b"gone")])
    assert store.usage().abandoned == 0  # a live pull took it over
    store.release(covered)
    store.ensure_room(340)  # 500 + 64 KiB + 340 > 900: the partial goes before any model
    assert not stale.exists()
    assert all(present(store, models))
    assert store.usage().abandoned == 0


def test_removal_observers_hear_rm_eviction_and_failed_pulls(store: Store) -> None:
    heard: list[tuple[str, str]] = []
    store.add_removal_observer(lambda r: heard.append((r.digest, r.reason)))
    models = five_models(store)
    store.remove_model(models[4].digest)
    store.ensure_room(505)  # 905 > 900: evicts m0..m3 (LRU) toward 600 - 505
    manifest, pending = manifest_for("pending")
    store.put_pending(pending, [], ref=None, source_kind="oci", manifest=manifest, holder="p")
    assert store.drop_pending(pending, "p")
    assert heard == [
        (models[4].digest, "rm"),
        *[(m.digest, "evict") for m in models[:4]],
        (pending, "failed-pull"),
    ]
    assert store.model_digests() == []


def test_force_overrides_a_pin_never_a_lease(store: Store) -> None:
    m = add_model(store, "m", {"w": b"w" * 10})
    store.pin(m.digest)
    store.add_lease(m.digest, "csi:v:/t", "csi")
    with pytest.raises(ModelInUseError, match="leased by csi"):
        store.remove_model(m.digest, force=True)
    assert store.leases(m.digest)  # the lease was not dropped
    store.release_lease("csi:v:/t")
    store.remove_model(m.digest, force=True)
    assert store.get_model(m.digest) is None


def test_removal_deletes_and_notifies_outside_the_store_lock(store: Store) -> None:
    """The slow half of a removal (deleting files, telling observers) runs without the store
    lock: another thread can use the store meanwhile (it would block forever otherwise)."""
    models = five_models(store)
    answered: list[bool] = []

    def observer(removal: Removal) -> None:
        other = threading.Thread(
            target=lambda: answered.append(store.get_model(removal.digest) is None)
        )
        other.start()
        other.join(timeout=10)
        assert not other.is_alive(), "the store lock is held while observers run"

    store.add_removal_observer(observer)
    store.remove_model(models[0].digest)
    assert answered == [True]  # and the model was already gone for everyone
    assert not list(store.root.glob("models/sha256/.tmp-trash-*"))  # the trash is emptied


def test_a_lease_or_pin_taken_between_plan_and_execute_keeps_the_model(store: Store) -> None:
    """The interleaving an online eviction meets (plan on one thread, a publish leasing the
    model on another, then execute): the late lease wins and is never dropped."""
    models = five_models(store)
    plan = store.plan_eviction(250)
    planned = set(plan.models)
    assert {models[0].digest, models[1].digest, models[2].digest} <= planned

    store.add_lease(models[0].digest, "csi:late:/t", "csi")
    store.pin(models[1].digest)
    store.execute(plan)

    kept = store.get_model(models[0].digest)
    assert kept is not None and store.leases(models[0].digest)
    assert (store.model_path(models[0].digest) / "w").read_bytes() == bytes([0]) * 100
    assert store.get_model(models[1].digest) is not None
    assert store.get_model(models[2].digest) is None
