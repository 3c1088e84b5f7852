"""How many bytes an on-demand eviction should free, and why. Pure: no store, no I/O.

``cacheagent gc --dry-run`` asks what capacity eviction would do now (the ``watermarks``
target: past the high watermark, down to the low one, exactly as ``Store.ensure_room`` does
before a pull); ``cacheagent evict --to 80%`` / ``--to 400Gi`` / ``--free 50Gi`` ask for a
level or an amount. The store's own LRU planner then chooses the models, with its rules
(never pinned, leased or pulling models), so on-demand and automatic eviction cannot differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cacheagent.errors import CacheAgentError

TargetKind = Literal["watermarks", "to_bytes", "to_fraction", "free"]


class ReclaimTargetError(CacheAgentError, ValueError):
    """A target that cannot be met as asked (a fraction out of range, no capacity to take it of)."""


@dataclass(frozen=True)
class ReclaimTarget:
    """``to_bytes``/``free`` take bytes, ``to_fraction`` a fraction of the capacity."""

    kind: TargetKind
    value: float = 0.0


@dataclass(frozen=True)
class Need:
    bytes: int
    reason: str


def need_for(
    target: ReclaimTarget, *, used: int, capacity: int | None, high: float, low: float
) -> Need:
    """The bytes ``target`` asks to free from a store using ``used`` of ``capacity`` bytes."""
    if target.kind == "free":
        amount = int(target.value)
        return Need(amount, f"asked to free {amount} bytes")
    if target.kind == "to_bytes":
        goal = int(target.value)
        return _down_to(used, goal, f"asked for at most {goal} bytes used")
    if capacity is None:
        raise ReclaimTargetError(
            "the store has no capacity limit, so there is no percentage or watermark to evict "
            "to; give a size (--to 400Gi or --free 50Gi)"
        )
    if target.kind == "to_fraction":
        if not 0.0 <= target.value <= 1.0:
            raise ReclaimTargetError(
                f"a target of {target.value:.0%} of capacity is not between 0% and 100%"
            )
        goal = int(target.value * capacity)
        return _down_to(used, goal, f"asked for at most {target.value:.0%} of capacity used")
    used_share = used / capacity if capacity else 0.0
    if used <= high * capacity:
        return Need(
            0,
            f"used {used_share:.1%} of capacity is not past the high watermark ({high:.0%}): "
            "capacity eviction would remove nothing now",
        )
    return Need(
        used - int(low * capacity),
        f"used {used_share:.1%} of capacity is past the high watermark ({high:.0%}): "
        f"capacity eviction frees down to the low watermark ({low:.0%})",
    )


def _down_to(used: int, goal: int, asked: str) -> Need:
    if used <= goal:
        return Need(0, f"{asked}; the store already uses {used} bytes")
    return Need(used - goal, f"{asked}; the store uses {used} bytes")
