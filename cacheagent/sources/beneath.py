"""Open files inside a directory without following a symlink or leaving the directory.

An OCI layout named by a pod may sit in a directory the pod writes (an emptyDir lives under
the kubelet directory), so any of its files may be a symlink to another pod's secrets. Every
open here refuses symlinks on the whole path:

- ``open_dir(path)`` opens the layout directory itself with no symlink anywhere on its path;
- ``open_beneath(dir_fd, relpath)`` opens a file below that directory fd.

Both use ``openat2(2)`` with ``RESOLVE_NO_SYMLINKS`` (and ``RESOLVE_BENEATH`` below a
directory), called through ``ctypes`` because Python has no binding for it. Where the kernel
lacks it (before Linux 5.6, or a seccomp filter answering ENOSYS/EPERM) they walk the path one
component at a time from a directory fd with ``O_NOFOLLOW``, which gives the same guarantee for
paths without ``..`` (both refuse ``..``). Files are opened ``O_NONBLOCK`` and must be regular
files, so a FIFO planted in the layout cannot hang a worker thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import PurePosixPath

from cacheagent.errors import UnsafePathError

_SYS_OPENAT2 = 437  # the same number on every architecture (the generic syscall table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_AT_FDCWD = -100


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


_libc = ctypes.CDLL(None, use_errno=True)
_openat2_works: bool | None = None  # None: not tried yet


def open_dir(path: str) -> int:
    """An ``O_PATH``-free read fd on directory ``path`` (absolute), through no symlink."""
    components = _components(path, absolute=True)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        fd = _openat2(_AT_FDCWD, path, flags, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        if fd is not None:
            return fd
        root = os.open("/", flags)
        try:
            return _walk(root, components, flags)
        finally:
            os.close(root)
    except OSError as exc:
        _raise_if_symlink(exc, path)
        raise


def open_beneath(dir_fd: int, relpath: str) -> int:
    """A read fd on the regular file ``relpath`` below ``dir_fd``, through no symlink.

    Raises FileNotFoundError when it does not exist, ``UnsafePathError`` when a component is a
    symlink or the file is not a regular file, other ``OSError`` as the kernel reports them.
    """
    components = _components(relpath, absolute=False)
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
    try:
        fd = _openat2(dir_fd, relpath, flags, resolve)
        if fd is None:
            fd = _walk(dir_fd, components, flags)
    except OSError as exc:
        _raise_if_symlink(exc, relpath)
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(relpath, "not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _raise_if_symlink(exc: OSError, path: str) -> None:
    if exc.errno in (errno.ELOOP, errno.EXDEV):
        raise UnsafePathError(path, "a symlink on the way (symlinks are not followed)") from None


def _components(path: str, *, absolute: bool) -> list[str]:
    if "\0" in path or path.startswith("/") != absolute:
        raise UnsafePathError(path, "expected an absolute path" if absolute else "not relative")
    parts = PurePosixPath(path).parts[1 if absolute else 0 :]
    if not parts or any(part in (".", "..") for part in parts):
        raise UnsafePathError(path, "empty, or '.' or '..' in the path")
    return list(parts)


def _openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int | None:
    """openat2(2), or None when this kernel cannot do it (the caller walks instead)."""
    global _openat2_works
    if _openat2_works is False:
        return None
    how = _OpenHow(flags=flags, mode=0, resolve=resolve)
    fd = _libc.syscall(
        _SYS_OPENAT2,
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd >= 0:
        _openat2_works = True
        return int(fd)
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM) and not _openat2_works:
        _openat2_works = False
        return None
    raise OSError(err, os.strerror(err), path)


def _walk(dir_fd: int, components: list[str], flags: int) -> int:
    """The fallback: one ``O_NOFOLLOW`` open per component, each from the previous fd."""
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    current = os.dup(dir_fd)
    try:
        for part in components[:-1]:
            following = _open_component(part, dir_flags, current)
            os.close(current)
            current = following
        return _open_component(components[-1], flags | os.O_NOFOLLOW, current)
    finally:
        os.close(current)


def _open_component(name: str, flags: int, dir_fd: int) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except NotADirectoryError:
        # O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR; say what it really is.
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
        raise
