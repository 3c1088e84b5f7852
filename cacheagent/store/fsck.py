"""Reconcile the index with the disk: run by ``Store.open`` and by ``Store.fsck``.

The disk is the truth for bytes, the index for intent. Every repair moves toward a state in
which each indexed blob is a whole verified file and each ready model is a complete tree:

- ``models/sha256/.tmp-*`` trees (builds or deletes cut short): deleted.
- blob files the index does not know: adopted if the name is a digest (and, with ``rehash``,
  the bytes hash to it), as evictable at once (no orphan grace period), else deleted; wrong
  size or hash: deleted; wrong mode: fixed.
- blob rows whose file is gone: dropped. A ready model that needs a dropped blob, or whose tree
  does not match its record, is reset to pending: its tree is removed, its record, pins and
  tags stay, ``get_model`` returns None and the next pull re-fetches only what is missing.
  A tree in use by a pod (inuse.py) is never removed: it is kept, same directory inode, and
  the next pull repairs it in place (``tree.repair``); the repair is logged.
- model trees with no ready record: deleted, unless a pod has one mounted (index lost): kept.
- partial downloads: deleted when their blob is already committed, or when untouched for a day
  and no pull holds a lease on a model that needs them; otherwise kept (and made writable
  again if a commit sealed it before crashing) so a pull can resume.
- at start-up only: fuse and pull leases (their processes died with the previous agent) dropped;
  csi leases stay, the CSI publish journal owns them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from cacheagent.digest import hex_of
from cacheagent.store import tree
from cacheagent.store.blobs import BLOB_MODE, hash_file
from cacheagent.store.index import Index
from cacheagent.store.inuse import trees_in_use
from cacheagent.store.paths import TMP_PREFIX, Layout, digest_of_hex, digest_of_partial, tree_shape

log = logging.getLogger(__name__)

STALE_PARTIAL_SECONDS = 24 * 3600
SESSION_LEASE_KINDS = ("fuse", "pull")
_TWO_HEX = re.compile(r"^[0-9a-f]{2}$")


@dataclass
class FsckReport:
    """What reconciliation found and fixed. ``str()`` gives a printable summary."""

    rehashed: bool = False
    blobs_checked: int = 0
    models_checked: int = 0
    blobs_adopted: int = 0
    blob_rows_dropped: int = 0
    corrupt_blobs_removed: int = 0
    stray_files_removed: int = 0
    models_reset: int = 0
    tmp_trees_removed: int = 0
    stray_trees_removed: int = 0
    partials_removed: int = 0
    modes_fixed: int = 0
    leases_dropped: int = 0
    refcounts_fixed: int = 0
    actions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Digests of the models reset to pending (for the removal observers); not a field,
        # so the report's JSON (``gc --json``) stays one number per kind of fix.
        self.reset: list[str] = []

    def counts(self) -> dict[str, int]:
        """Each kind of fix and how many times it was applied."""
        skip = {"rehashed", "blobs_checked", "models_checked", "actions"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    @property
    def fixes(self) -> int:
        return sum(self.counts().values())

    @property
    def clean(self) -> bool:
        return self.fixes == 0

    def note(self, counter: str, action: str) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        self.actions.append(action)

    def __str__(self) -> str:
        mode = "with re-hash" if self.rehashed else "without re-hash"
        lines = [
            f"fsck ({mode}): checked {self.blobs_checked} blobs, {self.models_checked} models; "
            + ("no problems" if self.clean else f"{self.fixes} fixes")
        ]
        lines += [f"  {name.replace('_', ' ')}: {n}" for name, n in self.counts().items() if n]
        lines += [f"  - {action}" for action in self.actions]
        return "\n".join(lines)


def reconcile(
    index: Index, layout: Layout, *, rehash: bool, now: float, at_start: bool
) -> FsckReport:
    """Repair the store in place (the caller holds the store lock); see the module docstring."""
    report = FsckReport(rehashed=rehash)
    in_use = trees_in_use(index, layout)
    with index.transaction():
        _remove_tmp_trees(layout, report)
        gone = _reconcile_blobs(index, layout, report, rehash=rehash)
        why = "needs a blob that is missing or corrupt"
        for digest in sorted(index.models_using(sorted(gone))):
            _reset_model(index, layout, digest, why, report, in_use)
        _check_trees(index, layout, report, in_use)
        _remove_stray_trees(index, layout, report, in_use)
        _clean_partials(index, layout, report, now=now)
        if at_start:
            dropped = index.drop_leases(kinds=SESSION_LEASE_KINDS)
            report.leases_dropped += dropped
            if dropped:
                report.actions.append(f"dropped {dropped} fuse/pull leases of the previous agent")
        fixed = index.recount_refs()
        report.refcounts_fixed += fixed
        if fixed:
            report.actions.append(f"recounted references of {fixed} blobs")
    return report


def _entries(directory: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            yield from sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        return


def _remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        tree.remove(path)
    else:
        path.unlink(missing_ok=True)


def _remove_tmp_trees(layout: Layout, report: FsckReport) -> None:
    for entry in _entries(layout.models_dir):
        if entry.name.startswith(TMP_PREFIX):
            _remove_entry(Path(entry.path))
            report.note("tmp_trees_removed", f"removed unfinished tree {entry.name}")


def _reconcile_blobs(index: Index, layout: Layout, report: FsckReport, *, rehash: bool) -> set[str]:
    """Check every blob file; returns the indexed blobs that are no longer there."""
    indexed = index.all_blobs()
    present: set[str] = set()
    for group in _entries(layout.blobs_dir):
        if not (_TWO_HEX.match(group.name) and group.is_dir(follow_symlinks=False)):
            _remove_entry(Path(group.path))
            report.note("stray_files_removed", f"removed {group.path}: not a blob directory")
            continue
        for entry in _entries(Path(group.path)):
            digest = _check_blob_file(entry, group.name, indexed, report, rehash=rehash)
            if digest is None:
                continue
            present.add(digest)
            if digest not in indexed:
                # A file without a row is what a crash left (a commit or a removal cut short);
                # no pull can be waiting on it, so it is recorded as old enough to evict at once
                # rather than taking its size out of the capacity for the orphan grace period.
                index.insert_blob(digest, entry.stat(follow_symlinks=False).st_size, 0.0)
                report.note("blobs_adopted", f"adopted {digest}: on disk but not in the index")
    report.blobs_checked = len(present)
    gone = set(indexed) - present
    index.delete_blobs(sorted(gone))
    for digest in sorted(gone):
        report.note("blob_rows_dropped", f"dropped {digest} from the index: file missing")
    return gone


def _check_blob_file(
    entry: os.DirEntry[str],
    group: str,
    indexed: dict[str, int],
    report: FsckReport,
    *,
    rehash: bool,
) -> str | None:
    """The digest of a good blob file (mode fixed if needed), or None after deleting a bad one."""
    path = Path(entry.path)
    digest = digest_of_hex(entry.name)
    if digest is None or entry.name[:2] != group or not entry.is_file(follow_symlinks=False):
        _remove_entry(path)
        report.note("stray_files_removed", f"removed {entry.path}: not a blob file")
        return None
    st = entry.stat(follow_symlinks=False)
    problem = None
    if digest in indexed and st.st_size != indexed[digest]:
        problem = f"size {st.st_size}, index says {indexed[digest]}"
    elif rehash and (actual := hash_file(path)[0]) != digest:
        problem = f"content hashes to {actual}"
    if problem is not None:
        path.unlink()
        report.note("corrupt_blobs_removed", f"removed corrupt blob {digest}: {problem}")
        return None
    if stat.S_IMODE(st.st_mode) != BLOB_MODE:
        path.chmod(BLOB_MODE)
        report.note("modes_fixed", f"blob {digest}: mode {stat.S_IMODE(st.st_mode):o} -> 444")
    return digest


def _reset_model(
    index: Index, layout: Layout, digest: str, why: str, report: FsckReport, in_use: set[str]
) -> None:
    index.set_state(digest, "pending")
    report.reset.append(digest)
    if digest in in_use:
        # A pod has this directory bind-mounted: removing it would leave the pod an empty,
        # deleted directory. Keep it (same inode); the next pull repairs it in place.
        log.warning("model %s %s; in use by a pod, so its directory is kept", digest, why)
        report.note(
            "models_reset",
            f"model {digest} {why}: in use, directory kept; the next pull repairs it in place",
        )
        return
    tree.remove(layout.model_path(digest))
    report.note("models_reset", f"model {digest} {why}: tree removed, will be re-pulled")


def _check_trees(index: Index, layout: Layout, report: FsckReport, in_use: set[str]) -> None:
    inodes: dict[str, tuple[int, int]] = {}
    models = index.ready_models()
    report.models_checked = len(models)
    for digest in models:
        files = index.model_files(digest)
        expected: dict[str, tuple[int, int]] = {}
        for f in files:
            if f.blob not in inodes:
                inodes[f.blob] = _inode(layout.blob_path(f.blob))
            expected[f.path] = inodes[f.blob]
        shape = tree_shape(f.path for f in files)
        problems, fixed = tree.check(layout.model_path(digest), expected, shape.dirs)
        if fixed:
            report.modes_fixed += fixed
            report.actions.append(f"model {digest}: fixed the mode of {fixed} directories")
        if problems:
            first = problems[0]
            where = f" {first.path!r}" if first.path else ""
            why = f"tree broken ({first.problem}{where})"
            _reset_model(index, layout, digest, why, report, in_use)


def _inode(path: Path) -> tuple[int, int]:
    """(st_dev, st_ino) of a blob file; (-1, -1) if it is gone, which no tree entry matches."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return (-1, -1)
    return (st.st_dev, st.st_ino)


