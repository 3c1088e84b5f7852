"""What a pod may name in its volume attributes, against a running agent with real mounts.

The two attacks of issue 12, reproduced through the CSI socket exactly as kubelet calls it:

- the symlink-in-emptyDir attack: a pod writes an OCI layout into its own emptyDir (under the
  kubelet directory) whose blob files are symlinks to another pod's secret volume, then names
  ``oci-layout://`` in a volume, in bind and in lazy mode;
- SSRF: a pod names ``http://127.0.0.1:...``, ``http://169.254.169.254/...``, a name that
  resolves to loopback, or an allowed URL that redirects to a host the policy does not allow.

Each is refused by default (PERMISSION_DENIED naming the policy key), and still refused where
it matters when the policy is widened (the symlink is not followed; loopback needs its own
opt-in; redirects stay on allowed hosts), while the allowed cases keep working.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from cacheagent.sources.layout import blob_path
from tests.agent_process import LOOPBACK_HTTP, AgentProcess
from tests.fault_server import Fault, FaultServer
from tests.faults.harness import (
    OK,
    LayoutModel,
    Rig,
    make_model,
    mounts,
    preheat_failure,
    publish,
    target_path,
    unpublish,
)
from tests.support import require_fuse

pytestmark = [pytest.mark.root]

DENIED = grpc.StatusCode.PERMISSION_DENIED
SECRET_MARK = b"SECRET-OF-ANOTHER-POD:"
PAYLOAD = bytes(range(256)) * 512  # 128 KiB served by the HTTP origin
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def no_policy(**keys: Any) -> dict[str, Any]:
    """The agent's default policy (the rig's own pod_layout_roots opt-in taken back)."""
    return {"policy": {"pod_layout_roots": [], **keys}}


def emptydir(agent: AgentProcess, pod: str, volume: str) -> Path:
    path = agent.kubelet_dir / "pods" / pod / "volumes" / "kubernetes.io~empty-dir" / volume
    path.mkdir(parents=True)
    return path


def plant_symlinked_layout(agent: AgentProcess) -> LayoutModel:
    """A layout in a pod's emptyDir whose weight blobs are symlinks to another pod's secret,
    each secret exactly the size the descriptor declares (so only the symlink rule stops it)."""
    model = make_model(emptydir(agent, "attacker", "scratch") / "layout", seed=41)
    secrets = agent.kubelet_dir / "pods" / "victim" / "volumes" / "kubernetes.io~secret" / "tok"
    secrets.mkdir(parents=True)
    manifest = json.loads(blob_path(model.path, model.digest).read_bytes())
    for i, layer in enumerate(manifest["layers"]):
        if not layer["mediaType"].endswith(".raw"):
            continue
        secret = secrets / f"token-{i}"
        secret.write_bytes((SECRET_MARK * (layer["size"] // len(SECRET_MARK) + 1))[: layer["size"]])
        blob = blob_path(model.path, layer["digest"])
        blob.unlink()
        blob.symlink_to(secret)
    return model


def no_secret_anywhere(agent: AgentProcess, target: Path) -> None:
    for path in [*agent.store_root.rglob("*"), *target.rglob("*")]:
        if not path.is_file() or path.is_symlink() or path.name == "index.db":
            continue
        try:
            head = path.read_bytes()[:4096]
        except OSError:  # a lazy file whose pull failed answers EIO: nothing leaked there
            continue
        assert SECRET_MARK not in head, f"secret bytes in {path}"


# --------------------------------------------------------------------------- OCI layouts


def test_pods_may_not_name_node_layouts_by_default(rig: Rig) -> None:
    agent = rig.agent(fuse=True, extra=no_policy()).start()
    model = plant_symlinked_layout(agent)
    for mode in ("bind", "lazy"):
        target = target_path(agent, f"m-{mode}")
        code, message = publish(agent, f"vol-{mode}", target, model.ref, {"mode": mode})
        assert code == DENIED, (mode, code, message)
        assert "policy.pod_layout_roots" in message, message
        assert not target.exists()
    assert mounts(agent) == []
    no_secret_anywhere(agent, agent.kubelet_dir / "nothing")
    assert not list((agent.store_root / "blobs").rglob("*/*")), "something was pulled"
    assert "Traceback" not in agent.log_text()


def test_allowed_layout_root_still_never_follows_a_symlink(rig: Rig) -> None:
    require_fuse()
    pods = rig.root / "agent" / "kubelet" / "pods"  # where AgentProcess puts kubelet's dir
    policy = no_policy(pod_layout_roots=[str(pods)], lazy_sources=["oci", "oci-layout"])
    agent = rig.agent(fuse=True, extra=policy)
    assert agent.kubelet_dir / "pods" == pods
    agent.start()
    # The allowed case works: a plain layout under the root, bind and lazy.
    good = make_model(emptydir(agent, "builder", "out") / "layout", seed=42)
    for mode in ("lazy", "bind"):
        target = target_path(agent, f"good-{mode}")
        assert publish(agent, f"vol-good-{mode}", target, good.ref, {"mode": mode}) == (OK, "")
        for name, data in good.files.items():
            if mode == "bind" or name.endswith(".safetensors"):  # lazy shows raw layers
                assert (target / name).read_bytes() == data
        assert unpublish(agent, f"vol-good-{mode}", target) == (OK, "")

    model = plant_symlinked_layout(agent)

    bind_target = target_path(agent, "bind")
    code, message = publish(agent, "vol-bind", bind_target, model.ref)
    assert code != OK, "a layout with symlinked blobs was published"
    assert "not a regular file inside the layout" in message or "symlink" in message, message
    assert not bind_target.exists() or not any(bind_target.iterdir())

    lazy_target = target_path(agent, "lazy")
    code, message = publish(agent, "vol-lazy", lazy_target, model.ref, {"mode": "lazy"})
    assert code == OK, message  # lazy publishes before any blob byte is read
    shard = lazy_target / "model-00001-of-00002.safetensors"
    with pytest.raises(OSError) as failed, shard.open("rb") as f:
        data = f.read(4096)
        pytest.fail(f"read {len(data)} bytes through the symlink: {data[:32]!r}")
    assert failed.value.errno == errno.EIO
    no_secret_anywhere(agent, lazy_target)
    assert unpublish(agent, "vol-lazy", lazy_target) == (OK, "")
    assert mounts(agent) == []


def test_lazy_mode_only_for_lazy_capable_sources(rig: Rig) -> None:
    agent = rig.agent(fuse=True)  # layouts allowed for pods, lazy_sources left at [oci]
    agent.start()
    model = make_model(emptydir(agent, "p", "v") / "layout", seed=43)
    target = target_path(agent)
    code, message = publish(agent, "vol", target, model.ref, {"mode": "lazy"})
    assert code == DENIED and "policy.lazy_sources" in message, message
    assert publish(agent, "vol", target, model.ref, {"mode": "bind"}) == (OK, "")
    assert unpublish(agent, "vol", target) == (OK, "")


# --------------------------------------------------------------------------- SSRF


def url_ref(host: str, name: str = "w.bin") -> str:
    return f"http://{host}/{name}#sha256={DIGEST}"


def test_pods_may_not_name_urls_by_default(rig: Rig) -> None:
    origin = rig.serve(FaultServer())
    origin.server.add("w.bin", PAYLOAD)
    agent = rig.agent(insecure=(origin.host,), extra=no_policy()).start()
    for ref in (url_ref(origin.host), url_ref("169.254.169.254", "latest/meta-data")):
        code, message = publish(agent, "vol", target_path(agent), ref)
        assert code == DENIED and "policy.pod_http_hosts" in message, (ref, message)
    assert origin.server.requests == []
    assert mounts(agent) == []


def test_loopback_and_link_local_refused_unless_configured(rig: Rig) -> None:
    origin = rig.serve(FaultServer())
    origin.server.add("w.bin", PAYLOAD)
    port = origin.host.rsplit(":", 1)[1]
    hosts = ["127.0.0.1", "169.254.169.254", "localhost"]
    insecure = (origin.host, "169.254.169.254", f"localhost:{port}")
    agent = rig.agent(insecure=insecure, extra=no_policy(pod_http_hosts=hosts)).start()
    # "localhost" passes the host rule by name; its address is what is refused (a name that
    # resolves to loopback, as after DNS rebinding, is caught at the address connected to).
    for host in (origin.host, f"localhost:{port}", "169.254.169.254"):
        code, message = publish(agent, "vol", target_path(agent), url_ref(host), timeout=20)
        assert code == DENIED and "policy.http_allowed_networks" in message, (host, message)
    # The operator's preheat is held to the same address rule.
    error_code, error = preheat_failure(agent, url_ref(origin.host))
    assert error_code == "PERMISSION_DENIED" and "policy.http_allowed_networks" in error, error
    assert origin.server.requests == [], "a request reached the loopback origin"
    assert mounts(agent) == []


def test_redirects_only_to_allowed_hosts_and_allowed_urls_work(rig: Rig) -> None:
    origin = rig.serve(FaultServer())
    port = origin.host.rsplit(":", 1)[1]
    for name in ("w.bin", "to-other.bin", "to-allowed.bin", "moved.bin"):
        origin.server.add(name, PAYLOAD)
    for name, location in (
        ("to-other.bin", f"http://127.0.0.2:{port}/moved.bin"),
        ("to-allowed.bin", f"http://localhost:{port}/moved.bin"),
    ):
        head = Fault("redirect", location=location, method="HEAD")
        origin.server.inject(name, head, Fault("redirect", location=location, times=99))
    policy = {
        **LOOPBACK_HTTP,
        "pod_http_hosts": ["127.0.0.1"],
        "http_redirect_hosts": ["localhost"],
    }
    insecure = (origin.host, f"127.0.0.2:{port}", f"localhost:{port}")
    agent = rig.agent(insecure=insecure, extra=no_policy(**policy)).start()

    code, message = publish(
        agent, "vol-r", target_path(agent), url_ref(origin.host, "to-other.bin")
    )
    assert code == DENIED and "policy.http_redirect_hosts" in message, message
    assert origin.server.seen("moved.bin") == []

    for name in ("w.bin", "to-allowed.bin"):
        target = target_path(agent, name.split(".")[0])
        assert publish(agent, f"vol-{name}", target, url_ref(origin.host, name)) == (OK, "")
        assert (target / name).read_bytes() == PAYLOAD
        assert unpublish(agent, f"vol-{name}", target) == (OK, "")
    assert origin.server.seen("moved.bin"), "the allowed redirect was not followed"
