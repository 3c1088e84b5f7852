"""Lazy (FUSE) volumes inside the real agent: cache hits, dead FUSE targets after a restart,
signals and health. Real registry, real FUSE and bind mounts, kubelet-shaped CSI calls."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cacheagent.cli.client import AgentClient
from cacheagent.mountinfo import find_mount
from tests.agent_process import AgentProcess, stop_and_unmount
from tests.e2e.conftest import HTTP_LAZY, Origin, kubelet, serve_unverifiable, wait_until_no_pulls
from tests.fault_server import Fault, FaultServer
from tests.kubelet import InlineVolume, Pod
from tests.mounts import mounts_under
from tests.support import require_fuse
from tests.threaded import serve_in_thread
from tests.throttle_proxy import ThrottleProxy

CACHE_HIT_PUBLISH_SECONDS = 5.0  # generous for a shared CI machine; it answers in milliseconds


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
    # listdir, not stat: the kernel may answer a stat from attributes cached for a second.
    with pytest.raises(OSError) as dead:
        os.listdir(target)
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


STALLED_READERS = 24  # more than libfuse's worker threads before the fix (16)
ORIGIN_WAIT_SECONDS = 3.0
CACHED_READ_BOUND_SECONDS = 2.0  # a cached 1 MiB read takes milliseconds; the bound is slack


def test_a_stalled_origin_does_not_freeze_reads_of_a_cached_model(tmp_path: Path) -> None:
    require_fuse()
    stalled, cached = os.urandom(96 << 20), os.urandom(8 << 20)
    server = FaultServer(stall_seconds=600)
    server.add("stalled.safetensors", stalled)
    server.add("cached.safetensors", cached)
    # cut_at 0: every GET of the stalled blob answers its headers, then nothing.
    server.inject("stalled.safetensors", Fault("stall", times=10_000, cut_at=0.0))
    with serve_in_thread(server):
        agent = AgentProcess(
            tmp_path / "agent",
            insecure=(server.host,),
            fuse=True,
            extra={"fuse": {"origin_wait_seconds": ORIGIN_WAIT_SECONDS}, "policy": HTTP_LAZY},
        )
        agent.start()
        try:
            _check_containment(agent, server, stalled, cached)
        finally:
            stop_and_unmount(agent)


def _http_ref(server: FaultServer, name: str, data: bytes) -> str:
    return f"{server.url(name)}#sha256={hashlib.sha256(data).hexdigest()}"


def _check_containment(
    agent: AgentProcess, server: FaultServer, stalled: bytes, cached: bytes
) -> None:
    cached_ref = _http_ref(server, "cached.safetensors", cached)
    with AgentClient(agent.socket) as client:
        list(client.preheat([cached_ref]))
    pods = [Pod("pod-stalled"), Pod("pod-cached")]
    volumes = [
        lazy_volume(_http_ref(server, "stalled.safetensors", stalled)),
        lazy_volume(cached_ref),
    ]
    with kubelet(agent) as k:
        for pod, volume in zip(pods, volumes, strict=True):
            assert k.set_up(pod, volume).ok
        stalled_file = k.target(pods[0], volumes[0]) / "stalled.safetensors"
        cached_file = k.target(pods[1], volumes[1]) / "cached.safetensors"
        try:
            outcomes = _read_while_stalled(stalled_file, cached_file, cached)
        finally:
            for pod, volume in zip(pods, volumes, strict=True):
                assert k.tear_down(pod, volume).ok
    cached_seconds, stalled_results = outcomes
    assert cached_seconds < CACHED_READ_BOUND_SECONDS, cached_seconds
    bound = ORIGIN_WAIT_SECONDS + 10.0
    assert len(stalled_results) == STALLED_READERS
    for err, seconds in stalled_results:
        assert err in (errno.ETIMEDOUT, errno.EIO), (err, seconds)
        assert seconds < bound, (err, seconds)


def _read_while_stalled(
    stalled_file: Path, cached_file: Path, cached: bytes
) -> tuple[float, list[tuple[int | None, float]]]:
    results: list[tuple[int | None, float]] = []
    guard = threading.Lock()

    def read_stalled(index: int) -> None:
        started = time.monotonic()
        code: int | None = None
        try:
            with stalled_file.open("rb", buffering=0) as f:
                os.pread(f.fileno(), 1 << 20, index * (4 << 20))
        except OSError as exc:
            code = exc.errno
        with guard:
            results.append((code, time.monotonic() - started))

    readers = [threading.Thread(target=read_stalled, args=(i,)) for i in range(STALLED_READERS)]
    for reader in readers:
        reader.start()
    try:
        time.sleep(1.0)  # not synchronisation: gives the readers time to occupy FUSE threads
        started = time.monotonic()
        with cached_file.open("rb", buffering=0) as f:
            data = os.pread(f.fileno(), 1 << 20, len(cached) - (1 << 20))
        cached_seconds = time.monotonic() - started
        assert data == cached[-(1 << 20) :]
    finally:
        for reader in readers:
            reader.join(ORIGIN_WAIT_SECONDS + 60)
    return cached_seconds, results


def test_pages_served_before_a_failed_verification_leave_the_page_cache(tmp_path: Path) -> None:
    """Bytes read before the blob failed its digest were cached by the kernel; once the pull
    fails, a reader that still has the file open must not get them again from the cache."""
    require_fuse()
    with serve_in_thread(FaultServer()) as server:
        payload, ref = serve_unverifiable(server)
        agent = AgentProcess(
            tmp_path / "agent", insecure=(server.host,), fuse=True, extra={"policy": HTTP_LAZY}
        )
        agent.start()
        pod, volume = Pod("pod-unverified"), lazy_volume(ref)
        try:
            with kubelet(agent) as k:
                assert k.set_up(pod, volume).ok
                path = k.target(pod, volume) / "weights.safetensors"
                try:
                    with path.open("rb", buffering=0) as f:
                        assert os.pread(f.fileno(), 65536, 0) == payload[:65536]
                        wait_until_no_pulls(agent)
                        assert _read_error(f.fileno(), deadline=30.0) == errno.EIO
                finally:
                    assert k.tear_down(pod, volume).ok
        finally:
            agent.stop()
            agent.cleanup()


def _read_error(fd: int, deadline: float) -> int | None:
    """Re-read the first 64 KiB until it fails (the agent drops the pages just after the pull
    ends); the errno, or None if the cached bytes were still served at the deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            os.pread(fd, 65536, 0)
        except OSError as exc:
            return exc.errno
        time.sleep(0.1)
    return None


