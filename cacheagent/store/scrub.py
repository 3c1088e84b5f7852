"""Background scrub: re-hash committed blobs a few at a time, so a flipped byte (same size,
so no size check sees it) is found without waiting for ``gc --fsck --rehash``.

The cursor walks the blobs in digest order and wraps around; it lives in memory (a restarted
agent starts over, which only repeats work). Hashing reads an immutable file and runs outside
the store lock; a blob that fails is quarantined under the lock (``Store.quarantine``): its
file moves to ``<root>/quarantine/`` (evidence, not served), its row goes, and every model that
used it goes back to pending (its directory kept if a pod uses it) for the next pull to repair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cacheagent.store.blobs import hash_file


@dataclass
class ScrubPass:
    """What one step hashed and what failed (blob digest -> what its bytes hash to)."""

    hashed_bytes: int = 0
    blobs: int = 0
    failed: dict[str, str] = field(default_factory=dict)


@dataclass
class ScrubCursor:
    """Where the scrub goes on from: the last digest checked ("" before the first)."""

    after: str = ""
    rounds: int = 0

    def next_batch(self, blobs: dict[str, int], budget: int) -> list[tuple[str, int]]:
        """Blobs after the cursor, in digest order, up to ``budget`` bytes (at least one),
        wrapping around to the first when the end is reached."""
        ordered = sorted(blobs.items())
        start = next((i for i, (d, _) in enumerate(ordered) if d > self.after), len(ordered))
        if start == len(ordered):
            start = 0
            if ordered:
                self.rounds += 1
        batch: list[tuple[str, int]] = []
        total = 0
        for digest, size in ordered[start:]:
            if batch and total + size > budget:
                break
            batch.append((digest, size))
            total += size
        if batch:
            self.after = batch[-1][0]
        return batch


def hash_batch(batch: list[tuple[str, int]], path_of: Callable[[str], Path]) -> ScrubPass:
    """Hash each blob of ``batch``; a file gone since the listing (evicted) is skipped."""
    result = ScrubPass()
    for digest, _ in batch:
        try:
            actual, size = hash_file(path_of(digest))
        except FileNotFoundError:
            continue
        result.blobs += 1
        result.hashed_bytes += size
        if actual != digest:
            result.failed[digest] = actual
    return result
