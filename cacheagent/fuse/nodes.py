"""Node ids that any agent process computes the same way, so a new one can resume a mount. Pure.

The kernel names every file by the node id our LOOKUP answered, and keeps using that id after
the agent that issued it is gone. So an id is not a counter but a function of what it names:
the root is 1, any other node is a 64-bit hash of (model digest, model-relative path), with the
top bit cleared and 0 and 1 never used. A process that never issued an id answers for it once
the id is in its reverse map, which ``NodeTable.add_model`` fills from a model's tree.

Two different paths may hash alike: with n nodes known the chance is about n**2 / 2**64
(1e-7 for a million files). The first path keeps the id; the later one is refused
(``NodeClashError``, answered EIO with a log line naming both) rather than served as the other.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from cacheagent.fuse.protocol import ROOT_ID

_TOP_BIT_CLEAR = (1 << 63) - 1


@dataclass(frozen=True)
class NodeRef:
    """What a node id names: a model's directory (``relpath`` "") or a path inside it."""

    model: str
    relpath: str


class NodeClashError(LookupError):
    """Two paths hash to the same node id; the later one cannot be served."""

    def __init__(self, nodeid: int, kept: NodeRef, refused: NodeRef) -> None:
        super().__init__(
            f"node id {nodeid:#x} of {refused.model}/{refused.relpath} clashes with "
            f"{kept.model}/{kept.relpath}, which keeps it; the later path answers EIO"
        )
        self.nodeid = nodeid


def node_id(model: str, relpath: str) -> int:
    """The node id of ``relpath`` in ``model`` (the same in every process)."""
    key = f"{model}\0{relpath}".encode("utf-8", "surrogateescape")
    value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    value &= _TOP_BIT_CLEAR
    return value if value > ROOT_ID else value + 2


@dataclass
class NodeTable:
    """The reverse map node id -> ``NodeRef``, filled per model (thread-safe)."""

    _refs: dict[int, NodeRef] = field(default_factory=dict)
    _by_model: dict[str, list[int]] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def add_model(self, model: str, relpaths: Iterable[str]) -> list[NodeClashError]:
        """Register every path of ``model`` (including "" for its directory); returns clashes."""
        clashes: list[NodeClashError] = []
        with self._guard:
            ids = self._by_model.setdefault(model, [])
            for relpath in relpaths:
                ref = NodeRef(model, relpath)
                nodeid = node_id(model, relpath)
                kept = self._refs.setdefault(nodeid, ref)
                if kept == ref:
                    ids.append(nodeid)
                else:
                    clashes.append(NodeClashError(nodeid, kept, ref))
        return clashes

    def id_for(self, model: str, relpath: str) -> int:
        """The id to hand the kernel for a path; NodeClashError if another path owns it."""
        ref = NodeRef(model, relpath)
        nodeid = node_id(model, relpath)
        with self._guard:
            kept = self._refs.setdefault(nodeid, ref)
            if kept is ref:
                self._by_model.setdefault(model, []).append(nodeid)
        if kept != ref:
            raise NodeClashError(nodeid, kept, ref)
        return nodeid

    def resolve(self, nodeid: int) -> NodeRef | None:
        with self._guard:
            return self._refs.get(nodeid)

    def drop_model(self, model: str) -> None:
        with self._guard:
            for nodeid in self._by_model.pop(model, []):
                ref = self._refs.get(nodeid)
                if ref is not None and ref.model == model:
                    del self._refs[nodeid]

    def __len__(self) -> int:
        with self._guard:
            return len(self._refs)
