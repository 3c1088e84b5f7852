"""Many threads adding, reading, evicting and removing at once on one Store."""

from __future__ import annotations

import contextlib
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cacheagent.digest import sha256_digest
from cacheagent.errors import CacheFullError, ModelInUseError, ModelNotFoundError
from cacheagent.store import ModelFile, Store
from tests.unit.store_helpers import manifest_for, visible_blobs

SHARED = [bytes([i]) * 700 for i in range(4)]
MODEL_NAMES = [f"model-{i}" for i in range(12)]


def model_files(name: str) -> dict[str, bytes]:
    rng = random.Random(name)
    files = {f"shard-{k}.bin": f"{name}/{k}".encode() * rng.randint(20, 80) for k in range(3)}
    files["tokenizer.json"] = rng.choice(SHARED)
    files[f"sub/{name}.txt"] = name.encode()
    return files


def pull(store: Store, name: str, worker: int) -> int:
    """What the pull engine does: lease, record pending, make room, commit, materialise.
    Returns how many models it evicted."""
    files = model_files(name)
    manifest, digest = manifest_for(name)
    records = [ModelFile(p, sha256_digest(b), len(b)) for p, b in files.items()]
    holder = f"pull-{worker}-{name}"
    store.add_lease(digest, holder, "pull")
    try:
        store.put_pending(digest, records, ref=name, source_kind="oci", manifest=manifest)
        plan = store.ensure_room(sum(len(b) for b in files.values()), protect=[digest])
        for data in files.values():
            store.add_blob_bytes(data)
        store.put_model(digest, records, ref=name, source_kind="oci", manifest=manifest)
        store.touch(digest)
    finally:
        store.release_lease(holder)
    return len(plan.models)


def read(store: Store, name: str) -> None:
    _, digest = manifest_for(name)
    model = store.get_model(digest)
    if model is None:
        return
    store.touch(digest)
    expected = model_files(name)
    for f in model.files:
        try:
            data = (store.model_path(digest) / f.path).read_bytes()
        except FileNotFoundError:
            return  # evicted while we read: the tree vanishes whole, never half
        assert data == expected[f.path]
    for listed in store.list_models():
        assert listed.size > 0


def remove(store: Store, name: str) -> None:
    _, digest = manifest_for(name)
    with contextlib.suppress(ModelNotFoundError, ModelInUseError):
        store.remove_model(digest)


def worker(store: Store, index: int, steps: int) -> dict[str, int]:
    rng = random.Random(index)
    counts = {"pull": 0, "evicted": 0, "read": 0, "remove": 0, "full": 0, "fsck": 0, "pin": 0}
    for _ in range(steps):
        name = rng.choice(MODEL_NAMES)
        op = rng.random()
        if op < 0.45:
            try:
                counts["evicted"] += pull(store, name, index)
                counts["pull"] += 1
            except CacheFullError:
                counts["full"] += 1
        elif op < 0.8:
            read(store, name)
            counts["read"] += 1
        elif op < 0.93:
            remove(store, name)
            counts["remove"] += 1
        elif op < 0.97:
            _, digest = manifest_for(name)
            with contextlib.suppress(ModelNotFoundError):
                store.pin(digest)
                store.unpin(digest)
            counts["pin"] += 1
        else:
            store.fsck()
            counts["fsck"] += 1
    return counts


def test_concurrent_adds_reads_and_evictions_leave_a_consistent_store(tmp_path: Path) -> None:
    # About four models fit: pulls keep forcing evictions.
    with Store.open(
        tmp_path, capacity_bytes=12_000, high_watermark=0.9, low_watermark=0.7
    ) as store:
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(worker, store, i, 60) for i in range(8)]
            results = [f.result(timeout=120) for f in futures]
        assert sum(r["pull"] for r in results) > 50
        assert sum(r["remove"] for r in results) > 0
        assert sum(r["evicted"] for r in results) > 10
        assert store.leases() == []
        report = store.fsck(rehash=True)
        assert report.clean, str(report)
        usage = store.usage()
        on_disk = visible_blobs(tmp_path)
        assert usage.used == sum(p.stat().st_size for p in on_disk.values())
        assert usage.used <= 12_000
        for model in store.list_models():
            for f in model.files:
                path = store.model_path(model.digest) / f.path
                assert path.stat().st_ino == on_disk[f.blob].stat().st_ino
        assert not any(
            p.name.startswith(".tmp-") for p in (tmp_path / "models" / "sha256").iterdir()
        )
