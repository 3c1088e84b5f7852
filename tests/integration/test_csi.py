"""The CSI node driver end to end: real gRPC on a unix socket, real bind mounts, real store.

The client drives the socket the way kubelet does; one test speaks raw protobuf bytes built from
the CSI spec's field numbers, so wire compatibility does not rest on our own generated code.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import os
import socket
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

import cacheagent
from cacheagent._proto.csi.v1 import csi_pb2 as pb
from cacheagent.config import CsiConfig
from cacheagent.csi import start_csi_server
from cacheagent.csi.mounts import MS_BIND
from cacheagent.csi.selinux import SELinux
from cacheagent.errors import (
    CacheFullError,
    ConfigError,
    ModelNotFoundError,
    OriginUnavailableError,
    PolicyDeniedError,
    RefError,
)
from cacheagent.mountinfo import mounts_at, read_mountinfo
from cacheagent.store import ModelFile
from tests.csi_backend import model_ref
from tests.csi_env import DRIVER, NODE, CsiEnv, mount_capability, publish_request
from tests.mounts import mounts_under
from tests.support import require_root

FILES_1 = {
    "config.json": b'{"hidden_size": 8}\n',
    "weights/model-00001.safetensors": os.urandom(300_000),
    "weights/model-00002.safetensors": os.urandom(70_000),
}
FILES_2 = {"config.json": b'{"hidden_size": 16}\n', "tokenizer.json": b"{}"}
Code = grpc.StatusCode

pytestmark = pytest.mark.root


@pytest.fixture
async def env() -> AsyncIterator[CsiEnv]:
    require_root()
    env = CsiEnv.create()
    try:
        env.backend.add_model("m1", FILES_1)
        env.backend.add_model("m2", FILES_2)
        yield env
    finally:
        await env.close()


async def rpc_error(call: Any) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as info:
        await call
    return info.value


def journal_rows(env: CsiEnv) -> list[tuple[str, str]]:
    with sqlite3.connect(env.root / "store" / "index.db") as db:
        return db.execute("SELECT volume_id, target_path FROM publishes ORDER BY 1").fetchall()


def lease_holders(env: CsiEnv) -> set[str]:
    return {lease.holder for lease in env.store.leases()}


def digest_of(env: CsiEnv, name: str) -> str:
    digest = env.store.resolve_tag(model_ref(name))
    assert digest is not None
    return digest


# --------------------------------------------------------------------------- identity and node


async def test_identity(env: CsiEnv) -> None:
    await env.start()
    info = await env.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert (info.name, info.vendor_version) == (DRIVER, cacheagent.__version__)
    caps = await env.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
    assert list(caps.capabilities) == []  # node-only: no CONTROLLER_SERVICE
    probe = await env.identity.Probe(pb.ProbeRequest())
    assert probe.HasField("ready") and probe.ready.value is True
    env.backend.ready = False
    probe = await env.identity.Probe(pb.ProbeRequest())
    assert probe.ready.value is False


async def test_node_info_capabilities_and_unimplemented(env: CsiEnv) -> None:
    await env.start()
    info = await env.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == NODE
    caps = await env.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest())
    assert {c.rpc.type for c in caps.capabilities} == {
        pb.NodeServiceCapability.RPC.GET_VOLUME_STATS,
        pb.NodeServiceCapability.RPC.VOLUME_CONDITION,
    }
    for call in (
        env.node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id="v")),
        env.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id="v")),
        env.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(volume_id="v")),
    ):
        assert (await rpc_error(call)).code() == Code.UNIMPLEMENTED


async def test_node_id_from_environment(env: CsiEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "from-env")
    await env.start(node_id=None)
    assert (await env.node.NodeGetInfo(pb.NodeGetInfoRequest())).node_id == "from-env"


# --------------------------------------------------------------------------- publish


async def test_publish_shows_the_model_read_only(env: CsiEnv) -> None:
    await env.start()
    target = env.target()
    await env.node.NodePublishVolume(publish_request("vol-1", target))

    for path, data in FILES_1.items():
        assert (target / path).read_bytes() == data
    with pytest.raises(OSError) as write:
        (target / "config.json").write_bytes(b"changed")
    assert write.value.errno == errno.EROFS
    with pytest.raises(OSError) as create:
        (target / "new-file").write_bytes(b"x")
    assert create.value.errno == errno.EROFS

    [mount] = mounts_at(target, read_mountinfo())
    assert {"ro", "nosuid", "nodev"} <= mount.options
    assert mount.root.endswith(digest_of(env, "m1").split(":")[1])
    holder = f"csi:vol-1:{target}"
    assert holder in lease_holders(env)
    assert journal_rows(env) == [("vol-1", str(target))]

    await env.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=str(target))
    )
    assert mounts_under(env.kubelet) == []
    assert not target.exists()
    assert holder not in lease_holders(env)
    assert journal_rows(env) == []


async def test_publish_is_idempotent(env: CsiEnv) -> None:
    await env.start()
    target = env.target()
    request = publish_request("vol-1", target)
    await env.node.NodePublishVolume(request)
    await env.node.NodePublishVolume(request)
    await asyncio.gather(*(env.node.NodePublishVolume(request) for _ in range(5)))
    assert len(mounts_at(target, read_mountinfo())) == 1
    assert journal_rows(env) == [("vol-1", str(target))]


async def test_writer_modes_still_get_a_read_only_mount(env: CsiEnv) -> None:
    await env.start()
    modes = pb.VolumeCapability.AccessMode
    for mode in (
        modes.SINGLE_NODE_WRITER,
        modes.SINGLE_NODE_MULTI_WRITER,
        modes.MULTI_NODE_READER_ONLY,
    ):
        target = env.target()
        request = publish_request(f"vol-{mode}", target)
        request.readonly = False
        request.volume_capability.CopyFrom(mount_capability(mode))
        await env.node.NodePublishVolume(request)
        [mount] = mounts_at(target, read_mountinfo())
        assert mount.read_only


async def test_many_volumes_at_once(env: CsiEnv) -> None:
    await env.start()
    targets = [env.target() for _ in range(12)]
    await asyncio.gather(
        *(
            env.node.NodePublishVolume(publish_request(f"vol-{i}", t, "m1" if i % 2 else "m2"))
            for i, t in enumerate(targets)
        )
    )
    assert sorted(mounts_under(env.kubelet)) == sorted(map(str, targets))
    assert len(lease_holders(env)) == 12
    await asyncio.gather(
        *(
            env.node.NodeUnpublishVolume(
                pb.NodeUnpublishVolumeRequest(volume_id=f"vol-{i}", target_path=str(t))
            )
            for i, t in enumerate(targets)
        )
    )
    assert mounts_under(env.kubelet) == [] and journal_rows(env) == []
    assert lease_holders(env) == set()


async def test_occupied_target_is_already_exists(env: CsiEnv) -> None:
    await env.start()
    target = env.target()
    await env.node.NodePublishVolume(publish_request("vol-1", target, "m1"))
    other_volume = await rpc_error(env.node.NodePublishVolume(publish_request("vol-2", target)))
    assert other_volume.code() == Code.ALREADY_EXISTS
    assert "vol-1" in (other_volume.details() or "")
    other_model = await rpc_error(
        env.node.NodePublishVolume(publish_request("vol-1", target, "m2"))
    )
    assert other_model.code() == Code.ALREADY_EXISTS
    other_mode = publish_request("vol-1", target, "m1", mode="lazy")
    assert (await rpc_error(env.node.NodePublishVolume(other_mode))).code() == Code.ALREADY_EXISTS
    [mount] = mounts_at(target, read_mountinfo())
    assert (target / "config.json").read_bytes() == FILES_1["config.json"]
    assert mount.read_only


async def test_foreign_mount_on_target_is_already_exists(env: CsiEnv) -> None:
    await env.start()
    target = env.target()
    target.mkdir()
    foreign = env.root / "foreign"
    foreign.mkdir()
    _bind(foreign, target)
    error = await rpc_error(env.node.NodePublishVolume(publish_request("vol-1", target)))
    assert error.code() == Code.ALREADY_EXISTS
    assert "not made by this driver" in (error.details() or "")
    assert journal_rows(env) == []


async def test_same_volume_on_two_targets(env: CsiEnv) -> None:
    await env.start()
    first, second = env.target(), env.target()
    await env.node.NodePublishVolume(publish_request("vol-1", first))
    await env.node.NodePublishVolume(publish_request("vol-1", second))
    assert set(mounts_under(env.kubelet)) == {str(first), str(second)}
    await env.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=str(first))
    )
    assert mounts_under(env.kubelet) == [str(second)]
    assert (second / "config.json").exists()


async def test_unpublish_is_idempotent(env: CsiEnv) -> None:
    await env.start()
    target = env.target()
    unpublish = pb.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=str(target))
    await env.node.NodeUnpublishVolume(unpublish)  # never published, target missing: OK
    await env.node.NodePublishVolume(publish_request("vol-1", target))
    await env.node.NodeUnpublishVolume(unpublish)
    await env.node.NodeUnpublishVolume(unpublish)
    assert mounts_under(env.kubelet) == []
    assert journal_rows(env) == []


async def test_unpublish_of_a_busy_mount_keeps_everything(env: CsiEnv) -> None:
    await env.start()
    target = env.target()
    await env.node.NodePublishVolume(publish_request("vol-1", target))
    unpublish = pb.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=str(target))
    busy = os.open(target / "config.json", os.O_RDONLY)
    try:
        error = await rpc_error(env.node.NodeUnpublishVolume(unpublish))
        assert error.code() == Code.FAILED_PRECONDITION
        assert "busy" in (error.details() or "")
        assert mounts_under(env.kubelet) == [str(target)]
        assert journal_rows(env) == [("vol-1", str(target))]
        assert f"csi:vol-1:{target}" in lease_holders(env)
    finally:
        os.close(busy)
    await env.node.NodeUnpublishVolume(unpublish)
    assert mounts_under(env.kubelet) == []
    assert lease_holders(env) == set()


# --------------------------------------------------------------------------- validation


def _request(**changes: Any) -> Any:
    return pb.NodePublishVolumeRequest(**changes)


INVALID_PUBLISHES: dict[str, tuple[Callable[[Path], Any], str]] = {
    "no volume_id": (lambda t: publish_request("", t), "volume_id"),
    "no target_path": (lambda t: publish_request("v", ""), "target_path"),
    "no capability": (
        lambda t: _request(volume_id="v", target_path=str(t), volume_context={"model": "x/y"}),
        "volume_capability",
    ),
    "block": (
        lambda t: _request(
            volume_id="v",
            target_path=str(t),
            volume_capability=pb.VolumeCapability(
                block=pb.VolumeCapability.BlockVolume(),
                access_mode=pb.VolumeCapability.AccessMode(
                    mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
                ),
            ),
            volume_context={"model": model_ref("m1")},
        ),
        "block",
    ),
    "no access type": (
        lambda t: _request(
            volume_id="v",
            target_path=str(t),
            volume_capability=pb.VolumeCapability(
                access_mode=pb.VolumeCapability.AccessMode(
                    mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
                )
            ),
            volume_context={"model": model_ref("m1")},
        ),
        "mount",
    ),
    "no access mode": (
        lambda t: _request(
            volume_id="v",
            target_path=str(t),
            volume_capability=mount_capability(pb.VolumeCapability.AccessMode.UNKNOWN),
            volume_context={"model": model_ref("m1")},
        ),
        "access_mode",
    ),
    "multi-node writer": (
        lambda t: _request(
            volume_id="v",
            target_path=str(t),
            volume_capability=mount_capability(
                pb.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER
            ),
            volume_context={"model": model_ref("m1")},
        ),
        "MULTI_NODE_MULTI_WRITER",
    ),
    "no model": (lambda t: publish_request("v", t, None), "'model' is required"),
    "bad model": (
        lambda t: _request(
            volume_id="v",
            target_path=str(t),
            volume_capability=mount_capability(),
            volume_context={"model": "oci-layout://relative/dir:v1"},
        ),
        "'model'",
    ),
    "unknown attribute": (lambda t: publish_request("v", t, prefech="true"), "'prefech'"),
    "bad mode": (lambda t: publish_request("v", t, mode="copy"), "'mode'"),
    "bad prefetch": (lambda t: publish_request("v", t, prefetch="yes"), "'prefetch'"),
    "bad gpus": (lambda t: publish_request("v", t, gpus="0,,1"), "'gpus'"),
    "relative target": (lambda t: publish_request("v", "pods/x/mount"), "absolute"),
    "dotdot target": (
        lambda t: publish_request("v", f"{t.parent}/../../../../etc"),
        "normalised",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_PUBLISHES))
async def test_invalid_publish_arguments(env: CsiEnv, case: str) -> None:
    await env.start()
    build, expected = INVALID_PUBLISHES[case]
    error = await rpc_error(env.node.NodePublishVolume(build(env.target())))
    assert error.code() == Code.INVALID_ARGUMENT
    assert expected in (error.details() or "")
    assert mounts_under(env.root) == []
    assert journal_rows(env) == []


async def test_invalid_unpublish_and_stats_arguments(env: CsiEnv) -> None:
    await env.start()
    target = str(env.target())
    for call in (
        env.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(target_path=target)),
        env.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="v")),
        env.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_path=target)),
        env.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="v")),
    ):
        assert (await rpc_error(call)).code() == Code.INVALID_ARGUMENT


async def test_target_outside_kubelet_dir_is_refused(env: CsiEnv) -> None:
    await env.start()
    outside = env.root / "elsewhere" / "mount"
    outside.parent.mkdir()
    error = await rpc_error(env.node.NodePublishVolume(publish_request("v", outside)))
    assert error.code() == Code.INVALID_ARGUMENT
    assert "kubelet directory" in (error.details() or "")
    unpublish = pb.NodeUnpublishVolumeRequest(volume_id="v", target_path=str(outside))
    assert (
        await rpc_error(env.node.NodeUnpublishVolume(unpublish))
    ).code() == Code.INVALID_ARGUMENT
    assert mounts_under(env.root) == []


async def test_symlinked_targets_are_refused(env: CsiEnv) -> None:
    await env.start()
    outside = env.root / "host-dir"
    outside.mkdir()
    (outside / "mount").mkdir()
    # A symlink in the middle of the path...
    pod = env.kubelet / "pods" / "evil"
    pod.mkdir()
    (pod / "volumes").symlink_to(outside)
    middle = pod / "volumes" / "mount"
    # ...and a symlink as the target itself.
    leaf_parent = env.target().parent
    leaf = leaf_parent / "mount"
    leaf.symlink_to(outside / "mount")
    for target in (middle, leaf):
        error = await rpc_error(env.node.NodePublishVolume(publish_request("v", target)))
        assert error.code() == Code.PERMISSION_DENIED
        assert "symlink" in (error.details() or "")
    assert mounts_under(env.root) == []
    assert os.listdir(outside / "mount") == []
    assert journal_rows(env) == []


async def test_kubelet_dir_given_through_a_symlink(env: CsiEnv) -> None:
    alias = env.root / "kubelet-alias"
    alias.symlink_to(env.kubelet)
    await env.start(kubelet_dir=alias)
    target = env.target()
    as_kubelet_sees_it = alias / target.relative_to(env.kubelet)
    await env.node.NodePublishVolume(publish_request("vol-1", as_kubelet_sees_it))
    assert mounts_under(env.kubelet) == [str(target)]
    await env.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=str(as_kubelet_sees_it))
    )
    assert mounts_under(env.kubelet) == []


async def test_missing_parent_is_failed_precondition(env: CsiEnv) -> None:
    await env.start()
    target = env.target(make_parent=False)
    error = await rpc_error(env.node.NodePublishVolume(publish_request("v", target)))
    assert error.code() == Code.FAILED_PRECONDITION
    assert journal_rows(env) == [] and lease_holders(env) == set()


# --------------------------------------------------------------------------- errors from the agent


async def test_policy_denial_names_the_rule(env: CsiEnv) -> None:
    env.backend.denied_namespaces["team-b"] = "policy.namespaces.team-b"
    await env.start()
    request = publish_request("v", env.target(), **{"csi.storage.k8s.io/pod.namespace": "team-b"})
    error = await rpc_error(env.node.NodePublishVolume(request))
    assert error.code() == Code.PERMISSION_DENIED
    assert "policy.namespaces.team-b" in (error.details() or "")
    allowed = publish_request("v", env.target(), **{"csi.storage.k8s.io/pod.namespace": "team-a"})
    await env.node.NodePublishVolume(allowed)


BACKEND_ERRORS = {
    "not found": (ModelNotFoundError("no such model"), Code.NOT_FOUND),
    "origin down": (OriginUnavailableError("registry unreachable"), Code.UNAVAILABLE),
    "cache full": (CacheFullError(10, 5), Code.RESOURCE_EXHAUSTED),
    "policy": (PolicyDeniedError("source not allowed", "allowed_sources"), Code.PERMISSION_DENIED),
    "ref": (RefError("x", "tag", "bad"), Code.INVALID_ARGUMENT),
    "bug": (RuntimeError("boom"), Code.INTERNAL),
}


@pytest.mark.parametrize("case", sorted(BACKEND_ERRORS))
async def test_agent_errors_map_to_codes(env: CsiEnv, case: str) -> None:
    exc, code = BACKEND_ERRORS[case]
    env.backend.failures[model_ref("m3")] = exc
    await env.start()
    error = await rpc_error(env.node.NodePublishVolume(publish_request("v", env.target(), "m3")))
    assert error.code() == code
    assert str(exc) in (error.details() or "")
    assert journal_rows(env) == [] and lease_holders(env) == set()
    assert env.operations[-1][:2] == ("NodePublishVolume", code.name)


# --------------------------------------------------------------------------- downloads


async def test_still_pulling_is_unavailable_quickly_then_published(env: CsiEnv) -> None:
    release = env.backend.start_pull("m3", FILES_2)
    await env.start(publish_wait_seconds=0.3)
    target = env.target()
    request = publish_request("vol-1", target, "m3")
    for _ in range(2):
        started = time.monotonic()
        error = await rpc_error(env.node.NodePublishVolume(request))
        assert time.monotonic() - started < 3.0
        assert error.code() == Code.UNAVAILABLE
        assert "still downloading: 25%" in (error.details() or "")
    others = [publish_request(f"vol-{i}", env.target(), "m3") for i in range(2, 6)]
    results = await asyncio.gather(
        *(env.node.NodePublishVolume(r) for r in others), return_exceptions=True
    )
    assert all(isinstance(r, aio.AioRpcError) for r in results)
    assert env.backend.pulls_started == 1  # every publish joined the one pull
    assert mounts_under(env.kubelet) == [] and journal_rows(env) == []
    release.set()
    await env.node.NodePublishVolume(request)
    assert (target / "tokenizer.json").read_bytes() == b"{}"
    assert env.backend.pulls_started == 1


async def test_pods_sharing_a_static_pv_wait_side_by_side(env: CsiEnv) -> None:
    """One volume id (a static PV) published at several targets: the waits must not queue on
    a per-volume lock, or the last pod's publish times out once per pod before it."""
    release = env.backend.start_pull("m3", FILES_2)
    await env.start(publish_wait_seconds=20.0)
    targets = [env.target() for _ in range(4)]
    publishes = [
        asyncio.ensure_future(env.node.NodePublishVolume(publish_request("pv-shared", t, "m3")))
        for t in targets
    ]
    deadline = time.monotonic() + 10.0
    while env.backend.waiting < len(targets):
        assert time.monotonic() < deadline, f"only {env.backend.waiting} waited at once"
        await asyncio.sleep(0.01)
    release.set()
    await asyncio.gather(*publishes)
    assert sorted(mounts_under(env.kubelet)) == sorted(map(str, targets))
    assert env.backend.pulls_started == 1


