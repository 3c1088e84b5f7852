"""The pure eviction planner."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from cacheagent.store.lru import Candidate, plan_eviction, plan_eviction_ordered


def model(digest: str, last_used: float, blobs: Mapping[str, int], **flags: bool) -> Candidate:
    return Candidate(digest=digest, last_used=last_used, blobs=dict(blobs), **flags)


def refcounts(*models: Candidate) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in models:
        for blob in m.blobs:
            counts[blob] = counts.get(blob, 0) + 1
    return counts


def test_nothing_needed_plans_nothing() -> None:
    a = model("a", 1, {"x": 10})
    for need in (0, -5):
        plan = plan_eviction([a], refcounts(a), need)
        assert plan.models == () and plan.blobs == () and plan.bytes_freed == 0
        assert plan.satisfied


def test_evicts_least_recently_used_first_and_stops_when_enough() -> None:
    old = model("old", 1, {"x": 10})
    mid = model("mid", 2, {"y": 10})
    new = model("new", 3, {"z": 10})
    plan = plan_eviction([new, old, mid], refcounts(old, mid, new), 15)
    assert plan.models == ("old", "mid")
    assert set(plan.blobs) == {"x", "y"}
    assert plan.bytes_freed == 20
    assert plan.satisfied


def test_pinned_leased_and_pulling_models_are_never_evicted() -> None:
    pinned = model("pinned", 1, {"p": 100}, pinned=True)
    leased = model("leased", 2, {"l": 100}, leased=True)
    pulling = model("pulling", 3, {"q": 100}, pulling=True)
    free = model("free", 4, {"f": 10})
    plan = plan_eviction(
        [pinned, leased, pulling, free], refcounts(pinned, leased, pulling, free), 50
    )
    assert plan.models == ("free",)
    assert plan.bytes_freed == 10
    assert not plan.satisfied


def test_shared_blob_is_freed_only_when_its_last_user_goes() -> None:
    a = model("a", 1, {"shared": 100, "a-only": 1})
    b = model("b", 2, {"shared": 100, "b-only": 1})
    counts = refcounts(a, b)
    plan = plan_eviction([a, b], counts, 2)
    assert plan.models == ("a", "b")
    assert sorted(plan.blobs) == ["a-only", "b-only", "shared"]
    assert plan.bytes_freed == 102
    plan = plan_eviction([a, b], counts, 1)
    assert plan.models == ("a",)
    assert plan.blobs == ("a-only",) and plan.bytes_freed == 1


def test_blob_shared_with_a_pinned_model_is_kept() -> None:
    a = model("a", 1, {"shared": 100, "a-only": 5})
    keep = model("keep", 2, {"shared": 100}, pinned=True)
    plan = plan_eviction([a, keep], refcounts(a, keep), 50)
    assert plan.models == ("a",)
    assert plan.blobs == ("a-only",)
    assert plan.bytes_freed == 5 and not plan.satisfied


def test_blob_used_by_a_model_outside_the_candidates_is_kept() -> None:
    # A pending model of a running pull is counted in the refcounts but is not a candidate.
    a = model("a", 1, {"shared": 100})
    plan = plan_eviction([a], {"shared": 2}, 10)
    assert plan.models == () and plan.bytes_freed == 0 and not plan.satisfied


def test_model_that_frees_nothing_is_dropped_from_the_plan() -> None:
    # "old" only shares blob s with "new"; evicting "mid" is enough, so "old" must stay.
    old = model("old", 1, {"s": 50})
    mid = model("mid", 2, {"m": 60})
    new = model("new", 3, {"s": 50})
    plan = plan_eviction([old, mid, new], refcounts(old, mid, new), 60)
    assert plan.models == ("mid",)
    assert plan.bytes_freed == 60


def test_cache_full_plan_holds_everything_evictable() -> None:
    a = model("a", 1, {"x": 10})
    b = model("b", 2, {"y": 20})
    c = model("c", 3, {"z": 40}, leased=True)
    plan = plan_eviction([a, b, c], refcounts(a, b, c), 1000)
    assert not plan.satisfied
    assert plan.models == ("a", "b")
    assert plan.bytes_freed == 30


def test_ties_in_last_use_break_by_digest() -> None:
    b = model("sha256:b", 5, {"y": 10})
    a = model("sha256:a", 5, {"x": 10})
    assert plan_eviction([b, a], refcounts(a, b), 10).models == ("sha256:a",)
    assert plan_eviction([a, b], refcounts(a, b), 10).models == ("sha256:a",)


def test_exact_fit_is_satisfied() -> None:
    a = model("a", 1, {"x": 10})
    plan = plan_eviction([a], refcounts(a), 10)
    assert plan.satisfied and plan.bytes_freed == 10


def test_orphans_go_first() -> None:
    a = model("a", 1, {"x": 10})
    plan = plan_eviction([a], refcounts(a), 5, orphans={"o2": 3, "o1": 3})
    assert plan.models == ()
    assert plan.blobs == ("o1", "o2")
    assert plan.bytes_freed == 6


def test_orphans_then_models() -> None:
    a = model("a", 1, {"x": 10})
    plan = plan_eviction([a], refcounts(a), 12, orphans={"o": 3})
    assert plan.models == ("a",)
    assert plan.blobs == ("o", "x")
    assert plan.bytes_freed == 13


def test_ordered_planner_reads_only_what_it_needs() -> None:
    seen: list[str] = []

    def stream() -> Iterator[Candidate]:
        for i in range(1000):
            seen.append(f"m{i}")
            yield model(f"m{i}", i, {f"b{i}": 10})

    counts = {f"b{i}": 1 for i in range(1000)}
    plan = plan_eviction_ordered(stream(), counts, 25)
    assert plan.models == ("m0", "m1", "m2")
    assert len(seen) == 3
