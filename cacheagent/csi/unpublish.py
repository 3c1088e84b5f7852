"""NodeUnpublishVolume's work: take down our mount, and only ours (see ownership.py).

Outcomes, each what kubelet and a node's admin need:

- nothing recorded and nothing mounted at the target: OK (idempotent); an empty target
  directory left behind is removed;
- nothing recorded but something mounted: FAILED_PRECONDITION naming the mount, which is left
  alone (it is not ours to take down). The CSI spec's "not published there: OK" would tell
  kubelet the target is free while a mount sits on it; kubelet's own cleanup would then fail
  with a vaguer error, so the driver says what is there instead;
- another volume of ours recorded at the target: OK (the spec's rule; that volume stays);
- our publish, with our mount on top: unmounted (never lazily: a busy mount is
  FAILED_PRECONDITION and keeps its row and lease), the directory removed, the row and lease
  dropped;
- our publish, with a mount stacked on ours: FAILED_PRECONDITION naming it; ours stays
  mounted, journaled and leased until whoever stacked theirs takes it down.

Blocking (mountinfo, umount2, rmdir, SQLite): run in a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import grpc

from cacheagent.mountinfo import MountInfo, read_mountinfo
from cacheagent.store.crashpoints import crashpoint
from cacheagent.volumes import CsiBackend

from .journal import Publish, PublishJournal
from .limits import shown
from .mounts import unmount_top
from .ownership import describe, is_ours, top_mount
from .restart import forget, models_location
from .status import CsiFailure
from .targets import Target, leaf_kind, open_parent, remove_target_dir

log = logging.getLogger(__name__)

_MAX_OWN_MOUNTS = 8
"""Our mounts stacked on one target (a repeated publish after a crash) taken down per call."""


def unpublish(
    journal: PublishJournal,
    backend: CsiBackend,
    models_dir: Path | None,
    volume_id: str,
    target: Target,
) -> None:
    row = journal.get(target.path)
    mounts = read_mountinfo()
    top = top_mount(target.path, mounts)
    if row is not None and not row.adopted and row.volume_id != volume_id:
        log.warning(
            "unpublish of volume %s at %s: the target holds volume %s; left alone",
            shown(volume_id),
            target.path,
            shown(row.volume_id),
        )
        return
    if row is None:
        if top is not None:
            raise _foreign(target, top, "no publish is recorded there")
        _remove_dir(target)
        return
    _unmount_ours(row, target, models_dir, mounts)
    crashpoint("unpublish.after_unmount")
    _remove_dir(target)
    crashpoint("unpublish.after_rmdir")
    forget(journal, backend, row)
    log.info("unpublished volume %s from %s", shown(volume_id), target.path)


def _unmount_ours(
    row: Publish, target: Target, models_dir: Path | None, mounts: Sequence[MountInfo]
) -> None:
    location = models_location(models_dir, mounts)
    for _ in range(_MAX_OWN_MOUNTS):
        top = top_mount(target.path, mounts)
        if top is None:
            return
        if not is_ours(top, row, location):
            raise _foreign(target, top, f"it is stacked on volume {shown(row.volume_id)}")
        unmount_top(target.path)  # MountBusyError: the row and the lease stay
        mounts = read_mountinfo()
    raise CsiFailure(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"target {target.path} still has mounts after {_MAX_OWN_MOUNTS} unmounts; left as is",
    )


def _foreign(target: Target, mount: MountInfo, why: str) -> CsiFailure:
    return CsiFailure(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"target {target.path} holds a {describe(mount)} that this driver did not make ({why}); "
        "it was left mounted: unmount it, and kubelet's retry will finish the unpublish",
    )


def _remove_dir(target: Target) -> None:
    with open_parent(target) as parent:
        if parent is not None and leaf_kind(parent, target) == "dir":
            remove_target_dir(parent, target)
