"""An origin wrapped so that blob bytes come from the fleet first.

For each range the pull engine asks for, the rendezvous owner of the blob (``discovery``) is
asked first; when this node is the owner, or there are no live peers, the origin is used. A
peer that fails, is slow or answers wrongly sits out its cooldown, and the rest of the range
comes from whichever node the rendezvous choice names next (every node moves to the same one,
which itself goes to the origin), else from the origin, in the same stream: the engine sees
one uninterrupted range. Falling straight back to the origin instead would make every node
re-fetch its in-flight ranges there when an owner dies (measured: 2.7 times the model's bytes
with 8 agents). Tags and manifests always come from the origin (``resolve`` is the origin's):
peers serve blobs only.

When a blob assembled partly from peers fails verification, the engine calls
``after_mismatch`` and downloads it once more, from the origin alone.

A node serving a peer must not itself ask a peer for those bytes (two nodes with different
views of the fleet could wait on each other): the peer server sets ``SERVING_PEER`` while it
asks the engine for a range, and fetches started under it go to the origin.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator

from cacheagent.peers.client import PeerClient, PeerError
from cacheagent.peers.discovery import Peer, PeerDirectory
from cacheagent.peers.stats import PeerStats
from cacheagent.refs import ModelRef
from cacheagent.sources.base import BlobRef, ResolvedModel, Source

log = logging.getLogger(__name__)

SERVING_PEER: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "cacheagent_serving_peer", default=False
)
_CONTRIBUTORS_KEPT = 1024
# Peers asked for one range before the origin: the owner, then whoever the rendezvous choice
# names once it is out (normally this node itself, or a node that now fetches from the origin).
PEERS_TRIED = 3


class _Counted(Source):
    """The origin, its blob bytes counted as origin bytes (what ``after_mismatch`` returns)."""

    def __init__(self, origin: Source, stats: PeerStats) -> None:
        self.origin = origin
        self.kind = origin.kind
        self.supports_ranges = origin.supports_ranges
        self._stats = stats

    async def resolve(self, ref: ModelRef) -> ResolvedModel:
        return await self.origin.resolve(ref)

    def waiting(self) -> str:
        return self.origin.waiting()

    async def fetch(
        self, blob: BlobRef, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        stream = self.origin.fetch(blob, start, end)
        try:
            async for chunk in stream:
                self._stats.origin_bytes += len(chunk)
                yield chunk
        finally:  # closed with us, not whenever the garbage collector gets to it
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()


class PeerSource(Source):
    """``origin`` with peer fetch in front of its blob reads."""

    def __init__(
        self, origin: Source, directory: PeerDirectory, client: PeerClient, stats: PeerStats
    ) -> None:
        self.origin = _Counted(origin, stats)
        self.kind = origin.kind
        self.supports_ranges = origin.supports_ranges
        self._directory = directory
        self._client = client
        self._stats = stats
        # blob digest -> peers that sent some of its bytes (blamed if it does not verify)
        self._contributors: OrderedDict[str, set[Peer]] = OrderedDict()

    async def resolve(self, ref: ModelRef) -> ResolvedModel:
        return await self.origin.resolve(ref)

    def waiting(self) -> str:
        """The origin's rate-limit waits (peers do not ask us to wait)."""
        return self.origin.waiting()

    async def fetch(
        self, blob: BlobRef, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        end = blob.size if end is None else end
        pos = start
        failure: PeerError | None = None
        for _ in range(PEERS_TRIED):
            peer = None if SERVING_PEER.get() else self._directory.owner(blob.digest)
            if peer is None or pos >= end:
                break
            stream = self._client.fetch(peer, blob.digest, blob.size, pos, end)
            try:
                async with contextlib.aclosing(stream):  # a cancelled pull closes the response
                    async for chunk in stream:
                        self._credit(peer, blob.digest, len(chunk))
                        pos += len(chunk)
                        yield chunk
                break
            except PeerError as exc:
                failure = exc
                self._stats.failed(peer.address, exc.reason)
                if exc.reason == "missing":
                    # Alive but without this blob (never pulled it, evicted it, or unpacked a
                    # tar layer it does not keep): the origin, and no cooldown.
                    log.info("%s; blob %s: from the origin", exc, blob.digest)
                    break
                # It sits out its cooldown, so the rendezvous choice now names the next node:
                # the one every other node also moves to (it fetches from the origin).
                self._directory.mark_failed(peer)
                log.warning(
                    "%s; blob %s: bytes %d-%d from the next node", exc, blob.digest, pos, end
                )
        if pos < end:
            if failure is not None:
                self._stats.fallbacks[failure.reason] += 1
            async with contextlib.aclosing(self.origin.fetch(blob, pos, end)) as rest:
                async for chunk in rest:
                    yield chunk

    def limit_key(self, blob: BlobRef, origin: str) -> str:
        """Fetches that will ask a peer count against their own per-"origin" limit: a node
        whose origin slots were all held by fetches waiting on a peer, which waits on this
        node's origin fetches, would stall both (measured: every owner's transfers given up
        as slow with 8 agents)."""
        if SERVING_PEER.get() or self._directory.owner(blob.digest) is None:
            return origin
        return "peers"

    def after_mismatch(self, blob: BlobRef) -> Source | None:
        """Blame the peers that sent bytes of a blob that did not verify; the engine downloads
        it again from the origin alone (once: the origin's own mismatch is final)."""
        peers = self._contributors.pop(blob.digest, set())
        if not peers:
            return None
        for peer in peers:
            self._directory.mark_failed(peer)
            self._stats.failed(peer.address, "unverified")
        self._stats.fallbacks["unverified"] += 1
        log.warning(
            "blob %s from peer(s) %s did not verify; fetching it from the origin",
            blob.digest,
            ", ".join(sorted(p.address for p in peers)),
        )
        return self.origin

    def _credit(self, peer: Peer, digest: str, n: int) -> None:
        self._stats.peer_bytes[peer.address] += n
        peers = self._contributors.setdefault(digest, set())
        peers.add(peer)
        self._contributors.move_to_end(digest)
        while len(self._contributors) > _CONTRIBUTORS_KEPT:
            self._contributors.popitem(last=False)
