"""Whether the store can still be trusted to write: checked while the agent runs.

- ``index.db`` deleted or replaced under a running agent: its SQLite connection would go on
  writing to the unlinked file and everything would be lost at the next start. Detected by
  comparing the path's inode with the one opened.
- ``.lock`` removed or replaced: the agent's flock lives on the unlinked inode, so an offline
  command could take a new lock and change the store under the agent (dropping its leases).
  Detected the same way; the agent takes the lock again on a new file at once, so later offline
  commands are refused again, and reports the store as not ready until restarted.
- the disk full (another tenant, or a capacity larger than the disk): the store keeps a small
  preallocated reserve file, released as soon as the filesystem runs out, so that SQLite can
  still commit the bookkeeping of a publish (journal row, lease, access time) of a model that
  is already cached; the store then reports itself unable to write new models.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RESERVE_BYTES = 8 << 20
RESERVE_NAME = "index.reserve"


def identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@dataclass
class Watched:
    """A file the store holds open and expects to find at its path."""

    path: Path
    opened: tuple[int, int] | None
    what: str

    def problem(self) -> str | None:
        now = identity(self.path)
        if self.opened is None or now == self.opened:
            return None
        change = "deleted" if now is None else "replaced"
        return f"{self.path} was {change} while the agent runs ({self.what}); restart the agent"


class Reserve:
    """A preallocated file that gives its room back to the index when the disk fills."""

    def __init__(self, path: Path, nbytes: int = RESERVE_BYTES) -> None:
        self.path = path
        self.nbytes = nbytes

    def ensure(self) -> bool:
        """Create the reserve if there is room for it (and twice as much); True if it exists."""
        if self.path.exists():
            return True
        stats = os.statvfs(self.path.parent)
        if stats.f_bavail * stats.f_frsize < 2 * self.nbytes:
            return False
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.nbytes)
        except OSError:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            return False
        os.close(fd)
        return True

    def release_if_full(self) -> bool:
        """Free the reserve when the filesystem has less room than it holds; True if the disk
        is that full (whether or not there was a reserve left to free)."""
        stats = os.statvfs(self.path.parent)
        if stats.f_bavail * stats.f_frsize >= self.nbytes:
            return False
        if self.path.exists():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            log.warning("the store's disk is full: released the index reserve at %s", self.path)
        return True
