"""The kubelet contract and hostile input, against a running agent over its real CSI socket.

Kubelet-shaped calls go through tests/kubelet.py; hostile ones are raw requests on the same
socket (whoever can reach it need not behave like kubelet).
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from cacheagent._proto.csi.v1 import csi_pb2 as pb
from cacheagent.csi.limits import MAX_CONTEXT_KEYS, MAX_ID_BYTES
from cacheagent.csi.mounts import MS_BIND
from cacheagent.mountinfo import find_mount, mounts_at, read_mountinfo
from tests.agent_process import AgentProcess
from tests.e2e.conftest import Origin
from tests.kubelet import InlineVolume, Kubelet, PersistentVolume, Pod
from tests.mounts import force_unmount, mounts_under
from tests.support import require_root

DRIVER = "model.cacheagent.io"
EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "daemonset" / "examples"
BACKOFF_SCALE = 0.02
Code = grpc.StatusCode
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def cached(agent: AgentProcess, origin: Origin) -> Iterator[tuple[AgentProcess, str]]:
    """A running agent with model alpha already in its store; leftover mounts cleared after."""
    require_root()
    ref = origin.models["alpha"].ref
    assert agent.cli("preheat", ref).returncode == 0
    try:
        yield agent, ref
    finally:
        for _ in range(4):
            for point in reversed(mounts_under(agent.kubelet_dir)):
                force_unmount(point)


def details(error: grpc.RpcError) -> str:
    text: str | None = error.details()
    return text or ""


def kubelet(agent: AgentProcess) -> Kubelet:
    return Kubelet(agent.csi_socket, agent.kubelet_dir, DRIVER, backoff_scale=BACKOFF_SCALE)


def mount_tmpfs(path: Path) -> None:
    if _libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount tmpfs on {path}")


def bind_mount(source: Path, path: Path) -> None:
    if _libc.mount(os.fsencode(source), os.fsencode(path), None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), f"bind {source} on {path}")


def raw_publish(
    k: Kubelet,
    pod: Pod,
    volume: InlineVolume,
    volume_context: dict[str, str] | None = None,
    **changes: str,
) -> grpc.RpcError:
    """A publish request as kubelet would build it, with fields replaced by hostile ones."""
    request = k.publish_request(pod, volume)
    if volume_context is not None:
        request.volume_context.clear()
        request.volume_context.update(volume_context)
    for name, value in changes.items():
        setattr(request, name, value)
    with pytest.raises(grpc.RpcError) as info:
        k.stub.NodePublishVolume(request, timeout=30)
    return info.value


# ------------------------------------------------------------------ item: only our mounts


def test_unpublish_leaves_a_foreign_tmpfs_without_a_journal_row(
    cached: tuple[AgentProcess, str],
) -> None:
    agent, ref = cached
    pod, volume = Pod("pod-t"), InlineVolume("model", {"model": ref}, read_only=True)
    with kubelet(agent) as k:
        target = k.target(pod, volume)
        target.mkdir(parents=True)
        (target.parent / "vol_data.json").write_text(
            json.dumps({"volumeHandle": k.volume_id(pod, volume)})
        )
        mount_tmpfs(target)
        try:
            outcome = k.tear_down(pod, volume)
            assert outcome.code == Code.FAILED_PRECONDITION, outcome
            assert "tmpfs" in outcome.message and "did not make" in outcome.message
            assert [m.fs_type for m in mounts_at(target, read_mountinfo())] == ["tmpfs"]
        finally:
            force_unmount(str(target))
        assert k.tear_down(pod, volume).ok  # nothing there any more: idempotent OK


def test_unpublish_leaves_a_bind_mount_stacked_on_ours(
    cached: tuple[AgentProcess, str], tmp_path: Path
) -> None:
    agent, ref = cached
    pod, volume = Pod("pod-s"), InlineVolume("model", {"model": ref}, read_only=True)
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "theirs").write_text("x")
    with kubelet(agent) as k:
        assert k.set_up(pod, volume).ok
        target = k.target(pod, volume)
        ours = find_mount(target)
        bind_mount(other, target)
        try:
            outcome = k.tear_down(pod, volume)
            assert outcome.code == Code.FAILED_PRECONDITION, outcome
            assert "stacked on volume" in outcome.message and "did not make" in outcome.message
            stack = mounts_at(target, read_mountinfo())
            assert stack[-1] != ours and ours in stack
            assert (target / "theirs").read_text() == "x"  # theirs is still there, on top
        finally:
            force_unmount(str(target))  # the admin takes theirs down
        assert find_mount(target) == ours
        assert k.tear_down(pod, volume).ok
        assert find_mount(target) is None and not target.exists()


# ------------------------------------------------------------------ item: bounded fields


def test_oversized_fields_are_invalid_argument_and_short(cached: tuple[AgentProcess, str]) -> None:
    agent, ref = cached
    pod, volume = Pod("pod-h"), InlineVolume("model", {"model": ref}, read_only=True)
    with kubelet(agent) as k:
        huge_id = raw_publish(k, pod, volume, volume_id="v" * (1 << 20))
        many_keys = raw_publish(
            k, pod, volume, volume_context={"model": ref, **{f"k{i}": "x" for i in range(10_000)}}
        )
        long_value = raw_publish(k, pod, volume, volume_context={"model": ref + "x" * 100_000})
        long_mode = raw_publish(k, pod, volume, volume_context={"model": ref, "mode": "x" * 16_000})
        long_name = raw_publish(
            k, pod, volume, target_path=str(k.root / "pods" / ("n" * 300) / "mount")
        )
    assert huge_id.code() == Code.INVALID_ARGUMENT
    assert f"volume_id is {1 << 20} bytes; the limit is {MAX_ID_BYTES}" in details(huge_id)
    assert many_keys.code() == Code.INVALID_ARGUMENT
    assert f"10001 entries; the limit is {MAX_CONTEXT_KEYS}" in details(many_keys)
    assert long_value.code() == Code.INVALID_ARGUMENT and "'model'" in details(long_value)
    assert long_name.code() == Code.INVALID_ARGUMENT  # was INTERNAL (ENAMETOOLONG)
    assert "255 bytes per component" in details(long_name)
    assert long_mode.code() == Code.INVALID_ARGUMENT and "'mode'" in details(long_mode)
    for error in (huge_id, many_keys, long_value, long_name, long_mode):
        assert len(details(error)) < 2200, details(error)[:200]
    assert mounts_under(agent.kubelet_dir) == []


def test_newlines_cannot_forge_log_lines(cached: tuple[AgentProcess, str]) -> None:
    agent, ref = cached
    forged = "ERROR cacheagent.csi.node: FORGED"
    pod, volume = Pod("pod-n"), InlineVolume("model", {"model": ref}, read_only=True)
    with kubelet(agent) as k:
        by_id = raw_publish(k, pod, volume, volume_id=f"v\n{forged}")
        by_attr = raw_publish(k, pod, volume, volume_context={"model": f"{ref}\n{forged}"})
        unpublished = k.stub.NodeUnpublishVolume
        with pytest.raises(grpc.RpcError) as by_unpublish:
            unpublished(
                pb.NodeUnpublishVolumeRequest(
                    volume_id=f"v\n{forged}", target_path=str(k.target(pod, volume))
                ),
                timeout=30,
            )
    for error in (by_id, by_attr, by_unpublish.value):
        assert error.code() == Code.INVALID_ARGUMENT
        assert "\n" not in details(error)
    assert not any(line.startswith(forged) for line in agent.log_text().splitlines())


# ------------------------------------------------------------------ item: stats conformance


def test_stats_of_an_unknown_volume_is_not_found_whatever_the_path(
    cached: tuple[AgentProcess, str],
) -> None:
    agent, _ = cached
    with kubelet(agent) as k:
        for path in ("relative/path", "/etc", str(k.root / "pods" / "x" / "mount"), "/a\0b"):
            with pytest.raises(grpc.RpcError) as info:
                k.stub.NodeGetVolumeStats(
                    pb.NodeGetVolumeStatsRequest(volume_id="no-such-volume", volume_path=path),
                    timeout=30,
                )
            assert info.value.code() == Code.NOT_FOUND, (path, details(info.value))


def test_stats_of_a_published_volume_do_not_look_full(cached: tuple[AgentProcess, str]) -> None:
    agent, ref = cached
    pod = Pod("pod-st")
    volume = PersistentVolume("pv-st", "model-alpha", {"model": ref})
    with kubelet(agent) as k:
        assert k.set_up(pod, volume).ok
        try:
            stats = k.volume_stats(pod, volume)
        finally:
            assert k.tear_down(pod, volume).ok
    usage = {u.unit: u for u in stats.usage}
    for unit in (pb.VolumeUsage.BYTES, pb.VolumeUsage.INODES):
        assert usage[unit].used > 0 and usage[unit].available > 0
        assert usage[unit].total == usage[unit].used + usage[unit].available
    assert not stats.volume_condition.abnormal


# ------------------------------------------------------------------ item: PVs as kubelet sends them


def test_a_pv_whose_first_access_mode_is_rwx_is_refused_and_cleaned_up(
    cached: tuple[AgentProcess, str],
) -> None:
    agent, ref = cached
    pod = Pod("pod-rwx")
    rwx = PersistentVolume("pv-rwx", "h-rwx", {"model": ref}, ("ReadWriteMany", "ReadOnlyMany"))
    rox = PersistentVolume("pv-rox", "h-rox", {"model": ref}, ("ReadOnlyMany", "ReadWriteMany"))
    with kubelet(agent) as k:
        refused = k.set_up(pod, rwx)
        assert refused.code == Code.INVALID_ARGUMENT and not refused.uncertain
        assert "ReadWriteMany" in refused.message and "first" in refused.message
        assert not k.target(pod, rwx).parent.exists()  # a final error: kubelet cleaned up
        assert k.set_up(pod, rox).ok  # only AccessModes[0] counts
        assert k.tear_down(pod, rox).ok


def test_pv_mount_options_are_honoured_or_refused_by_name(
    cached: tuple[AgentProcess, str],
) -> None:
    agent, ref = cached
    pod = Pod("pod-mo")
    noexec = PersistentVolume("pv-ne", "h-ne", {"model": ref}, mount_options=("noexec",))
    sync = PersistentVolume("pv-sy", "h-sy", {"model": ref}, mount_options=("ro", "sync"))
    with kubelet(agent) as k:
        assert k.set_up(pod, noexec).ok
        mounted = find_mount(k.target(pod, noexec))
        assert mounted is not None and {"ro", "nosuid", "nodev", "noexec"} <= mounted.options
        assert k.tear_down(pod, noexec).ok
        refused = k.set_up(pod, sync)
        assert refused.code == Code.INVALID_ARGUMENT and "'sync'" in refused.message


def test_pv_read_only_flag_does_not_reach_the_driver_but_the_mount_is_read_only(
    cached: tuple[AgentProcess, str],
) -> None:
    """Kubelet sends the claim's readOnly (false here), not the PV's csi.readOnly; on a node
    without SELinux the driver accepts readonly=false and still mounts read-only."""
    agent, ref = cached
    pod = Pod("pod-ro")
    volume = PersistentVolume("pv-ro", "h-ro", {"model": ref}, read_only=True)
    with kubelet(agent) as k:
        assert k.publish_request(pod, volume).readonly is False
        assert k.set_up(pod, volume).ok
        mounted = find_mount(k.target(pod, volume))
        assert mounted is not None and mounted.read_only
        assert k.tear_down(pod, volume).ok


def test_symlinked_pods_dir_as_k0s_microk8s_and_k3s_make_it(tmp_path: Path, origin: Origin) -> None:
    require_root()
    agent = AgentProcess(tmp_path / "agent", insecure=(origin.registry.host,))
    real_pods = tmp_path / "data" / "pods"
    real_pods.mkdir(parents=True)
    agent.kubelet_dir.mkdir(parents=True)
    (agent.kubelet_dir / "pods").symlink_to(real_pods)
    ref = origin.models["gamma"].ref
    pod, volume = Pod("pod-k0s"), InlineVolume("model", {"model": ref}, read_only=True)
    try:
        with agent, kubelet(agent) as k:
            assert k.mount(pod, volume, attempts=12)[-1].ok
            target = k.target(pod, volume)
            real_target = real_pods / pod.uid / "volumes" / "kubernetes.io~csi" / "model" / "mount"
            try:
                assert find_mount(real_target) is not None
                assert (target / "config.json").exists()
                stats = k.volume_stats(pod, volume)
                assert not stats.volume_condition.abnormal
            finally:
                assert k.tear_down(pod, volume).ok
            assert find_mount(real_target) is None and not real_target.exists()
    finally:
        for point in reversed(mounts_under(real_pods)):
            force_unmount(point)


def test_the_static_pv_example_publishes_as_kubelet_would_send_it(
    cached: tuple[AgentProcess, str],
) -> None:
    """deploy/daemonset/examples/static-pv.yaml, as kubelet turns it into a NodePublishVolume
    (only the model reference swapped for the test registry's)."""
    agent, ref = cached
    docs = {
        d["kind"]: d
        for d in yaml.safe_load_all((EXAMPLES / "static-pv.yaml").read_text())
        if d is not None
    }
    pv, pvc, pod_spec = docs["PersistentVolume"], docs["PersistentVolumeClaim"], docs["Pod"]
    assert pv["spec"]["accessModes"][0] == "ReadOnlyMany"
    assert pv["spec"]["claimRef"] == {
        "namespace": pvc["metadata"]["namespace"],
        "name": pvc["metadata"]["name"],
    }
    [claim] = [v["persistentVolumeClaim"] for v in pod_spec["spec"]["volumes"]]
    assert claim["claimName"] == pvc["metadata"]["name"]
    csi = pv["spec"]["csi"]
    volume = PersistentVolume(
        name=pv["metadata"]["name"],
        handle=csi["volumeHandle"],
        attributes={**csi["volumeAttributes"], "model": ref},
        access_modes=tuple(pv["spec"]["accessModes"]),
        mount_options=tuple(pv["spec"].get("mountOptions", ())),
        read_only=csi.get("readOnly", False),
        claim_read_only=claim.get("readOnly", False),
    )
    pod = Pod(pod_spec["metadata"]["name"], pod_spec["metadata"]["namespace"])
    with kubelet(agent) as k:
        assert k.set_up(pod, volume).ok
        try:
            mounted = find_mount(k.target(pod, volume))
            assert mounted is not None and mounted.read_only
        finally:
            assert k.tear_down(pod, volume).ok
