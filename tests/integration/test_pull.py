"""The pull engine end to end: real store, real layouts, a real HTTP origin for byte counting."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cacheagent.config import PullConfig
from cacheagent.errors import (
    CacheFullError,
    DigestMismatchError,
    ModelNotFoundError,
    OriginUnavailableError,
    SizeMismatchError,
    SourceError,
)
from cacheagent.pull.engine import PullEngine, PullTuning, SourceRegistry
from cacheagent.pull.partial_file import sidecar_path
from cacheagent.pull.progress import PullProgress
from cacheagent.pull.ranges import load_sidecar
from cacheagent.refs import LayoutRef
from cacheagent.sources.base import Source
from cacheagent.sources.layout import blob_path
from cacheagent.store import Store
from tests.fault_server import Fault, FaultServer
from tests.integration.pull_origin import CountingSource, ServedModel, registry_source, serve_layout
from tests.oci.layout_writer import LayoutEntry, synthetic_model, write_layout

KiB, MiB = 1 << 10, 1 << 20
# Small enough for fast tests, large enough that the weight shards are cut into many ranges.
CONFIG = PullConfig(range_threshold_bytes=512 * KiB, range_chunk_bytes=128 * KiB, retries=2)
TUNING = PullTuning(batch_bytes=48 * KiB, record_interval_seconds=0.01)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[LayoutEntry]]:
    """A ModelPack model (2 weight shards, small files, a tar+gzip code layer) in a layout."""
    work = tmp_path_factory.mktemp("model")
    entries = synthetic_model(work / "files", 3 * MiB, shards=2)
    write_layout(work / "layout", entries, tag="v1")
    return work, entries


@pytest.fixture
def layout(model_dir: tuple[Path, list[LayoutEntry]]) -> Path:
    return model_dir[0] / "layout"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


def engine_for(store: Store, *sources: Source, **tuning: Any) -> PullEngine:
    tun = dataclasses.replace(TUNING, **tuning)
    return PullEngine(store, SourceRegistry(sources), CONFIG, tuning=tun)


def layout_ref(layout: Path, tag: str = "v1") -> LayoutRef:
    return LayoutRef(path=str(layout), tag=tag, digest=None)


def tree_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def source_tree(entries: list[LayoutEntry]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for entry in entries:
        assert isinstance(entry.source, Path)
        if entry.source.is_dir():
            for p in entry.source.rglob("*"):
                if p.is_file():
                    files[f"{entry.path}/{p.relative_to(entry.source)}"] = p.read_bytes()
        else:
            files[entry.path] = entry.source.read_bytes()
    return files


def read_span(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def partial_files(store: Store) -> list[str]:
    partial = store.root / "partial"
    return sorted(p.name for p in partial.iterdir()) if partial.exists() else []


def biggest_layer(served: ServedModel) -> tuple[str, int]:
    return max(served.blob_sizes.items(), key=lambda kv: kv[1])


def smallest_layer(served: ServedModel) -> tuple[str, int]:
    return min(served.blob_sizes.items(), key=lambda kv: kv[1])


@pytest.fixture
async def origin(layout: Path) -> AsyncIterator[tuple[FaultServer, ServedModel]]:
    async with FaultServer() as server:
        yield server, serve_layout(server, layout, "models/synthetic")


async def wait_for_a_pull(engine: PullEngine) -> None:
    for _ in range(1000):
        if engine.in_flight:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("no pull started")


# -- the happy path ------------------------------------------------------------------------------


async def test_pull_from_a_layout_gives_the_source_tree(
    store: Store, model_dir: tuple[Path, list[LayoutEntry]]
) -> None:
    work, entries = model_dir
    source = CountingSource()
    engine = engine_for(store, source)
    model = await engine.pull(layout_ref(work / "layout"))
    root = store.model_path(model.digest)
    assert tree_of(root) == source_tree(entries)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o444 for p in root.rglob("*") if p.is_file())
    assert "code/modeling_synthetic.py" in {f.path for f in model.files}
    assert partial_files(store) == []
    assert store.leases(model.digest) == []
    assert engine.in_flight == {}


async def test_second_pull_is_a_cache_hit_without_the_origin(store: Store, layout: Path) -> None:
    source = CountingSource()
    engine = engine_for(store, source)
    first = await engine.pull(layout_ref(layout))
    fetched, resolves = sum(source.fetched.values()), source.resolves
    again = await engine.pull(layout_ref(layout))
    by_digest = await engine.pull(LayoutRef(path=str(layout), tag=None, digest=first.digest))
    assert again.digest == by_digest.digest == first.digest
    assert (sum(source.fetched.values()), source.resolves) == (fetched, resolves)


async def test_an_expired_tag_is_resolved_again_but_nothing_is_refetched(
    store: Store, layout: Path
) -> None:
    source = CountingSource()
    engine = engine_for(store, source, tag_ttl_seconds=0.0)
    await engine.pull(layout_ref(layout))
    fetched = sum(source.fetched.values())
    await engine.pull(layout_ref(layout))
    assert source.resolves == 2
    assert sum(source.fetched.values()) == fetched


# -- dedupe ---------------------------------------------------------------------------------------


async def test_a_hundred_concurrent_pulls_fetch_each_blob_once(store: Store, layout: Path) -> None:
    source = CountingSource()
    engine = engine_for(store, source)
    models = await asyncio.gather(*(engine.pull(layout_ref(layout)) for _ in range(100)))
    assert len({m.digest for m in models}) == 1
    resolved = await source.inner.resolve(layout_ref(layout))
    assert source.resolves == 1
    assert dict(source.fetched) == {layer.blob.digest: layer.blob.size for layer in resolved.layers}
    assert engine.fetched_bytes() == {"oci-layout": resolved.total_size}


async def test_a_hundred_concurrent_pulls_over_http_send_each_byte_once(
    store: Store, origin: tuple[FaultServer, ServedModel]
) -> None:
    server, served = origin
    source = registry_source()
    try:
        engine = engine_for(store, source)
        models = await asyncio.gather(*(engine.pull(served.ref) for _ in range(100)))
    finally:
        await source.aclose()
    assert len({m.digest for m in models}) == 1
    assert served.served(server) == served.blob_sizes
    assert len(server.seen("v2/models/synthetic/manifests/v1")) == 1


async def test_a_large_blob_arrives_as_parallel_ranges_a_small_one_in_one_request(
    store: Store, origin: tuple[FaultServer, ServedModel]
) -> None:
    server, served = origin
    big, size = biggest_layer(served)
    source = registry_source()
    try:
        await engine_for(store, source).pull(served.ref)
    finally:
        await source.aclose()
    ranges = sorted(r.headers["Range"] for r in server.seen(served.blob_paths[big]))
    assert len(ranges) == math.ceil(size / CONFIG.range_chunk_bytes) > 2
    assert len(set(ranges)) == len(ranges)
    small = smallest_layer(served)[0]
    requests = server.seen(served.blob_paths[small])
    assert len(requests) == 1 and "Range" not in requests[0].headers
    assert served.served(server)[big] == size


async def test_a_source_without_ranges_gets_one_stream_per_blob(
    store: Store, model_dir: tuple[Path, list[LayoutEntry]]
) -> None:
    work, entries = model_dir
    source = CountingSource(ranges=False)
    model = await engine_for(store, source).pull(layout_ref(work / "layout"))
    assert tree_of(store.model_path(model.digest)) == source_tree(entries)
    digests = [d for d, _, _ in source.requests]
    assert len(digests) == len(set(digests))


async def test_an_origin_that_ignores_range_gets_one_stream_for_the_rest(
    store: Store, origin: tuple[FaultServer, ServedModel]
) -> None:
    server, served = origin
    big, size = biggest_layer(served)
    # a 200 for the range at 0 is harmless; one of the first three requests asks for more
    server.inject(served.blob_paths[big], Fault("ignore_range", times=3))
    source = registry_source()
    try:
        model = await engine_for(store, source).pull(served.ref)
    finally:
        await source.aclose()
    assert not source.supports_ranges
    assert len(server.seen(served.blob_paths[big])) < math.ceil(size / CONFIG.range_chunk_bytes)
    assert hashlib.sha256(store.blob_path(big).read_bytes()).hexdigest() == big.split(":")[1]
    assert model.digest == served.manifest_digest


# -- failures -------------------------------------------------------------------------------------


async def test_a_dropped_connection_resumes_without_refetching(
    store: Store, origin: tuple[FaultServer, ServedModel]
) -> None:
    server, served = origin
    big, size = biggest_layer(served)
    server.inject(served.blob_paths[big], Fault("drop", times=2))
    source = registry_source()
    try:
        model = await engine_for(store, source).pull(served.ref)
    finally:
        await source.aclose()
    assert store.has_blob(big)
    assert source.received[big] == size  # the held halves were not asked for again
    assert (
        len(server.seen(served.blob_paths[big])) == math.ceil(size / CONFIG.range_chunk_bytes) + 2
    )
    assert model.digest == served.manifest_digest


async def test_a_failed_pull_keeps_its_ranges_and_the_next_one_resumes(
    store: Store, origin: tuple[FaultServer, ServedModel]
) -> None:
    server, served = origin
    big, size = biggest_layer(served)
    server.inject(served.blob_paths[big], Fault("drop", times=3))
    source = registry_source(attempts=1)  # the source gives up at the first drop
    try:
        engine = engine_for(store, source)
        with pytest.raises(OriginUnavailableError) as failure:
            await engine.pull(served.ref)
        assert server.host in str(failure.value) and big in str(failure.value)
        assert not store.has_blob(big)
        held = load_sidecar(sidecar_path(store.partial_path(big)).read_text(), big, size).total()
        assert 0 < held < size
        source.received.clear()
        model = await engine.pull(served.ref)
    finally:
        await source.aclose()
    # What this client received, not what the server counted as sent: the first pull's
    # abandoned connections may still be counted by the server after it gave up.
    assert source.received[big] == size - held
    assert hashlib.sha256(store.blob_path(big).read_bytes()).hexdigest() == big.split(":")[1]
    assert model.digest == served.manifest_digest
    assert partial_files(store) == []


@pytest.mark.parametrize("which", ["small", "big"])
async def test_wrong_bytes_are_refused_and_nothing_is_kept(
    store: Store, origin: tuple[FaultServer, ServedModel], which: str
) -> None:
    server, served = origin
    digest = (biggest_layer if which == "big" else smallest_layer)(served)[0]
    server.inject(served.blob_paths[digest], Fault("wrong"))
    source = registry_source()
    try:
        with pytest.raises(DigestMismatchError) as failure:
            await engine_for(store, source).pull(served.ref)
    finally:
        await source.aclose()
    assert failure.value.expected == digest
    assert not store.has_blob(digest)
    assert store.get_model(served.manifest_digest) is None
    assert not store.partial_path(digest).exists()
    assert not any(name.startswith(digest.split(":")[1]) for name in partial_files(store))


async def test_a_failed_pull_leaves_no_ghost(
    store: Store, origin: tuple[FaultServer, ServedModel]
) -> None:
    """No pending record, lease or reservation outlives a failed pull; the blobs it committed
    stay (the next pull reuses them) but no longer count as anybody's."""
    server, served = origin
    digest = biggest_layer(served)[0]
    server.inject(served.blob_paths[digest], Fault("wrong"))
    source = registry_source()
    try:
        with pytest.raises(DigestMismatchError):
            await engine_for(store, source).pull(served.ref)
    finally:
        await source.aclose()
    assert store.model_digests() == []
    assert store.get_pending(served.manifest_digest) is None
    assert store.leases() == []
    assert store.usage().reserved == 0
    committed = {d for d in served.blob_sizes if store.has_blob(d)}
    assert committed and committed <= set(store.plan_eviction(1 << 40).blobs)


