"""RangeSet bookkeeping and the ranges sidecar format."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from cacheagent.pull.ranges import RangeSet, dump_sidecar, load_sidecar, split

DIGEST = "sha256:" + "ab" * 32


def test_add_merges_overlapping_and_touching_intervals() -> None:
    held = RangeSet()
    held.add(10, 20)
    held.add(30, 40)
    assert held.intervals() == [(10, 20), (30, 40)]
    held.add(20, 25)  # touches the first
    assert held.intervals() == [(10, 25), (30, 40)]
    held.add(24, 31)  # bridges both
    assert held.intervals() == [(10, 40)]
    held.add(0, 5)
    held.add(50, 60)
    held.add(5, 55)  # swallows everything right of 0
    assert held.intervals() == [(0, 60)]


def test_empty_interval_is_ignored_and_bad_ones_refused() -> None:
    held = RangeSet()
    held.add(7, 7)
    assert len(held) == 0
    with pytest.raises(ValueError, match="bad byte range"):
        held.add(5, 4)
    with pytest.raises(ValueError, match="bad byte range"):
        held.add(-1, 4)


def test_covered_and_missing() -> None:
    held = RangeSet.of([(0, 10), (20, 30)])
    assert held.covered(0, 10)
    assert held.covered(22, 30)
    assert held.covered(15, 15)
    assert not held.covered(5, 15)
    assert not held.covered(30, 31)
    assert held.missing(0, 40) == [(10, 20), (30, 40)]
    assert held.missing(5, 25) == [(10, 20)]
    assert held.missing(0, 10) == []
    assert held.missing(12, 18) == [(12, 18)]
    assert RangeSet().missing(3, 9) == [(3, 9)]


def test_prefix_total_copy_and_equality() -> None:
    held = RangeSet.of([(0, 4), (8, 10)])
    assert held.prefix_end() == 4
    assert RangeSet.of([(1, 4)]).prefix_end() == 0
    assert held.total() == 6
    copy = held.copy()
    copy.add(4, 8)
    assert copy.intervals() == [(0, 10)]
    assert held.intervals() == [(0, 4), (8, 10)]
    assert held == RangeSet.of([(8, 10), (0, 4)])
    assert held != copy


def test_matches_a_byte_set_model_under_random_operations() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        held, model = RangeSet(), set[int]()
        for _ in range(rng.randint(1, 12)):
            s = rng.randint(0, 90)
            e = s + rng.randint(0, 15)
            held.add(s, e)
            model.update(range(s, e))
        # canonical form: sorted, disjoint, never touching
        ivs = held.intervals()
        assert all(a[1] < b[0] for a, b in itertools.pairwise(ivs))
        assert held.total() == len(model)
        qs = rng.randint(0, 100)
        qe = qs + rng.randint(0, 20)
        assert held.covered(qs, qe) == all(b in model for b in range(qs, qe))
        gaps = {b for s, e in held.missing(qs, qe) for b in range(s, e)}
        assert gaps == {b for b in range(qs, qe) if b not in model}


def test_split_cuts_into_chunks() -> None:
    assert split([(0, 10), (20, 25)], 4) == [(0, 4), (4, 8), (8, 10), (20, 24), (24, 25)]
    assert split([], 4) == []
    with pytest.raises(ValueError, match="chunk size"):
        split([(0, 1)], 0)


def test_sidecar_round_trip() -> None:
    held = RangeSet.of([(0, 100), (200, 300)])
    text = dump_sidecar(DIGEST, 1000, held)
    assert json.loads(text)["ranges"] == [[0, 100], [200, 300]]
    assert load_sidecar(text, DIGEST, 1000) == held


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        json.dumps({"version": 2, "digest": DIGEST, "size": 1000, "ranges": []}),
        json.dumps(
            {"version": 1, "digest": "sha256:" + "cd" * 32, "size": 1000, "ranges": [[0, 1]]}
        ),
        json.dumps({"version": 1, "digest": DIGEST, "size": 999, "ranges": [[0, 1]]}),
        json.dumps({"version": 1, "digest": DIGEST, "size": 1000, "ranges": [[0, 1001]]}),
        json.dumps({"version": 1, "digest": DIGEST, "size": 1000, "ranges": [[5, 4]]}),
        json.dumps({"version": 1, "digest": DIGEST, "size": 1000, "ranges": [[0, "9"]]}),
        json.dumps({"version": 1, "digest": DIGEST, "size": 1000, "ranges": [[0, True]]}),
        json.dumps({"version": 1, "digest": DIGEST, "size": 1000, "ranges": "0-9"}),
    ],
)
def test_a_sidecar_that_does_not_fit_this_blob_is_not_trusted(text: str) -> None:
    assert load_sidecar(text, DIGEST, 1000) == RangeSet()
