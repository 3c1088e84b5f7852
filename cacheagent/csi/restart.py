"""What a starting driver does with the journal it finds (see journal.py for the rules).

Blocking (SQLite, mountinfo, mount(2)): the node service runs it in a worker thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from cacheagent.mountinfo import MountInfo, mounts_at, read_mountinfo
from cacheagent.store.crashpoints import crashpoint
from cacheagent.volumes import LEASE_KIND, CsiBackend

from .journal import Publish, PublishJournal, ReconcilePlan, plan_reconcile
from .mounts import MS_NOEXEC, MountError, fs_location, remount_read_only
from .status import CsiFailure
from .targets import KubeletDir, check_target, open_parent

log = logging.getLogger(__name__)


def models_location(models_dir: Path | None, mounts: Sequence[MountInfo]) -> tuple[str, str] | None:
    """The store's ``models/`` as (device, path inside its filesystem), if there is one."""
    if models_dir is None or not models_dir.is_dir():
        return None
    return fs_location(os.path.realpath(models_dir), mounts)


def forget(journal: PublishJournal, backend: CsiBackend, row: Publish) -> None:
    """Drop a publish: its lease first, then its row (the write-ahead rule, in reverse)."""
    backend.release_lease(row.holder)
    crashpoint("journal.after_release")
    journal.remove(row.target_path)


def reconcile(
    journal: PublishJournal, backend: CsiBackend, kubelet: KubeletDir, models_dir: Path | None
) -> ReconcilePlan:
    """Match the journal with the mounts that exist now; keep, drop and adopt accordingly."""
    mounts = read_mountinfo()
    plan = plan_reconcile(
        journal.all(),
        mounts,
        kubelet_dirs=kubelet.mount_dirs,
        models_location=models_location(models_dir, mounts),
    )
    for row in plan.keep:
        _make_read_only(row, mounts, kubelet)
        backend.add_lease(row.manifest_digest, row.holder, LEASE_KIND)
    for row in plan.drop:
        forget(journal, backend, row)
    for row in plan.adopt:
        journal.put(row)
        backend.add_lease(row.manifest_digest, row.holder, LEASE_KIND)
    log.info(
        "CSI journal reconciled: %d mounts kept, %d stale rows dropped, %d mounts adopted",
        len(plan.keep),
        len(plan.drop),
        len(plan.adopt),
    )
    return plan


def _make_read_only(row: Publish, mounts: Sequence[MountInfo], kubelet: KubeletDir) -> None:
    """A crash between a publish's bind mount and its read-only remount leaves the mount
    writable, and an idempotent retry would accept it: finish the remount now."""
    stack = mounts_at(row.target_path, mounts)
    if all(m.read_only for m in stack):
        return
    log.warning(
        "mount at %s is writable (a publish was cut short); remounting read-only",
        row.target_path,
    )
    extra = MS_NOEXEC if any("noexec" in m.options for m in stack) else 0
    try:
        target = check_target(row.target_path, kubelet)
        with open_parent(target) as parent:
            if parent is not None:
                remount_read_only(parent, target.name, target.path, extra)
    except (CsiFailure, OSError, MountError) as exc:
        log.error("could not make %s read-only: %s", row.target_path, exc)
