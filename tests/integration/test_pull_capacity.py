"""Capacity is a bound: many concurrent pulls of distinct models on a small real filesystem.

The store lives on its own tmpfs, a little larger than its capacity, so a store that writes
past its capacity runs the disk full. Eighteen models of 12 MiB (three times the capacity)
are pulled at once; a pull refused for room tries again (at most three times) once another
pull has finished, so evictions run while other pulls are writing. A sampler thread watches
the bytes really allocated under the store and the store's own accounting all along.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from cacheagent._proto.cacheagent.v1 import agent_pb2 as pb
from cacheagent._proto.cacheagent.v1 import agent_pb2_grpc as pb_grpc
from cacheagent.api import AgentService
from cacheagent.config import PullConfig
from cacheagent.errors import CacheFullError, SourceError
from cacheagent.memory.prefetch import MemoryLocker
from cacheagent.pull.engine import PullEngine, PullTuning, SourceRegistry
from cacheagent.refs import LayoutRef
from cacheagent.server import start_agent_api
from cacheagent.service import ModelService
from cacheagent.sources.layout import OciLayoutSource
from cacheagent.store import Model, Store
from tests.integration.pull_origin import CountingSource
from tests.oci.layout_writer import LayoutEntry, write_layout
from tests.support import require_binary, require_root

MiB = 1 << 20
CAPACITY = 72 * MiB
DISK = CAPACITY + 24 * MiB  # room for index.db and its WAL, not for another model
MODEL_FILES = 2
FILE_BYTES = 6 * MiB
MODELS = 18
ATTEMPTS = 3


@dataclass
class Sampler:
    """Samples, until stopped, the bytes allocated under the store (each inode once) and the
    store's own figure of what it holds (blobs + reservations + abandoned partials)."""

    store: Store
    peaks: list[tuple[int, int]] = field(default_factory=list)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.wait(0.002):
            self.peaks.append((allocated_bytes(self.store.root), self.store.usage().held))
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()


def allocated_bytes(root: Path) -> int:
    seen: set[int] = set()
    total = 0
    for directory in ("blobs", "partial", "models"):
        for path, _, names in os.walk(root / directory):
            for name in names:
                try:
                    st = os.lstat(os.path.join(path, name))
                except FileNotFoundError:  # committed, evicted or deleted since the listing
                    continue
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    total += st.st_blocks * 512
    return total


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    require_root()
    disk = tmp_path / "disk"
    disk.mkdir()
    mount, umount = require_binary("mount"), require_binary("umount")
    subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={DISK},mode=0755", "tmpfs", str(disk)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield disk
    finally:
        subprocess.run([umount, str(disk)], check=True, capture_output=True, timeout=30)


def make_layout(root: Path, seed: int) -> tuple[LayoutRef, dict[str, str]]:
    """A model of MODEL_FILES random files; returns its reference and each file's sha256."""
    files = {f"w{i}.bin": os.urandom(FILE_BYTES) for i in range(MODEL_FILES)}
    entries = [LayoutEntry(name, data, "raw", "weight") for name, data in files.items()]
    layout = root / f"m{seed}"
    write_layout(layout, entries, tag="v1", name=f"m{seed}")
    hashes = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return LayoutRef(path=str(layout), tag="v1", digest=None), hashes


def tree_hashes(store: Store, model: Model) -> dict[str, str]:
    root = store.model_path(model.digest)
    return {f.path: hashlib.sha256((root / f.path).read_bytes()).hexdigest() for f in model.files}


