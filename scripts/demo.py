"""`make demo`: cacheagent's main job on an embedded default, end to end, on this machine.

1. builds a synthetic CNCF ModelPack model (safetensors-shaped shards, config, tokenizer, a
   README and a code layer) as a local OCI image layout, and pushes a second model to a real
   registry (Debian's docker-registry) on loopback;
2. starts `cacheagent serve` on a private directory (store, sockets, a stand-in kubelet dir,
   the FUSE mount), then preheats both models through the agent API with progress bars;
3. shows `cacheagent ls`, `status`, the hard-linked file tree on disk and a few metrics;
4. publishes the model to a pod-like target through the CSI socket exactly as kubelet would
   (read-only bind mount), shows a write being refused, and unpublishes it;
5. publishes a third, uncached model in lazy mode and reads its last bytes through FUSE
   while it is still downloading;
6. stops the agent (SIGTERM) and the registry.

Everything lives under ./demo-work (removed at the start of each run) and on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cacheagent._proto.csi.v1 import csi_pb2, csi_pb2_grpc  # noqa: E402
from cacheagent.cli.render import human_bytes  # noqa: E402
from tests.agent_process import AgentProcess  # noqa: E402
from tests.oci.layout_writer import write_synthetic_layout  # noqa: E402
from tests.oci.push import push_layout  # noqa: E402
from tests.registry_server import RegistryServer  # noqa: E402

WORK = ROOT / "demo-work"
MODEL_BYTES = 256 << 20
LAZY_MODEL_BYTES = 512 << 20


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def run(agent: AgentProcess, *args: str, echo: bool = True) -> str:
    """Run the real CLI (progress bars go to the terminal) and return its stdout."""
    cmd = [sys.executable, "-m", "cacheagent.cli.main", "--config", str(agent.config_path), *args]
    if echo:
        print(f"$ cacheagent {' '.join(args)}", flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, timeout=600).stdout
    if echo:
        print(out, end="", flush=True)
    return out


def build_models(registry: RegistryServer) -> tuple[str, str, str]:
    step("Building synthetic ModelPack models (OCI layout) and pushing to a local registry")
    started = time.monotonic()
    layout = WORK / "layout"
    write_synthetic_layout(layout, MODEL_BYTES, tag="v1", seed=1)
    pushed = WORK / "pushed"
    write_synthetic_layout(pushed, MODEL_BYTES, tag="v1", seed=2)
    asyncio.run(push_layout(pushed, "v1", registry.url, "models/demo-registry"))
    lazy = WORK / "lazy"
    write_synthetic_layout(lazy, LAZY_MODEL_BYTES, tag="v1", seed=3, shards=1, code_layer=False)
    asyncio.run(push_layout(lazy, "v1", registry.url, "models/demo-lazy"))
    print(f"built 3 models in {time.monotonic() - started:.1f}s; registry at {registry.url}")
    return (
        f"oci-layout://{layout}:v1",
        f"{registry.host}/models/demo-registry:v1",
        f"{registry.host}/models/demo-lazy:v1",
    )


def show_tree(agent: AgentProcess, digest: str) -> None:
    root = agent.store_root / "models" / "sha256" / digest.split(":")[1]
    print(f"{root}")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        mode = oct(st.st_mode & 0o777)
        rel = path.relative_to(root)
        print(f"  {mode} links={st.st_nlink} {human_bytes(st.st_size):>10}  {rel}")


def show_metrics(agent: AgentProcess) -> None:
    wanted = ("cacheagent_cache_", "cacheagent_pull_bytes_total", "cacheagent_csi_operations")
    for line in agent.get("/metrics")[1].splitlines():
        if line.startswith(wanted):
            print(f"  {line}")


@contextlib.contextmanager
def csi_node(agent: AgentProcess) -> Iterator[csi_pb2_grpc.NodeStub]:
    with grpc.insecure_channel(f"unix://{agent.csi_socket}") as channel:
        yield csi_pb2_grpc.NodeStub(channel)


def capability() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY
        ),
    )


def publish(node: csi_pb2_grpc.NodeStub, volume: str, target: Path, attrs: dict[str, str]) -> None:
    """Publish like kubelet: retry while the driver answers UNAVAILABLE (still downloading)."""
    target.parent.mkdir(parents=True, exist_ok=True)  # kubelet creates the volume's parent
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id=volume,
        target_path=str(target),
        volume_capability=capability(),
        readonly=True,
        volume_context={**attrs, "csi.storage.k8s.io/pod.namespace": "default"},
    )
    for _ in range(60):
        try:
            node.NodePublishVolume(request, timeout=120)
            return
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            print(f"  kubelet would retry: {err.details()}")
            time.sleep(1)
    raise RuntimeError("publish did not succeed")


def csi_bind_demo(agent: AgentProcess, ref: str) -> None:
    step("CSI: publish the model into a pod volume (bind mode), as kubelet does")
    target = agent.kubelet_dir / "pods" / "demo-pod" / "volumes" / "kubernetes.io~csi" / "model"
    with csi_node(agent) as node:
        publish(node, "demo-volume", target, {"model": ref, "prefetch": "true"})
        files = sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file())
        print(f"mounted at {target}: {len(files)} files")
        for rel in files[:6]:
            print(f"  {rel}")
        options = next(
            line.split()[5]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == str(target)
        )
        print(f"mount options: {options}")
        try:
            (target / "config.json").write_text("tampered")
        except OSError as err:
            print(f"write refused: {err.strerror}")
        node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id="demo-volume", target_path=str(target))
        )
        print(f"unpublished; target exists: {target.exists()}")


def lazy_demo(agent: AgentProcess, ref: str) -> None:
    step("FUSE lazy mode: publish an uncached model and read it while it downloads")
    target = agent.kubelet_dir / "pods" / "lazy-pod" / "volumes" / "kubernetes.io~csi" / "model"
    with csi_node(agent) as node:
        started = time.monotonic()
        publish(node, "lazy-volume", target, {"model": ref, "mode": "lazy"})
        print(f"published in {time.monotonic() - started:.2f}s (no waiting for the download)")
        shard = next(p for p in sorted(target.iterdir()) if p.suffix == ".safetensors")
        size = shard.stat().st_size
        with shard.open("rb") as f:
            f.seek(size - (4 << 20))
            tail = f.read()
        first = time.monotonic() - started
        print(f"read the last 4 MiB of {shard.name} ({human_bytes(size)}) after {first:.2f}s")
        digest = hashlib.sha256(shard.read_bytes()).hexdigest()
        print(
            f"whole file read through FUSE in {time.monotonic() - started:.2f}s, "
            f"sha256 {digest[:16]}..., tail ok: {len(tail) == 4 << 20}"
        )
        node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id="lazy-volume", target_path=str(target))
        )


def main() -> int:
    if os.geteuid() != 0:
        print("the demo mounts (CSI bind mounts, FUSE): run it as root", file=sys.stderr)
        return 2
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    total = time.monotonic()
    with RegistryServer(WORK / "registry") as registry:
        layout_ref, registry_ref, lazy_ref = build_models(registry)
        step("Starting the agent (cacheagent serve)")
        # Pods may name registry models only, unless policy allows more: the demo publishes
        # its OCI layout to a pod, so it lists the layout's directory as a pod layout root.
        policy = {"pod_layout_roots": [str(WORK)]}
        agent = AgentProcess(
            WORK / "agent", insecure=(registry.host,), fuse=True, extra={"policy": policy}
        )
        with agent:
            print(
                f"store {agent.store_root}, API {agent.socket}, CSI {agent.csi_socket}, "
                f"metrics {agent.http}/metrics"
            )
            step("Preheat from the OCI layout and from the registry, through the agent API")
            started = time.monotonic()
            run(agent, "preheat", layout_ref, registry_ref)
            print(f"pulled {human_bytes(2 * MODEL_BYTES)} in {time.monotonic() - started:.1f}s")
            started = time.monotonic()
            run(agent, "preheat", layout_ref)
            print(f"second preheat (cache hit) in {time.monotonic() - started:.2f}s")
            step("What the cache holds")
            run(agent, "ls")
            run(agent, "status")
            info = json.loads(run(agent, "stat", "--json", layout_ref, echo=False))
            digest = info["manifest_digest"]
            step("The model on disk: hard links to verified, read-only blobs")
            show_tree(agent, digest)
            csi_bind_demo(agent, layout_ref)
            lazy_demo(agent, lazy_ref)
            step("Metrics (a few lines of /metrics)")
            show_metrics(agent)
            step("Stopping the agent (SIGTERM)")
        print(f"agent stopped; FUSE mount gone: {not agent.fuse_root.exists()}")
    print(f"\ndemo finished in {time.monotonic() - total:.1f}s; files are in {WORK}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
