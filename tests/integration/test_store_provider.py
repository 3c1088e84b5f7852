"""StoreProvider, the lazy mode's read path, over the model service with a real store, the
real pull engine and a real HTTP registry origin (FaultServer) that can stall or corrupt blobs.
Reads run in worker threads, as the FUSE workers do, while the event loop runs the engine."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cacheagent.config import PullConfig
from cacheagent.errors import CacheAgentError
from cacheagent.fuse.provider import FuseFile
from cacheagent.fuse.stats import FuseStats
from cacheagent.fuse.store_provider import StoreProvider
from cacheagent.fuse.waits import LazyReadTimeoutError, OriginBusyError, OriginWaits
from cacheagent.pull.engine import PullEngine, PullTuning, SourceRegistry
from cacheagent.service import ModelService
from cacheagent.sources.registry import RegistrySource
from cacheagent.store import Store
from tests.fault_server import Fault, FaultServer
from tests.integration.pull_origin import ServedModel, registry_source, serve_layout
from tests.oci.layout_writer import synthetic_model, write_layout

KiB, MiB = 1 << 10, 1 << 20
CONFIG = PullConfig(range_threshold_bytes=512 * KiB, range_chunk_bytes=128 * KiB, retries=1)
TUNING = PullTuning(ranges_per_blob=2, batch_bytes=48 * KiB, record_interval_seconds=0.01)
WAIT_SECONDS = 30.0  # bounds every wait in these tests; the reads take milliseconds


@dataclasses.dataclass
class Rig:
    server: FaultServer
    served: ServedModel
    store: Store
    engine: PullEngine
    source: RegistrySource
    stats: FuseStats

    def provider(self, **options: object) -> StoreProvider:
        loop = asyncio.get_running_loop()
        service = ModelService(self.store, self.engine)
        return StoreProvider(service, loop, stats=self.stats, **options)  # type: ignore[arg-type]

    def biggest(self) -> str:
        return max(self.served.blob_sizes.items(), key=lambda kv: kv[1])[0]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("model")
    write_layout(work / "layout", synthetic_model(work / "files", 3 * MiB, shards=2), tag="v1")
    return work / "layout"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "store") as s:
        yield s


@pytest.fixture
async def rig(layout: Path, store: Store) -> AsyncIterator[Rig]:
    async with FaultServer(stall_seconds=600) as server:
        served = serve_layout(server, layout, "models/synthetic")
        source = registry_source(attempts=1)
        engine = PullEngine(store, SourceRegistry([source]), CONFIG, tuning=TUNING)
        try:
            yield Rig(server, served, store, engine, source, FuseStats())
        finally:
            await engine.aclose()
            await source.aclose()


def file_of(provider: StoreProvider, digest: str, blob: str) -> FuseFile:
    return next(f for f in provider.listing(digest).files if f.blob == blob)


async def read(provider: StoreProvider, handle: int, offset: int, size: int) -> bytes:
    return await asyncio.wait_for(
        asyncio.to_thread(provider.read, handle, offset, size), WAIT_SECONDS
    )


async def background_requests(server: FaultServer, path: str, count: int) -> None:
    """Wait until the background pull has sent ``count`` GETs for ``path`` (so they, not the
    reader's, took the stall faults queued for that path)."""
    for _ in range(2000):  # bounded: the pull sends them within milliseconds
        if len([r for r in server.seen(path) if r.method == "GET"]) >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"the background pull did not ask for {path} {count} times")