def test_publish_wait_default_fits_kubelets_deadline() -> None:
    assert 100.0 <= CsiConfig().publish_wait_seconds < 120.0


async def test_wait_is_bounded_by_the_request_deadline(env: CsiEnv) -> None:
    env.backend.start_pull("m3", FILES_2)
    await env.start(publish_wait_seconds=60.0)
    started = time.monotonic()
    error = await rpc_error(
        env.node.NodePublishVolume(publish_request("v", env.target(), "m3"), timeout=3.5)
    )
    # The driver answers (UNAVAILABLE) before the client's deadline, not DEADLINE_EXCEEDED.
    assert error.code() == Code.UNAVAILABLE
    assert time.monotonic() - started < 3.5


async def test_prefetch_runs_before_publish_returns(env: CsiEnv) -> None:
    env.backend.prefetch_delay = 0.2
    await env.start()
    request = publish_request("v", env.target(), prefetch="true", gpus="0,1")
    await env.node.NodePublishVolume(request)
    assert env.backend.prefetched == [(digest_of(env, "m1"), ("0", "1"))]
    await env.node.NodePublishVolume(request)  # idempotent repeat: no second warm-up
    assert len(env.backend.prefetched) == 1


async def test_lazy_mode_mounts_the_fuse_view(env: CsiEnv) -> None:
    await env.start()
    failed = await rpc_error(
        env.node.NodePublishVolume(publish_request("v", env.target(), mode="lazy"))
    )
    assert failed.code() == Code.FAILED_PRECONDITION
    lazy_root = env.root / "fuse"
    view = lazy_root / digest_of(env, "m1").split(":")[1]
    view.mkdir(parents=True)
    (view / "partial.bin").write_bytes(b"served while downloading")
    env.backend.lazy_root = lazy_root
    target = env.target()
    await env.node.NodePublishVolume(publish_request("v", target, mode="lazy"))
    assert (target / "partial.bin").read_bytes() == b"served while downloading"
    [mount] = mounts_at(target, read_mountinfo())
    assert mount.read_only


