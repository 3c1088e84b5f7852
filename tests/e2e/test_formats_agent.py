"""Formats through the real agent: pods written for modelpack/model-csi-driver, file-pattern
views and the Hugging Face cache layout, published over the CSI socket as kubelet does, with
the real registry behind the agent and real read-only bind mounts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest

from cacheagent._proto.csi.v1 import csi_pb2 as pb
from cacheagent._proto.csi.v1 import csi_pb2_grpc as pb_grpc
from cacheagent.cli.client import AgentClient
from cacheagent.mountinfo import find_mount
from tests.agent_process import AgentProcess
from tests.csi_env import mount_capability
from tests.e2e.conftest import Origin
from tests.mounts import force_unmount, mounts_under
from tests.s3_server import ACCESS_KEY, SECRET_KEY, S3Server
from tests.support import require_fuse, require_root

KUBELET = {
    "csi.storage.k8s.io/pod.name": "model-inference-pod",
    "csi.storage.k8s.io/pod.namespace": "default",
    "csi.storage.k8s.io/pod.uid": "0c7a9c52-1111-2222-3333-444455556666",
    "csi.storage.k8s.io/serviceAccount.name": "default",
    "csi.storage.k8s.io/ephemeral": "true",
}


@pytest.fixture
def published(agent: AgentProcess) -> Iterator[list[tuple[str, Path]]]:
    """Volumes a test published; unpublished (and force-unmounted if need be) afterwards."""
    volumes: list[tuple[str, Path]] = []
    yield volumes
    unpublish_all(agent, volumes)


def unpublish_all(agent: AgentProcess, volumes: list[tuple[str, Path]]) -> None:
    try:
        stub = pb_grpc.NodeStub(grpc.insecure_channel(f"unix://{agent.csi_socket}"))
        for volume, target in volumes:
            stub.NodeUnpublishVolume(
                pb.NodeUnpublishVolumeRequest(volume_id=volume, target_path=str(target)),
                timeout=60,
            )
    finally:
        for leftover in mounts_under(agent.kubelet_dir):
            force_unmount(leftover)


def publish(
    agent: AgentProcess,
    published: list[tuple[str, Path]],
    volume: str,
    context: Mapping[str, str],
) -> Path:
    """NodePublishVolume as kubelet sends it, retried while the model downloads."""
    require_root()
    target = agent.kubelet_dir / "pods" / volume / "volumes" / "kubernetes.io~csi" / "model"
    target.parent.mkdir(parents=True, exist_ok=True)
    request = pb.NodePublishVolumeRequest(
        volume_id=volume,
        target_path=str(target),
        volume_capability=mount_capability(),
        readonly=True,
        volume_context=dict(context),
    )
    stub = pb_grpc.NodeStub(grpc.insecure_channel(f"unix://{agent.csi_socket}"))
    for _ in range(60):
        try:
            stub.NodePublishVolume(request, timeout=60)
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    else:
        raise AssertionError("publish still UNAVAILABLE after 60 tries")
    published.append((volume, target))
    mount = find_mount(target)
    assert mount is not None and "ro" in mount.options
    return target


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_model_csi_driver_pod_works_with_only_the_driver_name_changed(
    agent: AgentProcess, origin: Origin, published: list[tuple[str, Path]]
) -> None:
    """The volume exactly as model-csi-driver's getting-started shows it."""
    model = origin.models["alpha"]
    target = publish(
        agent,
        published,
        "vol-mcd",
        {"model.csi.modelpack.org/reference": model.ref, **KUBELET},
    )
    with AgentClient(agent.socket) as client:
        info = client.stat(model.ref)
    assert info.manifest_digest == model.digest
    assert digests(target) == digests(Path(info.path))
    assert any(name.endswith(".safetensors") for name in digests(target))


def test_model_csi_driver_exclusions_mount_a_view(
    agent: AgentProcess, origin: Origin, published: list[tuple[str, Path]]
) -> None:
    model = origin.models["beta"]
    full = publish(agent, published, "vol-full", {"model": model.ref, **KUBELET})
    view = publish(
        agent,
        published,
        "vol-light",
        {
            "model.csi.modelpack.org/type": "image",
            "model.csi.modelpack.org/reference": model.ref,
            "model.csi.modelpack.org/exclude-model-weights": "true",
            "model.csi.modelpack.org/exclude-file-patterns": '["README.md"]',
            **KUBELET,
        },
    )
    everything = digests(full)
    shown = digests(view)
    assert set(shown) == {
        p for p in everything if not p.endswith(".safetensors") and p != "README.md"
    }
    assert {"config.json", "tokenizer.json", "code/__init__.py"} <= set(shown)
    assert all(shown[p] == everything[p] for p in shown)
    assert (view / "config.json").stat().st_ino == (full / "config.json").stat().st_ino


HF_LOADER = """
import json, sys
from huggingface_hub import hf_hub_download, snapshot_download
repo = sys.argv[1]
config = hf_hub_download(repo, "config.json")
tokenizer = hf_hub_download(repo, "tokenizer.json")
snapshot = snapshot_download(repo)
print(json.dumps({"config": config, "tokenizer": tokenizer, "snapshot": snapshot,
                  "loaded": json.load(open(config)), "vocab": json.load(open(tokenizer))}))
"""


