"""A misbehaving HTTP origin (and forward proxy) on 127.0.0.1 for transport and pull tests.

Serves named byte strings at ``/<name>`` (GET and HEAD, honouring ``Range`` with 206), counts
the body bytes it sent per name, records every request, and can be told to misbehave for the
next N requests of a name (``Fault``): 429 with Retry-After, 503, drop the connection halfway,
send a longer body than the blob (with a matching Content-Length, or chunked), wrong bytes, stall
mid-body, redirect elsewhere (307 or 302), ignore Range (200 with the whole body). With
``require_authorization`` set, requests without that exact header get a 401 carrying
``challenge`` (a Basic one unless told).

Behaving like the real services: with ``compress`` set it gzips whole bodies for a client whose
``Accept-Encoding`` admits gzip (as CDNs do for text); with ``presign_secret`` set it is object
storage behind presigned URLs (``presign``): a request needs a valid ``Signature`` for its path
and an ``Expires`` still in the future, else 403 ``AccessDenied``. ``bind`` picks the loopback
address (127.0.0.2 makes a second host for redirects). With ``strict_accept`` it serves an item
only to a request whose ``Accept`` admits its content type (exactly, or ``*/*``), else 404
``MANIFEST_UNKNOWN``, as registries that match Accept strictly do. ``count(name, method)``
tells manifest GETs from HEADs.

Because aiohttp parses absolute-form request targets, the server also works as a plain HTTP
forward proxy: point a client's proxy at it and it answers for any host (``Seen.raw_path`` shows
the absolute URL the client asked the proxy for).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from tests.loopback import start_loopback

FaultKind = Literal[
    "status", "drop", "long", "long_chunked", "wrong", "stall", "redirect", "ignore_range"
]
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Fault:
    kind: FaultKind
    times: int = 1  # how many matching requests misbehave (then the name behaves again)
    status: int = 503  # for kind="status"
    retry_after: str | None = None  # for kind="status"
    body: bytes = b""  # for kind="status"
    headers: dict[str, str] = field(default_factory=dict)  # for kind="status"
    location: str = ""  # for kind="redirect"
    redirect_status: int = 307  # for kind="redirect"
    extra: int = 1024  # for kind="long"/"long_chunked": bytes beyond the blob
    cut_at: float = 0.5  # for kind="drop"/"stall": the share of the body sent first
    method: str = "GET"  # the request method it applies to


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    raw_path: str
    headers: dict[str, str]
    peer: str  # client address:port, to tell connections apart


@dataclass
class _Item:
    data: bytes
    content_type: str
    headers: dict[str, str]
    declare_length: bool


def accepts_gzip(header: str | None) -> bool:
    """True when an ``Accept-Encoding`` header admits gzip (no header admits only identity)."""
    for part in (header or "").split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*") and params.replace(" ", "") != "q=0":
            return True
    return False


def _admits(accept: str | None, content_type: str) -> bool:
    types = {part.split(";", 1)[0].strip() for part in (accept or "").split(",")}
    return content_type in types or "*/*" in types


@dataclass
class FaultServer:
    require_authorization: str | None = None
    challenge: str = 'Basic realm="fault-server"'
    stall_seconds: float = 30.0
    bind: str = "127.0.0.1"
    compress: bool = False
    presign_secret: str | None = None
    strict_accept: bool = False
    items: dict[str, _Item] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    served: Counter[str] = field(default_factory=Counter)
    requests: list[Seen] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    def url(self, name: str = "") -> str:
        return f"http://{self.host}/{name}"

    def add(
        self,
        name: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
        *,
        declare_length: bool = True,
    ) -> None:
        """Serve ``data`` at ``/<name>``; ``declare_length=False`` sends it chunked, unsized."""
        self.items[name] = _Item(data, content_type, dict(headers or {}), declare_length)

    def inject(self, name: str, *faults: Fault) -> None:
        self.faults.setdefault(name, []).extend(faults)

    def seen(self, name: str) -> list[Seen]:
        return [r for r in self.requests if r.path == name]

    def count(self, name: str, method: str) -> int:
        """How many ``method`` requests for ``name`` arrived (manifest GETs vs HEADs)."""
        return sum(1 for r in self.seen(name) if r.method == method)

    def presign(self, name: str, lifetime: float = 3600.0) -> str:
        """A presigned URL for ``name`` (CloudFront style ``Expires``/``Signature`` query)."""
        expires = int(time.time() + lifetime)
        return f"{self.url(name)}?Expires={expires}&Signature={self._signature(name, expires)}"

    def _signature(self, name: str, expires: int) -> str:
        assert self.presign_secret is not None
        message = f"{name}\n{expires}".encode()
        return hmac.new(self.presign_secret.encode(), message, hashlib.sha256).hexdigest()

    def _presign_refusal(self, request: web.Request, name: str) -> web.Response | None:
        if self.presign_secret is None:
            return None
        expires = request.query.get("Expires", "")
        signature = request.query.get("Signature", "")
        valid = expires.isdigit() and hmac.compare_digest(
            signature, self._signature(name, int(expires))
        )
        if valid and int(expires) > time.time():
            return None
        why = "Request has expired" if valid else "Signature does not match"
        return web.Response(
            status=403,
            content_type="application/xml",
            text=f"<Error><Code>AccessDenied</Code><Message>{why}</Message></Error>",
        )

    def _next_fault(self, name: str, method: str) -> Fault | None:
        queue = self.faults.get(name)
        if not queue or queue[0].method != method:
            return None
        fault = queue[0]
        fault.times -= 1
        if fault.times <= 0:
            queue.pop(0)
        return fault

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.path.lstrip("/")
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(
            Seen(request.method, name, request.raw_path, dict(request.headers.items()), str(peer))
        )
        wanted = self.require_authorization
        if wanted is not None and request.headers.get("Authorization") != wanted:
            return web.Response(status=401, headers={"WWW-Authenticate": self.challenge})
        refusal = self._presign_refusal(request, name)
        if refusal is not None:
            return refusal
        item = self.items.get(name)
        if item is None:
            return web.Response(status=404)
        if self.strict_accept and not _admits(request.headers.get("Accept"), item.content_type):
            return web.json_response(
                {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]},
                status=404,
            )
        fault = self._next_fault(name, request.method)
        if fault is not None and fault.kind == "status":
            headers = dict(fault.headers)
            if fault.retry_after:
                headers["Retry-After"] = fault.retry_after
            return web.Response(status=fault.status, headers=headers, body=fault.body)
        if fault is not None and fault.kind == "redirect":
            return web.Response(status=fault.redirect_status, headers={"Location": fault.location})
        if self.compress and accepts_gzip(request.headers.get("Accept-Encoding")):
            return self._gzipped(item)
        return await self._serve(request, name, item, fault)

    @staticmethod
    def _gzipped(item: _Item) -> web.Response:
        """The whole body gzipped (a CDN compressing ignores Range, as many do)."""
        headers = {**item.headers, "Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
        body = gzip.compress(item.data, mtime=0)
        return web.Response(body=body, content_type=item.content_type, headers=headers)

    async def _serve(
        self, request: web.Request, name: str, item: _Item, fault: Fault | None
    ) -> web.StreamResponse:
        data = item.data
        start, stop = 0, len(data)
        match = _RANGE_RE.match(request.headers.get("Range", ""))
        ranged = match is not None and (fault is None or fault.kind != "ignore_range")
        resp = web.StreamResponse(status=206 if ranged else 200)
        if match is not None and ranged:
            start = int(match.group(1))
            stop = min(len(data), int(match.group(2)) + 1 if match.group(2) else len(data))
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        body = data[start:stop]
        if fault is not None and fault.kind == "wrong":
            body = bytes(b ^ 0xFF for b in body)
        if fault is not None and fault.kind in ("long", "long_chunked"):
            body += b"\xee" * fault.extra
        resp.content_type = item.content_type
        resp.headers.update(item.headers)
        resp.headers["Accept-Ranges"] = "bytes"
        if (fault is not None and fault.kind == "long_chunked") or not item.declare_length:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = len(body)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        return await self._write_body(request, resp, name, body, fault)

    async def _write_body(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        name: str,
        body: bytes,
        fault: Fault | None,
    ) -> web.StreamResponse:
        if fault is not None and fault.kind in ("drop", "stall"):
            half = body[: int(len(body) * fault.cut_at)]
            await resp.write(half)
            self.served[name] += len(half)
            if fault.kind == "stall":
                await asyncio.sleep(self.stall_seconds)
            assert request.transport is not None
            request.transport.close()
            return resp
        for offset in range(0, len(body), 64 << 10):
            piece = body[offset : offset + (64 << 10)]
            await resp.write(piece)
            self.served[name] += len(piece)
        await resp.write_eof()
        return resp

    async def start(self) -> FaultServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.port = await start_loopback(
            app, self.port, host=self.bind, handler_cancellation=True, shutdown_timeout=2.0
        )
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FaultServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