# --------------------------------------------------------------------------- stats


async def test_volume_stats_and_condition(env: CsiEnv) -> None:
    await env.start()
    target = env.target()
    await env.node.NodePublishVolume(publish_request("vol-1", target))
    request = pb.NodeGetVolumeStatsRequest(volume_id="vol-1", volume_path=str(target))
    stats = await env.node.NodeGetVolumeStats(request)
    usage = {u.unit: u for u in stats.usage}
    space = os.statvfs(env.root / "store")
    nbytes, inodes = usage[pb.VolumeUsage.BYTES], usage[pb.VolumeUsage.INODES]
    assert nbytes.used == sum(len(b) for b in FILES_1.values())
    assert inodes.used == len(FILES_1) + 2  # files + root + weights/
    # available is the store's free space (never 0 on a disk with room: no FillingUp alert)
    assert abs(nbytes.available - space.f_bavail * space.f_frsize) < 64 << 20
    assert nbytes.available > 0 and inodes.available > 0
    assert nbytes.total == nbytes.used + nbytes.available
    assert inodes.total == inodes.used + inodes.available
    assert not stats.volume_condition.abnormal

    model_dir = env.store.model_path(digest_of(env, "m1"))
    (model_dir / "weights" / "model-00002.safetensors").unlink()  # damage behind the store
    stats = await env.node.NodeGetVolumeStats(request)
    assert stats.volume_condition.abnormal
    assert "model-00002.safetensors" in stats.volume_condition.message

    unknown = pb.NodeGetVolumeStatsRequest(volume_id="vol-9", volume_path=str(target))
    assert (await rpc_error(env.node.NodeGetVolumeStats(unknown))).code() == Code.NOT_FOUND


