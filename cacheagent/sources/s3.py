"""S3 and S3-compatible object stores as a model source (``s3://bucket/prefix/``).

Resolution: a key not ending in ``/`` is first tried as one object (HEAD); if there is none,
or the key ends in ``/``, every object under ``<key>/`` is a file of the model, its path the key
relative to the prefix (``safe_relpath``; zero-byte ``.../`` directory markers skipped), found
with ListObjectsV2 (at most ``max_objects``). Each object is HEADed with
``x-amz-checksum-mode: ENABLED``: a full-object SHA-256 checksum (uploads with
``--checksum-algorithm SHA256``) is its blob digest at once; an object without one is read
once at resolution and hashed (so it is read twice in all; the README says how to avoid it);
the digest is remembered by bucket, key, version, ETag and size, so re-listing an unchanged
prefix after the tag TTL reads nothing again.
The manifest is synthesized (canonical JSON of bucket, prefix and every file's path, digest,
size, ETag and version id), so a changed object means a new model digest; a reference pinned
``@sha256:<digest>`` must resolve to exactly that manifest, which is how a user-given manifest
digest is verified. ``@<etag>`` and ``@<version id>`` pin a single object.

Fetching: ranged GETs signed with SigV4 (``s3auth``) carry ``If-Match: <etag>`` (and the
version id when known), so bytes of an object replaced after resolution are refused (412)
rather than mixed; the pull engine verifies every byte against the SHA-256 digest.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import random
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

import aiohttp
from yarl import URL

from cacheagent.digest import sha256_digest
from cacheagent.errors import DigestMismatchError, ModelNotFoundError, SourceError
from cacheagent.refs import ModelRef, S3Ref
from cacheagent.sources.base import BlobRef, Layer, ResolvedModel
from cacheagent.sources.http import canonical_json
from cacheagent.sources.retry import RetryPolicy
from cacheagent.sources.s3auth import S3Signer
from cacheagent.sources.streaming import BlobHomes, StreamingSource, raise_for_status, read_bounded
from cacheagent.sources.transport import Transport, host_port
from cacheagent.store.paths import safe_relpath

log = logging.getLogger(__name__)

S3_ARTIFACT_TYPE = "application/vnd.cacheagent.s3.objects.v1+json"
FILE_MEDIA_TYPE = "application/octet-stream"
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_LIST_MAX_BYTES = 8 << 20
_HASHED_KEPT = 1 << 16


@dataclass(frozen=True)
class S3Options:
    endpoint: str | None = None
    region: str = "us-east-1"
    addressing: str = "auto"  # auto | path | virtual
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    chunk_bytes: int = 1 << 20
    max_objects: int = 100_000
    concurrency: int = 8


@dataclass(frozen=True)
class _Object:
    key: str
    path: str
    size: int
    etag: str
    version: str | None
    checksum: str | None  # "sha256:<hex>" when the store holds a full-object SHA-256


@dataclass(frozen=True)
class _Home:
    bucket: str
    obj: _Object


class S3Source(StreamingSource):
    kind = "s3"

    def __init__(
        self,
        transport: Transport | None = None,
        *,
        signer: S3Signer | None = None,
        options: S3Options | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options or S3Options()
        super().__init__(
            transport, retry=self.options.retry, chunk_bytes=self.options.chunk_bytes, rng=rng
        )
        self.signer = signer or S3Signer(self.options.region)
        self._homes: BlobHomes[_Home] = BlobHomes()
        # Digests of objects without a checksum, by (bucket, key, version, ETag, size).
        self._hashed: OrderedDict[tuple[str, str, str | None, str, int], str] = OrderedDict()

    # -- resolve --------------------------------------------------------------------------------

    async def resolve(self, ref: ModelRef) -> ResolvedModel:
        if not isinstance(ref, S3Ref):
            raise SourceError(f"the s3 source cannot resolve {ref} (a {ref.kind} ref)")
        objects = await self._objects(ref)
        gate = asyncio.Semaphore(self.options.concurrency)
        digests = await asyncio.gather(*(self._digest(ref.bucket, o, gate) for o in objects))
        files = sorted(zip(objects, digests, strict=True), key=lambda od: od[0].path)
        manifest = canonical_json(
            {
                "mediaType": S3_ARTIFACT_TYPE,
                "bucket": ref.bucket,
                "key": ref.key,
                "files": [
                    {"path": o.path, "digest": d, "size": o.size, "etag": o.etag}
                    | ({"version": o.version} if o.version else {})
                    for o, d in files
                ],
            }
        )
        digest = sha256_digest(manifest)
        if ref.digest is not None and digest != ref.digest:
            raise DigestMismatchError(ref.digest, digest, what=f"manifest of {ref}")
        for o, d in files:
            self._homes.remember(d, _Home(ref.bucket, o))
        return ResolvedModel(
            ref=ref,
            manifest_digest=digest,
            manifest=manifest,
            layers=tuple(Layer(BlobRef(d, o.size, FILE_MEDIA_TYPE), o.path) for o, d in files),
            artifact_type=S3_ARTIFACT_TYPE,
        )

    async def _objects(self, ref: S3Ref) -> list[_Object]:
        if ref.key and not ref.key.endswith("/"):
            one = await self._head(ref.bucket, ref.key, ref.version, ref.key.rsplit("/", 1)[-1])
            if one is not None:
                if ref.etag is not None and one.etag != ref.etag:
                    raise SourceError(
                        f"{ref}: the object's ETag is now {one.etag}, the reference pins {ref.etag}"
                    )
                return [one]
            if ref.version or ref.etag:
                raise ModelNotFoundError(f"{ref}: no such object version")
        prefix = ref.key if not ref.key or ref.key.endswith("/") else ref.key + "/"
        keys = await self._list(ref.bucket, prefix)
        if not keys:
            raise ModelNotFoundError(f"no object at s3://{ref.bucket}/{ref.key} nor under it")
        gate = asyncio.Semaphore(self.options.concurrency)

        async def head(key: str) -> _Object:
            async with gate:
                found = await self._head(ref.bucket, key, None, key.removeprefix(prefix))
            if found is None:
                raise SourceError(f"s3://{ref.bucket}/{key} vanished while being listed")
            return found

        return list(await asyncio.gather(*(head(k) for k in keys)))

    async def _list(self, bucket: str, prefix: str) -> list[str]:
        keys: list[str] = []
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            page = await self._get_small(bucket, "", query, f"listing of {prefix!r}")
            root = _parse_xml(page)
            for item in root.iter(f"{_NS}Contents"):
                key = item.findtext(f"{_NS}Key") or ""
                if key.endswith("/") and item.findtext(f"{_NS}Size") == "0":
                    continue  # a directory marker
                keys.append(key)
            if len(keys) > self.options.max_objects:
                raise SourceError(
                    f"s3://{bucket}/{prefix}: more than {self.options.max_objects} objects"
                )
            token = root.findtext(f"{_NS}NextContinuationToken")
            if root.findtext(f"{_NS}IsTruncated") != "true" or not token:
                return keys

    async def _head(self, bucket: str, key: str, version: str | None, path: str) -> _Object | None:
        query = {"versionId": version} if version else {}
        what = f"s3://{bucket}/{key}"
        url = self._url(bucket, key, query)

        async def attempt() -> _Object | None:
            resp = await self._send("HEAD", url, {"x-amz-checksum-mode": "ENABLED"})
            async with resp:
                if resp.status == 404:
                    return None
                if resp.status in (401, 403):
                    raise SourceError(
                        f"{what}: access denied (HTTP {resp.status}); check the S3 credentials "
                        "(s3.* config or the AWS environment) and the bucket policy"
                    )
                raise_for_status(resp.status, resp.headers, what=what, origin=url.host or "")
                size = resp.content_length
                etag = resp.headers.get("ETag", "").strip('"')
                if size is None or not etag:
                    raise SourceError(f"{what}: HEAD gave no Content-Length or ETag")
                return _Object(
                    key=key,
                    path=safe_relpath(path),
                    size=size,
                    etag=etag,
                    version=resp.headers.get("x-amz-version-id") or version,
                    checksum=_sha256_checksum(resp.headers.get("x-amz-checksum-sha256")),
                )

        return await self._retrying(attempt, what=what, origin=host_port(url))

    async def _digest(self, bucket: str, obj: _Object, gate: asyncio.Semaphore) -> str:
        if obj.checksum is not None:
            return obj.checksum
        identity = (bucket, obj.key, obj.version, obj.etag, obj.size)
        known = self._hashed.get(identity)
        if known is not None:  # unchanged since we hashed it (a re-listing after the tag TTL)
            self._hashed.move_to_end(identity)
            return known
        log.warning(
            "s3://%s/%s has no SHA-256 checksum: reading it once to hash it", bucket, obj.key
        )
        probe = BlobRef(f"s3://{bucket}/{obj.key}", obj.size, FILE_MEDIA_TYPE)
        hasher = hashlib.sha256()
        async with gate, contextlib.aclosing(self._object_bytes(bucket, obj, probe)) as chunks:
            async for chunk in chunks:
                hasher.update(chunk)
        digest = f"sha256:{hasher.hexdigest()}"
        self._hashed[identity] = digest
        while len(self._hashed) > _HASHED_KEPT:
            self._hashed.popitem(last=False)
        return digest

    async def _get_small(self, bucket: str, key: str, query: Mapping[str, str], what: str) -> bytes:
        url = self._url(bucket, key, query)

        async def attempt() -> bytes:
            resp = await self._send("GET", url, {})
            async with resp:
                raise_for_status(
                    resp.status, resp.headers, what=f"s3://{bucket} {what}", origin=url.host or ""
                )
                return await read_bounded(resp, _LIST_MAX_BYTES, what=what)

        return await self._retrying(attempt, what=what, origin=host_port(url))

    # -- fetch ----------------------------------------------------------------------------------

    async def fetch(
        self, blob: BlobRef, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        home = self._homes.find(blob, "s3")
        async with contextlib.aclosing(
            self._object_bytes(home.bucket, home.obj, blob, start, end)
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _object_bytes(
        self, bucket: str, obj: _Object, blob: BlobRef, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        url = self._url(bucket, obj.key, {"versionId": obj.version} if obj.version else {})

        async def open_response(headers: Mapping[str, str]) -> aiohttp.ClientResponse:
            resp = await self._send("GET", url, {**headers, "If-Match": f'"{obj.etag}"'})
            if resp.status == 412:
                resp.release()
                raise SourceError(
                    f"s3://{bucket}/{obj.key} changed since it was resolved (ETag is no longer "
                    f"{obj.etag}); pull again to pick up the new object"
                )
            return resp

        async with contextlib.aclosing(
            self._stream(open_response, blob, start, end, host_port(url))
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    # -- requests -------------------------------------------------------------------------------

    def _url(self, bucket: str, key: str, query: Mapping[str, str]) -> URL:
        opts = self.options
        endpoint = URL(opts.endpoint or f"https://s3.{opts.region}.amazonaws.com")
        path_style = opts.addressing == "path" or (
            opts.addressing == "auto" and opts.endpoint is not None
        )
        if path_style:
            base, path = endpoint, f"/{bucket}/{quote(key, safe='/~')}"
        else:
            base = endpoint.with_host(f"{bucket}.{endpoint.host}")
            path = "/" + quote(key, safe="/~")
        text = str(base.with_path("")) + path
        if query:
            text += "?" + "&".join(
                f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in sorted(query.items())
            )
        return URL(text, encoded=True)

    async def _send(
        self, method: str, url: URL, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        signed = await self.signer.sign(method, str(url), headers)
        return await self.transport.request(method, url, headers=signed, follow_redirects=False)


def _parse_xml(data: bytes) -> ET.Element:
    """A ListObjectsV2 answer. A DTD is refused before parsing (no entity expansion: the
    answer is bounded, but a billion-laughs document would still blow up in memory)."""
    if b"<!" in data:
        raise SourceError("S3 listing holds a DTD or markup declaration; refused")
    try:
        return ET.fromstring(data)  # noqa: S314 - no DTD (checked above), size-bounded
    except ET.ParseError as exc:
        raise SourceError(f"S3 listing is not valid XML: {exc}") from None


def _sha256_checksum(header: str | None) -> str | None:
    """``x-amz-checksum-sha256`` (base64) as a digest; None for none or a composite
    (multipart, ``...-N``) checksum, which is not the object's SHA-256."""
    if not header or "-" in header:
        return None
    try:
        raw = base64.b64decode(header, validate=True)
    except (binascii.Error, ValueError):
        return None
    return f"sha256:{raw.hex()}" if len(raw) == 32 else None
