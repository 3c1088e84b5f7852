"""The /proc/self/mountinfo parser and the path arithmetic built on it (pure)."""

from __future__ import annotations

from cacheagent.csi.mounts import fs_location
from cacheagent.mountinfo import find_mount, mounts_at, parse_mountinfo, parse_mountinfo_line

SAMPLE = (
    "22 1 0:21 / /proc rw,relatime - proc proc rw\n"
    "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n"
    "40 27 259:1 / /mnt/nvme rw,noatime shared:7 master:2 - xfs /dev/nvme0n1 rw,attr2\n"
    "41 27 259:1 /cache/models/sha256/ab12 /var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/"
    "my\\040model/mount ro,nosuid,nodev,noatime shared:7 - xfs /dev/nvme0n1 rw,attr2\n"
    "42 41 259:1 /cache/models/sha256/ab12 /var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/"
    "my\\040model/mount ro,nosuid,nodev,noatime - xfs /dev/nvme0n1 rw\n"
    "43 27 254:0 /host/agent /var/lib/cacheagent rw,relatime - ext4 /dev/vda rw\n"
    "garbage that is not a mountinfo line\n"
)
TARGET = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/my model/mount"


def test_parses_fields_optional_fields_and_escapes() -> None:
    mounts = parse_mountinfo(SAMPLE)
    assert [m.mount_id for m in mounts] == [22, 27, 40, 41, 42, 43]  # the garbage line is skipped
    nvme = mounts[2]
    assert (nvme.parent_id, nvme.major_minor, nvme.root) == (27, "259:1", "/")
    assert (nvme.mount_point, nvme.fs_type, nvme.source) == ("/mnt/nvme", "xfs", "/dev/nvme0n1")
    assert "noatime" in nvme.options and not nvme.read_only
    bind = mounts[3]
    assert bind.mount_point == TARGET
    assert bind.read_only and {"nosuid", "nodev"} <= bind.options
    assert bind.super_options == frozenset({"rw", "attr2"})


def test_unescapes_tab_newline_and_backslash() -> None:
    entry = parse_mountinfo_line(r"50 1 0:5 /a\011b /x\012y\134z rw - tmpfs none rw")
    assert (entry.root, entry.mount_point) == ("/a\tb", "/x\ny\\z")


def test_malformed_line_raises_naming_it() -> None:
    try:
        parse_mountinfo_line("1 2 3")
    except ValueError as exc:
        assert "1 2 3" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_mounts_at_lists_stacked_mounts() -> None:
    mounts = parse_mountinfo(SAMPLE)
    assert [m.mount_id for m in mounts_at(TARGET, mounts)] == [41, 42]
    assert mounts_at(TARGET + "/sub", mounts) == []
    assert mounts_at("/var/lib/kubelet", mounts) == []


def test_fs_location_maps_a_host_path_into_its_filesystem() -> None:
    mounts = parse_mountinfo(SAMPLE)
    assert fs_location("/mnt/nvme/cache/models/sha256", mounts) == ("259:1", "/cache/models/sha256")
    assert fs_location("/srv/store/models", mounts) == ("254:0", "/srv/store/models")
    assert fs_location("/mnt/nvme", mounts) == ("259:1", "/")
    assert fs_location("/mnt/nvmex/a", mounts) == ("254:0", "/mnt/nvmex/a")
    assert fs_location("/proc/self", mounts) == ("0:21", "/self")
    # The store itself bind-mounted into the agent's container (a hostPath volume):
    assert fs_location("/var/lib/cacheagent/models/sha256", mounts) == (
        "254:0",
        "/host/agent/models/sha256",
    )
    assert fs_location("/x", []) is None


def test_find_mount_sees_the_root_filesystem() -> None:
    root = find_mount("/")
    assert root is not None
    assert root.mount_point == "/"
    major, minor = root.device.split(":")
    assert major.isdigit() and minor.isdigit()
