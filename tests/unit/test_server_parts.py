"""Daemon parts that need no agent process: readiness, scrape-time figures, structured logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cacheagent.http_listener import Coalesced, Handler, HttpListener, parse_request_line
from cacheagent.logs import JsonFormatter, TextFormatter, request_context, setup_logging
from cacheagent.memory.gpu import GpuInventory
from cacheagent.metrics import Metrics
from cacheagent.server import Health, http_routes, take_snapshot
from cacheagent.store import Store
from tests.fake_pynvml import two_gpus_on_two_nodes
from tests.unit.store_helpers import add_model


@dataclass
class FakeMount:
    alive: bool

    def healthy(self) -> bool:
        return self.alive


Serve = Callable[[Mapping[str, Handler]], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    listeners: list[HttpListener] = []

    async def start(routes: Mapping[str, Handler]) -> str:
        listener = HttpListener(routes)
        await listener.start("127.0.0.1", 0)
        listeners.append(listener)
        return f"http://127.0.0.1:{listener.port}"

    yield start
    for listener in listeners:
        await listener.stop()


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def test_readyz_reports_each_missing_part(serve: Serve) -> None:
    health = Health()
    routes, scrape = http_routes(Metrics(), health)
    base = await serve(routes)
    scrape.close()
    status, text = await get(f"{base}/readyz")
    assert status == 503
    assert "store not open" in text and "CSI socket not serving" in text
    assert (await get(f"{base}/healthz"))[0] == 200

    health.store = health.api = health.csi = True
    assert await get(f"{base}/readyz") == (200, "ready\n")

    health.fuse, health.fuse_required = FakeMount(alive=False), True  # type: ignore[assignment]
    status, text = await get(f"{base}/readyz")
    assert status == 503 and "FUSE mount not serving" in text

    status, text = await get(f"{base}/healthz")
    assert status == 503 and "FUSE session dead" in text  # a restart repairs it: liveness

    health.fuse = FakeMount(alive=True)  # type: ignore[assignment]
    assert (await get(f"{base}/healthz"))[0] == 200
    health.stopping = True
    assert "shutting down" in (await get(f"{base}/readyz"))[1]


def test_snapshot_exports_models_and_two_gpus(tmp_path: Path) -> None:
    with Store.open(tmp_path / "store") as store:
        model = add_model(store, "m", {"w.bin": b"w" * 8192}, ref="r.example/m/model:v1")
        gpus = GpuInventory(two_gpus_on_two_nodes(), sys_root=tmp_path / "sys")
        metrics = Metrics()
        metrics.snapshot = take_snapshot(store, gpus, lambda: {"bind": 2})
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }
    short = model.digest[7:19]
    assert (
        samples[("cacheagent_model_size_bytes", (("digest", short), ("name", "model:v1")))] == 8192
    )
    assert samples[("cacheagent_cache_models", ())] == 1
    assert samples[("cacheagent_nvml_up", ())] == 1
    assert samples[("cacheagent_csi_volumes", (("mode", "bind"),))] == 2
    gpu_memory = [k for k in samples if k[0] == "cacheagent_gpu_memory_total_bytes"]
    assert sorted(dict(labels)["gpu"] for _, labels in gpu_memory) == ["0", "1"]


def test_json_logs_carry_request_context_and_mask_secrets() -> None:
    stream = io.StringIO()
    setup_logging(fmt="json", level="info")
    root = logging.getLogger()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    assert isinstance(handler.formatter, JsonFormatter)
    handler.setStream(stream)
    try:
        with request_context(ref="reg.example/m:v1", digest="sha256:abc", rid="req-1"):
            logging.getLogger("cacheagent.test").warning(
                "sent Authorization: Bearer abc.def.ghi123"
            )
    finally:
        setup_logging(fmt="text", level="warning")
    entry = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert entry["request_id"] == "req-1"
    assert entry["model_ref"] == "reg.example/m:v1"
    assert "abc.def.ghi123" not in entry["msg"] and "Bearer ***" in entry["msg"]
    assert isinstance(logging.getLogger().handlers[0].formatter, TextFormatter)


async def test_concurrent_scrapes_share_one_fresh_render() -> None:
    renders: list[float] = []
    started, gate = threading.Event(), threading.Event()

    def render() -> bytes:
        started.set()
        gate.wait(10)
        renders.append(time.monotonic())
        return f"render {len(renders)}".encode()

    scrape = Coalesced(render, min_interval=0.0)
    try:
        first = asyncio.ensure_future(scrape.get())
        assert await asyncio.to_thread(started.wait, 10)  # render 1 runs, held at the gate
        # These arrive while render 1 runs: they must not get it (it predates them).
        waiting = [asyncio.ensure_future(scrape.get()) for _ in range(50)]
        await asyncio.sleep(0)
        gate.set()
        assert await first == b"render 1"
        assert await asyncio.gather(*waiting) == [b"render 2"] * 50
        assert await scrape.get() == b"render 3"  # nobody waiting: a new, fresh render
        assert len(renders) == 3
    finally:
        scrape.close()


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", ("GET", "/metrics", None)),
        (b"HEAD /healthz HTTP/1.0\r\n\r\n", ("HEAD", "/healthz", None)),
    ],
)
def test_request_line_parsed(head: bytes, expected: tuple[str, str, None]) -> None:
    assert parse_request_line(head) == expected


@pytest.mark.parametrize(
    "head",
    [
        b"HELLO\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"get / HTTP/1.1\r\n\r\n",
        b"GET / SPDY\r\n",
    ],
)
def test_malformed_request_lines_named(head: bytes) -> None:
    problem = parse_request_line(head)[2]
    assert problem is not None and "malformed" in problem