def test_hf_cache_layout_loads_offline_with_huggingface_hub(
    agent: AgentProcess, origin: Origin, published: list[tuple[str, Path]]
) -> None:
    """``HF_HUB_OFFLINE=1 HF_HUB_CACHE=<volume>``: the real huggingface_hub finds config and
    tokenizer by repo name alone, as transformers/vllm would, reading the read-only mount."""
    model = origin.models["gamma"]
    target = publish(
        agent,
        published,
        "vol-hf",
        {"model": model.ref, "layout": "hf-cache", "hf-repo": "acme/gamma", **KUBELET},
    )
    with AgentClient(agent.socket) as client:
        list(client.preheat([model.ref]))  # the full model, to compare with
        plain = Path(client.stat(model.ref).path)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(agent.work),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(target),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", HF_LOADER, "acme/gamma"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    snapshot = Path(result["snapshot"])
    assert snapshot.parent == target / "models--acme--gamma" / "snapshots"
    assert result["loaded"] == json.loads((plain / "config.json").read_bytes())
    assert result["vocab"] == json.loads((plain / "tokenizer.json").read_bytes())
    assert Path(result["config"]) == snapshot / "config.json"
    assert digests(snapshot) == digests(plain)
    commit = (target / "models--acme--gamma" / "refs" / "main").read_text()
    assert snapshot.name == commit
    blobs = {p.name for p in (target / "models--acme--gamma" / "blobs").iterdir()}
    assert blobs == set(digests(plain).values())


def test_agent_serves_an_s3_model_as_its_config_describes(tmp_path: Path) -> None:
    """``s3.endpoint`` in the config file, credentials from the standard AWS environment
    variables: preheat over the agent API, then a pod mounts a view of it."""
    files = {"config.json": b'{"model_type": "s3"}', "weights.bin": os.urandom(300_000)}
    with S3Server(tmp_path / "s3") as s3:
        client = s3.client()
        client.create_bucket(Bucket="team-models")
        for path, data in files.items():
            client.put_object(
                Bucket="team-models", Key=f"m1/{path}", Body=data, ChecksumAlgorithm="SHA256"
            )
        agent = AgentProcess(
            tmp_path / "s3agent",
            insecure=(s3.host,),
            extra={
                "s3": {"endpoint": s3.endpoint, "region": "us-east-1"},
                "policy": {"pod_s3_buckets": ["team-*"]},
            },
            env={
                "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_EC2_METADATA_DISABLED": "true",
            },
        )
        volumes: list[tuple[str, Path]] = []
        with agent:
            try:
                done = agent.cli("preheat", "s3://team-models/m1/")
                assert done.returncode == 0, done.stderr
                with AgentClient(agent.socket) as api:
                    info = api.stat("s3://team-models/m1/")
                assert {
                    str(p.relative_to(info.path)): p.read_bytes()
                    for p in Path(info.path).rglob("*")
                    if p.is_file()
                } == files
                target = publish(
                    agent, volumes, "vol-s3", {"model": "s3://team-models/m1/", "include": "*.json"}
                )
                assert digests(target) == {
                    "config.json": hashlib.sha256(files["config.json"]).hexdigest()
                }
            finally:
                unpublish_all(agent, volumes)


def test_preheat_takes_a_view_reference(agent: AgentProcess, origin: Origin) -> None:
    """``cacheagent preheat 'REF|include=...'``: only the matching files are pulled, and the
    view is listed under its own canonical reference."""
    model = origin.models["alpha"]
    view = f"{model.ref}|include=*.json,code/"
    done = agent.cli("preheat", view)
    assert done.returncode == 0, done.stderr
    with AgentClient(agent.socket) as client:
        info = client.stat(view)
        listed = {m.ref: m.manifest_digest for m in client.list().models}
    assert listed == {view: info.manifest_digest}  # a model of its own; the full one not pulled
    assert sorted(f.path for f in info.files) == [
        "code/__init__.py",
        "code/modeling_synthetic.py",
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]
    assert info.ref == view
    assert info.manifest_digest != model.digest


def test_lazy_mode_serves_a_view_through_fuse(tmp_path: Path, origin: Origin) -> None:
    """A view in lazy mode: the FUSE mount shows only the kept files, in the HF layout."""
    require_fuse()
    model = origin.models["beta"]
    agent = AgentProcess(tmp_path / "lazy", insecure=(origin.registry.host,), fuse=True)
    volumes: list[tuple[str, Path]] = []
    with agent:
        try:
            target = publish(
                agent,
                volumes,
                "vol-lazy",
                {
                    "model": model.ref,
                    "mode": "lazy",
                    "exclude": "README.md,code/",
                    "layout": "hf-cache",
                    "hf-repo": "acme/beta",
                },
            )
            snapshots = target / "models--acme--beta" / "snapshots"
            (snapshot,) = list(snapshots.iterdir())
            shown = digests(snapshot)
            assert "README.md" not in shown and not any(p.startswith("code/") for p in shown)
            assert {"config.json", "tokenizer.json"} <= set(shown)
            assert any(p.endswith(".safetensors") for p in shown)
        finally:
            unpublish_all(agent, volumes)
