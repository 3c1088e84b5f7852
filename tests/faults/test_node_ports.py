"""Hostile input on the agent's own sockets and port, each reproduced against a running agent.

- a second agent (another store) pointed at the first one's API socket must not take it over;
- the HTTP port drops clients that never finish a request head, answers oversized and
  malformed requests with one log line each (no traceback), and a /metrics flood does not
  slow CSI publishes;
- Preheat is bounded (references per call, calls at once), a 10,000-reference Preheat is
  refused without growing the agent for good, and API load does not slow CSI publishes.

CSI latency is compared with the same agent's own latency a moment before, unloaded, so the
bound holds on a busy two-core machine as well as on a quiet one.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from cacheagent._proto.cacheagent.v1 import agent_pb2 as apb
from cacheagent._proto.cacheagent.v1 import agent_pb2_grpc as apb_grpc
from tests.agent_process import AgentProcess
from tests.faults.harness import (
    OK,
    LayoutModel,
    Rig,
    make_model,
    pid_of,
    preheat_ok,
    publish,
    rss_bytes,
    status,
    target_path,
    unpublish,
)

pytestmark = [pytest.mark.root]

CYCLES = 40
MAX_CYCLES = 10 * CYCLES
SLOW_CLIENTS = 200
HEADER_TIMEOUT = 5.0  # http_listener.ListenerLimits.header_timeout
LOAD_WARMUP_CALLS = 4


@pytest.fixture
def model(tmp_path: Path) -> LayoutModel:
    return make_model(tmp_path / "m", seed=61, weight_bytes=256 * 1024)


def publish_latency(
    agent: AgentProcess, ref: str, *, until: Callable[[], bool] = lambda: True
) -> float:
    """Median seconds of NodePublishVolume for a cached model (each volume unpublished).

    At least CYCLES publishes, and more (at most MAX_CYCLES) until ``until()`` holds, so a
    load that runs slowly on a busy machine still overlaps the whole measurement."""
    times: list[float] = []
    for i in range(MAX_CYCLES):
        if len(times) >= CYCLES and until():
            break
        target = target_path(agent, f"lat{i}")
        started = time.monotonic()
        assert publish(agent, f"vol-{i}", target, ref) == (OK, "")
        times.append(time.monotonic() - started)
        assert unpublish(agent, f"vol-{i}", target) == (OK, "")
    return statistics.median(times)


@contextmanager
def load(*args: str) -> Iterator[list[str]]:
    """Run ``tests.faults.load_child`` with ``args`` for the block's duration; the list it
    yields fills with each call's outcome as the call finishes."""
    outcomes: list[str] = []
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.faults.load_child", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    reader = threading.Thread(target=lambda: outcomes.extend(map(str.strip, child.stdout or ())))
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while len(outcomes) < LOAD_WARMUP_CALLS and child.poll() is None:
            assert time.monotonic() < deadline, "the load never started"
            time.sleep(0.01)  # the load is running before measuring starts
        yield outcomes
    finally:
        os.kill(child.pid, signal.SIGTERM)
        child.wait(timeout=60)
        reader.join(timeout=60)


def assert_not_slowed(loaded: float, unloaded: float, *, factor: float, slack: float) -> None:
    assert loaded <= factor * unloaded + slack, (
        f"publish median {loaded * 1000:.1f} ms under load, {unloaded * 1000:.1f} ms without"
    )


# --------------------------------------------------------------------------- API socket


def test_second_agent_does_not_take_over_the_api_socket(rig: Rig, model: LayoutModel) -> None:
    first = rig.agent("first").start()
    preheat_ok(first, model.ref)
    before = first.socket.stat().st_ino
    second = rig.agent("second", extra={"agent": {"socket": str(first.socket)}})
    with pytest.raises(RuntimeError, match="agent exited at start"):
        second.start()
    assert "agent.socket" in second.log_text() and "in use" in second.log_text()
    assert "Traceback" not in second.log_text()
    # The first agent still owns its socket (same file), and answers on it.
    assert first.socket.stat().st_ino == before
    assert status(first).store_root == str(first.store_root)
    assert first.get("/readyz")[0] == 200


# --------------------------------------------------------------------------- HTTP port


