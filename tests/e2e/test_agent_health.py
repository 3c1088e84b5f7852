"""Health as kubelet's probes see it: /healthz from the first moment of `serve`, /readyz only
when every part serves, and /healthz failing when the CSI socket stops answering Probe."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.agent_process import AgentProcess

WAIT_SECONDS = 20.0  # below the store index's 30 s busy timeout, so the agent is still blocked


@contextmanager
def index_held(index: Path) -> Iterator[None]:
    """Hold SQLite's exclusive lock on the store index: the agent's store open (the start-up
    reconcile's first step) waits on it, as it waits on a long reconcile of a big store."""
    conn = sqlite3.connect(index, isolation_level=None)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        yield
        conn.execute("COMMIT")
    finally:
        conn.close()


def _poll(agent: AgentProcess, path: str, status: int) -> tuple[int, str]:
    deadline = time.monotonic() + WAIT_SECONDS
    answer = agent.get(path)
    while answer[0] != status and time.monotonic() < deadline:
        assert agent.proc is not None and agent.proc.poll() is None, agent.log_text()
        time.sleep(0.1)
        answer = agent.get(path)
    return answer


def test_healthz_answers_while_the_store_is_still_opening(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent")
    with agent:
        pass  # creates the store and its index
    index = agent.store_root / "index.db"
    assert index.exists()
    try:
        with index_held(index):
            agent.start(wait=False)
            assert _poll(agent, "/healthz", 200)[0] == 200, agent.log_text()
            status, text = agent.get("/readyz")
            assert status == 503
            assert "store not open" in text
        agent.wait_ready()
        assert agent.get("/healthz")[0] == 200
        assert agent.stop() == 0
    finally:
        agent.kill()
        agent.cleanup()


def test_healthz_fails_when_the_csi_socket_stops_answering(tmp_path: Path) -> None:
    with AgentProcess(tmp_path / "agent") as agent:
        assert agent.get("/healthz") == (200, "ok\n")
        agent.csi_socket.unlink()  # kubelet can no longer reach the driver: restart it
        status, text = _poll(agent, "/healthz", 503)
        assert status == 503
        assert "CSI Probe" in text
        assert agent.get("/metrics")[0] == 200
