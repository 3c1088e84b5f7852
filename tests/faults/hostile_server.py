"""A registry origin that abuses its clients: endless bodies, slow drips, lies about sizes.

``HostileServer`` is a ``FaultServer`` (so everything it can do, it can still do) with extra
routes that need a handler of their own. Every route is bounded on the server side too (a byte
cap, a time cap), so a client that never gives up cannot make the test hang or eat the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from tests.fault_server import FaultServer
from tests.oci_push import Artifact

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ENDLESS_CAP_BYTES = 1 << 30
DRIP_CAP_SECONDS = 120.0


@dataclass
class HostileServer(FaultServer):
    routes: dict[str, Handler] = field(default_factory=dict)
    sent: Counter[str] = field(default_factory=Counter)  # body bytes written by the routes

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        route = self.routes.get(request.path.lstrip("/"))
        if route is None:
            return await super()._handle(request)
        return await route(request)

    def publish(self, repo: str, artifact: Artifact, tag: str = "v1") -> str:
        """Serve an artifact the way a registry would; returns the reference to pull."""
        for reference in (tag, artifact.digest):
            self.add(f"v2/{repo}/manifests/{reference}", artifact.manifest, artifact.media_type)
        for digest, data in artifact.blobs.items():
            self.add(f"v2/{repo}/blobs/{digest}", data)
        return f"{self.host}/{repo}:{tag}"

    def endless(self, name: str, content_type: str = "application/octet-stream") -> None:
        """A chunked 200 whose body never ends (up to ENDLESS_CAP_BYTES)."""

        async def handle(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(status=200)
            resp.content_type = content_type
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            chunk = b"\x00" * (64 << 10)
            with contextlib.suppress(ConnectionError):  # the client hung up
                while self.sent[name] < ENDLESS_CAP_BYTES:
                    await resp.write(chunk)
                    self.sent[name] += len(chunk)
            return resp

        self.routes[name] = handle

    def drip(
        self,
        name: str,
        data: bytes,
        *,
        interval: float,
        content_type: str = "application/octet-stream",
    ) -> None:
        """Slowloris: honest headers (206 for a Range), then one byte every ``interval`` s."""

        async def handle(request: web.Request) -> web.StreamResponse:
            start, stop = _span(request.headers.get("Range", ""), len(data))
            resp = web.StreamResponse(status=206 if (start, stop) != (0, len(data)) else 200)
            if resp.status == 206:
                resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            resp.content_type = content_type
            resp.content_length = stop - start
            await resp.prepare(request)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DRIP_CAP_SECONDS
            with contextlib.suppress(ConnectionError):  # the client hung up
                for i in range(start, stop):
                    if loop.time() > deadline:
                        break
                    await resp.write(data[i : i + 1])
                    self.sent[name] += 1
                    await asyncio.sleep(interval)
            return resp

        self.routes[name] = handle


def _span(header: str, size: int) -> tuple[int, int]:
    match = re.match(r"^bytes=(\d+)-(\d*)$", header)
    if match is None:
        return 0, size
    return int(match.group(1)), min(size, int(match.group(2) or size - 1) + 1)