async def test_a_lazy_model_still_downloading_is_not_abnormal(env: CsiEnv) -> None:
    data = b"first shard"
    manifest = b'{"pending": true}'
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    entry = ModelFile("weights.bin", "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
    env.store.put_pending(digest, [entry], ref=None, source_kind="oci", manifest=manifest)
    env.store.set_tag(model_ref("m9"), digest, 3600.0)
    lazy_root = env.root / "fuse"
    (lazy_root / digest.split(":")[1]).mkdir(parents=True)
    env.backend.lazy_root = lazy_root
    await env.start()
    target = env.target()
    await env.node.NodePublishVolume(publish_request("vol-z", target, "m9", mode="lazy"))
    stats = await env.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id="vol-z", volume_path=str(target))
    )
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    assert "downloading" in stats.volume_condition.message
    assert {u.unit: u.used for u in stats.usage}[pb.VolumeUsage.BYTES] == len(data)
    # A model that is neither complete nor downloading is abnormal.
    env.store.release_lease(f"csi:vol-z:{target}")
    env.store.remove_model(digest, force=True)
    stats = await env.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id="vol-z", volume_path=str(target))
    )
    assert stats.volume_condition.abnormal


async def test_volume_condition_reports_a_vanished_mount(env: CsiEnv) -> None:
    await env.start()
    target = env.target()
    await env.node.NodePublishVolume(publish_request("vol-1", target))
    _unmount(target)  # someone else unmounts it
    stats = await env.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id="vol-1", volume_path=str(target))
    )
    assert stats.volume_condition.abnormal
    assert "gone" in stats.volume_condition.message
    await env.node.NodePublishVolume(publish_request("vol-1", target))  # repairs it
    assert mounts_under(env.kubelet) == [str(target)]


