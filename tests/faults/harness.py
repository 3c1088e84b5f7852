"""What the fault suite shares: a world for one test, clients, origins and the invariant checks.

``Rig`` owns everything a test starts: a short work directory under /tmp (unix socket paths are
limited to 107 bytes), the agent processes (stopped by PID), origin servers running on event
loops of their own in threads (the test body stays synchronous, so a blocking CLI call never
starves the origin it is talking to), and every mount left below its directories (detached in
teardown, even after a failure).

The invariant checks read the store the way an operator would: ``cacheagent gc --fsck --rehash``
with the agent stopped, a read-only ``Store.open(root, lock=False)`` view for models and leases,
the journal table, and /proc/self/mountinfo below the test's kubelet directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from cacheagent._proto.cacheagent.v1 import agent_pb2 as apb
from cacheagent._proto.cacheagent.v1 import agent_pb2_grpc as apb_grpc
from cacheagent._proto.csi.v1 import csi_pb2 as cpb
from cacheagent._proto.csi.v1 import csi_pb2_grpc as cpb_grpc
from cacheagent.pull.partial_file import sidecar_path
from cacheagent.pull.ranges import load_sidecar
from cacheagent.store import Lease, Store
from tests.agent_process import AgentProcess
from tests.csi_env import mount_capability
from tests.fault_server import FaultServer
from tests.mounts import force_unmount, mounts_under
from tests.oci.layout_writer import LayoutEntry, write_layout
from tests.threaded import ThreadedServer

MiB = 1 << 20
F = TypeVar("F", bound=FaultServer)
OK = grpc.StatusCode.OK
DRIVER = "model.cacheagent.io"

# The agent's pull settings for the suite: ranged downloads even for MiB-sized blobs (so the
# range crash points and resume are exercised), fast retries, short timeouts.
FAST_PULL: dict[str, Any] = {
    "range_threshold_bytes": 512 * 1024,
    "range_chunk_bytes": 256 * 1024,
    "retries": 2,
    "retry_max_seconds": 0.2,
    "timeout_seconds": 2,
}


# --------------------------------------------------------------------------- origins


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class LayoutModel:
    """A small ModelPack layout: raw weight shards, a config and a tar+gzip code layer."""

    path: Path
    tag: str
    digest: str
    files: Mapping[str, bytes]

    @property
    def ref(self) -> str:
        return f"oci-layout://{self.path}:{self.tag}"


def make_model(
    path: Path, *, seed: int, weight_bytes: int = 3 * MiB, tag: str = "v1"
) -> LayoutModel:
    rng = random.Random(seed).randbytes  # reproducible filler
    half = weight_bytes // 2
    files = {
        "model-00001-of-00002.safetensors": rng(half),
        "model-00002-of-00002.safetensors": rng(weight_bytes - half),
        "config.json": json.dumps({"hidden_size": 8, "seed": seed}).encode(),
        "code/modeling.py": f"SEED = {seed}\n".encode(),
        "code/__init__.py": b"",
    }
    entries = [
        LayoutEntry(name, data, "raw", "weight")
        for name, data in files.items()
        if name.endswith(".safetensors")
    ]
    entries.append(LayoutEntry("config.json", files["config.json"], "raw", "weight.config"))
    code = path.parent / f".code-{seed}"
    (code / "code").mkdir(parents=True, exist_ok=True)
    for name in ("code/modeling.py", "code/__init__.py"):
        (code / name).write_bytes(files[name])
    entries.append(LayoutEntry("code", code / "code", "tar+gzip", "code"))
    digest = write_layout(path, entries, tag=tag, name=f"fault-model-{seed}")
    return LayoutModel(path, tag, digest, files)


# --------------------------------------------------------------------------- the world


@dataclass
class Rig:
    """One test's processes, servers and mounts; ``close`` stops and removes all of them.

    Tests make their own mounts (a small tmpfs, a host directory to protect) below ``root``, so
    the same sweep that catches what the agent left detaches them too.
    """

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="flt-", dir="/tmp")))
    agents: list[AgentProcess] = field(default_factory=list)
    servers: list[ThreadedServer[Any]] = field(default_factory=list)

    def agent(self, name: str = "agent", **options: Any) -> AgentProcess:
        """An agent whose pods may publish the suite's layouts, all written under the temp dir
        (an explicit ``policy.pod_layout_roots`` opt-in; a test's own policy keys win)."""
        extra = dict(options.pop("extra", {}))
        extra["policy"] = {"pod_layout_roots": [tempfile.gettempdir()], **extra.get("policy", {})}
        agent = AgentProcess(self.root / name, extra=extra, **options)
        self.agents.append(agent)
        return agent

    def serve(self, server: F) -> ThreadedServer[F]:
        threaded = ThreadedServer(server).start()
        self.servers.append(threaded)
        return threaded

    def close(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.kill()
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()
        places = [self.root, *(a.run_dir for a in self.agents)]
        for _ in range(8):
            left = [p for place in places for p in mounts_under(place)]
            if not left:
                break
            for point in sorted(set(left), key=len, reverse=True):
                force_unmount(point)
        for agent in self.agents:
            agent.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- agent API


@contextlib.contextmanager
def _channel(socket: Path) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        yield channel


def preheat(agent: AgentProcess, *refs: str, timeout: float = 60.0) -> dict[str, Any]:
    """The outcome (the one DONE or FAILED event) per reference; grpc.RpcError if the call fails."""
    final: dict[str, Any] = {}
    with _channel(agent.socket) as channel:
        stub = apb_grpc.AgentStub(channel)
        for event in stub.Preheat(apb.PreheatRequest(refs=list(refs)), timeout=timeout):
            if event.phase in (apb.PreheatEvent.DONE, apb.PreheatEvent.FAILED):
                assert event.ref not in final, f"two outcomes for {event.ref}"
                final[event.ref] = event
    return final


def preheat_ok(agent: AgentProcess, ref: str, timeout: float = 60.0) -> Any:
    event = preheat(agent, ref, timeout=timeout)[ref]
    assert event.phase == apb.PreheatEvent.DONE, f"{event.error_code}: {event.error}"
    return event


def preheat_failure(agent: AgentProcess, ref: str, timeout: float = 60.0) -> tuple[str, str]:
    """(error_code, error) of a preheat that must fail."""
    event = preheat(agent, ref, timeout=timeout)[ref]
    assert event.phase == apb.PreheatEvent.FAILED, f"preheat of {ref} did not fail"
    return event.error_code, event.error


def agent_call(agent: AgentProcess, method: str, request: Any, timeout: float = 30.0) -> Any:
    with _channel(agent.socket) as channel:
        return getattr(apb_grpc.AgentStub(channel), method)(request, timeout=timeout)


def status(agent: AgentProcess) -> Any:
    return agent_call(agent, "Status", apb.StatusRequest())


def evict(agent: AgentProcess, model: str) -> tuple[grpc.StatusCode, str]:
    return _outcome(lambda: agent_call(agent, "Evict", apb.EvictRequest(model=model)))


# --------------------------------------------------------------------------- CSI


def target_path(agent: AgentProcess, name: str = "model") -> Path:
    """A target the way kubelet builds one: its parent exists, the target does not."""
    pod = uuid.uuid4().hex[:12]
    parent = agent.kubelet_dir / "pods" / pod / "volumes" / "kubernetes.io~csi" / name
    parent.mkdir(parents=True)
    return parent / "mount"


def publish_request(
    volume_id: str, target: Path | str, ref: str, attributes: Mapping[str, str] | None = None
) -> Any:
    return cpb.NodePublishVolumeRequest(
        volume_id=volume_id,
        target_path=str(target),
        volume_capability=mount_capability(),
        readonly=True,
        volume_context={"model": ref, **(attributes or {})},
    )


def publish(
    agent: AgentProcess,
    volume_id: str,
    target: Path | str,
    ref: str,
    attributes: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[grpc.StatusCode, str]:
    request = publish_request(volume_id, target, ref, attributes)
    return _outcome(lambda: _node(agent, "NodePublishVolume", request, timeout))


def unpublish(
    agent: AgentProcess, volume_id: str, target: Path | str, timeout: float = 30.0
) -> tuple[grpc.StatusCode, str]:
    request = cpb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
    return _outcome(lambda: _node(agent, "NodeUnpublishVolume", request, timeout))


def _node(agent: AgentProcess, method: str, request: Any, timeout: float) -> Any:
    with _channel(agent.csi_socket) as channel:
        return getattr(cpb_grpc.NodeStub(channel), method)(request, timeout=timeout)


def _outcome(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return OK, ""


# --------------------------------------------------------------------------- invariants


def fsck(agent: AgentProcess) -> dict[str, Any]:
    """``cacheagent gc --fsck --rehash --json`` (the agent must be stopped)."""
    result = agent.cli("gc", "--fsck", "--rehash", "--json", check=False)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def fsck_fixes(report: Mapping[str, Any]) -> int:
    """How many repairs a ``gc --json`` report made (0: the store was consistent)."""
    skip = {"rehashed", "blobs_checked", "models_checked", "actions"}
    return sum(int(v) for k, v in report.items() if k not in skip)


def open_view(agent: AgentProcess) -> contextlib.AbstractContextManager[Store]:
    return Store.open(agent.store_root, lock=False)


def leases(agent: AgentProcess) -> list[Lease]:
    with open_view(agent) as store:
        return store.leases()


def journal(agent: AgentProcess) -> dict[str, str]:
    """target path -> volume id, from the publish journal."""
    db = agent.store_root / "index.db"
    if not db.exists():
        return {}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        try:
            rows = conn.execute("SELECT target_path, volume_id FROM publishes").fetchall()
        except sqlite3.OperationalError:  # the CSI server never started: no table yet
            return {}
    return {str(t): str(v) for t, v in rows}


def mounts(agent: AgentProcess) -> list[str]:
    return mounts_under(agent.kubelet_dir)


def verify_models(agent: AgentProcess) -> dict[str, int]:
    """Hash every file of every ready model through its tree; digest -> file count."""
    checked: dict[str, int] = {}
    with open_view(agent) as store:
        for model in store.list_models():
            root = store.model_path(model.digest)
            for f in model.files:
                data = (root / f.path).read_bytes()
                actual = "sha256:" + hashlib.sha256(data).hexdigest()
                assert actual == f.blob, f"model {model.digest}: {f.path} is corrupt"
            checked[model.digest] = len(model.files)
    return checked


def held_bytes(agent: AgentProcess, digest: str, size: int) -> int:
    """Bytes of a blob the store holds on disk: all of it once its file exists in blobs/
    (indexed or not), else what its partial file's ranges record claims."""
    with open_view(agent) as store:
        if store.blob_path(digest).exists():
            return size
        side = sidecar_path(store.partial_path(digest))
    if not side.exists():
        return 0
    return load_sidecar(side.read_text(), digest, size).total()


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size of a process, from /proc/<pid>/status."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def pid_of(agent: AgentProcess) -> int:
    assert agent.proc is not None, "the agent is not running"
    return agent.proc.pid


def blob_files(agent: AgentProcess) -> set[str]:
    """Digests of every blob file on disk (indexed or not)."""
    base = agent.store_root / "blobs" / "sha256"
    if not base.is_dir():
        return set()
    return {f"sha256:{p.name}" for p in base.glob("*/*") if p.is_file()}


def wait_dead(agent: AgentProcess, timeout: float = 30.0) -> int:
    """Wait for an agent that is expected to die (a crash point); returns its exit code."""
    assert agent.proc is not None
    code = agent.proc.wait(timeout=timeout)
    agent.stop()
    return code
