"""Highest-random-weight (rendezvous) choice of the node that fetches a blob from the origin.

Every node computes the same answer from the same peer list without talking to anyone, and a
node joining or leaving moves only the blobs it wins or won (about 1/N of them). Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(node: str, digest: str) -> int:
    """The node's score for this digest: the first 8 bytes of sha256(node, digest)."""
    h = hashlib.sha256(f"{node}\n{digest}".encode()).digest()
    return int.from_bytes(h[:8], "big")


def choose(digest: str, nodes: Iterable[str]) -> str | None:
    """The node with the highest weight for ``digest`` (ties: the smallest name); None if
    there are no nodes."""
    best: tuple[int, str] | None = None
    for node in nodes:
        key = (weight(node, digest), node)
        if best is None or key[0] > best[0] or (key[0] == best[0] and node < best[1]):
            best = key
    return None if best is None else best[1]


def ranking(digest: str, nodes: Iterable[str]) -> list[str]:
    """All nodes, best first: who takes over when the winner is gone."""
    return sorted(set(nodes), key=lambda node: (-weight(node, digest), node))
