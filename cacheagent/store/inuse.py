"""Which model trees pods are using right now, so a repair never removes one.

A tree is in use when a published volume leases it (``csi`` leases survive restarts: the publish
journal re-takes them) or when it is the source of a bind mount anywhere on the node (found in
``/proc/self/mountinfo``: same device, and a mount root at or under the tree), which still holds
after the index, and with it the leases, was lost.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cacheagent.mountinfo import MountInfo, read_mountinfo
from cacheagent.store.index import Index
from cacheagent.store.paths import Layout, digest_of_hex


def trees_in_use(index: Index, layout: Layout) -> set[str]:
    leased = {lease.manifest_digest for lease in index.leases(None) if lease.kind == "csi"}
    try:
        mounts = read_mountinfo()
    except OSError:
        mounts = []
    return leased | mounted_trees(layout.models_dir, mounts)


def mounted_trees(models_dir: Path, mounts: Iterable[MountInfo]) -> set[str]:
    """Digests of the trees under ``models_dir`` that are the root of some mount."""
    mounts = list(mounts)
    real = os.path.realpath(models_dir)
    home = _containing(real, mounts)
    if home is None:
        return set()
    inside = os.path.relpath(real, home.mount_point)
    base = os.path.normpath(str(Path(home.root) / inside))
    found: set[str] = set()
    for mount in mounts:
        if mount.major_minor != home.major_minor or mount is home:
            continue
        rel = os.path.relpath(mount.root, base)
        if rel.startswith(".."):
            continue
        digest = digest_of_hex(rel.split(os.sep, 1)[0])
        if digest is not None:
            found.add(digest)
    return found


def _containing(path: str, mounts: list[MountInfo]) -> MountInfo | None:
    best: MountInfo | None = None
    for mount in mounts:
        point = mount.mount_point
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = mount
    return best
