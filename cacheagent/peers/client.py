"""Fetch a byte range of a blob from one peer, and give up early when the peer misbehaves.

A peer is trusted for nothing: the answer must be the range asked for (status, Content-Range,
length), must keep coming (no read waits longer than ``stall_seconds``) and must keep a
minimum throughput (``min_bytes_per_second`` over every ``stall_seconds`` window); otherwise
``PeerError`` says why, and the caller takes the rest from the origin. The bytes themselves are
verified by digest on this node after the whole blob has landed, wherever they came from.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from cacheagent.errors import CacheAgentError
from cacheagent.peers.discovery import Peer
from cacheagent.peers.stats import FailureReason

# The repository part of the blob URL. Peers serve blobs by digest alone (the store is
# content-addressed), so the name only has to be a valid OCI name.
PEER_REPOSITORY = "cacheagent/peer"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_READ_BYTES = 1 << 20


class PeerError(CacheAgentError):
    """A peer transfer was given up; ``reason`` is the metric label."""

    def __init__(self, peer: Peer, reason: FailureReason, detail: str) -> None:
        super().__init__(f"peer {peer}: {detail}")
        self.peer = peer
        self.reason: FailureReason = reason


@dataclass(frozen=True)
class ClientSettings:
    """``answer_seconds`` bounds connecting and the response headers: a peer may hold them
    back while it waits for a pull to reach the blob (its ``miss_wait_seconds``)."""

    stall_seconds: float = 5.0
    min_bytes_per_second: int = 1 << 20
    answer_seconds: float = 7.0
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None  # presented to peers that ask for a client certificate
    tls_key: Path | None = None


class PeerClient:
    """One connection pool to every peer."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            ssl_context = client_tls(self.settings) if self.settings.tls else False
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_context, limit=0),
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
            )
        return self._session

    def url(self, peer: Peer, digest: str) -> str:
        scheme = "https" if self.settings.tls else "http"
        return f"{scheme}://{peer.address}/v2/{PEER_REPOSITORY}/blobs/{digest}"

    async def fetch(
        self, peer: Peer, digest: str, size: int, start: int, end: int
    ) -> AsyncGenerator[bytes, None]:
        """Yield bytes ``[start, end)`` of the blob from ``peer``; PeerError on any misbehaviour
        (the bytes yielded before it are the right range of what the peer sent)."""
        wait = self.settings.answer_seconds
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        try:
            async with asyncio.timeout(wait):
                response = await self._client().get(self.url(peer, digest), headers=headers)
        except (aiohttp.ClientError, OSError) as exc:
            raise PeerError(peer, "error", f"{type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise PeerError(peer, "slow", f"no answer in {wait:g}s") from exc
        async with response:
            _check_answer(peer, response, size, start, end)
            async for chunk in self._body(peer, response, end - start):
                yield chunk

    async def _body(
        self, peer: Peer, response: aiohttp.ClientResponse, want: int
    ) -> AsyncIterator[bytes]:
        stall, floor = self.settings.stall_seconds, self.settings.min_bytes_per_second
        got, window_start, window_bytes = 0, time.monotonic(), 0
        while got < want:
            try:
                async with asyncio.timeout(stall):
                    chunk = await response.content.read(min(_READ_BYTES, want - got))
            except TimeoutError as exc:
                raise PeerError(peer, "slow", f"no bytes for {stall:g}s at byte {got}") from exc
            except (aiohttp.ClientError, OSError) as exc:
                raise PeerError(peer, "error", f"{type(exc).__name__}: {exc}") from exc
            if not chunk:
                raise PeerError(peer, "error", f"body ended at byte {got} of {want}")
            got += len(chunk)
            window_bytes += len(chunk)
            now = time.monotonic()
            if now - window_start >= stall:
                rate = window_bytes / (now - window_start)
                if rate < floor:
                    raise PeerError(peer, "slow", f"{rate:.0f} B/s, under {floor} B/s")
                window_start, window_bytes = now, 0
            yield chunk

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def client_tls(settings: ClientSettings) -> ssl.SSLContext:
    """Peers are checked against ``tls_ca`` (the fleet's CA), not by name: they are addressed
    by pod IP, which changes with every pod, so a certificate cannot name them all."""
    context = ssl.create_default_context(
        cafile=None if settings.tls_ca is None else str(settings.tls_ca)
    )
    if settings.tls_ca is not None:
        context.check_hostname = False  # the chain is still verified (CERT_REQUIRED)
    if settings.tls_cert is not None and settings.tls_key is not None:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def _check_answer(
    peer: Peer, response: aiohttp.ClientResponse, size: int, start: int, end: int
) -> None:
    """The answer must be exactly the range asked for of a blob of the declared size."""
    if response.status == 404:
        raise PeerError(peer, "missing", "does not hold the blob")
    if response.status == 200:
        length = response.content_length
        if (start, end) != (0, size):
            raise PeerError(peer, "wrong_answer", f"ignored the Range bytes={start}-{end - 1}")
        if length is not None and length != size:
            raise PeerError(peer, "wrong_answer", f"sent {length} bytes for a {size}-byte blob")
        return
    if response.status != 206:
        raise PeerError(peer, "error", f"HTTP {response.status}")
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
    if match is None:
        raise PeerError(peer, "wrong_answer", "206 without a valid Content-Range")
    first, last, total = match.groups()
    if (int(first), int(last) + 1) != (start, end) or (total != "*" and int(total) != size):
        raise PeerError(
            peer,
            "wrong_answer",
            f"sent {match.group(0)}, asked for bytes {start}-{end - 1}/{size}",
        )
