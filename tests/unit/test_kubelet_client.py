"""The kubelet-shaped test client says what kubelet says (tests/kubelet.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc

from cacheagent._proto.csi.v1 import csi_pb2 as pb
from tests.kubelet import (
    InlineVolume,
    Kubelet,
    Outcome,
    PersistentVolume,
    Pod,
    backoff_delays,
)

Mode = pb.VolumeCapability.AccessMode


def test_backoff_doubles_from_half_a_second_to_two_minutes_two_seconds() -> None:
    assert backoff_delays(10) == [0.5, 1, 2, 4, 8, 16, 32, 64, 122, 122]
    assert backoff_delays(3, scale=0.1) == [0.05, 0.1, 0.2]


def test_uncertain_and_final_codes() -> None:
    for code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED", "DEADLINE_EXCEEDED", "CANCELLED"):
        assert Outcome(grpc.StatusCode[code]).uncertain
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "INTERNAL"):
        assert not Outcome(grpc.StatusCode[code]).uncertain


def test_requests_carry_what_kubelet_sends(tmp_path: Path) -> None:
    k = Kubelet(tmp_path / "csi.sock", Path("/var/lib/kubelet"), "model.cacheagent.io")
    try:
        pod = Pod("p", "ns", "sa", uid="uid-1")
        inline = k.publish_request(pod, InlineVolume("model", {"model": "r"}))
        assert inline.volume_id == "csi-" + hashlib.sha256(b"uid-1model").hexdigest()
        assert inline.target_path == (
            "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/model/mount"
        )
        assert inline.readonly is False  # csi.readOnly defaults to false
        assert inline.volume_capability.access_mode.mode == Mode.SINGLE_NODE_WRITER
        assert dict(inline.volume_context) == {
            "model": "r",
            "csi.storage.k8s.io/pod.name": "p",
            "csi.storage.k8s.io/pod.namespace": "ns",
            "csi.storage.k8s.io/pod.uid": "uid-1",
            "csi.storage.k8s.io/serviceAccount.name": "sa",
            "csi.storage.k8s.io/ephemeral": "true",
        }
        pv = PersistentVolume(
            "pv", "handle", {"model": "r"}, ("ReadWriteMany", "ReadOnlyMany"), ("noexec",), True
        )
        persistent = k.publish_request(pod, pv)
        assert persistent.volume_id == "handle"
        assert persistent.readonly is False  # the PV's csi.readOnly is not passed on
        assert persistent.volume_capability.access_mode.mode == Mode.MULTI_NODE_MULTI_WRITER
        assert list(persistent.volume_capability.mount.mount_flags) == ["noexec"]
        assert persistent.volume_context["csi.storage.k8s.io/ephemeral"] == "false"
        claimed = PersistentVolume("pv", "handle", {"model": "r"}, claim_read_only=True)
        assert k.publish_request(pod, claimed).readonly is True
    finally:
        k.close()