# --------------------------------------------------------------------------- restart


async def test_restart_keeps_live_mounts_and_drops_stale_rows(env: CsiEnv) -> None:
    await env.start()
    live, lost = env.target(), env.target()
    await env.node.NodePublishVolume(publish_request("vol-live", live))
    await env.node.NodePublishVolume(publish_request("vol-lost", lost, "m2"))
    await env.stop()
    _unmount(lost)  # as if the node had rebooted, for this one
    env.reopen_store()

    await env.start()
    assert journal_rows(env) == [("vol-live", str(live))]
    assert lease_holders(env) == {f"csi:vol-live:{live}"}
    assert (live / "config.json").read_bytes() == FILES_1["config.json"]
    await env.node.NodePublishVolume(publish_request("vol-live", live))  # still idempotent
    assert len(mounts_at(live, read_mountinfo())) == 1
    await env.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id="vol-live", target_path=str(live))
    )
    assert mounts_under(env.kubelet) == [] and lease_holders(env) == set()


async def test_orphan_mount_of_a_model_is_adopted(env: CsiEnv) -> None:
    target = env.target()
    target.mkdir()
    _bind(env.store.model_path(digest_of(env, "m1")), target)
    await env.start()
    assert journal_rows(env) == [("", str(target))]
    assert lease_holders(env) == {f"csi::{target}"}
    await env.node.NodePublishVolume(publish_request("vol-1", target))
    assert len(mounts_at(target, read_mountinfo())) == 1
    assert journal_rows(env) == [("vol-1", str(target))]
    assert lease_holders(env) == {f"csi:vol-1:{target}"}
    await env.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=str(target))
    )
    assert mounts_under(env.kubelet) == [] and lease_holders(env) == set()