def blob_bytes(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


async def test_a_committed_model_is_read_from_its_blobs_under_a_lease(
    rig: Rig, layout: Path
) -> None:
    model = await rig.engine.pull(rig.served.ref)
    provider = rig.provider()
    big = file_of(provider, model.digest, rig.biggest())
    handle = await asyncio.to_thread(provider.open_file, model.digest, big.path)
    assert [lease.kind for lease in rig.store.leases(model.digest)] == ["fuse"]
    data = await read(provider, handle, big.size - 100_000, 200_000)  # clipped at the end
    assert big.blob is not None and data == blob_bytes(layout, big.blob)[-100_000:]
    assert rig.stats.snapshot().lazy_fetched_bytes == 0
    await asyncio.to_thread(provider.release, handle)
    assert not rig.store.leases(model.digest)


async def test_a_read_ahead_of_a_stalled_background_pull_is_fetched_on_demand(
    rig: Rig, layout: Path
) -> None:
    big = rig.biggest()
    # The background download's two first ranges stall; the reader's range is asked for later.
    rig.server.inject(rig.served.blob_paths[big], Fault("stall", times=2, cut_at=0.0))
    digest = await rig.engine.start_background(rig.served.ref)
    await background_requests(rig.server, rig.served.blob_paths[big], 2)
    provider = rig.provider()
    wanted = file_of(provider, digest, big)
    handle = await asyncio.to_thread(provider.open_file, digest, wanted.path)
    tail = await read(provider, handle, wanted.size - 64 * KiB, 64 * KiB)
    assert wanted.blob is not None and tail == blob_bytes(layout, wanted.blob)[-64 * KiB :]
    assert rig.stats.snapshot().lazy_fetched_bytes == 64 * KiB
    assert digest in rig.engine.in_flight  # the pull is still stalled: the bytes came on demand
    await asyncio.to_thread(provider.release, handle)


async def test_a_read_waiting_on_a_stalled_origin_fails_within_its_bound(rig: Rig) -> None:
    big = rig.biggest()
    rig.server.inject(rig.served.blob_paths[big], Fault("stall", times=1000, cut_at=0.0))
    digest = await rig.engine.start_background(rig.served.ref)
    provider = rig.provider(read_timeout=0.5)
    wanted = file_of(provider, digest, big)
    handle = await asyncio.to_thread(provider.open_file, digest, wanted.path)
    started = time.monotonic()
    with pytest.raises(LazyReadTimeoutError, match="origin_wait_seconds"):
        await read(provider, handle, 0, 64 * KiB)
    assert 0.5 <= time.monotonic() - started < 5.0
    await asyncio.to_thread(provider.release, handle)


async def test_a_read_over_the_per_model_bound_is_refused_at_once(rig: Rig) -> None:
    big = rig.biggest()
    rig.server.inject(rig.served.blob_paths[big], Fault("stall", times=1000, cut_at=0.0))
    digest = await rig.engine.start_background(rig.served.ref)
    waits = OriginWaits(total=4, per_model=1)
    provider = rig.provider(read_timeout=5.0, waits=waits)
    wanted = file_of(provider, digest, big)
    first, second = [
        await asyncio.to_thread(provider.open_file, digest, wanted.path) for _ in range(2)
    ]
    waiting = asyncio.ensure_future(read(provider, first, 0, 64 * KiB))
    for _ in range(1000):  # bounded: the first reader takes its slot in milliseconds
        if waits.waiting() == 1:
            break
        await asyncio.sleep(0.005)
    assert waits.waiting() == 1
    started = time.monotonic()
    with pytest.raises(OriginBusyError, match="origin_waits_per_model"):
        await read(provider, second, MiB, 64 * KiB)
    assert time.monotonic() - started < 1.0
    with pytest.raises(LazyReadTimeoutError):
        await waiting
    assert waits.waiting() == 0
    for handle in (first, second):
        await asyncio.to_thread(provider.release, handle)


async def test_files_served_before_a_failed_verification_are_reported(rig: Rig) -> None:
    big = rig.biggest()
    path = rig.served.blob_paths[big]
    # The first range holds the pull for a while; every other response is corrupt.
    rig.server.stall_seconds = 5
    rig.server.inject(path, Fault("stall", times=1, cut_at=0.5), Fault("wrong", times=1000))
    digest = await rig.engine.start_background(rig.served.ref)
    provider = rig.provider()
    reported: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    provider.on_unverified = lambda model, file: loop.call_soon_threadsafe(
        reported.put_nowait, (model, file)
    )
    wanted = file_of(provider, digest, big)
    handle = await asyncio.to_thread(provider.open_file, digest, wanted.path)
    assert await asyncio.wait_for(reported.get(), WAIT_SECONDS) == (digest, wanted.path)
    assert reported.empty()  # only the file whose blob failed, once
    with pytest.raises(CacheAgentError):
        await read(provider, handle, 0, 64 * KiB)
    await asyncio.to_thread(provider.release, handle)
    await provider.aclose()
