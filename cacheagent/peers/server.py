"""The peer listener: a read-only subset of the OCI distribution API over this node's blobs.

``GET/HEAD /v2/`` and ``GET/HEAD /v2/<name>/blobs/<digest>`` with single Range requests,
nothing else: no manifests, no tags, no uploads (peers resolve references at the origin). The
digest is the only key (the store is content-addressed, so ``<name>`` is checked for form and
otherwise ignored) and is validated before any path is built from it, so a request can only
ever read a file the store names: a verified blob, or the partial file of a blob this node is
downloading right now, up to the bytes it already holds (the pull engine's ``ensure_range``
says when a range is there, and fetches it first if nobody is fetching it yet — from the
origin, never from another peer; see ``source.SERVING_PEER``).

Anyone who can reach the port can read any blob whose digest they know: keep the port inside
the cluster (the headless Service, a NetworkPolicy) or turn on TLS with client certificates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
from pathlib import Path

from aiohttp import web

from cacheagent.errors import CacheAgentError, ModelNotFoundError, StoreError
from cacheagent.peers.ranges import UnsatisfiableRangeError, parse_range
from cacheagent.peers.source import SERVING_PEER
from cacheagent.peers.stats import PeerStats
from cacheagent.pull.engine import PullEngine
from cacheagent.store import Store

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_NAME = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)
_STEP = 1 << 20
_POLL_SECONDS = 0.05


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": message}]}, status=status)


class PeerServer:
    """Serves blobs to peers; ``start`` binds ``host:port`` (TLS when ``tls`` is given)."""

    def __init__(
        self,
        store: Store,
        engine: PullEngine,
        stats: PeerStats,
        *,
        miss_wait_seconds: float = 2.0,
        chunk_wait_seconds: float = 60.0,
    ) -> None:
        self.store = store
        self.engine = engine
        self.stats = stats
        self.miss_wait_seconds = miss_wait_seconds
        self.chunk_wait_seconds = chunk_wait_seconds
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/", self._base)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        return app

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Listen; returns the port (useful with port 0)."""
        runner = web.AppRunner(
            self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=2.0
        )
        await runner.setup()
        await web.TCPSite(runner, host, port, ssl_context=tls).start()
        self._runner = runner
        bound: int = runner.addresses[0][1]
        return bound

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _base(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        response = await self._answer(request)
        if not isinstance(response, web.FileResponse):  # counted by _verified
            self.stats.served[str(response.status)] += 1
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        digest, name = request.match_info["digest"], request.match_info["name"]
        if not _NAME.fullmatch(name):
            return _error(400, "NAME_INVALID", f"invalid repository name {name!r}")
        if not _DIGEST.fullmatch(digest):
            return _error(400, "DIGEST_INVALID", f"invalid digest {digest!r}")
        unknown = _error(404, "BLOB_UNKNOWN", f"blob {digest} is not on this node")
        try:
            if await asyncio.to_thread(self.store.has_blob, digest):
                return await self._verified(request, digest)
            SERVING_PEER.set(True)  # this handler's task only: our fetches go to the origin
            path = await self._in_flight(digest)
            return unknown if path is None else await self._partial(request, digest, path)
        except FileNotFoundError:  # evicted, or a download discarded, a moment ago
            return unknown

    async def _verified(self, request: web.Request, digest: str) -> web.StreamResponse:
        """A committed blob: aiohttp sends it (Range, HEAD, sendfile) after we return."""
        path = self.store.blob_path(digest)
        size = (await asyncio.to_thread(path.stat)).st_size
        try:
            span = parse_range(request.headers.get("Range"), size)
        except UnsatisfiableRangeError:
            self.stats.served["416"] += 1
        else:
            self.stats.served["200" if span is None else "206"] += 1
            if request.method == "GET":
                start, end = span or (0, size)
                self.stats.served_bytes += end - start
        return web.FileResponse(
            path,
            headers={"Docker-Content-Digest": digest, "Content-Type": "application/octet-stream"},
        )

    async def _in_flight(self, digest: str) -> Path | None:
        """The partial file of a blob being downloaded, once it is open (waiting up to
        ``miss_wait_seconds`` for a pull that has not reached it yet), or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.miss_wait_seconds
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    return await self.engine.ensure_range(digest, 0, 0)
            except ModelNotFoundError:
                if loop.time() >= deadline:
                    return None
                await asyncio.sleep(_POLL_SECONDS)
            except TimeoutError:
                return None

    async def _partial(self, request: web.Request, digest: str, path: Path) -> web.StreamResponse:
        fd = await asyncio.to_thread(_open_either, path, self.store.blob_path(digest))
        try:
            size = os.fstat(fd).st_size
            try:
                span = parse_range(request.headers.get("Range"), size)
            except UnsatisfiableRangeError:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            start, end = span or (0, size)
            response = web.StreamResponse(status=200 if span is None else 206)
            response.headers["Docker-Content-Digest"] = digest
            response.headers["Content-Type"] = "application/octet-stream"
            response.headers["Accept-Ranges"] = "bytes"
            if span is not None:
                response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            response.content_length = end - start
            await response.prepare(request)
            if request.method == "GET":
                await self._stream(request, response, fd, digest, start, end)
            return response
        finally:
            os.close(fd)

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        fd: int,
        digest: str,
        start: int,
        end: int,
    ) -> None:
        # Claim the whole range at once (the engine fetches what nobody fetches yet in its own
        # range-sized pieces), then send it step by step as it lands.
        claim = asyncio.create_task(self.engine.ensure_range(digest, start, end))
        pos = start
        try:
            while pos < end:
                upto = min(end, pos + _STEP)
                async with asyncio.timeout(self.chunk_wait_seconds):
                    await self.engine.ensure_range(digest, pos, upto)
                data = await asyncio.to_thread(os.pread, fd, upto - pos, pos)
                if len(data) != upto - pos:
                    raise StoreError(f"partial file of {digest} ends before byte {upto}")
                await response.write(data)
                self.stats.served_bytes += len(data)
                pos = upto
            await response.write_eof()
        except ConnectionError:
            log.debug("peer hung up while receiving blob %s at byte %d", digest, pos)
        except (CacheAgentError, TimeoutError) as exc:
            # The download here failed or stalled: cut the connection, the peer falls back.
            log.warning("serving blob %s to a peer stopped at byte %d: %s", digest, pos, exc)
            if request.transport is not None:
                request.transport.close()
        finally:
            claim.cancel()
            await asyncio.gather(claim, return_exceptions=True)


def _open_either(partial: Path, blob: Path) -> int:
    """Open the partial file, or the blob if it was committed meanwhile (same inode)."""
    try:
        return os.open(partial, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return os.open(blob, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
