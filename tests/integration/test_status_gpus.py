"""`cacheagent status` shows per-GPU memory and utilisation when NVML is up.

The agent API runs in this process on a real unix socket with a real store; only NVML is
faked, at the pynvml boundary (tests/fake_pynvml.py), since no GPU exists here. The CLI runs
as its own process against that socket.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cacheagent.api import AgentService
from cacheagent.api_server import start_agent_api
from cacheagent.memory.gpu import GpuInventory
from cacheagent.pull.engine import PullEngine, SourceRegistry
from cacheagent.service import ModelService
from cacheagent.store import Store
from tests.fake_pynvml import FakeNvml, two_gpus_on_two_nodes


@pytest.fixture
async def socket_dir() -> AsyncIterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ca-", dir="/tmp") as tmp:
        yield Path(tmp)


async def status_of(tmp_path: Path, socket: Path, nvml: FakeNvml, *args: str) -> str:
    store = Store.open(tmp_path / "store")
    engine = PullEngine(store, SourceRegistry([]))
    gpus = GpuInventory(nvml, sys_root=tmp_path / "sys")
    server = await start_agent_api(socket, AgentService(ModelService(store, engine), gpus=gpus))
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cacheagent.cli.main",
            "status",
            "--socket",
            str(socket),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 0, err.decode()
        return out.decode()
    finally:
        await server.stop(1)
        await engine.aclose()
        gpus.close()
        store.close()


async def test_status_lists_each_gpu_with_memory_and_utilisation(
    tmp_path: Path, socket_dir: Path
) -> None:
    nvml = two_gpus_on_two_nodes()
    nvml.gpus[1].unsupported = frozenset({"nvmlDeviceGetUtilizationRates"})
    status = json.loads(await status_of(tmp_path, socket_dir / "a.sock", nvml, "--json"))
    assert status["nvml_up"] is True
    first, second = status["gpus"]
    assert first["uuid"] == nvml.gpus[0].uuid
    assert int(first["memory_total_bytes"]) == nvml.gpus[0].memory_total
    assert int(first["memory_used_bytes"]) == nvml.gpus[0].memory_used
    assert first["utilization_gpu_percent"] == 37.0
    assert first["utilization_memory_percent"] == 12.0
    assert first["temperature_celsius"] == 41.0
    assert "utilization_gpu_percent" not in second  # unsupported: absent, not 0

    text = await status_of(tmp_path, socket_dir / "b.sock", nvml)
    assert "gpu 0:" in text and "memory 3.0 GiB / 80.0 GiB, utilisation 37%" in text
    assert "gpu 1:" in text and "utilisation -" in text


async def test_status_says_why_there_are_no_gpus(tmp_path: Path, socket_dir: Path) -> None:
    nvml = FakeNvml(init_error=9)  # NVML_ERROR_DRIVER_NOT_LOADED
    text = await status_of(tmp_path, socket_dir / "c.sock", nvml)
    assert "gpus:    none (" in text
