"""Request bounds, mount options, ownership of mounts and the SELinux probe: the pure rules."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cacheagent._proto.csi.v1 import csi_pb2 as pb
from cacheagent.csi import selinux
from cacheagent.csi.journal import Publish
from cacheagent.csi.limits import SHOWN_CHARS, check_map, shown
from cacheagent.csi.mounts import MS_NOEXEC
from cacheagent.csi.ownership import is_ours, top_mount
from cacheagent.csi.requests import check_publish, mount_flags
from cacheagent.csi.status import CsiFailure
from cacheagent.mountinfo import parse_mountinfo

HEX = "ab" * 32
TARGET = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/m/mount"


def _refusal(call: object, *args: object) -> str:
    with pytest.raises(CsiFailure) as info:
        call(*args)  # type: ignore[operator]
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.message


def test_shown_escapes_and_truncates() -> None:
    assert shown("a\nb") == "'a\\nb'"
    long = shown("x" * 100_000)
    assert len(long) < SHOWN_CHARS + 40 and "100000 bytes" in long and "\n" not in long


def test_maps_are_bounded_by_count_size_and_content() -> None:
    assert "3 entries; the limit is 2" in _refusal(
        lambda: check_map("volume_context", {"a": "", "b": "", "c": ""}, max_keys=2)
    )
    assert "the limit is 16384 bytes" in _refusal(check_map, "volume_context", {"m": "x" * 20_000})
    assert "control characters" in _refusal(check_map, "volume_context", {"m": "a\nb"})
    message = _refusal(lambda: check_map("secrets", {"k": "s\ne" * 10_000}, echo=False))
    assert "s\\ne" not in message  # a secret's value is never echoed


def test_publish_request_fields_are_bounded() -> None:
    request = pb.NodePublishVolumeRequest(
        volume_id="v", target_path=TARGET, volume_capability=pb.VolumeCapability()
    )
    request.volume_capability.mount.SetInParent()
    request.volume_capability.access_mode.mode = pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    assert check_publish(request).extra_flags == 0
    request.volume_capability.mount.mount_flags.extend(["x"] * 40)
    assert "mount_flags has 40 entries" in _refusal(check_publish, request)
    request.volume_capability.mount.ClearField("mount_flags")
    request.staging_target_path = "/" + "s" * 300
    assert "255 bytes per component" in _refusal(check_publish, request)


def test_mount_options_are_honoured_or_refused_by_name() -> None:
    assert mount_flags(["ro", "nosuid,nodev", " noexec "]) == MS_NOEXEC
    assert mount_flags([]) == 0
    assert "'rw' cannot be honoured" in _refusal(mount_flags, ["rw"])
    assert "'sync' is not supported" in _refusal(mount_flags, ["noexec", "sync"])


MOUNTINFO = f"""\
30 1 8:1 / / rw - ext4 /dev/sda1 rw
40 30 8:1 /store/models/sha256/{HEX} {TARGET} ro,nosuid,nodev - ext4 /dev/sda1 rw
41 40 0:50 / {TARGET} rw - tmpfs tmpfs rw
"""


def test_only_our_mount_at_the_top_of_the_stack_is_ours() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    row = Publish("vol", TARGET, f"sha256:{HEX}", "ref", "bind")
    location = ("8:1", "/store/models/sha256")
    top = top_mount(TARGET, mounts)
    assert top is not None and top.fs_type == "tmpfs" and not is_ours(top, row, location)
    ours = top_mount(TARGET, mounts[:2])
    assert ours is not None and is_ours(ours, row, location)
    other_model = Publish("vol", TARGET, "sha256:" + "cd" * 32, "ref", "bind")
    assert not is_ours(ours, other_model, location)
    assert not is_ours(ours, row, ("8:2", "/store/models/sha256"))  # same path, another disk
    assert top_mount("/elsewhere", mounts) is None


def test_selinux_probe_reads_selinuxfs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(selinux, "SELINUXFS", tmp_path)
    monkeypatch.setattr(selinux, "read_mountinfo", lambda: [])
    assert not selinux.selinux_enabled()
    (tmp_path / "enforce").write_text("1")
    assert selinux.selinux_enabled()
    (tmp_path / "enforce").unlink()
    monkeypatch.setattr(
        selinux, "read_mountinfo", lambda: parse_mountinfo("9 1 0:9 / /x rw - selinuxfs s rw\n")
    )
    assert selinux.selinux_enabled()
    assert selinux.SELinux.detect(lambda: True).enabled
    assert not selinux.SELinux.detect(lambda: False).enabled
