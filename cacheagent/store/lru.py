"""Which models to evict to free a number of bytes. Pure: no files, no index.

Eviction is least-recently-used by model. A model's bytes are only freed when no surviving
model uses them, so the planner counts references per blob: evicting a model drops one
reference from each of its distinct blobs, and a blob is freed when its count reaches zero.
``blob_refcounts`` must count every model that uses a blob (ready or pending, evictable or
not), so blobs shared with a pinned or leased model are never freed.

Blobs no model uses ("orphans": leftovers of an abandoned pull) cost nobody anything, so the
caller may pass the ones old enough to be abandoned; they are freed before any model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """A model as the planner sees it. ``blobs`` maps each distinct blob it uses to its size."""

    digest: str
    last_used: float
    blobs: Mapping[str, int] = field(default_factory=dict)
    size: int = 0
    pinned: bool = False
    leased: bool = False
    pulling: bool = False

    @property
    def evictable(self) -> bool:
        return not (self.pinned or self.leased or self.pulling)


@dataclass(frozen=True)
class EvictionPlan:
    """Models to delete and blobs that deleting them frees. ``bytes_freed`` counts freed blobs.

    When the need cannot be met the plan holds everything that may be evicted, so
    ``bytes_freed`` is then the most that can be freed at all."""

    need_bytes: int
    models: tuple[str, ...] = ()
    blobs: tuple[str, ...] = ()
    bytes_freed: int = 0

    @property
    def satisfied(self) -> bool:
        return self.bytes_freed >= self.need_bytes


def lru_key(candidate: Candidate) -> tuple[float, str]:
    """Oldest access first; equal access times are broken by digest so plans are repeatable."""
    return (candidate.last_used, candidate.digest)


def plan_eviction(
    models: Sequence[Candidate],
    blob_refcounts: Mapping[str, int],
    need_bytes: int,
    *,
    orphans: Mapping[str, int] | None = None,
) -> EvictionPlan:
    """Plan the eviction of least-recently-used models until ``need_bytes`` are freed."""
    return plan_eviction_ordered(
        sorted(models, key=lru_key), blob_refcounts, need_bytes, orphans=orphans
    )


def plan_eviction_ordered(
    models: Iterable[Candidate],
    blob_refcounts: Mapping[str, int],
    need_bytes: int,
    *,
    orphans: Mapping[str, int] | None = None,
) -> EvictionPlan:
    """``plan_eviction`` for candidates already in ``lru_key`` order.

    The iterable is consumed only as far as needed, so the store can stream candidates from its
    index and stop reading once enough is freed; ``blob_refcounts`` is read only for blobs of
    candidates already yielded (the store fills it while streaming).
    """
    if need_bytes <= 0:
        return EvictionPlan(need_bytes=need_bytes)
    freed_blobs: list[str] = []
    freed = 0
    for digest, size in sorted((orphans or {}).items()):
        if freed >= need_bytes:
            break
        freed_blobs.append(digest)
        freed += size
    remaining: dict[str, int] = {}
    chosen: list[Candidate] = []
    for candidate in models if freed < need_bytes else ():
        if not candidate.evictable:
            continue
        chosen.append(candidate)
        for blob, size in candidate.blobs.items():
            count = remaining.get(blob, blob_refcounts[blob]) - 1
            remaining[blob] = count
            if count == 0:
                freed_blobs.append(blob)
                freed += size
        if freed >= need_bytes:
            break
    # A chosen model all of whose blobs survive (each still used by a kept model) frees
    # nothing: keep it.
    needed = tuple(c.digest for c in chosen if any(remaining[blob] == 0 for blob in c.blobs))
    return EvictionPlan(
        need_bytes=need_bytes, models=needed, blobs=tuple(freed_blobs), bytes_freed=freed
    )