async def test_a_body_longer_than_declared_is_cut_off(
    store: Store, origin: tuple[FaultServer, ServedModel]
) -> None:
    server, served = origin
    small = smallest_layer(served)[0]
    server.inject(served.blob_paths[small], Fault("long_chunked", extra=5 * MiB))
    source = registry_source()
    try:
        with pytest.raises(SizeMismatchError):
            await engine_for(store, source).pull(served.ref)
    finally:
        await source.aclose()
    assert not store.has_blob(small)
    assert not store.partial_path(small).exists()


async def test_a_source_that_sends_past_the_end_is_stopped(store: Store, layout: Path) -> None:
    source = CountingSource(extra=b"\xee" * 64 * KiB)
    with pytest.raises(SizeMismatchError) as failure:
        await engine_for(store, source).pull(layout_ref(layout))
    digest = failure.value.digest
    resolved = await source.inner.resolve(layout_ref(layout))
    size = next(layer.blob.size for layer in resolved.layers if layer.blob.digest == digest)
    assert source.fetched[digest] <= size + 64 * KiB  # stopped at the first byte too many
    assert not store.has_blob(digest)
    assert not store.partial_path(digest).exists()


async def test_cache_full_is_reported_before_anything_is_fetched(
    tmp_path: Path, layout: Path
) -> None:
    small = Store.open(tmp_path / "small", capacity_bytes=1 * MiB)
    try:
        source = CountingSource()
        with pytest.raises(CacheFullError):
            await engine_for(small, source).pull(layout_ref(layout))
        assert sum(source.fetched.values()) == 0
        assert partial_files(small) == []
        assert small.usage().blobs == 0
    finally:
        small.close()


