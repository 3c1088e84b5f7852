"""A single file over HTTP(S) as a model (``https://host/path/file#sha256=<hex>``).

The model is one raw layer: the file, named after the URL's last path component (percent-decoded,
checked with ``safe_relpath``), with the digest the reference fixes. Its manifest is synthesized:
canonical JSON (sorted keys, no whitespace) naming the URL and the file's path, digest and size,
and the model digest is that document's sha256, so the same reference always maps to the same
model.

The size comes from ``HEAD``'s ``Content-Length``. When HEAD gives none (chunked, or HEAD
refused: 405, or 403 from object storage URLs presigned for GET), a ``GET`` of
``Range: bytes=0-0`` is tried and ``Content-Range``'s total used. If the origin
declares no size either way the reference is refused: the store must know a blob's size before
downloading it (room on disk, and a server that streams forever is cut off at that size).

``http://`` is allowed only for hosts listed as insecure (``TransportOptions.insecure``).
In the agent this source has a transport of its own whose hooks (``sources.guard``) keep
redirects on allowed hosts and refuse loopback and link-local addresses unless configured.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

import aiohttp
from yarl import URL

from cacheagent.digest import sha256_digest
from cacheagent.errors import SourceError, UnsafePathError
from cacheagent.refs import HttpRef, ModelRef
from cacheagent.sources.base import BlobRef, Layer, ResolvedModel
from cacheagent.sources.retry import RetryPolicy, is_retryable
from cacheagent.sources.streaming import BlobHomes, StreamingSource, raise_for_status
from cacheagent.sources.transport import Transport, host_port, redact_url
from cacheagent.store.paths import safe_relpath

HTTP_ARTIFACT_TYPE = "application/vnd.cacheagent.http.file.v1+json"
FILE_MEDIA_TYPE = "application/octet-stream"
_TOTAL_RE = re.compile(r"/(\d+)\s*$")


@dataclass(frozen=True)
class HttpOptions:
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    chunk_bytes: int = 1 << 20


def canonical_json(doc: object) -> bytes:
    """The one serialisation synthesized manifests use: a stable digest for the same content."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def file_name(url: URL) -> str:
    """The model-relative path of a URL's file: its last path component, decoded and checked."""
    name = unquote(url.raw_path.rsplit("/", 1)[-1])
    if not name:
        raise SourceError(f"{redact_url(url)}: the URL names no file (it ends with '/')")
    if "/" in name:
        raise UnsafePathError(name, "an encoded '/' in the URL's file name")
    return safe_relpath(name)


class HttpSource(StreamingSource):
    """Fetches single files from web servers; ranges when the server honours them."""

    kind = "http"

    def __init__(
        self,
        transport: Transport | None = None,
        *,
        options: HttpOptions | None = None,
        rng: random.Random | None = None,
        owns_transport: bool = False,
    ) -> None:
        self.options = options or HttpOptions()
        super().__init__(
            transport, retry=self.options.retry, chunk_bytes=self.options.chunk_bytes, rng=rng
        )
        # The agent gives this source a transport of its own (policy hooks, sources.guard).
        self._owns_transport = self._owns_transport or owns_transport
        self._homes: BlobHomes[URL] = BlobHomes()

    async def resolve(self, ref: ModelRef) -> ResolvedModel:
        if not isinstance(ref, HttpRef):
            raise SourceError(f"the http source cannot resolve {ref} (a {ref.kind} ref)")
        url = URL(ref.url, encoded=True)
        self.transport.check_url(url, what="model URL")
        path = file_name(url)
        size = await self._size(url)
        manifest = canonical_json(
            {
                "mediaType": HTTP_ARTIFACT_TYPE,
                "url": ref.url,
                "files": [{"path": path, "digest": ref.sha256, "size": size}],
            }
        )
        self._homes.remember(ref.sha256, url)
        return ResolvedModel(
            ref=ref,
            manifest_digest=sha256_digest(manifest),
            manifest=manifest,
            layers=(Layer(BlobRef(ref.sha256, size, FILE_MEDIA_TYPE), path, "raw"),),
            artifact_type=HTTP_ARTIFACT_TYPE,
        )

    async def _size(self, url: URL) -> int:
        origin = host_port(url)
        what = f"file {redact_url(url)}"

        async def attempt() -> int:
            # Connection: close: bytes a server sends after a HEAD must not reach the next request.
            resp = await self.transport.request("HEAD", url, headers={"Connection": "close"})
            async with resp:
                if resp.status == 404 or is_retryable(resp.status):
                    raise_for_status(resp.status, resp.headers, what=what, origin=origin)
                if resp.status == 200 and resp.content_length is not None:
                    return resp.content_length
            # No size, or HEAD refused (405, or 403 from a URL presigned for GET only).
            return await self._size_from_range(url, what, origin)

        return await self._retrying(attempt, what=what, origin=origin)

    async def _size_from_range(self, url: URL, what: str, origin: str) -> int:
        resp = await self.transport.request("GET", url, headers={"Range": "bytes=0-0"})
        try:
            raise_for_status(resp.status, resp.headers, what=what, origin=origin)
            if resp.status == 206:
                match = _TOTAL_RE.search(resp.headers.get("Content-Range", ""))
                if match is not None:
                    return int(match.group(1))
            elif resp.content_length is not None:
                return resp.content_length
        finally:
            resp.close()
        raise SourceError(
            f"{origin}: {what}: the server declares no size (no Content-Length on HEAD or GET, "
            "no Content-Range total); cacheagent needs the size before downloading"
        )

    async def fetch(
        self, blob: BlobRef, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        url = self._homes.find(blob, "http")

        async def open_response(headers: Mapping[str, str]) -> aiohttp.ClientResponse:
            return await self.transport.request("GET", url, headers=headers)

        async with contextlib.aclosing(
            self._stream(open_response, blob, start, end, host_port(url))
        ) as chunks:
            async for chunk in chunks:
                yield chunk
