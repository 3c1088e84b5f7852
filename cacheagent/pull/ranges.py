"""Byte-range bookkeeping for partial downloads. Pure: no I/O beyond (de)serialising JSON text.

A ``RangeSet`` is a sorted set of disjoint, non-adjacent half-open intervals ``[start, end)``.
The pull engine keeps one per partial blob (the ranges written to the partial file) and persists
it as a JSON sidecar next to the partial file, so a killed or dropped download resumes from the
bytes it already holds. The sidecar names the blob digest and size, so a record that belongs to
another blob (or a different declared size) is never trusted.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

SIDECAR_VERSION = 1


@dataclass
class RangeSet:
    """Disjoint half-open intervals, kept sorted and merged (touching intervals coalesce)."""

    _starts: list[int] = field(default_factory=list)
    _ends: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, intervals: Iterable[tuple[int, int]]) -> RangeSet:
        result = cls()
        for start, end in intervals:
            result.add(start, end)
        return result

    def add(self, start: int, end: int) -> None:
        """Add ``[start, end)``, merging with every interval it overlaps or touches."""
        _check_interval(start, end)
        if start == end:
            return
        # first interval whose end >= start (touching or overlapping on the left)
        lo = bisect.bisect_left(self._ends, start)
        # first interval whose start > end (strictly right of the new one)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def covered(self, start: int, end: int) -> bool:
        """True when every byte of ``[start, end)`` is held (an empty interval always is)."""
        _check_interval(start, end)
        if start == end:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The gaps of ``[start, end)`` not held, in order."""
        _check_interval(start, end)
        gaps: list[tuple[int, int]] = []
        cursor = start
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while cursor < end and i < len(self._starts):
            s, e = self._starts[i], self._ends[i]
            if e <= cursor:
                i += 1
                continue
            if s >= end:
                break
            if s > cursor:
                gaps.append((cursor, s))
            cursor = max(cursor, e)
            i += 1
        if cursor < end:
            gaps.append((cursor, end))
        return gaps

    def prefix_end(self) -> int:
        """End of the held interval that starts at 0 (0 when byte 0 is not held)."""
        if self._starts and self._starts[0] == 0:
            return self._ends[0]
        return 0

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def copy(self) -> RangeSet:
        return RangeSet(list(self._starts), list(self._ends))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.intervals())

    def __len__(self) -> int:
        return len(self._starts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    __hash__ = None  # type: ignore[assignment]  # mutable


def _check_interval(start: int, end: int) -> None:
    if start < 0 or end < start:
        raise ValueError(f"bad byte range [{start}, {end})")


def split(intervals: Iterable[tuple[int, int]], chunk: int) -> list[tuple[int, int]]:
    """Cut intervals into pieces of at most ``chunk`` bytes (the unit of one Range request)."""
    if chunk <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk}")
    pieces: list[tuple[int, int]] = []
    for start, end in intervals:
        pieces.extend((s, min(s + chunk, end)) for s in range(start, end, chunk))
    return pieces


def dump_sidecar(digest: str, size: int, held: RangeSet) -> str:
    """The sidecar text for ``held``; it claims only bytes already fsync'ed to the partial file."""
    return json.dumps(
        {
            "version": SIDECAR_VERSION,
            "digest": digest,
            "size": size,
            "ranges": [[s, e] for s, e in held],
        },
        separators=(",", ":"),
    )


def load_sidecar(text: str, digest: str, size: int) -> RangeSet:
    """Parse a sidecar for blob ``digest`` of ``size`` bytes.

    Anything unexpected (other blob, other size, bad JSON, ranges out of bounds) yields an empty
    set: the download then starts over, which is always safe, instead of trusting a bad record.
    """
    try:
        data = json.loads(text)
    except ValueError:
        return RangeSet()
    if not isinstance(data, dict) or data.get("version") != SIDECAR_VERSION:
        return RangeSet()
    if data.get("digest") != digest or data.get("size") != size:
        return RangeSet()
    ranges = data.get("ranges")
    if not isinstance(ranges, list):
        return RangeSet()
    held = RangeSet()
    for item in ranges:
        if not _valid_pair(item, size):
            return RangeSet()
        held.add(item[0], item[1])
    return held


def _valid_pair(item: object, size: int) -> bool:
    if not isinstance(item, list) or len(item) != 2:
        return False
    start, end = item
    return type(start) is int and type(end) is int and 0 <= start <= end <= size
