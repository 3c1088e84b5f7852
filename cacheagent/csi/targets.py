"""Where a volume may be mounted: a directory under the kubelet directory, never via a symlink.

The driver runs privileged in the host's mount namespace, so a target path is an attack surface:
``/var/lib/kubelet/../../etc`` or a symlink planted under the kubelet directory would otherwise
let a caller of the socket mount over any host directory. Two layers:

1. ``check_target`` (pure): the path must be absolute, normalised (no ``.``, ``..`` or empty
   components) and strictly below the configured kubelet directory (or its resolved form, since
   ``/var/lib/kubelet`` is itself a symlink on some distributions). Refused: INVALID_ARGUMENT.
2. ``open_parent`` walks the components below the kubelet directory with
   ``O_PATH|O_NOFOLLOW|O_DIRECTORY``, one ``openat`` at a time, and the mount is made through
   those descriptors (mounts.py). A symlink anywhere below the kubelet directory is refused with
   PERMISSION_DENIED: it was put there by someone, and we will not guess what they meant.

One symlink is the operator's, not an attacker's: k0s, microk8s and k3s installs (and nodes
whose pod data lives on another disk) make ``<kubelet dir>/pods`` a symlink. It is resolved once,
when the agent starts, and targets below ``<kubelet dir>/pods`` (either spelling of the kubelet
directory, or the resolved pods directory itself) are walked from its real path; a symlink
planted later below it is still refused.

The CO creates the target's parent directory; the driver creates the target itself (mode 0750,
narrowed by the umask) and removes it again on unpublish.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from .limits import check_path, shown
from .mounts import DIR_PATH_FLAGS
from .status import CsiFailure, invalid

log = logging.getLogger(__name__)

TARGET_DIR_MODE = 0o750


@dataclass(frozen=True)
class KubeletDir:
    """The configured kubelet directory and what it resolves to on this host."""

    configured: str
    real: str
    pods_real: str | None = None  # the real path of ``<kubelet dir>/pods`` when it is a symlink

    @classmethod
    def resolve(cls, path: Path | str) -> KubeletDir:
        configured = os.path.normpath(os.fspath(path))
        if not Path(configured).is_absolute():
            raise ValueError(f"kubelet directory must be absolute: {configured!r}")
        real = os.path.realpath(configured)
        pods = Path(real, "pods")
        pods_real = os.path.realpath(pods) if pods.is_symlink() else None
        return cls(configured=configured, real=real, pods_real=pods_real)

    @property
    def roots(self) -> tuple[tuple[str, str], ...]:
        """(prefix a target may start with, real directory to walk from), most specific first."""
        plain = ((self.configured, self.real), (self.real, self.real))
        if self.pods_real is None:
            return plain
        pods = tuple((f"{p.rstrip('/')}/pods", self.pods_real) for p, _ in plain)
        return (*pods, (self.pods_real, self.pods_real), *plain)

    @property
    def mount_dirs(self) -> tuple[str, ...]:
        """The real directories under which published volumes are mounted."""
        return (self.real,) if self.pods_real is None else (self.real, self.pods_real)


@dataclass(frozen=True)
class Target:
    """A checked target: ``path`` is absolute under the *resolved* ``base``."""

    path: str
    parts: tuple[str, ...]  # components below ``base``; at least one
    base: str  # the real directory the walk starts from (kubelet dir or its pods/)

    @property
    def name(self) -> str:
        return self.parts[-1]


def check_target(text: str, kubelet: KubeletDir, field: str = "target_path") -> Target:
    """Lexical checks only (no I/O); raise CsiFailure(INVALID_ARGUMENT) naming ``field``."""
    check_path(field, text)
    if not text.startswith("/"):
        raise invalid(f"{field} must be an absolute path, got {shown(text)}")
    parts = text.rstrip("/").split("/")[1:]
    if any(p in ("", ".", "..") for p in parts):
        raise invalid(
            f"{field} must be a normalised path (no '.', '..' or '//'), got {shown(text)}"
        )
    for prefix, base in dict.fromkeys(kubelet.roots):
        base_parts = [p for p in prefix.split("/") if p]
        if len(parts) > len(base_parts) and parts[: len(base_parts)] == base_parts:
            below = tuple(parts[len(base_parts) :])
            return Target(path="/".join((base.rstrip("/"), *below)), parts=below, base=base)
    raise invalid(f"{field} {shown(text)} is not under the kubelet directory {kubelet.configured}")


def _refuse_symlink(target: Target, depth: int) -> CsiFailure:
    shown = "/".join(target.parts[: depth + 1])
    return CsiFailure(
        grpc.StatusCode.PERMISSION_DENIED,
        f"target {target.path}: {shown!r} under the kubelet directory is a symlink or not a "
        "directory; refusing to follow it",
    )


def _walk_to_parent(target: Target) -> int | None:
    fd = os.open(target.base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, part in enumerate(target.parts[:-1]):
            try:
                child = os.open(part, DIR_PATH_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refuse_symlink(target, depth) from exc
                raise
            fd, child = child, fd
            os.close(child)
        fd, parent = -1, fd
        return parent
    finally:
        if fd >= 0:
            os.close(fd)


@contextmanager
def open_parent(target: Target) -> Iterator[int | None]:
    """Yield an O_PATH descriptor of the target's parent, or None if the parent does not exist."""
    fd = _walk_to_parent(target)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def leaf_kind(parent_fd: int, target: Target) -> str:
    """'missing', 'dir', or (refused) symlink / other file: raises CsiFailure for those."""
    try:
        st = os.lstat(target.name, dir_fd=parent_fd)
    except FileNotFoundError:
        return "missing"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        raise _refuse_symlink(target, len(target.parts) - 1)
    raise CsiFailure(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"target {target.path} exists and is not a directory",
    )


def make_target_dir(parent_fd: int, target: Target) -> None:
    """Create the target directory if it is missing (the SP's job per the CSI spec)."""
    if leaf_kind(parent_fd, target) == "missing":
        try:
            os.mkdir(target.name, TARGET_DIR_MODE, dir_fd=parent_fd)
        except FileExistsError:
            leaf_kind(parent_fd, target)  # raced with someone: refuse unless it is a directory


def remove_target_dir(parent_fd: int, target: Target) -> None:
    """Remove the (unmounted) target directory; leave it, with a warning, if it is not empty."""
    try:
        os.rmdir(target.name, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        log.warning("target %s is not empty after unmount; leaving it in place", target.path)