async def test_a_blob_over_the_size_cap_is_refused(store: Store, layout: Path) -> None:
    source = CountingSource()
    with pytest.raises(SourceError, match="over the"):
        await engine_for(store, source, max_blob_bytes=256 * KiB).pull(layout_ref(layout))
    assert sum(source.fetched.values()) == 0


# -- progress and lazy reads ----------------------------------------------------------------------


async def test_progress_reports_bytes_until_done(store: Store, layout: Path) -> None:
    source = CountingSource(delay=0.01)
    engine = engine_for(store, source, progress_interval_seconds=0.01, ranges_per_blob=1)
    seen: list[PullProgress] = []
    model = await engine.pull(layout_ref(layout), progress=seen.append)
    assert seen[0].state == "resolving"
    states = [s.state for s in seen]
    assert "downloading" in states and states[-1] == "done"
    done = [s.done_bytes for s in seen if s.state == "downloading"]
    assert done == sorted(done) and len(set(done)) > 2
    last = seen[-1]
    assert last.done_bytes == last.total_bytes == sum(b.total_bytes for b in last.blobs)
    assert last.total_bytes >= model.size - 64 * KiB  # the code layer is counted compressed
    assert any(s.rate > 0 for s in seen)
    assert any(b.rate > 0 and b.eta_seconds is not None for s in seen for b in s.blobs)