# --------------------------------------------------------------------------- socket and metrics


async def test_socket_permissions_stale_and_live(env: CsiEnv) -> None:
    env.socket.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(env.socket))
    stale.close()  # a socket file nobody listens on: what a crashed agent leaves
    await env.start()
    assert stat.S_IMODE(env.socket.stat().st_mode) == 0o660
    assert (await env.identity.Probe(pb.ProbeRequest())).ready.value
    with pytest.raises(ConfigError, match="in use"):
        await env.start()
    (env.root / "not-a-socket").write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        await start_csi_server(
            env.root / "not-a-socket",
            DRIVER,
            NODE,
            env.kubelet,
            env.backend,
            store_root=env.root / "store",
        )


async def test_operations_are_observed(env: CsiEnv) -> None:
    await env.start()
    target = env.target()
    await env.node.NodePublishVolume(publish_request("v", target))
    await rpc_error(env.node.NodePublishVolume(publish_request("", target)))
    codes = [(method, code) for method, code, _ in env.operations]
    assert codes == [("NodePublishVolume", "OK"), ("NodePublishVolume", "INVALID_ARGUMENT")]
    assert all(seconds >= 0 for *_, seconds in env.operations)


# --------------------------------------------------------------------------- wire compatibility


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    """Protobuf wire format by hand: varint (type 0) for ints, length-delimited (type 2)."""
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _strings(message: bytes) -> dict[int, bytes]:
    """Top-level length-delimited fields of a message (enough for the responses read here)."""
    fields, i = {}, 0
    while i < len(message):
        key, shift = 0, 0
        while True:
            key |= (message[i] & 0x7F) << shift
            shift += 7
            i += 1
            if not message[i - 1] & 0x80:
                break
        number, kind = key >> 3, key & 7
        assert kind == 2, f"unexpected wire type {kind}"
        size, shift = 0, 0
        while True:
            size |= (message[i] & 0x7F) << shift
            shift += 7
            i += 1
            if not message[i - 1] & 0x80:
                break
        fields[number] = message[i : i + size]
        i += size
    return fields


