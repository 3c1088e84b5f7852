"""Parsing /proc/self/mountinfo."""

from __future__ import annotations

from pathlib import Path

from cacheagent.fuse.mountinfo import find_mount, mount_at, parse_line, parse_mountinfo

TEXT = (
    "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "42 22 0:39 / /run/cache\\040agent/fuse ro,nosuid,nodev,relatime shared:7 master:2 - "
    "fuse.cacheagent cacheagent ro,user_id=0,group_id=0,default_permissions,allow_other\n"
    "this line is garbage\n"
    "43 42 0:40 / /run/cache\\040agent/fuse rw,relatime - tmpfs tmpfs rw\n"
)


def test_fields_are_parsed_and_unescaped() -> None:
    entry = parse_mountinfo(TEXT)[1]
    assert entry.mount_id == 42
    assert (entry.major, entry.minor, entry.device) == (0, 39, "0:39")
    assert entry.mount_point == "/run/cache agent/fuse"
    assert entry.fstype == "fuse.cacheagent"
    assert entry.source == "cacheagent"
    assert entry.options == "ro,nosuid,nodev,relatime"


def test_malformed_lines_are_skipped() -> None:
    assert parse_line("this line is garbage") is None
    assert parse_line("1 2 x:y / /a rw - ext4 /dev/a rw") is None
    assert len(parse_mountinfo(TEXT)) == 3


def test_the_last_mount_stacked_on_a_path_wins() -> None:
    entries = parse_mountinfo(TEXT)
    top = mount_at(entries, "/run/cache agent/fuse")
    assert top is not None and top.fstype == "tmpfs"
    assert mount_at(entries, "/run") is None


def test_the_live_root_filesystem_is_found() -> None:
    root = find_mount(Path("/"))
    assert root is not None and root.mount_point == "/"