async def test_watch_streams_a_pull_in_flight(store: Store, layout: Path) -> None:
    source = CountingSource(delay=0.002)
    engine = engine_for(store, source, progress_interval_seconds=0.01)
    pull = asyncio.create_task(engine.pull(layout_ref(layout)))
    await wait_for_a_pull(engine)
    (digest,) = engine.in_flight
    events = [event async for event in engine.watch(digest)]
    model = await pull
    assert events[-1].state == "done" and events[-1].manifest_digest == model.digest
    assert len(events) > 1
    assert engine.progress(digest) is None


async def test_ensure_range_fetches_ahead_of_the_background_order(
    store: Store, layout: Path
) -> None:
    source = CountingSource(delay=0.01)
    engine = engine_for(store, source, ranges_per_blob=1)
    resolved = await source.inner.resolve(layout_ref(layout))
    big = max(resolved.layers, key=lambda layer: layer.blob.size).blob
    pull = asyncio.create_task(engine.pull(layout_ref(layout)))
    await wait_for_a_pull(engine)
    start, end = big.size - 1000, big.size
    async with asyncio.timeout(30):
        path = await engine.ensure_range(big.digest, start, end)
    assert not pull.done()
    assert read_span(path, start, end) == read_span(blob_path(layout, big.digest), start, end)
    model = await pull
    assert sum(n for d, n in source.fetched.items() if d == big.digest) == big.size
    assert store.has_blob(big.digest) and model.digest == resolved.manifest_digest
    assert await engine.ensure_range(big.digest, 0, 10) == store.blob_path(big.digest)


async def test_ensure_range_of_a_blob_nobody_pulls_is_not_found(store: Store) -> None:
    engine = engine_for(store, CountingSource())
    with pytest.raises(ModelNotFoundError, match="neither in the store nor being pulled"):
        await engine.ensure_range("sha256:" + "0" * 64, 0, 1)


async def test_one_caller_giving_up_does_not_stop_the_others(store: Store, layout: Path) -> None:
    source = CountingSource(delay=0.01)
    engine = engine_for(store, source, ranges_per_blob=1)
    quitter = asyncio.create_task(engine.pull(layout_ref(layout)))
    stayer = asyncio.create_task(engine.pull(layout_ref(layout)))
    await wait_for_a_pull(engine)
    quitter.cancel()
    model = await stayer
    assert quitter.cancelled()
    assert store.get_model(model.digest) is not None