def test_slow_clients_are_dropped_and_health_still_answers(rig: Rig) -> None:
    agent = rig.agent().start()
    port = agent.port
    clients = []
    try:
        for _ in range(SLOW_CLIENTS):
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the head never ends
            clients.append(conn)
        started = time.monotonic()
        assert agent.get("/healthz") == (200, "ok\n")  # not starved by the slow ones
        for conn in clients:
            conn.settimeout(HEADER_TIMEOUT + 20)
            assert conn.recv(1) == b"", "a slow client got an answer instead of a close"
        assert time.monotonic() - started < HEADER_TIMEOUT + 20
    finally:
        for conn in clients:
            conn.close()
    assert "Traceback" not in agent.log_text()


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_oversized_and_malformed_requests_get_one_log_line(rig: Rig) -> None:
    agent = rig.agent().start()
    huge = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
    assert raw_request(agent.port, huge).startswith(b"HTTP/1.1 431 ")
    assert raw_request(agent.port, b"HELLO THERE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_request(agent.port, b"DELETE /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert raw_request(agent.port, b"GET /secret HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    log = agent.log_text()
    assert "Traceback" not in log
    assert sum("request head over" in line for line in log.splitlines()) == 1
    assert sum("bad request" in line for line in log.splitlines()) == 1
    assert agent.get("/readyz")[0] == 200


def test_metrics_flood_does_not_slow_csi(rig: Rig, model: LayoutModel) -> None:
    agent = rig.agent().start()
    preheat_ok(agent, model.ref)
    unloaded = publish_latency(agent, model.ref)

    with load("scrape", f"{agent.http}/metrics", "8") as scrapes:
        loaded = publish_latency(agent, model.ref, until=lambda: len(scrapes) >= 2 * CYCLES)
    assert len(scrapes) >= 2 * CYCLES and set(scrapes) == {"OK"}, "the flood did not happen"
    # Measured on the 2-core dev machine: 5-10 ms here against 6-7 ms unloaded; 45-47 ms
    # (against 3-4 ms) before scrapes left the agent's event loop and worker threads.
    assert_not_slowed(loaded, unloaded, factor=3, slack=0.01)


# --------------------------------------------------------------------------- Preheat


def preheat_call(agent: AgentProcess, refs: list[str], timeout: float = 60) -> grpc.StatusCode:
    with grpc.insecure_channel(f"unix://{agent.socket}") as channel:
        stub = apb_grpc.AgentStub(channel)
        try:
            for _ in stub.Preheat(apb.PreheatRequest(refs=refs), timeout=timeout):
                pass
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_huge_preheat_refused_and_memory_does_not_grow(rig: Rig, model: LayoutModel) -> None:
    agent = rig.agent().start()
    preheat_ok(agent, model.ref)
    refs = [f"{model.ref}-{i}" for i in range(10_000)]
    with grpc.insecure_channel(f"unix://{agent.socket}") as channel:
        stub = apb_grpc.AgentStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Preheat(apb.PreheatRequest(refs=refs), timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "agent.preheat_max_refs" in (refused.value.details() or "")
    settled, _ = rss_bytes(pid_of(agent))
    started = time.monotonic()
    for _ in range(5):
        assert preheat_call(agent, refs) == grpc.StatusCode.INVALID_ARGUMENT
    assert time.monotonic() - started < 30
    grown = rss_bytes(pid_of(agent))[0] - settled
    assert grown < 32 << 20, f"the agent grew by {grown >> 20} MiB"
    assert preheat_call(agent, [model.ref] * 256) == grpc.StatusCode.OK


def test_preheat_load_does_not_slow_csi_and_excess_calls_are_refused(
    rig: Rig, model: LayoutModel
) -> None:
    agent = rig.agent().start()
    preheat_ok(agent, model.ref)
    unloaded = publish_latency(agent, model.ref)
    with load("preheat", str(agent.socket), "8", model.ref, "256") as calls:
        loaded = publish_latency(agent, model.ref, until=lambda: len(calls) >= 2 * 8)
    assert len(calls) >= 8, "the load did not happen"
    assert set(calls) <= {"OK", "RESOURCE_EXHAUSTED"}, set(calls)
    assert "RESOURCE_EXHAUSTED" in calls, "8 callers never met the limit of 4"
    # Measured on the 2-core dev machine: 16-40 ms here against 4-6 ms unloaded; 150-590 ms
    # before Preheat work was bounded agent-wide.
    assert_not_slowed(loaded, unloaded, factor=6, slack=0.05)
