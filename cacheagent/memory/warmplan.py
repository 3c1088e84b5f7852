"""Which 8 MiB steps a warm reads within its memory budget (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cacheagent.memory.pagecache import page_floor


@dataclass(frozen=True)
class WarmStep:
    """Bytes ``[offset, offset + length)`` of file ``file``; ``missing`` were not resident."""

    file: int
    offset: int
    length: int
    missing: int


@dataclass(frozen=True)
class WarmPlan:
    steps: tuple[WarmStep, ...]
    bytes_missing: int
    bytes_planned: int

    @property
    def limited(self) -> bool:
        return self.bytes_planned < self.bytes_missing


def plan_warm(
    sizes: Sequence[int], resident: Sequence[Sequence[int]], step: int, budget: int
) -> WarmPlan:
    """Choose the steps to warm: every step with missing pages, in file order, within budget.

    ``resident[f][i]`` is the resident byte count of step ``i`` of file ``f``. The step that
    would cross the budget is shortened to the budget (page aligned) and the plan ends there.
    """
    steps: list[WarmStep] = []
    missing_total = planned = 0
    exhausted = False
    for index, (size, per_step) in enumerate(zip(sizes, resident, strict=True)):
        for i, resident_bytes in enumerate(per_step):
            offset = i * step
            length = min(step, size - offset)
            missing = length - resident_bytes
            if missing <= 0:
                continue
            missing_total += missing
            if exhausted:
                continue
            if planned + missing > budget:
                exhausted = True
                length = page_floor(budget - planned)
                missing = min(missing, length)
                if length <= 0:
                    continue
            steps.append(WarmStep(index, offset, length, missing))
            planned += missing
    return WarmPlan(tuple(steps), missing_total, planned)
