"""Mounts a test (or benchmark) made: list what is under a directory, detach leftovers."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from cacheagent.mountinfo import read_mountinfo

_libc = ctypes.CDLL(None, use_errno=True)


def mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    return [m.mount_point for m in read_mountinfo() if m.mount_point.startswith(prefix)]


def force_unmount(path: str) -> None:
    """Test cleanup only: detach whatever is left (the driver itself never does this)."""
    _libc.umount2(os.fsencode(path), 2)  # MNT_DETACH
