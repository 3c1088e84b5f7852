"""CPU lists in the kernel's text form (``0-3,8,10-11``), as sysfs writes them (pure)."""

from __future__ import annotations

from collections.abc import Iterable


def parse_cpulist(text: str) -> frozenset[int]:
    """Parse ``/sys/devices/system/node/node<N>/cpulist`` text; ValueError names a bad part."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, sep, last = part.partition("-")
        try:
            low = int(first)
            high = int(last) if sep else low
        except ValueError:
            raise ValueError(f"bad CPU list part {part!r} in {text.strip()!r}") from None
        if low < 0 or high < low:
            raise ValueError(f"bad CPU range {part!r} in {text.strip()!r}")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpulist(cpus: Iterable[int]) -> str:
    """The inverse of :func:`parse_cpulist`, with ranges collapsed."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    start = 0
    for i, cpu in enumerate(ordered):
        if i + 1 < len(ordered) and ordered[i + 1] == cpu + 1:
            continue
        low = ordered[start]
        parts.append(str(low) if low == cpu else f"{low}-{cpu}")
        start = i + 1
    return ",".join(parts)


def cpus_from_mask_words(words: Iterable[int], bits_per_word: int = 64) -> frozenset[int]:
    """CPUs set in a bitmask split into words, lowest word first (NVML's CPU affinity)."""
    cpus: set[int] = set()
    for index, word in enumerate(words):
        cpus.update(index * bits_per_word + bit for bit in range(bits_per_word) if word >> bit & 1)
    return frozenset(cpus)
