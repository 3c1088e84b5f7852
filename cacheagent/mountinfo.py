"""/proc/self/mountinfo: which mounts exist, where, of what type, on which device (proc(5)).

The parser is pure; ``read_mountinfo`` and ``find_mount`` read the live file. Shared by the CSI
driver (what is published where) and the FUSE mount (is it up, which bdi to tune).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
_ESCAPE_RE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo (proc(5)); paths are unescaped."""

    mount_id: int
    parent_id: int
    major_minor: str
    root: str
    mount_point: str
    options: frozenset[str]
    fs_type: str
    source: str
    super_options: frozenset[str]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options

    @property
    def device(self) -> str:
        """``major:minor``, also the name of the mount's /sys/class/bdi entry."""
        return self.major_minor


def _unescape(field: str) -> str:
    return _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo_line(line: str) -> MountInfo:
    """Parse one mountinfo line; ValueError names the line when it is not one."""
    fields = line.split()
    try:
        sep = fields.index("-", 6)
        mount_id, parent_id, major_minor, root, mount_point, options = fields[:6]
        fs_type, source, super_options = fields[sep + 1 : sep + 4]
        return MountInfo(
            mount_id=int(mount_id),
            parent_id=int(parent_id),
            major_minor=major_minor,
            root=_unescape(root),
            mount_point=_unescape(mount_point),
            options=frozenset(options.split(",")),
            fs_type=fs_type,
            source=_unescape(source),
            super_options=frozenset(super_options.split(",")),
        )
    except (ValueError, IndexError) as exc:
        raise ValueError(f"not a mountinfo line: {line!r}") from exc


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Parse the whole of /proc/self/mountinfo, in mount order, skipping malformed lines.

    Skipping rather than failing: a line a future kernel formats differently must not make
    every publish fail; it only makes that one mount invisible to us.
    """
    entries = []
    for line in text.splitlines():
        try:
            entries.append(parse_mountinfo_line(line))
        except ValueError:
            continue
    return entries


def read_mountinfo() -> list[MountInfo]:
    return parse_mountinfo(MOUNTINFO.read_text(encoding="utf-8", errors="surrogateescape"))


def mounts_at(path: Path | str, mounts: Iterable[MountInfo]) -> list[MountInfo]:
    """The mounts stacked on exactly ``path`` (an absolute, symlink-free path), bottom first."""
    target = os.fspath(path)
    return [m for m in mounts if m.mount_point == target]


def find_mount(path: Path | str) -> MountInfo | None:
    """The live mount visible at ``path`` (the top of the stack there), if any."""
    stacked = mounts_at(path, read_mountinfo())
    return stacked[-1] if stacked else None
