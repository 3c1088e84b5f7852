"""HTTP Range header parsing for the peer server (pure, no I/O)."""

from __future__ import annotations

import re

_SINGLE = re.compile(r"bytes=(\d*)-(\d*)")


class UnsatisfiableRangeError(ValueError):
    """The Range header names no byte of the blob (HTTP 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` for a single-range ``Range`` header; None for no header (or one we do
    not understand, such as several ranges: the whole blob is then sent, as RFC 9110 allows).
    """
    if header is None:
        return None
    match = _SINGLE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0:
            raise UnsatisfiableRangeError(header)
        return max(0, size - n), size
    start = int(first)
    end = size if not last else min(size, int(last) + 1)
    if start >= size or start >= end:
        raise UnsatisfiableRangeError(header)
    return start, end
