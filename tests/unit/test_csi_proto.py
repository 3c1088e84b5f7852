"""proto/csi/v1/csi.proto keeps the CSI spec v1's names and numbers (the wire contract).

The table below is transcribed from the CSI specification (container-storage-interface/spec,
csi.proto), independently of our .proto; a renumbered or renamed field fails here.
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor

from cacheagent._proto.csi.v1 import csi_pb2 as pb

SPEC_FIELDS: dict[str, dict[str, int]] = {
    "GetPluginInfoResponse": {"name": 1, "vendor_version": 2, "manifest": 3},
    "GetPluginCapabilitiesResponse": {"capabilities": 1},
    "PluginCapability": {"service": 1, "volume_expansion": 2},
    "PluginCapability.Service": {"type": 1},
    "ProbeResponse": {"ready": 1},
    "VolumeCapability": {"block": 1, "mount": 2, "access_mode": 3},
    "VolumeCapability.MountVolume": {"fs_type": 1, "mount_flags": 2, "volume_mount_group": 3},
    "VolumeCapability.AccessMode": {"mode": 1},
    "CapacityRange": {"required_bytes": 1, "limit_bytes": 2},
    "Topology": {"segments": 1},
    "VolumeUsage": {"available": 1, "total": 2, "used": 3, "unit": 4},
    "VolumeCondition": {"abnormal": 1, "message": 2},
    "NodeStageVolumeRequest": {
        "volume_id": 1,
        "publish_context": 2,
        "staging_target_path": 3,
        "volume_capability": 4,
        "secrets": 5,
        "volume_context": 6,
    },
    "NodeUnstageVolumeRequest": {"volume_id": 1, "staging_target_path": 2},
    "NodePublishVolumeRequest": {
        "volume_id": 1,
        "publish_context": 2,
        "staging_target_path": 3,
        "target_path": 4,
        "volume_capability": 5,
        "readonly": 6,
        "secrets": 7,
        "volume_context": 8,
    },
    "NodeUnpublishVolumeRequest": {"volume_id": 1, "target_path": 2},
    "NodeGetVolumeStatsRequest": {"volume_id": 1, "volume_path": 2, "staging_target_path": 3},
    "NodeGetVolumeStatsResponse": {"usage": 1, "volume_condition": 2},
    "NodeGetCapabilitiesResponse": {"capabilities": 1},
    "NodeServiceCapability": {"rpc": 1},
    "NodeServiceCapability.RPC": {"type": 1},
    "NodeGetInfoResponse": {"node_id": 1, "max_volumes_per_node": 2, "accessible_topology": 3},
    "NodeExpandVolumeRequest": {
        "volume_id": 1,
        "volume_path": 2,
        "capacity_range": 3,
        "staging_target_path": 4,
        "volume_capability": 5,
        "secrets": 6,
    },
    "NodeExpandVolumeResponse": {"capacity_bytes": 1},
}

SPEC_ENUMS: dict[str, dict[str, int]] = {
    "PluginCapability.Service.Type": {
        "UNKNOWN": 0,
        "CONTROLLER_SERVICE": 1,
        "VOLUME_ACCESSIBILITY_CONSTRAINTS": 2,
        "GROUP_CONTROLLER_SERVICE": 3,
        "SNAPSHOT_METADATA_SERVICE": 4,
    },
    "VolumeCapability.AccessMode.Mode": {
        "UNKNOWN": 0,
        "SINGLE_NODE_WRITER": 1,
        "SINGLE_NODE_READER_ONLY": 2,
        "MULTI_NODE_READER_ONLY": 3,
        "MULTI_NODE_SINGLE_WRITER": 4,
        "MULTI_NODE_MULTI_WRITER": 5,
        "SINGLE_NODE_SINGLE_WRITER": 6,
        "SINGLE_NODE_MULTI_WRITER": 7,
    },
    "VolumeUsage.Unit": {"UNKNOWN": 0, "BYTES": 1, "INODES": 2},
    "NodeServiceCapability.RPC.Type": {
        "UNKNOWN": 0,
        "STAGE_UNSTAGE_VOLUME": 1,
        "GET_VOLUME_STATS": 2,
        "EXPAND_VOLUME": 3,
        "VOLUME_CONDITION": 4,
        "SINGLE_NODE_MULTI_WRITER": 5,
        "VOLUME_MOUNT_GROUP": 6,
    },
}

SPEC_METHODS = {
    "Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
    "Node": [
        "NodeStageVolume",
        "NodeUnstageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeGetVolumeStats",
        "NodeExpandVolume",
        "NodeGetCapabilities",
        "NodeGetInfo",
    ],
}


def _message(path: str) -> Descriptor:
    head, *rest = path.split(".")
    desc = pb.DESCRIPTOR.message_types_by_name[head]
    for name in rest:
        desc = desc.nested_types_by_name[name]
    return desc


def test_package() -> None:
    assert pb.DESCRIPTOR.package == "csi.v1"


@pytest.mark.parametrize("message", sorted(SPEC_FIELDS))
def test_field_names_and_numbers(message: str) -> None:
    desc = _message(message)
    assert {f.name: f.number for f in desc.fields} == SPEC_FIELDS[message]


@pytest.mark.parametrize("enum", sorted(SPEC_ENUMS))
def test_enum_values(enum: str) -> None:
    *owner, name = enum.split(".")
    values = _message(".".join(owner)).enum_types_by_name[name].values
    assert {v.name: v.number for v in values} == SPEC_ENUMS[enum]


def test_services_and_method_paths() -> None:
    for service, methods in SPEC_METHODS.items():
        desc = pb.DESCRIPTOR.services_by_name[service]
        assert desc.full_name == f"csi.v1.{service}"
        assert [m.name for m in desc.methods] == methods
    probe = pb.DESCRIPTOR.services_by_name["Identity"].methods_by_name["Probe"]
    ready = probe.output_type.fields_by_name["ready"].message_type
    assert ready is not None and ready.full_name == "google.protobuf.BoolValue"
