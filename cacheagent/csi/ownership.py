"""Which mount at a target is the driver's own: the rule NodeUnpublishVolume unmounts by. Pure.

The driver runs privileged, so an unpublish must never take away a mount someone else made: a
tmpfs placed on a target that has no journal row, or a bind mount stacked on top of one of ours
(another tool, or an admin debugging a node). Unmounting either would break whoever made it, and
unmounting "everything stacked there" would also pull ours out from under a mount we cannot
see the purpose of. So the rule is: unmount only a target the journal says we published, and
only when the mount at the top of its stack is ours (its source is that row's model tree: the
store's ``models/<digest>`` directory in bind mode, or ``<fuse root>/<digest>`` in lazy mode).
Anything else is left alone and the unpublish answers FAILED_PRECONDITION saying what is there.
"""

from __future__ import annotations

from collections.abc import Sequence

from cacheagent.mountinfo import MountInfo, mounts_at

from .journal import Publish, digest_of_model_dir, model_digest_of_mount
from .limits import shown


def top_mount(path: str, mounts: Sequence[MountInfo]) -> MountInfo | None:
    """The mount visible at ``path``: the one in its stack that no other one there covers."""
    stack = mounts_at(path, mounts)
    if not stack:
        return None
    covered = {m.parent_id for m in stack}
    uncovered = [m for m in stack if m.mount_id not in covered]
    return (uncovered or stack)[-1]


def is_ours(mount: MountInfo, row: Publish, models_location: tuple[str, str] | None) -> bool:
    """True when ``mount`` is the bind mount of ``row``'s model that a publish makes."""
    if row.mode == "bind" and models_location is not None:
        return model_digest_of_mount(mount, models_location) == row.manifest_digest
    name = mount.root.rstrip("/").rsplit("/", 1)[-1]
    return digest_of_model_dir(name) == row.manifest_digest


def describe(mount: MountInfo) -> str:
    """A mount as a person would want it named in an error: type, source and root."""
    where = shown(f"{mount.source}:{mount.root}")
    return f"{shown(mount.fs_type, 32)} mount of {where} (mount id {mount.mount_id})"
