"""Test data files: reproducible pseudo-random content and stand-in digests."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

MiB = 1 << 20


def write_random_file(path: Path, size: int, seed: int) -> Path:
    """``size`` pseudo-random bytes (reproducible from ``seed``), written in 8 MiB pieces."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        left = size
        while left:
            piece = min(left, 8 * MiB)
            out.write(rng.randbytes(piece))
            left -= piece
    return path


def fake_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
