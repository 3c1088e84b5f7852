"""The CSI driver inside the real agent: kubelet-style calls over the CSI socket, real registry,
real bind and FUSE mounts, restarts and crashes of the agent process."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import grpc
import pytest

from cacheagent.cli.client import AgentCallError, AgentClient
from cacheagent.memory.pagecache import drop
from cacheagent.mountinfo import find_mount
from tests.agent_process import AgentProcess
from tests.e2e.conftest import (
    HTTP_LAZY,
    WRONG_SHA256,
    Origin,
    kubelet,
    serve_unverifiable,
    wait_until_no_pulls,
)
from tests.fault_server import FaultServer
from tests.kubelet import InlineVolume, Pod
from tests.mounts import mounts_under
from tests.support import require_fuse, require_root
from tests.threaded import serve_in_thread


def model_volume(ref: str, **attrs: str) -> InlineVolume:
    return InlineVolume("model", {"model": ref, **attrs}, read_only=True)


def mount(agent: AgentProcess, pod: Pod, ref: str, **attrs: str) -> tuple[InlineVolume, Path]:
    """Publish ``ref`` into ``pod`` as kubelet would; the volume and its target."""
    volume = model_volume(ref, **attrs)
    with kubelet(agent) as k:
        outcome = k.set_up(pod, volume)
        assert outcome.ok, outcome
        return volume, k.target(pod, volume)


def unmount(agent: AgentProcess, pod: Pod, volume: InlineVolume) -> None:
    with kubelet(agent) as k:
        outcome = k.tear_down(pod, volume)
        assert outcome.ok, outcome
        assert not k.target(pod, volume).parent.exists()


def tree_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_publish_of_an_uncached_model_is_retryable_then_mounts(
    agent: AgentProcess, origin: Origin
) -> None:
    require_root()
    model = origin.models["alpha"]
    pod, volume = Pod("pod-a"), model_volume(model.ref)
    with kubelet(agent) as k:
        target = k.target(pod, volume)
        outcomes = k.mount(pod, volume, attempts=12)
        assert outcomes[-1].ok, outcomes
        # Every failure was UNAVAILABLE: uncertain, so kubelet kept the directory and retried.
        assert all(o.code == grpc.StatusCode.UNAVAILABLE for o in outcomes[:-1]), outcomes
        try:
            mounted = find_mount(target)
            assert mounted is not None and {"ro", "nosuid", "nodev"} <= mounted.options
            with AgentClient(agent.socket) as client:
                info = client.stat(model.ref)
            assert tree_digests(target) == tree_digests(Path(info.path))
            with pytest.raises(OSError, match="Read-only"):
                (target / "config.json").write_text("x")
            assert k.set_up(pod, volume).ok  # idempotent
            assert len([m for m in mounts_under(agent.kubelet_dir) if m == str(target)]) == 1
        finally:
            assert k.tear_down(pod, volume).ok
    assert not target.exists() and not target.parent.exists()


def test_restart_keeps_leases_so_eviction_skips_published_models(
    agent: AgentProcess, origin: Origin
) -> None:
    require_root()
    alpha, beta = origin.models["alpha"], origin.models["beta"]
    with AgentClient(agent.socket) as client:
        list(client.preheat([alpha.ref, beta.ref]))
    pods = {name: Pod(f"pod-{name}") for name in ("alpha", "beta")}
    mounted = {
        name: mount(agent, pods[name], m.ref) for name, m in (("alpha", alpha), ("beta", beta))
    }

    agent.stop()
    agent.start()

    with AgentClient(agent.socket) as client:
        info = client.stat(alpha.digest)
        assert [lease.kind for lease in info.leases] == ["csi"]
        with pytest.raises(AgentCallError) as refused:
            client.evict(alpha.digest, force=True)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    for name, (volume, target) in mounted.items():
        assert find_mount(target) is not None
        unmount(agent, pods[name], volume)
        assert find_mount(target) is None
    with AgentClient(agent.socket) as client:
        assert client.evict(alpha.digest).bytes_freed > 0
        assert not client.stat(beta.digest).leases


def test_sigkill_with_a_volume_published_is_reconciled_on_start(
    agent: AgentProcess, origin: Origin
) -> None:
    require_root()
    model = origin.models["gamma"]
    with AgentClient(agent.socket) as client:
        list(client.preheat([model.ref]))
    pod = Pod("pod-k")
    volume, target = mount(agent, pod, model.ref)
    agent.kill()
    agent.start()
    assert find_mount(target) is not None
    with AgentClient(agent.socket) as client:
        assert [lease.kind for lease in client.stat(model.digest).leases] == ["csi"]
    unmount(agent, pod, volume)
    with AgentClient(agent.socket) as client:
        assert not client.stat(model.digest).leases


def test_prefetch_attribute_warms_the_page_cache(agent: AgentProcess, origin: Origin) -> None:
    require_root()
    model = origin.models["beta"]
    with AgentClient(agent.socket) as client:
        list(client.preheat([model.ref]))
        path = Path(client.stat(model.ref).path)
    drop([path])
    with AgentClient(agent.socket) as client:
        cold = client.stat(model.ref)
    pod = Pod("pod-p")
    volume, _ = mount(agent, pod, model.ref, prefetch="true")
    try:
        with AgentClient(agent.socket) as client:
            warm = client.stat(model.ref)
    finally:
        unmount(agent, pod, volume)
    assert cold.resident_bytes < cold.size_bytes // 4
    assert warm.resident_bytes > warm.size_bytes * 0.9


def test_lazy_publish_serves_the_model_while_it_downloads(
    lazy_agent: AgentProcess, origin: Origin
) -> None:
    model = origin.models["beta"]
    pod = Pod("pod-lazy")
    volume, target = mount(lazy_agent, pod, model.ref, mode="lazy")
    try:
        found = find_mount(target)
        assert found is not None and "ro" in found.options
        with kubelet(lazy_agent) as k:  # downloading or done: either way not abnormal
            condition = k.volume_stats(pod, volume).volume_condition
        assert not condition.abnormal, condition.message
        shards = sorted(p for p in target.iterdir() if p.suffix == ".safetensors")
        assert shards, os.listdir(target)
        # The tail first: it must be fetched ahead of the background pull's order.
        with shards[-1].open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(size - 65536)
            tail = f.read()
        assert len(tail) == 65536
        with pytest.raises(OSError, match="Read-only"):
            (target / "new-file").write_text("x")
        with AgentClient(lazy_agent.socket) as client:
            list(client.preheat([model.ref]))
            info = client.stat(model.ref)
        for entry in info.files:
            if entry.path.endswith(".safetensors"):
                data = (target / entry.path).read_bytes()
                assert "sha256:" + hashlib.sha256(data).hexdigest() == entry.blob
    finally:
        unmount(lazy_agent, pod, volume)
    assert find_mount(target) is None


def test_kill_9_leaves_a_stale_fuse_mount_that_the_next_start_clears(
    lazy_agent: AgentProcess,
) -> None:
    fuse_root = lazy_agent.fuse_root
    assert find_mount(fuse_root) is not None
    lazy_agent.kill()
    lazy_agent.start()
    mount = find_mount(fuse_root)
    assert mount is not None and mount.fs_type.startswith("fuse")
    assert os.listdir(fuse_root) == []


def test_lazy_reads_fail_with_eio_once_verification_fails(tmp_path: Path) -> None:
    require_fuse()
    with serve_in_thread(FaultServer()) as server:
        payload, ref = serve_unverifiable(server)
        agent = AgentProcess(
            tmp_path / "agent", insecure=(server.host,), fuse=True, extra={"policy": HTTP_LAZY}
        )
        agent.start()
        pod = Pod("pod-bad")
        try:
            volume, target = mount(agent, pod, ref, mode="lazy")
            with (target / "weights.safetensors").open("rb") as f:
                assert f.read(65536) == payload[:65536]  # served before verification
                wait_until_no_pulls(agent)
                f.seek(60 << 20)
                with pytest.raises(OSError) as failed:
                    f.read(65536)
            assert failed.value.errno == errno.EIO
            assert 'cacheagent_fuse_errors_total{kind="verify"}' in agent.get("/metrics")[1]
            with AgentClient(agent.socket) as client:
                assert not client.list().models
            assert not list((agent.store_root / "blobs").rglob(WRONG_SHA256))
            unmount(agent, pod, volume)
        finally:
            agent.stop()
            agent.cleanup()