async def test_concurrent_pulls_never_push_the_store_past_its_capacity(
    small_disk: Path, tmp_path: Path
) -> None:
    layouts = [make_layout(tmp_path / "layouts", seed) for seed in range(MODELS + 3)]
    store = Store.open(
        small_disk / "store", capacity_bytes=CAPACITY, high_watermark=0.9, low_watermark=0.5
    )
    engine = PullEngine(
        store,
        SourceRegistry([OciLayoutSource()]),
        PullConfig(range_threshold_bytes=2 * MiB, range_chunk_bytes=1 * MiB),
        tuning=PullTuning(batch_bytes=256 << 10),
    )
    sampler = Sampler(store)
    thread = threading.Thread(target=sampler.run, name="capacity-sampler")
    try:
        # Before the storm: one pinned model, one in use by a published volume, one old one.
        pinned = await engine.pull(layouts[0][0])
        store.pin(pinned.digest)
        in_use = await engine.pull(layouts[1][0])
        store.add_lease(in_use.digest, "csi:vol-1:/target", "csi")
        await engine.pull(layouts[2][0])
        thread.start()
        finished = asyncio.Condition()
        outcomes: dict[int, Model | CacheFullError] = {}

        async def preheat(i: int) -> None:
            ref = layouts[i][0]
            for attempt in range(ATTEMPTS):
                try:
                    outcomes[i] = await engine.pull(ref)
                    break
                except CacheFullError as err:
                    outcomes[i] = err
                    if attempt + 1 < ATTEMPTS:
                        async with finished:
                            await asyncio.wait_for(finished.wait(), timeout=60)
                finally:
                    async with finished:
                        finished.notify_all()

        async with asyncio.timeout(240):
            await asyncio.gather(*(preheat(i) for i in range(3, MODELS + 3)))
    finally:
        sampler.stop()
        if thread.is_alive():
            thread.join(timeout=30)
        await engine.aclose()
        try:
            disk_peak = max((a for a, _ in sampler.peaks), default=0)
            held_peak = max((h for _, h in sampler.peaks), default=0)
            final_pins = {m.digest for m in store.list_models() if m.pinned}
            pinned_tree = tree_hashes(store, pinned)
            in_use_tree = tree_hashes(store, in_use)
            survivors = {
                i: tree_hashes(store, m)
                for i, m in outcomes.items()
                if isinstance(m, Model) and store.get_model(m.digest) is not None
            }
            leftovers = sorted(p.name for p in (small_disk / "store" / "partial").iterdir())
        finally:
            store.close()

    committed = [i for i, o in outcomes.items() if isinstance(o, Model)]
    refused = [o for o in outcomes.values() if isinstance(o, CacheFullError)]
    assert sampler.samples > 20
    assert disk_peak <= CAPACITY, f"{disk_peak - CAPACITY} bytes past the capacity on disk"
    assert held_peak <= CAPACITY, f"the store counted {held_peak - CAPACITY} bytes too many"
    assert len(outcomes) == MODELS  # every pull committed or refused for room: no DiskFull
    assert len(committed) >= 4, "eviction should have made room for several models"
    assert all("capacity" in str(err) and "reserved by pulls" in str(err) for err in refused)
    assert pinned_tree == layouts[0][1] and pinned.digest in final_pins
    assert in_use_tree == layouts[1][1]
    for i, hashes in survivors.items():
        assert hashes == layouts[i][1]
    assert leftovers == []  # refused pulls wrote nothing; finished ones committed everything


async def test_every_removal_releases_locked_pages_and_tells_the_fuse_view(
    tmp_path: Path,
) -> None:
    """Capacity eviction goes through the same path as rm: the memory locker lets go of the
    evicted model's pages and the FUSE view forgets it."""
    layouts = [make_layout(tmp_path / "layouts", seed) for seed in range(3)]
    store = Store.open(tmp_path / "store", capacity_bytes=CAPACITY)
    engine = PullEngine(store, SourceRegistry([OciLayoutSource()]))
    locker = MemoryLocker()
    forgotten: list[str] = []
    service = ModelService(store, engine, locker=locker, on_evicted=forgotten.append)
    try:
        first, _ = await service.pull(layouts[0][0])
        second, _ = await service.pull(layouts[1][0])
        root = store.model_path(first.digest)
        await locker.lock_async(first.digest, [root / f.path for f in first.files])
        assert first.digest in locker.locked()
        # Just past the high watermark (0.9): evict toward the low one (0.8), the LRU model.
        await asyncio.to_thread(store.ensure_room, int(0.9 * CAPACITY) - 2 * second.size + 1)
        assert store.get_model(first.digest) is None
        assert first.digest not in locker.locked()
        assert forgotten == [first.digest]
        await service.evict(second.digest)
        assert forgotten == [first.digest, second.digest]
    finally:
        await engine.aclose()
        locker.release_all()
        store.close()