async def test_wire_compatibility_with_the_spec(env: CsiEnv) -> None:
    """Raw calls on the spec's method paths with bytes built from the spec's field numbers."""
    await env.start()
    target = env.target()

    def call(path: str, body: bytes) -> Any:
        assert env.channel is not None
        return env.channel.unary_unary(path, None, None)(body)

    info = _strings(await call("/csi.v1.Identity/GetPluginInfo", b""))
    assert info[1] == DRIVER.encode() and info[2] == cacheagent.__version__.encode()
    assert _strings(await call("/csi.v1.Node/NodeGetInfo", b""))[1] == NODE.encode()

    # NodePublishVolumeRequest: volume_id=1, target_path=4, volume_capability=5
    # (mount=2, access_mode=3 {mode=1: MULTI_NODE_READER_ONLY=3}), readonly=6, volume_context=8.
    capability = _field(2, b"") + _field(3, _field(1, 3))
    context = _field(8, _field(1, b"model") + _field(2, model_ref("m1").encode()))
    body = (
        _field(1, b"vol-wire")
        + _field(4, str(target).encode())
        + _field(5, capability)
        + _field(6, 1)
        + context
    )
    assert await call("/csi.v1.Node/NodePublishVolume", body) == b""
    assert (target / "config.json").read_bytes() == FILES_1["config.json"]
    # NodeUnpublishVolumeRequest: volume_id=1, target_path=2.
    unpublish = _field(1, b"vol-wire") + _field(2, str(target).encode())
    assert await call("/csi.v1.Node/NodeUnpublishVolume", unpublish) == b""
    assert mounts_under(env.kubelet) == []


