"""What the FUSE keeper holds, per mount (pure: file descriptors are numbers, time is passed in).

Each key (a mount point) has at most one owner, the live connection of the agent serving it,
so two agents never serve one mount. When the owner's connection ends without a release, the
entry is orphaned: its descriptor is kept until ``deadline`` for the next agent to take, then
closed. Methods return the descriptors the caller must close; the table closes nothing itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


class RefusedError(Exception):
    """The key belongs to another connection (``owner``), live as far as the table knows."""

    def __init__(self, key: str, owner: int) -> None:
        super().__init__(key)
        self.key = key
        self.owner = owner


@dataclass
class Entry:
    key: str
    fd: int | None
    state: dict[str, object]
    owner: int | None
    handover_seconds: float
    deadline: float | None = None


class KeeperTable:
    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def take(self, conn: int, key: str, *, handover_seconds: float) -> Entry:
        """Claim ``key`` for ``conn`` (an orphaned entry's window ends: it is owned again)."""
        entry = self._entries.get(key)
        if entry is None:
            entry = Entry(key, None, {}, conn, handover_seconds)
            self._entries[key] = entry
        self._claim(conn, entry)
        return entry

    def hold(
        self, conn: int, key: str, fd: int, state: dict[str, object], handover_seconds: float
    ) -> list[int]:
        """Keep ``fd`` for ``key`` on behalf of ``conn``; the descriptor it replaces is returned.

        RefusedError leaves the table as it was (the caller closes ``fd``)."""
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = Entry(key, fd, state, conn, handover_seconds)
            return []
        self._claim(conn, entry)
        replaced = [] if entry.fd is None or entry.fd == fd else [entry.fd]
        entry.fd, entry.state, entry.handover_seconds = fd, state, handover_seconds
        return replaced

    def release(self, conn: int, key: str) -> list[int]:
        """Forget ``key`` (unknown: nothing to do); refused while another connection owns it."""
        entry = self._entries.get(key)
        if entry is None:
            return []
        if entry.owner is not None and entry.owner != conn:
            raise RefusedError(key, entry.owner)
        del self._entries[key]
        return [] if entry.fd is None else [entry.fd]

    def disconnect(self, conn: int, now: float) -> list[Entry]:
        """``conn`` ended: its entries start their hand-over windows (returned); a claim that
        never got a descriptor is dropped."""
        orphaned = []
        for entry in [e for e in self._entries.values() if e.owner == conn]:
            entry.owner = None
            if entry.fd is None:
                del self._entries[entry.key]
                continue
            entry.deadline = now + entry.handover_seconds
            orphaned.append(entry)
        return orphaned

    def expire(self, now: float) -> list[Entry]:
        """Remove and return the orphaned entries whose window has ended."""
        expired = [
            e for e in self._entries.values() if e.deadline is not None and e.deadline <= now
        ]
        for entry in expired:
            del self._entries[entry.key]
        return expired

    def next_deadline(self) -> float | None:
        deadlines = [e.deadline for e in self._entries.values() if e.deadline is not None]
        return min(deadlines, default=None)

    def held(self) -> Iterator[tuple[str, int]]:
        """(key, fd) for every descriptor held."""
        for entry in list(self._entries.values()):
            if entry.fd is not None:
                yield entry.key, entry.fd

    def drop(self, key: str) -> Entry | None:
        """Remove ``key`` whatever its owner (its connection died): the caller closes its fd."""
        return self._entries.pop(key, None)

    def clear(self) -> list[int]:
        """Forget everything; the descriptors to close."""
        fds = [fd for _, fd in self.held()]
        self._entries.clear()
        return fds

    def _claim(self, conn: int, entry: Entry) -> None:
        if entry.owner is not None and entry.owner != conn:
            raise RefusedError(entry.key, entry.owner)
        entry.owner, entry.deadline = conn, None