def _remove_stray_trees(index: Index, layout: Layout, report: FsckReport, in_use: set[str]) -> None:
    ready = set(index.ready_models())
    for entry in _entries(layout.models_dir.parent):
        if entry.name != layout.models_dir.name:
            _remove_entry(Path(entry.path))
            report.note("stray_trees_removed", f"removed {entry.path}: not part of the store")
    for entry in _entries(layout.models_dir):
        digest = digest_of_hex(entry.name)
        if digest in in_use and digest not in ready:
            log.warning("kept %s: no ready model record, but a pod has it mounted", entry.path)
            report.actions.append(f"kept {entry.path}: mounted by a pod (no record; index lost?)")
        elif digest not in ready:
            _remove_entry(Path(entry.path))
            report.note("stray_trees_removed", f"removed {entry.path}: no ready model record")


def _clean_partials(index: Index, layout: Layout, report: FsckReport, *, now: float) -> None:
    committed = index.all_blobs()
    live = index.pulling_blobs()
    entries = list(_entries(layout.partial_dir))
    # A download and its ranges sidecar age together: the newest of the two counts.
    newest: dict[str, float] = {}
    for entry in entries:
        key = digest_of_partial(entry.name) or entry.name
        mtime = entry.stat(follow_symlinks=False).st_mtime
        newest[key] = max(newest.get(key, 0.0), mtime)
    for entry in entries:
        digest = digest_of_partial(entry.name)
        if digest in committed:
            why = "blob already committed"
        elif digest in live:
            continue
        elif now - newest[digest or entry.name] > STALE_PARTIAL_SECONDS:
            why = "untouched for over a day"
        else:
            _make_writable(entry, report)
            continue
        _remove_entry(Path(entry.path))
        report.note("partials_removed", f"removed partial/{entry.name}: {why}")


