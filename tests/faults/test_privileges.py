"""The privileged agent refuses what a caller of its sockets must not get, and keeps secrets.

CSI targets outside the kubelet directory or through a symlink planted below it, mounts from a
namespace the policy does not allow, pulls from a source the policy does not allow: refused with
the right code and a message naming the rule or the path, and nothing mounted anywhere. The API
and CSI sockets are created without access for other users. Registry credentials (a basic-auth
registry, a Docker ``config.json``) never appear in the agent's log, at any level, nor in the
CLI's output or the metrics, whether the pull succeeds or is rejected.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
from pathlib import Path

import grpc
import pytest

from cacheagent.mountinfo import mounts_at, read_mountinfo
from tests.agent_process import AgentProcess
from tests.faults.harness import (
    OK,
    LayoutModel,
    Rig,
    make_model,
    mounts,
    preheat_failure,
    preheat_ok,
    publish,
    target_path,
    unpublish,
)
from tests.oci_push import OciPusher, modelpack_artifact
from tests.registry_server import BasicAuth, RegistryServer
from tests.support import require_binary

pytestmark = [pytest.mark.root, pytest.mark.registry]

NAMESPACE = "csi.storage.k8s.io/pod.namespace"
PASSWORD = "s3cret-Pa55word-4-fault-suite"


@pytest.fixture
def model(tmp_path: Path) -> LayoutModel:
    return make_model(tmp_path / "allowed" / "m", seed=21, weight_bytes=256 * 1024)


def outside_dir(rig: Rig) -> Path:
    outside = rig.root / "outside"
    outside.mkdir(exist_ok=True)
    return outside


def nothing_mounted(rig: Rig, agent: AgentProcess) -> None:
    assert mounts(agent) == []
    assert [
        m for m in read_mountinfo() if m.mount_point.startswith(str(rig.root / "outside"))
    ] == []


# --------------------------------------------------------------------------- CSI targets


def test_targets_outside_the_kubelet_dir(rig: Rig, model: LayoutModel) -> None:
    agent = rig.agent().start()
    outside = outside_dir(rig)
    for target in (
        outside / "mount",
        agent.kubelet_dir / "pods" / ".." / ".." / "outside" / "mount",
        "relative/pods/x/mount",
    ):
        code, message = publish(agent, "vol-1", target, model.ref)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, message
        assert "kubelet directory" in message or "normalised" in message or "absolute" in message
    code, message = unpublish(agent, "vol-1", outside / "mount")
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    nothing_mounted(rig, agent)


def test_symlinked_parent_below_the_kubelet_dir(rig: Rig, model: LayoutModel) -> None:
    agent = rig.agent().start()
    outside = outside_dir(rig)
    legit = target_path(agent)
    planted = legit.parent.parent / "planted"
    planted.symlink_to(outside)
    code, message = publish(agent, "vol-1", planted / "mount", model.ref)
    assert code == grpc.StatusCode.PERMISSION_DENIED, message
    assert "symlink" in message and "planted" in message, message
    assert not (outside / "mount").exists()
    nothing_mounted(rig, agent)


def test_symlinked_target(rig: Rig, model: LayoutModel) -> None:
    """The target itself is a symlink to a mounted host directory: neither publish nor unpublish
    may act through it."""
    agent = rig.agent().start()
    outside = outside_dir(rig)
    host_mount = outside / "host"
    host_mount.mkdir()
    subprocess.run(
        [require_binary("mount"), "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(host_mount)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    target = target_path(agent)
    target.symlink_to(host_mount)
    code, message = publish(agent, "vol-1", target, model.ref)
    assert code == grpc.StatusCode.PERMISSION_DENIED, message
    code, message = unpublish(agent, "vol-1", target)
    assert code == grpc.StatusCode.PERMISSION_DENIED, message
    [still] = mounts_at(host_mount, read_mountinfo())
    assert still.fs_type == "tmpfs"
    assert mounts(agent) == []


# --------------------------------------------------------------------------- policy


def test_policy_denies_namespaces_and_sources(rig: Rig, model: LayoutModel, tmp_path: Path) -> None:
    allowed = f"oci-layout://{tmp_path / 'allowed'}/*"
    policy = {
        "allowed_sources": [allowed],
        "namespaces": {"team-a": [allowed], "team-b": ["registry.example.com/*"]},
    }
    agent = rig.agent(extra={"policy": policy}).start()
    elsewhere = make_model(tmp_path / "elsewhere" / "m", seed=22, weight_bytes=1024)

    code, message = preheat_failure(agent, elsewhere.ref)
    assert code == "PERMISSION_DENIED" and "policy.allowed_sources" in message, message

    for context, words in (
        ({NAMESPACE: "team-b"}, "namespace team-b may not mount"),
        ({NAMESPACE: "team-c"}, "no namespace rule matches namespace team-c"),
        ({}, "namespace is unknown"),
    ):
        target = target_path(agent)
        status, message = publish(agent, "vol-x", target, model.ref, context)
        assert status == grpc.StatusCode.PERMISSION_DENIED, message
        assert words in message and "policy.namespaces" in message, message
        assert not target.exists()
    assert mounts(agent) == []

    target = target_path(agent)
    assert publish(agent, "vol-a", target, model.ref, {NAMESPACE: "team-a"}) == (OK, "")
    [mount] = mounts_at(target, read_mountinfo())
    assert {"ro", "nosuid", "nodev"} <= mount.options
    assert unpublish(agent, "vol-a", target) == (OK, "")
    assert mounts(agent) == []


# --------------------------------------------------------------------------- sockets and ports


def test_sockets_are_not_open_to_other_users(rig: Rig) -> None:
    agent = rig.agent().start()
    for path in (agent.socket, agent.csi_socket):
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) in (0o600, 0o660), f"{path}: {oct(st.st_mode)}"
        parent = stat.S_IMODE(path.parent.stat().st_mode)
        assert parent & 0o002 == 0, f"{path.parent} is world-writable: {oct(parent)}"
    assert agent.get("/healthz")[0] == 200
    for url in ("/", "/v1/models", "/debug/pprof", "/metrics/../agent.sock"):
        assert agent.get(url)[0] == 404, url


# --------------------------------------------------------------------------- credentials


def docker_config(path: Path, host: str, user: str, password: str) -> Path:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    path.chmod(0o600)
    return path


def registry_agent(
    rig: Rig, name: str, registry: RegistryServer, work: Path, password: str
) -> AgentProcess:
    """An agent logging at debug level whose Docker config holds ``alice:<password>``."""
    config = docker_config(work / f"{name}.json", registry.host, "alice", password)
    return rig.agent(
        name,
        insecure=(registry.host,),
        extra={"registries": {"docker_config": str(config)}, "agent": {"log_level": "debug"}},
    ).start()


def secrets(user: str, password: str) -> list[str]:
    return [password, base64.b64encode(f"{user}:{password}".encode()).decode()]


def test_credentials_never_reach_logs_or_output(rig: Rig, tmp_path: Path) -> None:
    registry = RegistryServer(tmp_path / "registry", basic=BasicAuth("alice", PASSWORD)).start()
    try:
        artifact = modelpack_artifact({"model.safetensors": os.urandom(300_000)})

        async def push() -> None:
            async with OciPusher(registry.url, username="alice", password=PASSWORD) as pusher:
                await pusher.push("private/model", artifact, "v1")

        asyncio.run(push())
        ref = f"{registry.host}/private/model:v1"
        wrong = "not-" + PASSWORD
        outputs: list[str] = []

        good = registry_agent(rig, "good", registry, tmp_path, PASSWORD)
        result = good.cli("preheat", ref)
        outputs += [result.stdout, result.stderr]
        assert result.returncode == 0, result.stderr
        assert preheat_ok(good, ref).manifest_digest == artifact.digest
        for args in (("status",), ("ls",), ("stat", ref), ("status", "--json")):
            result = good.cli(*args)
            outputs += [result.stdout, result.stderr]
        outputs.append(good.get("/metrics")[1])

        bad = registry_agent(rig, "bad", registry, tmp_path, wrong)
        result = bad.cli("preheat", ref, check=False)
        outputs += [result.stdout, result.stderr]
        assert result.returncode != 0
        assert "alice" in result.stdout + result.stderr, "the rejection should name the user"
        code, message = preheat_failure(bad, ref)
        assert code in ("PERMISSION_DENIED", "UNAUTHENTICATED", "FAILED_PRECONDITION"), message
        outputs.append(message)
        good.stop()
        bad.stop()
        outputs += [good.log_text(), bad.log_text()]
    finally:
        registry.stop()
    assert "DEBUG" in outputs[-2] and "/blobs/sha256:" in outputs[-2], "not logging at debug"
    assert "rejected" in message, message
    for text in outputs:
        for secret in secrets("alice", PASSWORD) + secrets("alice", wrong):
            assert secret not in text, f"a credential leaked: ...{text[:300]}"