THROTTLED_BYTES_PER_SECOND = 1 << 20  # a 24 MiB model takes ~24 s to pull: room for a slow read


def test_lazy_reads_are_fetched_on_demand_while_the_pull_runs(
    tmp_path: Path, origin: Origin
) -> None:
    """Through a bandwidth-capped link to the registry, the tail of the last shard is read
    long before the background pull gets there: the bytes came from a range fetch on demand."""
    require_fuse()
    model = origin.models["gamma"]
    proxy = ThrottleProxy(origin.registry.port, THROTTLED_BYTES_PER_SECOND)
    with serve_in_thread(proxy):
        ref = model.ref.replace(origin.registry.host, proxy.address)
        agent = AgentProcess(tmp_path / "agent", insecure=(proxy.address,), fuse=True)
        agent.start()
        pod, volume = Pod("pod-on-demand"), lazy_volume(ref)
        try:
            with kubelet(agent) as k:
                assert k.set_up(pod, volume).ok
                target = k.target(pod, volume)
                try:
                    _read_tail_while_pulling(agent, target, model.digest)
                finally:
                    assert k.tear_down(pod, volume).ok
        finally:
            agent.stop()
            agent.cleanup()


def _read_tail_while_pulling(agent: AgentProcess, target: Path, digest: str) -> None:
    shard = sorted(p for p in target.iterdir() if p.suffix == ".safetensors")[-1]
    with shard.open("rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        tail = os.pread(f.fileno(), 1 << 20, size - (1 << 20))
    with AgentClient(agent.socket) as client:
        pulling = [p.manifest_digest for p in client.status().pulls]
    assert digest in pulling, "the pull finished before the read: the test proves nothing"
    assert _metric(agent, "cacheagent_fuse_lazy_fetched_bytes_total") >= len(tail)
    wait_until_no_pulls(agent, timeout=120.0)
    with AgentClient(agent.socket) as client:
        stored = Path(client.stat(digest).path) / shard.name
    assert tail == stored.read_bytes()[-(1 << 20) :]


def _metric(agent: AgentProcess, name: str) -> float:
    for line in agent.get("/metrics")[1].splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")