def _make_writable(entry: os.DirEntry[str], report: FsckReport) -> None:
    """A commit cut short after sealing leaves a read-only partial; a resuming pull writes it."""
    if not entry.is_file(follow_symlinks=False):
        return
    mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
    if not mode & stat.S_IWUSR:
        Path(entry.path).chmod(mode | stat.S_IWUSR)
        report.note("modes_fixed", f"partial/{entry.name}: made writable again for resume")


def quarantine(index: Index, layout: Layout, failed: dict[str, str], report: FsckReport) -> None:
    """Take blobs whose bytes do not hash to their digest out of service (the caller holds
    the store lock): files to ``quarantine/``, rows dropped, models using them reset to pending
    (kept in place if a pod uses them)."""
    in_use = trees_in_use(index, layout)
    where = layout.root / "quarantine"
    where.mkdir(mode=0o700, exist_ok=True)
    with index.transaction():
        users = sorted(index.models_using(sorted(failed)))
        for digest, actual in sorted(failed.items()):
            with contextlib.suppress(FileNotFoundError):
                layout.blob_path(digest).rename(where / hex_of(digest))
            index.delete_blobs([digest])
            report.note(
                "corrupt_blobs_removed", f"quarantined {digest}: content hashes to {actual}"
            )
        for digest in users:
            _reset_model(index, layout, digest, "uses a corrupt blob (scrub)", report, in_use)
