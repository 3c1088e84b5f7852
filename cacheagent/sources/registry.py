"""An OCI distribution registry as a model source (``registry.example.com/models/x:v1``).

Resolution GETs ``/v2/<repo>/manifests/<tag|digest>`` accepting OCI and Docker manifests and
indexes, reads at most ``manifest_max_bytes`` (a bigger ``Content-Length`` is refused unread),
and hashes the bytes itself: ``Docker-Content-Digest`` is advisory, a digest reference must match
what we computed. An index is narrowed to one manifest with ``manifest.select_from_index`` (the
node's platform, else the single artifact entry); the model is then that manifest, and its digest
is the model's digest.

Mirrors configured for a registry are tried first, in order, for manifests and blobs alike, with
``?ns=<registry>`` (the containerd convention, so one mirror can front several registries); a
mirror that fails or lacks the content is skipped for ``mirror_cooldown_seconds`` and the next
one, finally the registry itself, answers. Only the registry's own 404 means "not found".

``fetch`` needs the repository a blob lives in, so it serves blobs of models this source has
resolved (the pull engine always resolves first). Blob GETs follow redirects to object storage
without the registry's ``Authorization`` header (see transport.py).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from cacheagent.digest import sha256_digest
from cacheagent.errors import (
    DigestMismatchError,
    SizeMismatchError,
    SourceError,
)
from cacheagent.refs import ModelRef, OciRef
from cacheagent.sources.auth import DOCKER_HUB, CredentialStore, RegistryAuth, RegistryAuthError
from cacheagent.sources.base import BlobRef, ResolvedModel
from cacheagent.sources.manifest import (
    ACCEPT_MEDIA_TYPES,
    ParsedIndex,
    layers_of,
    parse_manifest,
    select_from_index,
)
from cacheagent.sources.retry import RetryPolicy
from cacheagent.sources.streaming import (
    BlobHomes,
    StreamingSource,
    raise_for_status,
    read_bounded,
)
from cacheagent.sources.transport import Transport, redact_url

log = logging.getLogger(__name__)

DEFAULT_MANIFEST_MAX_BYTES = 4 << 20
DOCKER_HUB_API = "registry-1.docker.io"
_MAX_INDEX_DEPTH = 4
_ACCEPT = ", ".join(ACCEPT_MEDIA_TYPES)


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

    def __repr__(self) -> str:
        return f"RegistrySource(auth={self.auth!r})"

    # -- resolve --------------------------------------------------------------------------------

    async def resolve(self, ref: ModelRef) -> ResolvedModel:
        if not isinstance(ref, OciRef):
            raise SourceError(f"the registry source cannot resolve {ref} (a {ref.kind} ref)")
        reference = ref.digest or ref.tag or "latest"
        expected_size: int | None = None
        for _ in range(_MAX_INDEX_DEPTH):
            data, media_type = await self._manifest(ref, reference)
            digest = self._check_manifest(ref, reference, data, expected_size)
            doc = parse_manifest(
                data, max_bytes=self.options.manifest_max_bytes, media_type=media_type
            )
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
                raise_for_status(
                    resp.status, resp.headers.get("Retry-After"), what=what, origin=ref.registry
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
            return await self._open(
                registry, repository, f"blobs/{blob.digest}", headers, acceptable=(200, 206)
            )

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
    ) -> aiohttp.ClientResponse:
        """The first acceptable answer from a mirror, else whatever the registry answers."""
        for endpoint in self._endpoints(registry):
            url = URL(f"{self.transport.scheme_for(endpoint.host)}://{endpoint.host}")
            url = url.with_path(f"/v2/{repository}/{path}")
            if not endpoint.is_mirror:
                return await self._send(endpoint.host, repository, url, headers)
            try:
                resp = await self._send(
                    endpoint.host, repository, url.with_query(ns=registry), headers
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
        self, host: str, repository: str, url: URL, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """GET with whatever auth we hold; on 401 answer the challenge once and resend."""
        scope = f"repository:{repository}:pull"
        sent = self.auth.authorization(host, scope)
        resp = await self._get(url, headers, sent)
        if resp.status == 401:
            challenge = resp.headers.get("WWW-Authenticate")
            resp.release()
            answer = await self.auth.answer(host, scope, challenge, sent)
            resp = await self._get(url, headers, answer)
            if resp.status == 401:
                resp.release()
                raise self.auth.rejected(host, scope, answer)
        if resp.status == 403:
            resp.release()
            raise RegistryAuthError(host, f"access to {repository} denied (403)")
        return resp

    async def _get(
        self, url: URL, headers: Mapping[str, str], authorization: str | None
    ) -> aiohttp.ClientResponse:
        sent = dict(headers)
        if authorization is not None:
            sent["Authorization"] = authorization
        log.debug("GET %s", redact_url(url))
        return await self.transport.request("GET", url, headers=sent)
