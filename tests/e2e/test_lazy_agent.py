"""Lazy (FUSE) volumes inside the real agent: cache hits, dead FUSE targets after a restart,
signals and health. Real registry, real FUSE and bind mounts, kubelet-shaped CSI calls."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheagent.cli.client import AgentClient
from cacheagent.mountinfo import find_mount
from tests.agent_process import AgentProcess
from tests.csi_env import force_unmount, mounts_under
from tests.e2e.conftest import Origin
from tests.kubelet import InlineVolume, Kubelet, Pod
from tests.support import require_fuse

DRIVER = "model.cacheagent.io"
BACKOFF_SCALE = 0.02
CACHE_HIT_PUBLISH_SECONDS = 5.0  # generous for a shared CI machine; it answers in milliseconds


@pytest.fixture
def lazy_agent(tmp_path: Path, origin: Origin) -> Iterator[AgentProcess]:
    require_fuse()
    agent = AgentProcess(tmp_path / "agent", insecure=(origin.registry.host,), fuse=True)
    try:
        yield agent.start()
    finally:
        agent.stop()
        for leftover in mounts_under(agent.kubelet_dir):
            force_unmount(leftover)
        agent.cleanup()


def kubelet(agent: AgentProcess, timeout: float = 120.0) -> Kubelet:
    return Kubelet(
        agent.csi_socket, agent.kubelet_dir, DRIVER, backoff_scale=BACKOFF_SCALE, timeout=timeout
    )


def lazy_volume(ref: str) -> InlineVolume:
    return InlineVolume("model", {"model": ref, "mode": "lazy"}, read_only=True)


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_lazy_publish_of_a_cached_model_answers_at_once(
    lazy_agent: AgentProcess, origin: Origin, by: str
) -> None:
    model = origin.models["alpha"]
    with AgentClient(lazy_agent.socket) as client:
        list(client.preheat([model.ref]))
        stored = Path(client.stat(model.ref).path)
    ref = model.ref if by == "tag" else f"{model.ref.rsplit(':', 1)[0]}@{model.digest}"
    pod, volume = Pod(f"pod-hit-{by}"), lazy_volume(ref)
    with kubelet(lazy_agent, timeout=CACHE_HIT_PUBLISH_SECONDS) as k:
        started = time.monotonic()
        outcome = k.set_up(pod, volume)
        elapsed = time.monotonic() - started
        assert outcome.ok, outcome
        target = k.target(pod, volume)
        try:
            assert elapsed < CACHE_HIT_PUBLISH_SECONDS, elapsed
            assert file_digests(target) == file_digests(stored)
        finally:
            assert k.tear_down(pod, volume).ok
    assert find_mount(target) is None


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_unpublish_of_a_dead_lazy_target_succeeds_and_kubelet_can_republish(
    lazy_agent: AgentProcess, origin: Origin, how: str
) -> None:
    """After a restart without FUSE survival, the old bind mount answers ENOTCONN: unpublish
    must still take it down (kubelet tears the pod down) and a new publish must serve."""
    model = origin.models["beta"]
    with AgentClient(lazy_agent.socket) as client:
        list(client.preheat([model.ref]))
        stored = Path(client.stat(model.ref).path)
    pod, volume = Pod(f"pod-dead-{how}"), lazy_volume(model.ref)
    with kubelet(lazy_agent) as k:
        assert k.set_up(pod, volume).ok
        target = k.target(pod, volume)
    if how == "sigterm":
        lazy_agent.stop()
    else:
        lazy_agent.kill()
    lazy_agent.start()
    with pytest.raises(OSError) as dead:
        os.stat(target)
    assert dead.value.errno == errno.ENOTCONN
    with kubelet(lazy_agent) as k:
        outcome = k.tear_down(pod, volume)
        assert outcome.ok, outcome
        assert find_mount(target) is None
        assert not target.exists()
        assert k.set_up(pod, volume).ok
        try:
            assert file_digests(target) == file_digests(stored)
        finally:
            assert k.tear_down(pod, volume).ok
    assert not [m for m in mounts_under(lazy_agent.kubelet_dir) if m.startswith(str(target))]


def test_sighup_leaves_the_fuse_mount_serving(lazy_agent: AgentProcess, origin: Origin) -> None:
    model = origin.models["gamma"]
    with AgentClient(lazy_agent.socket) as client:
        list(client.preheat([model.ref]))
    assert lazy_agent.proc is not None
    os.kill(lazy_agent.proc.pid, signal.SIGHUP)
    # The agent answers an API call after the signal, so the signal has been handled.
    with AgentClient(lazy_agent.socket) as client:
        assert client.stat(model.ref).manifest_digest == model.digest
    assert lazy_agent.proc.poll() is None
    assert model.digest in os.listdir(lazy_agent.fuse_root)
    assert lazy_agent.get("/readyz")[0] == 200
    assert lazy_agent.get("/healthz")[0] == 200
    assert "SIGHUP" in lazy_agent.log_text()


def test_health_reports_a_dead_fuse_session(lazy_agent: AgentProcess) -> None:
    """Someone detaches the agent's FUSE mount: the session ends, and both probes say so
    (liveness fails, so kubelet restarts the agent, which mounts a new session)."""
    subprocess.run(["umount", "-l", str(lazy_agent.fuse_root)], check=True, timeout=30)
    deadline = time.monotonic() + 30
    while lazy_agent.get("/healthz")[0] == 200:
        assert time.monotonic() < deadline, "healthz still ok 30 s after the FUSE session died"
        time.sleep(0.1)
    status, text = lazy_agent.get("/healthz")
    assert status == 503 and "FUSE" in text, text
    assert lazy_agent.get("/readyz")[0] == 503
