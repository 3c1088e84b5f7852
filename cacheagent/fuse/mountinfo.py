"""Reading /proc/self/mountinfo: is a path a mount point, of which type, on which device.

Parsing is pure (``parse_mountinfo``); ``find_mount`` reads the live file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    major: int
    minor: int
    mount_point: str
    fstype: str
    source: str
    options: str  # per-mount options (ro, nosuid, ...)

    @property
    def device(self) -> str:
        """``major:minor``, the name of the mount's backing-device-info in /sys/class/bdi."""
        return f"{self.major}:{self.minor}"


def _unescape(field: str) -> str:
    """Undo the kernel's octal escapes (space, tab, newline, backslash) in path fields."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_line(line: str) -> MountEntry | None:
    """One mountinfo line, or None for a line that does not have the documented shape."""
    fields = line.split()
    try:
        sep = fields.index("-", 6)
        major, minor = fields[2].split(":")
        return MountEntry(
            mount_id=int(fields[0]),
            major=int(major),
            minor=int(minor),
            mount_point=_unescape(fields[4]),
            fstype=fields[sep + 1],
            source=_unescape(fields[sep + 2]),
            options=fields[5],
        )
    except (ValueError, IndexError):
        return None


def parse_mountinfo(text: str) -> list[MountEntry]:
    return [entry for line in text.splitlines() if (entry := parse_line(line)) is not None]


def mount_at(entries: list[MountEntry], mount_point: str) -> MountEntry | None:
    """The mount visible at ``mount_point``: the last one stacked there wins."""
    found = None
    for entry in entries:
        if entry.mount_point == mount_point:
            found = entry
    return found


def find_mount(mount_point: Path) -> MountEntry | None:
    """The live mount at ``mount_point`` (an absolute path, compared literally)."""
    return mount_at(parse_mountinfo(MOUNTINFO.read_text()), str(mount_point))
