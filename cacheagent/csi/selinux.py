"""SELinux nodes (RHEL/CRI-O, OpenShift, Bottlerocket): model trees labelled for containers.

On a node with SELinux enabled, a container (``container_t``) may read only files whose label
allows it; the store's files inherit ``/var/lib``'s label (``var_lib_t``), which it may not. So
before a bind-mode publish the driver labels the model's tree ``container_ro_file_t`` (read-only
content shared by every container: no MCS categories, so every pod on the node may read it) by
setting the ``security.selinux`` xattr on each directory and file, as ``chcon`` does. The blobs
are hard links of the tree's files, so they share the label; the labelling is idempotent (a file
that already carries it is not written) and costs one getxattr per file on later publishes.

``readonly=false`` on an SELinux node is refused: kubelet then asks the container runtime to
relabel the volume, which fails on a read-only mount (EROFS, CreateContainerError) after the
publish succeeded, a puzzle for the pod's author. The refusal says to set ``readOnly: true``.
On nodes without SELinux ``readonly=false`` is accepted (the mount is read-only anyway).

Lazy mode serves files through FUSE, whose labels come from the FUSE mount (``fusefs_t``), not
from xattrs: those volumes are not relabelled here (see the README's "On your cluster").

SELinux cannot run on the development machines, so the probe and the xattr syscalls are fields
of ``SELinux``: tests replace them and assert the calls and values at that boundary.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cacheagent.mountinfo import read_mountinfo

log = logging.getLogger(__name__)

CONTAINER_RO_LABEL = "system_u:object_r:container_ro_file_t:s0"
XATTR = "security.selinux"
SELINUXFS = Path("/sys/fs/selinux")
MAX_LABELLED_ENTRIES = 1_000_000
"""A bound on one tree walk (a model with more files than this is not a model)."""


class LabelError(OSError):
    """A file of a model tree could not be labelled; the message names it and the errno."""


def selinux_enabled() -> bool:
    """SELinux is enabled when selinuxfs is there: ``/sys/fs/selinux/enforce`` or a mount."""
    if (SELINUXFS / "enforce").exists():
        return True
    return any(m.fs_type == "selinuxfs" for m in read_mountinfo())


def _getxattr(path: str, name: str) -> bytes:
    return os.getxattr(path, name, follow_symlinks=False)


def _setxattr(path: str, name: str, value: bytes) -> None:
    os.setxattr(path, name, value, follow_symlinks=False)


@dataclass(frozen=True)
class SELinux:
    """Whether SELinux is enabled on this node, and the syscalls that label a tree."""

    enabled: bool
    label: str = CONTAINER_RO_LABEL
    getxattr: Callable[[str, str], bytes] = _getxattr
    setxattr: Callable[[str, str, bytes], None] = _setxattr

    @classmethod
    def detect(cls, probe: Callable[[], bool] = selinux_enabled) -> SELinux:
        enabled = probe()
        if enabled:
            log.info("SELinux is enabled: model trees are labelled %s", CONTAINER_RO_LABEL)
        return cls(enabled=enabled)

    def label_tree(self, root: Path) -> int:
        """Label ``root`` and everything below it (blocking); returns how many were written."""
        if not self.enabled:
            return 0
        written = 0
        seen = 0
        for top, _dirs, files in os.walk(root, followlinks=False):
            for path in (top, *(f"{top}/{name}" for name in files)):
                seen += 1
                if seen > MAX_LABELLED_ENTRIES:
                    raise LabelError(errno.EFBIG, f"{root} has over {MAX_LABELLED_ENTRIES} entries")
                written += self._label(path)
        return written

    def _label(self, path: str) -> int:
        value = self.label.encode() + b"\0"  # what libselinux's setfilecon writes
        try:
            if self.getxattr(path, XATTR).rstrip(b"\0") == value.rstrip(b"\0"):
                return 0
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise LabelError(exc.errno, f"reading the SELinux label of {path}: {exc}") from exc
        try:
            self.setxattr(path, XATTR, value)
        except OSError as exc:
            raise LabelError(
                exc.errno, f"labelling {path} {self.label}: {exc.strerror or exc}"
            ) from exc
        return 1