_libc = ctypes.CDLL(None, use_errno=True)


def _bind(source: Path, target: Path) -> None:
    if _libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), f"bind {source} -> {target}")


def _unmount(target: Path) -> None:
    if _libc.umount2(os.fsencode(target), 0) != 0:
        raise OSError(ctypes.get_errno(), f"umount {target}")


# --------------------------------------------------------------------------- SELinux


class FakeXattrs:
    """The security.selinux xattr at the syscall boundary: SELinux cannot run on this machine."""

    def __init__(self) -> None:
        self.labels: dict[str, bytes] = {}
        self.writes: list[tuple[str, str, bytes]] = []

    def getxattr(self, path: str, name: str) -> bytes:
        if path not in self.labels:
            raise OSError(errno.ENODATA, "No data available", path)
        return self.labels[path]

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        self.writes.append((path, name, value))
        self.labels[path] = value


async def test_selinux_nodes_label_the_model_tree_for_containers(env: CsiEnv) -> None:
    xattrs = FakeXattrs()
    selinux = SELinux(enabled=True, getxattr=xattrs.getxattr, setxattr=xattrs.setxattr)
    await env.start(selinux=selinux)
    tree = env.store.model_path(digest_of(env, "m1"))
    await env.node.NodePublishVolume(publish_request("vol-1", env.target()))
    expected = {str(tree), str(tree / "weights"), *(str(tree / p) for p in FILES_1)}
    assert {path for path, _, _ in xattrs.writes} == expected
    assert {(name, value) for _, name, value in xattrs.writes} == {
        ("security.selinux", b"system_u:object_r:container_ro_file_t:s0\0")
    }
    await env.node.NodePublishVolume(publish_request("vol-2", env.target()))
    assert len(xattrs.writes) == len(expected)  # already labelled: nothing written again

    lazy_root = env.root / "fuse"
    (lazy_root / digest_of(env, "m2").split(":")[1]).mkdir(parents=True)
    env.backend.lazy_root = lazy_root
    await env.node.NodePublishVolume(publish_request("vol-l", env.target(), "m2", mode="lazy"))
    assert len(xattrs.writes) == len(expected)  # FUSE files take the FUSE mount's label

    request = publish_request("vol-3", env.target())
    request.readonly = False
    refused = await rpc_error(env.node.NodePublishVolume(request))
    assert refused.code() == Code.INVALID_ARGUMENT
    assert "readOnly: true" in (refused.details() or "")


async def test_without_selinux_nothing_is_labelled_and_readonly_false_is_accepted(
    env: CsiEnv,
) -> None:
    xattrs = FakeXattrs()
    await env.start(
        selinux=SELinux(enabled=False, getxattr=xattrs.getxattr, setxattr=xattrs.setxattr)
    )
    request = publish_request("vol-1", env.target())
    request.readonly = False
    await env.node.NodePublishVolume(request)
    assert xattrs.writes == []
    [mount] = mounts_at(request.target_path, read_mountinfo())
    assert mount.read_only


async def test_a_label_the_kernel_refuses_is_a_clear_failure(env: CsiEnv) -> None:
    def refuse(path: str, name: str, value: bytes) -> None:
        raise OSError(errno.EACCES, "Permission denied", path)

    xattrs = FakeXattrs()
    await env.start(selinux=SELinux(enabled=True, getxattr=xattrs.getxattr, setxattr=refuse))
    failed = await rpc_error(env.node.NodePublishVolume(publish_request("v", env.target())))
    assert failed.code() == Code.FAILED_PRECONDITION
    assert "container_ro_file_t" in (failed.details() or "")
    assert journal_rows(env) == [] and lease_holders(env) == set()
    assert mounts_under(env.kubelet) == []
