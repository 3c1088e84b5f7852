"""A CSI client that calls the node driver the way kubelet does, for the end-to-end tests.

Written from kubelet's CSI volume plugin (pkg/volume/csi: csi_mounter.go SetUpAt/TearDownAt,
csi_client.go, csi_plugin.go, csi_util.go) and its operation backoff
(pkg/util/goroutinemap/exponentialbackoff), not from what our driver would like to hear:

- SetUp creates the target's *parent* (``.../volumes/kubernetes.io~csi/<spec name>``, 0750) and
  writes ``vol_data.json`` there; it never creates the ``mount`` target itself.
- ``readonly`` is the inline volume's ``csi.readOnly`` (default false), or for a PersistentVolume
  the pod's ``persistentVolumeClaim.readOnly``; the PV's own ``csi.readOnly`` never reaches the
  driver.
- The access mode is the PV's ``AccessModes[0]`` (ReadWriteOnce for inline volumes); its
  ``mountOptions`` become ``mount_flags``; ``fs_type`` comes from the volume source.
- With podInfoOnMount every ``csi.storage.k8s.io/`` key is added to the volume attributes:
  ``pod.name``, ``pod.namespace``, ``pod.uid``, ``serviceAccount.name``, ``ephemeral``.
- An inline volume's id is ``csi-`` + sha256(pod uid + volume name), in hex.
- Every call has a 2-minute deadline. UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED,
  DEADLINE_EXCEEDED and CANCELLED are *uncertain* (the mount may exist: the directory stays);
  any other error is *final*, and SetUp removes the mount directory, ``vol_data.json`` and the
  parent (removeMountDir; never while the target is still a mount point).
- A failed operation is retried after an exponential backoff: 0.5 s, doubling, capped at
  2 min 2 s. ``backoff_scale`` shrinks those waits for tests; nothing else changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from cacheagent._proto.csi.v1 import csi_pb2 as pb
from cacheagent._proto.csi.v1 import csi_pb2_grpc as pb_grpc
from cacheagent.mountinfo import find_mount

CSI_TIMEOUT_SECONDS = 120.0
INITIAL_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 122.0
UNCERTAIN_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)
_Mode = pb.VolumeCapability.AccessMode.Mode
ACCESS_MODES = {
    "ReadWriteOnce": _Mode.SINGLE_NODE_WRITER,
    "ReadOnlyMany": _Mode.MULTI_NODE_READER_ONLY,
    "ReadWriteMany": _Mode.MULTI_NODE_MULTI_WRITER,
    "ReadWriteOncePod": _Mode.SINGLE_NODE_SINGLE_WRITER,
}
VOL_DATA = "vol_data.json"


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str = "default"
    service_account: str = "default"
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True)
class InlineVolume:
    """``pod.spec.volumes[].csi``: an ephemeral volume."""

    name: str
    attributes: Mapping[str, str]
    read_only: bool = False
    fs_type: str = ""


@dataclass(frozen=True)
class PersistentVolume:
    """A static PV with ``spec.csi``, mounted through a claim."""

    name: str
    handle: str
    attributes: Mapping[str, str]
    access_modes: tuple[str, ...] = ("ReadOnlyMany",)
    mount_options: tuple[str, ...] = ()
    read_only: bool = False  # the PV's csi.readOnly: kubelet does not pass it on
    claim_read_only: bool = False  # the pod's persistentVolumeClaim.readOnly
    fs_type: str = ""


Volume = InlineVolume | PersistentVolume


@dataclass(frozen=True)
class Outcome:
    """One operation's answer as kubelet classifies it."""

    code: grpc.StatusCode
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    @property
    def uncertain(self) -> bool:
        return self.code in UNCERTAIN_CODES


def backoff_delays(count: int, scale: float = 1.0) -> list[float]:
    """The first ``count`` waits between retries of one operation."""
    delays, delay = [], INITIAL_BACKOFF_SECONDS
    for _ in range(count):
        delays.append(delay * scale)
        delay = min(delay * 2, MAX_BACKOFF_SECONDS)
    return delays


def inline_volume_id(pod: Pod, volume: InlineVolume) -> str:
    return "csi-" + hashlib.sha256(f"{pod.uid}{volume.name}".encode()).hexdigest()


