"""CPU list text and NVML affinity masks."""

from __future__ import annotations

import pytest

from cacheagent.memory.cpuset import cpus_from_mask_words, format_cpulist, parse_cpulist


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0-3\n", {0, 1, 2, 3}),
        ("0-1,8,10-11", {0, 1, 8, 10, 11}),
        ("5", {5}),
        ("\n", set()),
    ],
)
def test_parse_cpulist(text: str, cpus: set[int]) -> None:
    assert parse_cpulist(text) == cpus


@pytest.mark.parametrize("text", ["a-b", "3-1", "1,x", "-2"])
def test_parse_cpulist_names_the_bad_part(text: str) -> None:
    with pytest.raises(ValueError, match="bad CPU"):
        parse_cpulist(text)


@pytest.mark.parametrize(
    ("cpus", "text"),
    [({0, 1, 2, 3}, "0-3"), ({0, 1, 8, 10, 11}, "0-1,8,10-11"), ({7}, "7"), (set(), "")],
)
def test_format_cpulist_round_trips(cpus: set[int], text: str) -> None:
    assert format_cpulist(cpus) == text
    assert parse_cpulist(text) == cpus


def test_mask_words_lowest_word_first() -> None:
    assert cpus_from_mask_words([0b101, 1 << 63, 0b10]) == {0, 2, 127, 129}
    assert cpus_from_mask_words([0, 0]) == set()
