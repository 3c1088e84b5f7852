"""What a CSI node request must look like before the driver acts on it. Pure.

Each ``check_*`` bounds every field of its request (limits.py) first, so nothing unbounded is
parsed, logged or echoed, then applies the driver's rules:

- access type ``mount`` only (block: INVALID_ARGUMENT); the access mode is the PV's *first*
  access mode (kubelet sends only ``AccessModes[0]``), and ReadWriteMany
  (MULTI_NODE_MULTI_WRITER) is refused with a message saying what to use instead;
- PV ``mountOptions`` (``mount_flags``) are honoured where they mean something on a read-only
  model volume (``ro``, ``nosuid``, ``nodev`` are what it gets anyway; ``noexec`` is added to the
  mount) and refused otherwise, naming the option: never dropped silently;
- ``fs_type`` is ignored (kubelet fills it in from the PV; a bind mount has no filesystem type
  of its own to choose).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cacheagent._proto.csi.v1 import csi_pb2 as pb

from .limits import (
    MAX_FLAG_BYTES,
    MAX_ID_BYTES,
    MAX_MOUNT_FLAGS,
    MAX_SHORT_BYTES,
    check_list,
    check_map,
    check_path,
    check_string,
    shown,
)
from .mounts import MS_NOEXEC
from .status import invalid

_Mode = pb.VolumeCapability.AccessMode.Mode
_REFUSED_ACCESS_MODES = {
    _Mode.MULTI_NODE_MULTI_WRITER: "MULTI_NODE_MULTI_WRITER (ReadWriteMany)",
}
MOUNT_OPTIONS = {"ro": 0, "nosuid": 0, "nodev": 0, "noexec": MS_NOEXEC}
"""PV mountOptions a model volume honours, and the mount flag each adds to ``ro,nosuid,nodev``."""


@dataclass(frozen=True)
class PublishFields:
    volume_id: str
    target_path: str
    extra_flags: int  # mount(2) flags from the PV's mountOptions, on top of ro,nosuid,nodev


def required(value: str, field: str) -> str:
    if not value:
        raise invalid(f"{field} is required")
    return value


def volume_id(value: str) -> str:
    return check_string("volume_id", required(value, "volume_id"), MAX_ID_BYTES, identifier=True)


def path(value: str, field: str) -> str:
    return check_path(field, required(value, field))


def check_publish(request: pb.NodePublishVolumeRequest) -> PublishFields:
    """Bound and check a NodePublishVolumeRequest (volume_context is parsed by attributes.py)."""
    vid = volume_id(request.volume_id)
    target = path(request.target_path, "target_path")
    if request.staging_target_path:
        check_path("staging_target_path", request.staging_target_path)
    check_map("volume_context", request.volume_context)
    check_map("publish_context", request.publish_context)
    check_map("secrets", request.secrets, max_key=MAX_SHORT_BYTES, echo=False)
    return PublishFields(vid, target, check_capability(request))


def check_capability(request: pb.NodePublishVolumeRequest) -> int:
    """Check volume_capability; return the extra mount flags its mount_flags ask for."""
    if not request.HasField("volume_capability"):
        raise invalid("volume_capability is required")
    capability = request.volume_capability
    access = capability.WhichOneof("access_type")
    if access == "block":
        raise invalid(
            "block access type is not supported: a model volume is a read-only directory "
            "(use a filesystem volume: volumeMode Filesystem)"
        )
    if access != "mount":
        raise invalid("volume_capability.mount is required (the only supported access type)")
    mount = capability.mount
    check_string("volume_capability.mount.fs_type", mount.fs_type, MAX_SHORT_BYTES)
    check_string(
        "volume_capability.mount.volume_mount_group", mount.volume_mount_group, MAX_SHORT_BYTES
    )
    check_list(
        "volume_capability.mount.mount_flags", mount.mount_flags, MAX_MOUNT_FLAGS, MAX_FLAG_BYTES
    )
    mode = capability.access_mode.mode
    if mode == _Mode.UNKNOWN:
        raise invalid("volume_capability.access_mode.mode is required")
    if mode in _REFUSED_ACCESS_MODES:
        raise invalid(
            f"access mode {_REFUSED_ACCESS_MODES[mode]} is not supported: model volumes are "
            "read-only. Kubelet sends a PersistentVolume's first access mode only: put "
            "ReadOnlyMany first in the PV's accessModes (and the claim's), or use an inline "
            "volume with readOnly: true"
        )
    return mount_flags(mount.mount_flags)


def mount_flags(options: Iterable[str]) -> int:
    """The mount(2) flags for PV ``mountOptions``; INVALID_ARGUMENT naming one it cannot honour."""
    flags = 0
    for entry in options:
        for option in entry.split(","):
            name = option.strip()
            if not name:
                continue
            if name == "rw":
                raise invalid(
                    "mount option 'rw' cannot be honoured: model volumes are always mounted "
                    "read-only (remove it from the PersistentVolume's mountOptions)"
                )
            if name not in MOUNT_OPTIONS:
                raise invalid(
                    f"mount option {shown(name, 64)} is not supported by model volumes "
                    f"(supported: {', '.join(sorted(MOUNT_OPTIONS))}); remove it from the "
                    "PersistentVolume's mountOptions"
                )
            flags |= MOUNT_OPTIONS[name]
    return flags