class Kubelet:
    """One node's kubelet, as far as the CSI node plugin is concerned."""

    def __init__(
        self,
        socket: Path,
        root: Path,
        driver: str,
        node: str = "test-node",
        *,
        backoff_scale: float = 1.0,
        timeout: float = CSI_TIMEOUT_SECONDS,
    ) -> None:
        self.root = root
        self.driver = driver
        self.node = node
        self.backoff_scale = backoff_scale
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{socket}")
        self.stub = pb_grpc.NodeStub(self._channel)
        self.calls: list[tuple[str, Outcome]] = []

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Kubelet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- what kubelet sends

    def target(self, pod: Pod, volume: Volume) -> Path:
        return (
            self.root / "pods" / pod.uid / "volumes" / "kubernetes.io~csi" / volume.name / "mount"
        )

    def volume_id(self, pod: Pod, volume: Volume) -> str:
        if isinstance(volume, InlineVolume):
            return inline_volume_id(pod, volume)
        return volume.handle

    def publish_request(self, pod: Pod, volume: Volume) -> pb.NodePublishVolumeRequest:
        flags: tuple[str, ...] = ()
        if isinstance(volume, InlineVolume):
            read_only, mode, ephemeral = volume.read_only, "ReadWriteOnce", True
        else:
            read_only, mode = volume.claim_read_only, volume.access_modes[0]
            flags, ephemeral = volume.mount_options, False
        context = {
            **volume.attributes,
            "csi.storage.k8s.io/pod.name": pod.name,
            "csi.storage.k8s.io/pod.namespace": pod.namespace,
            "csi.storage.k8s.io/pod.uid": pod.uid,
            "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
            "csi.storage.k8s.io/ephemeral": str(ephemeral).lower(),
        }
        return pb.NodePublishVolumeRequest(
            volume_id=self.volume_id(pod, volume),
            target_path=str(self.target(pod, volume)),
            volume_capability=pb.VolumeCapability(
                mount=pb.VolumeCapability.MountVolume(
                    fs_type=volume.fs_type, mount_flags=list(flags)
                ),
                access_mode=pb.VolumeCapability.AccessMode(mode=ACCESS_MODES[mode]),
            ),
            readonly=read_only,
            volume_context=context,
        )

    # ---------------------------------------------------------------- SetUp / TearDown

    def set_up(self, pod: Pod, volume: Volume) -> Outcome:
        """One SetUpAt: parent dir and vol_data.json, NodePublishVolume, cleanup if final."""
        target = self.target(pod, volume)
        target.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        ephemeral = isinstance(volume, InlineVolume)
        data = {
            "specVolID": volume.name,
            "volumeHandle": self.volume_id(pod, volume),
            "driverName": self.driver,
            "nodeName": self.node,
            "volumeLifecycleMode": "Ephemeral" if ephemeral else "Persistent",
        }
        (target.parent / VOL_DATA).write_text(json.dumps(data))
        outcome = self._call("NodePublishVolume", self.publish_request(pod, volume))
        if not outcome.ok and not outcome.uncertain:
            self.remove_mount_dir(target)
        return outcome

    def tear_down(self, pod: Pod, volume: Volume) -> Outcome:
        """One TearDownAt: NodeUnpublishVolume with the id from vol_data.json, then cleanup."""
        target = self.target(pod, volume)
        data = json.loads((target.parent / VOL_DATA).read_text())
        request = pb.NodeUnpublishVolumeRequest(
            volume_id=data["volumeHandle"], target_path=str(target)
        )
        outcome = self._call("NodeUnpublishVolume", request)
        if outcome.ok:
            self.remove_mount_dir(target)
        return outcome

    def volume_stats(self, pod: Pod, volume: Volume) -> pb.NodeGetVolumeStatsResponse:
        request = pb.NodeGetVolumeStatsRequest(
            volume_id=self.volume_id(pod, volume), volume_path=str(self.target(pod, volume))
        )
        response: pb.NodeGetVolumeStatsResponse = self.stub.NodeGetVolumeStats(
            request, timeout=self.timeout
        )
        return response

    def mount(self, pod: Pod, volume: Volume, *, attempts: int = 8) -> list[Outcome]:
        """SetUp with kubelet's retries until it succeeds or ``attempts`` are spent."""
        return self._retry(lambda: self.set_up(pod, volume), attempts)

    def unmount(self, pod: Pod, volume: Volume, *, attempts: int = 8) -> list[Outcome]:
        return self._retry(lambda: self.tear_down(pod, volume), attempts)

    def remove_mount_dir(self, target: Path) -> None:
        """removeMountDir: refuse while mounted; else the target, vol_data.json, the parent."""
        if find_mount(target) is not None:
            raise AssertionError(f"kubelet would not remove {target}: it is still a mount point")
        for path in (target, target.parent / VOL_DATA):
            if path.is_dir():
                path.rmdir()
            elif path.exists():
                path.unlink()
        if target.parent.is_dir():
            os.rmdir(target.parent)

    # ---------------------------------------------------------------- plumbing

    def _retry(self, operation: Any, attempts: int) -> list[Outcome]:
        outcomes: list[Outcome] = [operation()]
        for delay in backoff_delays(attempts - 1, self.backoff_scale):
            if outcomes[-1].ok:
                break
            time.sleep(delay)  # kubelet's backoff between attempts, not a synchronisation
            outcomes.append(operation())
        return outcomes

    def _call(self, method: str, request: Any) -> Outcome:
        try:
            getattr(self.stub, method)(request, timeout=self.timeout)
            outcome = Outcome(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            outcome = Outcome(err.code(), err.details() or "")
        self.calls.append((method, outcome))
        return outcome
