"""Metrics that tell the truth about pulls: hits, misses, lazy pulls and pulls in flight."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from cacheagent.config import PolicyConfig
from cacheagent.metrics import Metrics
from cacheagent.pull.blobjobs import BlobJob
from cacheagent.pull.engine import PullEngine, PullTuning, SourceRegistry
from cacheagent.refs import LayoutRef
from cacheagent.service import ModelService
from cacheagent.store import Store
from tests.integration.pull_origin import CountingSource
from tests.oci.layout_writer import LayoutEntry, write_layout

KIND = "oci-layout"


def layout_ref(root: Path) -> LayoutRef:
    entries = [LayoutEntry(f"w{i}.bin", os.urandom(256 << 10), "raw", "weight") for i in range(3)]
    write_layout(root, entries, tag="v1")
    return LayoutRef(path=str(root), tag="v1", digest=None)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[ModelService, CountingSource, Metrics]]:
    store = Store.open(tmp_path / "store")
    source = CountingSource()
    # Every tag resolution expires at once: each pull asks the origin again.
    engine = PullEngine(store, SourceRegistry([source]), tuning=PullTuning(tag_ttl_seconds=0))
    metrics = Metrics()
    policy = PolicyConfig(lazy_sources=("oci", "oci-layout"))  # lazy mode for layouts too
    service = ModelService(store, engine, policy, metrics=metrics, fuse_root=tmp_path / "fuse")
    try:
        yield service, source, metrics
    finally:
        await engine.aclose()
        store.close()


async def test_a_tag_resolved_again_after_its_ttl_is_a_hit(
    rig: tuple[ModelService, CountingSource, Metrics], tmp_path: Path
) -> None:
    service, source, metrics = rig
    ref = layout_ref(tmp_path / "layout")
    _, first_hit = await service.pull(ref)
    _, second_hit = await service.pull(ref)
    assert source.resolves == 2  # the expired tag really was resolved again
    assert (first_hit, second_hit) == (False, True)
    assert sample(metrics, "cacheagent_cache_misses_total", source=KIND) == 1
    assert sample(metrics, "cacheagent_cache_hits_total", source=KIND) == 1


async def test_pulls_in_flight_counts_pulls_not_callers(
    rig: tuple[ModelService, CountingSource, Metrics], tmp_path: Path
) -> None:
    service, source, metrics = rig
    source.delay = 0.02
    ref = layout_ref(tmp_path / "layout")
    callers = [asyncio.create_task(service.pull(ref)) for _ in range(10)]
    async with asyncio.timeout(30):
        while not any(source.fetched.values()):  # noqa: ASYNC110 - polling the origin's count
            await asyncio.sleep(0.005)
    assert sample(metrics, "cacheagent_pulls_in_flight") == 1
    await asyncio.gather(*callers)
    assert sample(metrics, "cacheagent_pulls_in_flight") == 0


async def test_a_lazy_pull_is_counted(
    rig: tuple[ModelService, CountingSource, Metrics], tmp_path: Path
) -> None:
    service, _, metrics = rig
    ref = layout_ref(tmp_path / "layout")
    ready = await service.lazy_model_dir(ref)
    async for _ in service.engine.watch(ready.digest):
        pass
    assert sample(metrics, "cacheagent_cache_misses_total", source=KIND) == 1
    assert sample(metrics, "cacheagent_pull_duration_seconds_count", source=KIND, result="ok") == 1


class _Growing:
    """A download whose byte count, when a scrape reads it, starts another blob job: what the
    event loop does to the job table while the HTTP listener's thread renders /metrics."""

    def __init__(self, jobs: dict[str, BlobJob], n: int) -> None:
        self._jobs, self._n = jobs, n

    @property
    def fetched_bytes(self) -> int:
        if self._n < 50:
            self._jobs[f"sha256:{self._n + 1:064x}"] = job_of(_Growing(self._jobs, self._n + 1))
        return 1


def job_of(download: object) -> BlobJob:
    return BlobJob(unpack="raw", source_kind=KIND, download=download)  # type: ignore[arg-type]


async def test_a_scrape_never_iterates_the_job_table_the_loop_is_changing(
    rig: tuple[ModelService, CountingSource, Metrics],
) -> None:
    service, _, metrics = rig
    jobs = service.engine._blobs._blobs  # the live table the engine's tasks add to
    jobs["sha256:" + "0" * 64] = job_of(_Growing(jobs, 0))
    metrics.pulled_bytes = service.engine.fetched_bytes
    text = generate_latest(metrics.registry).decode()  # raises if the table is iterated live
    assert f'cacheagent_pull_bytes_total{{source="{KIND}"}}' in text
    jobs.clear()
