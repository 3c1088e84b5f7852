"""An OCI distribution registry as a model source (``registry.example.com/models/x:v1``).

A tag is resolved as containerd does: ``HEAD /v2/<repo>/manifests/<tag>`` reads the digest from
``Docker-Content-Digest``, and the manifest is fetched (``GET .../manifests/<digest>``) only when
that digest is new to this agent (manifests are kept, bounded, by digest). Docker Hub counts
every manifest GET as a pull against its per-IP quota and a HEAD as none, and every node
re-resolves its tags when their TTL runs out. A registry whose HEAD gives no digest gets a GET
by tag. ``Accept`` lists OCI and Docker manifests and indexes, the OCI 1.1-rc artifact manifest,
and ``*/*`` (as containerd does, so a registry that matches Accept strictly still answers).
At most ``manifest_max_bytes`` are read (a bigger ``Content-Length`` is refused unread), and
the bytes are hashed here: a digest reference, or the digest HEAD announced, must match what we
computed. An index is narrowed to one manifest with ``indexes.select_from_index`` (the
node's platform, else the single artifact entry); the model is then that manifest, and its digest
is the model's digest.

Mirrors configured for a registry are tried first, in order, for manifests and blobs alike, with
``?ns=<registry>`` (the containerd convention, so one mirror can front several registries); a
mirror that fails or lacks the content is skipped for ``mirror_cooldown_seconds`` and the next
one, finally the registry itself, answers. Only the registry's own 404 means "not found".
Error answers carry the registry's ``errors[]`` (code, message, detail) into our error messages.

``fetch`` needs the repository a blob lives in, so it serves blobs of models this source has
resolved (the pull engine always resolves first). Blob GETs follow redirects to object storage
without the registry's ``Authorization`` header (see transport.py).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from cacheagent.digest import is_digest, sha256_digest
from cacheagent.errors import (
    DigestMismatchError,
    ModelNotFoundError,
    SizeMismatchError,
    SourceError,
)
from cacheagent.refs import ModelRef, OciRef
from cacheagent.sources.auth import RegistryAuth
from cacheagent.sources.base import BlobRef, ResolvedModel
from cacheagent.sources.credentials import DOCKER_HUB, CredentialStore, RegistryAuthError
from cacheagent.sources.indexes import select_from_index
from cacheagent.sources.manifest import (
    ACCEPT_MEDIA_TYPES,
    ParsedDocument,
    ParsedIndex,
    layers_of,
    parse_manifest,
)
from cacheagent.sources.registry_errors import error_detail
from cacheagent.sources.retry import RetryPolicy, is_retryable
from cacheagent.sources.streaming import (
    BlobHomes,
    StreamingSource,
    TransientError,
    raise_for_status,
    read_bounded,
)
from cacheagent.sources.transport import Transport, redact_url

log = logging.getLogger(__name__)

DEFAULT_MANIFEST_MAX_BYTES = 4 << 20
DOCKER_HUB_API = "registry-1.docker.io"
_MAX_INDEX_DEPTH = 4
_ACCEPT = ", ".join((*ACCEPT_MEDIA_TYPES, "*/*"))
_MAX_CACHED_MANIFESTS = 256


@dataclass(frozen=True)
class RegistryOptions:
    """Registry-specific settings (connection settings live in ``TransportOptions``)."""

    mirrors: Mapping[str, Sequence[str]] = field(default_factory=dict)
    platform: tuple[str, str] | None = None
    manifest_max_bytes: int = DEFAULT_MANIFEST_MAX_BYTES
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    mirror_cooldown_seconds: float = 30.0
    chunk_bytes: int = 1 << 20


@dataclass(frozen=True)
class _Endpoint:
    host: str  # what we connect to (and key credentials and tokens by)
    is_mirror: bool


class RegistrySource(StreamingSource):
    """Pulls manifests and blobs from OCI registries over the distribution API."""

    kind = "oci"

    def __init__(
        self,
        transport: Transport | None = None,
        *,
        credentials: CredentialStore | None = None,
        options: RegistryOptions | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options or RegistryOptions()
        super().__init__(
            transport, retry=self.options.retry, chunk_bytes=self.options.chunk_bytes, rng=rng
        )
        self.auth = RegistryAuth(self.transport, credentials)
        self._homes: BlobHomes[tuple[str, str]] = BlobHomes()
        self._mirror_down_until: dict[str, float] = {}
        self._manifests: OrderedDict[str, tuple[bytes, str | None]] = OrderedDict()

    def __repr__(self) -> str:
        return f"RegistrySource(auth={self.auth!r})"

    # -- resolve --------------------------------------------------------------------------------

    async def resolve(self, ref: ModelRef) -> ResolvedModel:
        if not isinstance(ref, OciRef):
            raise SourceError(f"the registry source cannot resolve {ref} (a {ref.kind} ref)")
        reference = ref.digest or await self._digest_of_tag(ref, ref.tag or "latest")
        expected_size: int | None = None
        for _ in range(_MAX_INDEX_DEPTH):
            digest, doc, data = await self._document(ref, reference, expected_size)
            if not isinstance(doc, ParsedIndex):
                resolved = ResolvedModel(
                    ref=ref,
                    manifest_digest=digest,
                    manifest=data,
                    layers=layers_of(doc),
                    artifact_type=doc.artifact_type,
                )
                for layer in resolved.layers:
                    self._homes.remember(layer.blob.digest, (ref.registry, ref.repository))
                return resolved
            chosen = select_from_index(doc, self.options.platform)
            reference, expected_size = chosen.digest, chosen.size
        raise SourceError(f"{ref}: image indexes nested deeper than {_MAX_INDEX_DEPTH}")

    async def _document(
        self, ref: OciRef, reference: str, expected_size: int | None
    ) -> tuple[str, ParsedDocument, bytes]:
        """A manifest or index by digest (from memory when seen before) or by tag."""
        cached = self._manifests.get(reference)
        if cached is None:
            cached = await self._manifest(ref, reference)
        data, media_type = cached
        digest = self._check_manifest(ref, reference, data, expected_size)
        doc = parse_manifest(data, max_bytes=self.options.manifest_max_bytes, media_type=media_type)
        self._manifests[digest] = cached
        self._manifests.move_to_end(digest)
        while len(self._manifests) > _MAX_CACHED_MANIFESTS:
            self._manifests.popitem(last=False)
        return digest, doc, data

    async def _digest_of_tag(self, ref: OciRef, tag: str) -> str:
        """The digest a tag points at, from a HEAD; the tag itself when the registry's HEAD does
        not say or fails (then the manifest is fetched by tag, which reports any failure).

        The HEAD says ``Connection: close`` and its connection is not pooled: a server that
        sends (or drips) a body after a HEAD would otherwise feed those bytes to the next
        request on that connection (aiohttp pools a HEAD's connection as soon as the headers
        are in). One handshake per tag resolution is cheap."""
        what = f"manifest {ref.registry}/{ref.repository}:{tag}"

        async def attempt() -> str:
            try:
                resp = await self._open(
                    ref.registry,
                    ref.repository,
                    f"manifests/{tag}",
                    {"Accept": _ACCEPT, "Connection": "close"},
                    acceptable=(200,),
                    method="HEAD",
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.debug("%s: HEAD failed (%s); fetching by tag", what, exc)
                return tag  # the GET by tag that follows retries and reports properly
            resp.close()
            if is_retryable(resp.status):
                raise TransientError.from_status(resp.status, resp.headers)
            announced = resp.headers.get("Docker-Content-Digest", "")
            return announced if resp.status == 200 and is_digest(announced) else tag

        return await self._retrying(attempt, what=what, origin=ref.registry)

    def _check_manifest(
        self, ref: OciRef, reference: str, data: bytes, expected_size: int | None
    ) -> str:
        digest = sha256_digest(data)
        if reference.startswith("sha256:") and digest != reference:
            raise DigestMismatchError(reference, digest, what=f"manifest of {ref}")
        if expected_size is not None and len(data) != expected_size:
            raise SizeMismatchError(digest, expected_size, len(data))
        return digest

    async def _manifest(self, ref: OciRef, reference: str) -> tuple[bytes, str | None]:
        what = f"manifest {ref.registry}/{ref.repository}:{reference}"
        if reference.startswith("sha256:"):
            what = f"manifest {ref.registry}/{ref.repository}@{reference}"

        async def attempt() -> tuple[bytes, str | None]:
            resp = await self._open(
                ref.registry,
                ref.repository,
                f"manifests/{reference}",
                {"Accept": _ACCEPT},
                acceptable=(200,),
            )
            async with resp:
                if resp.status >= 300:
                    detail = await error_detail(resp)
                    raise_for_status(
                        resp.status, resp.headers, what=what, origin=ref.registry, detail=detail
                    )
                data = await read_bounded(
                    resp,
                    self.options.manifest_max_bytes,
                    what=what,
                    stall_seconds=self.transport.options.read_timeout,
                )
                advertised = resp.headers.get("Docker-Content-Digest")
                if advertised and advertised != sha256_digest(data):
                    log.warning(
                        "%s: Docker-Content-Digest %s disagrees with the bytes", what, advertised
                    )
                return data, resp.headers.get("Content-Type")

        return await self._retrying(attempt, what=what, origin=ref.registry)

    # -- fetch ----------------------------------------------------------------------------------

    async def fetch(
        self, blob: BlobRef, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        registry, repository = self._homes.find(blob, "registry")

        async def open_response(headers: Mapping[str, str]) -> aiohttp.ClientResponse:
            resp = await self._open(
                registry, repository, f"blobs/{blob.digest}", headers, acceptable=(200, 206)
            )
            if resp.status < 400 or resp.status == 416:
                return resp
            async with resp:
                detail = await error_detail(resp)
            if is_retryable(resp.status):
                raise TransientError.from_status(resp.status, resp.headers, detail)
            said = f": {detail}" if detail else ""
            if resp.status == 404:
                raise ModelNotFoundError(f"blob {blob.digest} not found at {registry} (404){said}")
            raise SourceError(f"{registry}: blob {blob.digest}: HTTP {resp.status}{said}")

        async with contextlib.aclosing(
            self._stream(open_response, blob, start, end, registry)
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    # -- one request, through mirrors and auth ---------------------------------------------------

    def _endpoints(self, registry: str) -> list[_Endpoint]:
        now = time.monotonic()
        mirrors = [
            _Endpoint(m, True)
            for m in self.options.mirrors.get(registry, ())
            if self._mirror_down_until.get(m, 0.0) <= now
        ]
        return [*mirrors, _Endpoint(DOCKER_HUB_API if registry == DOCKER_HUB else registry, False)]

    async def _open(
        self,
        registry: str,
        repository: str,
        path: str,
        headers: Mapping[str, str],
        *,
        acceptable: tuple[int, ...],
        method: str = "GET",
    ) -> aiohttp.ClientResponse:
        """The first acceptable answer from a mirror, else whatever the registry answers."""
        for endpoint in self._endpoints(registry):
            url = URL(f"{self.transport.scheme_for(endpoint.host)}://{endpoint.host}")
            url = url.with_path(f"/v2/{repository}/{path}")
            if not endpoint.is_mirror:
                return await self._send(method, endpoint.host, repository, url, headers)
            try:
                resp = await self._send(
                    method, endpoint.host, repository, url.with_query(ns=registry), headers
                )
            except (aiohttp.ClientError, OSError, SourceError) as exc:
                self._mirror_failed(endpoint.host, registry, type(exc).__name__)
                continue
            if resp.status in acceptable:
                return resp
            resp.release()
            self._mirror_failed(endpoint.host, registry, f"HTTP {resp.status}")
        raise AssertionError("unreachable: the registry itself is always the last endpoint")

    def _mirror_failed(self, mirror: str, registry: str, why: str) -> None:
        log.warning("mirror %s of %s failed (%s); falling back", mirror, registry, why)
        self._mirror_down_until[mirror] = time.monotonic() + self.options.mirror_cooldown_seconds

    async def _send(
        self, method: str, host: str, repository: str, url: URL, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """Send with whatever auth we hold; on 401 answer the challenge once and resend."""
        scope = f"repository:{repository}:pull"
        sent = await self.auth.authorization(host, scope)
        resp = await self._request(method, url, headers, sent)
        if resp.status == 401:
            challenge = resp.headers.get("WWW-Authenticate")
            resp.release()
            answer = await self.auth.answer(host, scope, challenge, sent)
            resp = await self._request(method, url, headers, answer)
            if resp.status == 401:
                async with resp:
                    detail = await error_detail(resp)
                raise self.auth.rejected(host, scope, answer, detail)
        if resp.status == 403:
            async with resp:
                detail = await error_detail(resp)
            said = f": {detail}" if detail else ""
            raise RegistryAuthError(host, f"access to {repository} denied (403){said}")
        return resp

    async def _request(
        self, method: str, url: URL, headers: Mapping[str, str], authorization: str | None
    ) -> aiohttp.ClientResponse:
        sent = dict(headers)
        if authorization is not None:
            sent["Authorization"] = authorization
        log.debug("%s %s", method, redact_url(url))
        return await self.transport.request(method, url, headers=sent)
