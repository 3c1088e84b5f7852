"""Read-only bind mounts through mount(2) and umount2(2).

mount(2) and umount2(2) are called through ctypes rather than mount(8)/umount(8): no fork/exec
per publish (a publish stays in the low milliseconds), errno arrives as a number (EBUSY is told
apart from "not mounted" without parsing localised text), and nothing consults fstab or follows
a symlink behind our back. The target and source arrive as O_PATH file descriptors opened without
following symlinks (see targets.py); mount(2) is handed ``/proc/self/fd/<n>``, so the directory
that was checked is the directory that gets mounted on.

Every function here blocks: async callers run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from pathlib import Path

from cacheagent.errors import CacheAgentError
from cacheagent.mountinfo import MountInfo, mounts_at, read_mountinfo
from cacheagent.store.crashpoints import crashpoint

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
UMOUNT_NOFOLLOW = 0x8

DIR_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
"""open(2) flags for a directory handle that refuses to be a symlink (ELOOP/ENOTDIR)."""

READ_ONLY_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV
"""What every published volume gets, whatever the pod asked for: ``ro,nosuid,nodev``."""


class MountError(CacheAgentError):
    """A mount or unmount syscall failed; ``errno`` and ``path`` say which and where."""

    def __init__(self, op: str, path: str, err: int) -> None:
        self.op = op
        self.path = path
        self.errno = err
        super().__init__(f"{op} {path}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")


class MountBusyError(MountError):
    """The mount is in use (open files, a working directory); it was left mounted on purpose."""

    def __init__(self, path: str) -> None:
        super().__init__("unmount", path, errno.EBUSY)
        self.args = (
            f"unmount {path}: the mount is busy (a process still has files open or its working "
            "directory there); it was not lazily detached, retry once the pod's processes exit",
        )


def is_mountpoint(path: Path | str, mounts: Sequence[MountInfo] | None = None) -> bool:
    return bool(mounts_at(path, read_mountinfo() if mounts is None else mounts))


def fs_location(path: Path | str, mounts: Sequence[MountInfo]) -> tuple[str, str] | None:
    """(device, path inside that filesystem) for an absolute, symlink-free ``path``.

    A bind mount's mountinfo ``root`` is the source's path inside its filesystem, not on the
    host; this lets a caller recognise bind mounts whose source lies under ``path``.
    """
    target = os.fspath(path).rstrip("/") or "/"
    best: MountInfo | None = None
    for m in mounts:
        point = m.mount_point.rstrip("/") or "/"
        inside = target == point or target.startswith(point if point == "/" else point + "/")
        if inside and (best is None or len(point) >= len(best.mount_point.rstrip("/") or "/")):
            best = m
    if best is None:
        return None
    point = best.mount_point.rstrip("/") or "/"
    suffix = target[len(point) :] if point != "/" else target
    root = best.root.rstrip("/")
    return best.major_minor, (root + suffix) or "/"


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def _fd_path(fd: int) -> bytes:
    return f"/proc/self/fd/{fd}".encode()


def _mount(source: bytes | None, target: bytes, flags: int, what: str) -> None:
    if _libc.mount(source, target, None, flags, None) != 0:
        raise MountError("mount", what, ctypes.get_errno())


def bind_mount_read_only(
    source_fd: int, parent_fd: int, name: str, target_path: str, extra_flags: int = 0
) -> None:
    """Bind-mount the directory ``source_fd`` onto ``name`` inside ``parent_fd``, read-only.

    A bind mount takes the source's flags; making it read-only needs a second, remount call on
    the new mount. The new mount is only reachable by looking the name up again (an fd opened
    before the mount keeps pointing at the covered directory), hence the parent fd. If the
    remount fails the bind mount is undone, so no writable mount is left behind.
    ``target_path`` is the same directory as a path, for unmounting and for messages;
    ``extra_flags`` (MS_NOEXEC from a PV's mountOptions) are added to ``ro,nosuid,nodev``.
    """
    leaf = os.open(name, DIR_PATH_FLAGS, dir_fd=parent_fd)
    try:
        _mount(_fd_path(source_fd), _fd_path(leaf), MS_BIND, target_path)
    finally:
        os.close(leaf)
    crashpoint("publish.after_bind")
    try:
        remount_read_only(parent_fd, name, target_path, extra_flags)
    except MountError:
        unmount_top(target_path)
        raise


def remount_read_only(parent_fd: int, name: str, target_path: str, extra_flags: int = 0) -> None:
    """Make the mount on ``name`` inside ``parent_fd`` ``ro,nosuid,nodev``, in place.

    The second step of ``bind_mount_read_only``; the journal reconcile also calls it on a mount
    that a crash between the two steps left writable.
    """
    flags = MS_REMOUNT | MS_BIND | READ_ONLY_FLAGS | extra_flags
    mounted = os.open(name, DIR_PATH_FLAGS, dir_fd=parent_fd)
    try:
        _mount(None, _fd_path(mounted), flags, target_path)
    finally:
        os.close(mounted)  # before any unmount: an open handle on the mount makes it EBUSY


def unmount_top(path: str) -> bool:
    """Unmount the top mount at ``path`` (never lazily); False when nothing is mounted there.

    A busy mount raises MountBusyError and stays, so the caller keeps its journal row and lease
    and nothing is freed under a running process.
    """
    if _libc.umount2(os.fsencode(path), UMOUNT_NOFOLLOW) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    if err == errno.EBUSY:
        raise MountBusyError(path)
    raise MountError("unmount", path, err)
