"""Capacity: what the store holds, what pulls have reserved, and how much eviction must free.

A pull reserves the bytes it is about to write before it writes any (``Store.reserve``), in
the same step, under the store lock, as the eviction that makes room for them; so concurrent
pulls of different models can never together push the store past its capacity. What counts
against the capacity (``Room.used``):

- committed blobs (the index);
- live reservations: bytes pulls have reserved and not committed yet (a blob committed under a
  reservation moves from here to the index in one step, so the sum does not change);
- abandoned partial files: downloads no live reservation covers (a failed or crashed pull kept
  them to resume from), until a pull takes them over or eviction deletes them;
- bytes being freed: dropped from the index, not unlinked yet.

The filesystem is checked too (``statvfs``), so another tenant of the disk, or a capacity larger
than the disk, is seen before a write fails: ``Room.disk_free`` is what the filesystem can still
take less what live reservations have not allocated yet.

Pure, apart from ``scan_partials`` (one ``scandir`` of partial/) and ``disk_free``.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cacheagent.store.lru import EvictionPlan
from cacheagent.store.paths import digest_of_hex


@dataclass(eq=False)
class Reservation:
    """Room a pull holds for bytes it has not committed yet.

    ``remaining`` shrinks as blobs commit under it (``Store.commit_blob(reservation=...)``);
    ``blobs`` are the digests whose partial files it covers; ``committed`` the blobs committed
    under it, which eviction leaves alone while it lives even if no model uses them yet (the
    members of a tar layer before the model is recorded)."""

    holder: str
    remaining: int
    blobs: frozenset[str]
    plan: EvictionPlan
    committed: set[str] = field(default_factory=set)
    released: bool = False
    # Bytes its own eviction is still deleting: they count as being freed until then, so the
    # reservation counts only the rest (the sum stays what the capacity check allowed).
    awaiting: int = 0

    @property
    def counted(self) -> int:
        return max(self.remaining - self.awaiting, 0)


class Ledger:
    """The live reservations and the bytes being freed; guarded by the store lock."""

    def __init__(self) -> None:
        self._live: list[Reservation] = []
        self.freeing = 0

    def add(self, reservation: Reservation) -> None:
        self._live.append(reservation)

    def drop(self, reservation: Reservation) -> None:
        reservation.released = True
        reservation.remaining = 0
        if reservation in self._live:
            self._live.remove(reservation)

    def consume(self, reservation: Reservation, digest: str, size: int) -> None:
        """A blob of ``size`` bytes was committed under ``reservation``."""
        reservation.committed.add(digest)
        reservation.remaining -= min(size, reservation.remaining)

    def reserved(self) -> int:
        return sum(r.counted for r in self._live)

    def covered(self) -> set[str]:
        """Blobs whose partial files belong to a live pull."""
        return {d for r in self._live for d in r.blobs}

    def protected(self) -> set[str]:
        """Blobs committed under a live reservation (not orphans yet, whatever refs says)."""
        return {d for r in self._live for d in r.committed}

    def holders(self) -> list[str]:
        return [r.holder for r in self._live]


@dataclass(frozen=True)
class Partials:
    """The partial downloads on disk: bytes allocated by covered and by abandoned ones."""

    covered_bytes: int = 0
    abandoned: tuple[tuple[Path, int], ...] = ()

    @property
    def abandoned_bytes(self) -> int:
        return sum(size for _, size in self.abandoned)


def scan_partials(partial_dir: Path, covered: Collection[str]) -> Partials:
    """Allocated bytes of every partial download, split by whether a live pull covers it.
    Sidecars and temporary files are ignored (tiny, or cleaned at start)."""
    covered_bytes = 0
    abandoned: list[tuple[Path, int]] = []
    try:
        entries = list(os.scandir(partial_dir))
    except FileNotFoundError:
        return Partials()
    for entry in entries:
        digest = digest_of_hex(entry.name)
        if digest is None:
            continue
        try:
            allocated = entry.stat(follow_symlinks=False).st_blocks * 512
        except FileNotFoundError:  # committed or discarded since the listing
            continue
        if digest in covered:
            covered_bytes += allocated
        else:
            abandoned.append((Path(entry.path), allocated))
    return Partials(covered_bytes, tuple(sorted(abandoned)))


def disk_free(root: Path) -> int:
    stats = os.statvfs(root)
    return stats.f_bavail * stats.f_frsize


@dataclass(frozen=True)
class Room:
    """A snapshot, under the store lock, of where the store's bytes are."""

    capacity: int | None
    committed: int
    reserved: int
    abandoned: int
    freeing: int
    disk_free: int

    @property
    def used(self) -> int:
        return self.committed + self.reserved + self.abandoned + self.freeing


def room_of(
    capacity: int | None, committed: int, ledger: Ledger, partials: Partials, free: int
) -> Room:
    unallocated = max(ledger.reserved() - partials.covered_bytes, 0)
    return Room(
        capacity=capacity,
        committed=committed,
        reserved=ledger.reserved(),
        abandoned=partials.abandoned_bytes,
        freeing=ledger.freeing,
        disk_free=max(free - unallocated, 0),
    )


def shortfall(room: Room, nbytes: int, high: float, low: float) -> int:
    """Bytes eviction must free before ``nbytes`` more may be reserved: past the high
    watermark, down to the low one less the request; and whatever the disk lacks."""
    need = nbytes - room.disk_free
    if room.capacity is not None and room.used + nbytes > high * room.capacity:
        need = max(need, room.used + nbytes - int(low * room.capacity))
    return max(need, 0)


def fits_capacity(room: Room, nbytes: int, freed: int) -> bool:
    return room.capacity is None or room.used + nbytes - freed <= room.capacity


def fits(room: Room, nbytes: int, freed: int) -> bool:
    """Whether ``nbytes`` fit once ``freed`` bytes are gone (capacity and disk both)."""
    return fits_capacity(room, nbytes, freed) and nbytes <= room.disk_free + freed


def available(room: Room, freeable: int) -> int:
    """The most that could be reserved once ``freeable`` bytes are freed."""
    most = room.disk_free + freeable
    if room.capacity is not None:
        most = min(most, room.capacity - room.used + freeable)
    return max(most, 0)


def refusal(room: Room, nbytes: int, freeable: int) -> str:
    """Why ``nbytes`` cannot be reserved, with every size a user needs to act on it."""
    parts = [f"need {nbytes} bytes"]
    if room.capacity is not None:
        parts.append(
            f"capacity {room.capacity}, used {room.committed} by blobs"
            f" + {room.reserved} reserved by pulls in flight"
            f" + {room.abandoned} by abandoned partial downloads"
            + (f" + {room.freeing} being freed" if room.freeing else "")
        )
    parts.append(f"the disk can take {room.disk_free} more")
    parts.append(f"at most {freeable} can be freed (the rest is pinned, in use or being pulled)")
    return "; ".join(parts)


def take_partials(partials: Partials, need: int) -> tuple[list[Path], int]:
    """Abandoned partial files to delete (oldest name order) until ``need`` bytes are freed."""
    chosen: list[Path] = []
    freed = 0
    for path, size in partials.abandoned:
        if freed >= need:
            break
        chosen.append(path)
        freed += size
    return chosen, freed


def without(orphans: dict[str, int], protected: Iterable[str]) -> dict[str, int]:
    """Orphan blobs less those a live pull committed (its model is not recorded yet)."""
    keep = set(protected)
    return {d: size for d, size in orphans.items() if d not in keep}
