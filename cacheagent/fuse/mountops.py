"""The kernel side of a FUSE mount: mount(2), unmount, stale mounts, the bdi readahead knob.

No libfuse and no fusermount3: the agent is root, so it opens ``/dev/fuse`` and calls mount(2)
itself (what libfuse's ``fuse_kern_mount`` does for root), and unmounts with umount(8).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import subprocess
from pathlib import Path

from cacheagent.errors import CacheAgentError
from cacheagent.mountinfo import MountInfo, find_mount

log = logging.getLogger(__name__)

FS_NAME = "cacheagent"
FS_TYPE = f"fuse.{FS_NAME}"
BDI_ROOT = Path("/sys/class/bdi")
_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_UNMOUNT_TIMEOUT_S = 10.0
_MAX_STACKED = 8  # stale mounts detached at one start (one per crashed agent)


class MountError(CacheAgentError):
    """The FUSE filesystem could not be mounted or unmounted; the message names the mount point."""


def mount_fuse(fd: int, mountpoint: Path, *, allow_other: bool) -> None:
    """mount(2) a ``fuse.cacheagent`` filesystem served through ``fd`` (read-only, nosuid,
    nodev, permissions checked by the kernel from the modes we report)."""
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions"
    if allow_other:
        options += ",allow_other"
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    result = libc.mount(
        FS_NAME.encode(),
        os.fsencode(mountpoint),
        FS_TYPE.encode(),
        ctypes.c_ulong(_MS_RDONLY | _MS_NOSUID | _MS_NODEV),
        options.encode(),
    )
    if result != 0:
        err = ctypes.get_errno()
        raise MountError(f"mount(2) of FUSE at {mountpoint} failed: {os.strerror(err)}")


def unmount(mountpoint: Path) -> None:
    """Unmount a FUSE mount; when it is busy, abort its connection and detach it."""
    if find_mount(mountpoint) is None:
        return
    if _run_umount(mountpoint):
        return
    _run_umount(mountpoint, "-f")  # aborts the FUSE connection even when busy
    if find_mount(mountpoint) is not None and not _run_umount(mountpoint, "-l"):
        raise MountError(f"cannot unmount {mountpoint}")


def clear_stale_mount(mountpoint: Path) -> None:
    """Detach dead FUSE mounts left at ``mountpoint`` by crashes; refuse a live one."""
    for _ in range(_MAX_STACKED):
        entry = find_mount(mountpoint)
        if entry is None:
            return
        try:
            os.statvfs(mountpoint)  # always asks the server; stat() may answer from the cache
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
            log.warning("fuse: detaching stale mount at %s left by a previous agent", mountpoint)
            if not _run_umount(mountpoint, "-l"):
                raise MountError(f"cannot detach the stale mount at {mountpoint}") from exc
            continue
        raise MountError(
            f"{mountpoint} is already a live {entry.fs_type} mount (is another agent running?)"
        )
    raise MountError(f"more than {_MAX_STACKED} stale mounts stacked at {mountpoint}")


def set_read_ahead(entry: MountInfo, read_ahead_kb: int) -> int | None:
    """Set the mount's readahead window; returns what the kernel reports (None if unknown).

    The kernel gives a FUSE mount a 128 KiB window, and a sequential reader (a model loader) is
    only as fast as the window lets the kernel read ahead.
    """
    knob = BDI_ROOT / entry.device / "read_ahead_kb"
    try:
        knob.write_text(f"{read_ahead_kb}\n")
        return int(knob.read_text())
    except (OSError, ValueError) as exc:
        log.warning("fuse: cannot set %s to %d: %s", knob, read_ahead_kb, exc)
        try:
            return int(knob.read_text())
        except (OSError, ValueError):
            return None


def _run_umount(mountpoint: Path, *flags: str) -> bool:
    binary = shutil.which("umount") or "/usr/bin/umount"
    done = subprocess.run(
        [binary, *flags, str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=_UNMOUNT_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        log.info("fuse: umount %s %s: %s", " ".join(flags), mountpoint, done.stderr.strip())
    return done.returncode == 0
