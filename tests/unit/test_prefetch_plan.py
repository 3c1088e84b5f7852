"""plan_warm: which steps a warm reads within its memory budget (pure)."""

from __future__ import annotations

from cacheagent.memory.pagecache import PAGE_SIZE
from cacheagent.memory.prefetch import WarmStep, plan_warm

STEP = 16 * PAGE_SIZE


def test_everything_missing_within_budget() -> None:
    plan = plan_warm([2 * STEP, STEP + 100], [[0, 0], [0, 0]], STEP, budget=10 * STEP)
    assert plan.steps == (
        WarmStep(0, 0, STEP, STEP),
        WarmStep(0, STEP, STEP, STEP),
        WarmStep(1, 0, STEP, STEP),
        WarmStep(1, STEP, 100, 100),
    )
    assert plan.bytes_missing == plan.bytes_planned == 3 * STEP + 100
    assert not plan.limited


def test_resident_steps_cost_nothing_and_are_skipped() -> None:
    plan = plan_warm([3 * STEP], [[STEP, PAGE_SIZE, 0]], STEP, budget=2 * STEP)
    assert [step.offset for step in plan.steps] == [STEP, 2 * STEP]
    assert plan.bytes_planned == 2 * STEP - PAGE_SIZE
    assert not plan.limited


def test_budget_cuts_the_crossing_step_at_a_page_and_stops() -> None:
    budget = STEP + 3 * PAGE_SIZE + 17
    plan = plan_warm([4 * STEP], [[0, 0, 0, 0]], STEP, budget)
    assert plan.steps == (
        WarmStep(0, 0, STEP, STEP),
        WarmStep(0, STEP, 3 * PAGE_SIZE, 3 * PAGE_SIZE),
    )
    assert plan.bytes_planned <= budget
    assert plan.bytes_missing == 4 * STEP
    assert plan.limited


def test_zero_budget_plans_nothing_but_counts_what_is_missing() -> None:
    plan = plan_warm([STEP, 0], [[0], []], STEP, budget=0)
    assert plan.steps == ()
    assert plan.bytes_missing == STEP
    assert plan.limited


def test_nothing_missing_is_not_limited_even_with_no_budget() -> None:
    plan = plan_warm([STEP, 0], [[STEP], []], STEP, budget=0)
    assert plan.steps == () and not plan.limited