async def test_rm_cancels_a_pull_in_flight_and_leaves_nothing(tmp_path: Path) -> None:
    ref, _ = make_layout(tmp_path / "layouts", 0)
    store = Store.open(tmp_path / "store")
    source = CountingSource(delay=0.05)
    engine = PullEngine(store, SourceRegistry([source]), PullConfig())
    service = ModelService(store, engine)
    try:
        pull = asyncio.create_task(service.pull(ref))
        async with asyncio.timeout(30):
            while not engine.in_flight or not any(source.fetched.values()):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        digest = next(iter(engine.in_flight))
        assert await service.evict(digest) == (digest, 0)
        with pytest.raises(SourceError, match="cancelled"):
            await pull
        assert store.model_digests() == [] and store.leases() == []
        assert store.usage().reserved == 0
    finally:
        await engine.aclose()
        store.close()


async def test_pulls_in_flight_show_in_ls_and_stat_and_rm_cancels_them(tmp_path: Path) -> None:
    """Over the real agent API (gRPC on a unix socket): a pull in flight is listed with its
    state, bytes and rate, found by stat, and cancelled by rm, leaving nothing behind."""
    ref, _ = make_layout(tmp_path / "layouts", 0)
    store = Store.open(tmp_path / "store")
    source = CountingSource(delay=0.05)
    engine = PullEngine(store, SourceRegistry([source]), PullConfig())
    service = ModelService(store, engine)
    socket = tmp_path / "agent.sock"
    server = await start_agent_api(socket, AgentService(service))
    channel = grpc.aio.insecure_channel(f"unix://{socket}")
    stub = pb_grpc.AgentStub(channel)
    pull = asyncio.create_task(service.pull(ref))
    try:
        async with asyncio.timeout(30):  # progress is published every 0.25 s
            while True:
                models = list((await stub.List(pb.ListRequest())).models)
                if models and models[0].done_bytes:
                    break
                await asyncio.sleep(0.02)
        [listed] = models
        assert listed.state == "pulling"
        assert 0 < listed.done_bytes <= listed.size_bytes == MODEL_FILES * FILE_BYTES
        stat = await stub.Stat(pb.StatRequest(model=listed.manifest_digest[:19]))
        assert (stat.state, stat.manifest_digest) == ("pulling", listed.manifest_digest)
        evicted = await stub.Evict(pb.EvictRequest(model=listed.manifest_digest))
        assert evicted.manifest_digest == listed.manifest_digest
        with pytest.raises(SourceError, match="cancelled"):
            await pull
        assert list((await stub.List(pb.ListRequest())).models) == []
        assert store.model_digests() == [] and store.leases() == []
    finally:
        pull.cancel()
        await asyncio.gather(pull, return_exceptions=True)
        await channel.close(None)
        await server.stop(None)
        await engine.aclose()
        store.close()


async def test_a_compressed_layer_that_unpacks_past_its_reservation_stays_bounded(
    tmp_path: Path,
) -> None:
    """A tar+gzip layer reserves twice its size; one that unpacks to more must reserve the
    rest as it commits, and is refused once that passes the capacity."""
    # Four letters at random: gzip packs them about 3.5 to 1, under the zip-bomb guard (32).
    text = os.urandom(4 * MiB).translate(bytes(b"ACGT"[i % 4] for i in range(256)))
    layout = tmp_path / "layout"
    write_layout(layout, [LayoutEntry("w.txt", text, "tar+gzip", "weight")], tag="v1")
    store = Store.open(tmp_path / "store", capacity_bytes=3 * MiB)
    engine = PullEngine(store, SourceRegistry([OciLayoutSource()]))
    try:
        with pytest.raises(CacheFullError, match="need"):
            await engine.pull(LayoutRef(path=str(layout), tag="v1", digest=None))
        usage = store.usage()
        assert usage.used == 0 and usage.reserved == 0
        assert allocated_bytes(store.root) == 0  # the archive and the member are gone
        assert store.model_digests() == []
    finally:
        await engine.aclose()
        store.close()
