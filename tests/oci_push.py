"""Push artifacts to a registry over the distribution API, the way a client such as ORAS does.

Blobs go up as ``POST /v2/<repo>/blobs/uploads/`` then either one ``PUT ?digest=`` with the
whole body (monolithic) or ``PATCH`` chunks with ``Content-Range`` and a closing ``PUT``
(chunked). Manifests go up with ``PUT /v2/<repo>/manifests/<tag|digest>``. Basic and bearer
challenges are answered with the pusher's own credentials (independent of the code under test).

``modelpack_artifact`` and ``oras_artifact`` build small manifests to push.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODELPACK_RAW_WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
ORAS_CONFIG = "application/vnd.oci.empty.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Artifact:
    manifest: bytes
    blobs: dict[str, bytes] = field(default_factory=dict)
    media_type: str = OCI_MANIFEST

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def _descriptor(
    media_type: str, data: bytes, annotations: Mapping[str, str] | None = None
) -> dict[str, object]:
    desc: dict[str, object] = {"mediaType": media_type, "digest": sha256(data), "size": len(data)}
    if annotations:
        desc["annotations"] = dict(annotations)
    return desc


def modelpack_artifact(files: Mapping[str, bytes]) -> Artifact:
    """A CNCF ModelPack artifact: one raw weight layer per file, path in org.cncf.model.filepath."""
    config = canonical_json({"descriptor": {"name": "test-model"}, "modelfs": {"type": "layers"}})
    layers = [
        _descriptor(MODELPACK_RAW_WEIGHT, data, {"org.cncf.model.filepath": path})
        for path, data in files.items()
    ]
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": MODELPACK_ARTIFACT,
            "config": _descriptor(MODELPACK_CONFIG, config),
            "layers": layers,
        }
    )
    blobs = {sha256(config): config, **{sha256(d): d for d in files.values()}}
    return Artifact(manifest, blobs)


def oras_artifact(
    files: Mapping[str, bytes], artifact_type: str = "application/x.test"
) -> Artifact:
    """An ORAS-style artifact: each file a layer titled with org.opencontainers.image.title."""
    config = b"{}"
    layers = [
        _descriptor("application/octet-stream", data, {"org.opencontainers.image.title": path})
        for path, data in files.items()
    ]
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": _descriptor(ORAS_CONFIG, config),
            "layers": layers,
        }
    )
    blobs = {sha256(config): config, **{sha256(d): d for d in files.values()}}
    return Artifact(manifest, blobs)


def index_of(entries: list[tuple[Artifact, dict[str, str] | None]]) -> Artifact:
    """An OCI index over already-built manifests, each with an optional platform."""
    manifests = []
    for artifact, platform in entries:
        desc = _descriptor(artifact.media_type, artifact.manifest)
        if platform is not None:
            desc["platform"] = platform
        manifests.append(desc)
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    return Artifact(canonical_json(doc), {}, OCI_INDEX)


class PushError(RuntimeError):
    pass


class OciPusher:
    """Pushes to one registry; ``async with OciPusher(url) as p: await p.push(...)``."""

    def __init__(
        self,
        base_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.base = URL(base_url)
        self._basic = (
            "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
            if username is not None
            else None
        )
        self._ssl = ssl_context
        self._auth: dict[str, str] = {}  # repo -> Authorization header that worked
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OciPusher:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl or True))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _request(
        self,
        method: str,
        url: URL,
        repo: str,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        assert self._session is not None
        for _ in range(2):
            sent = dict(headers or {})
            if repo in self._auth:
                sent["Authorization"] = self._auth[repo]
            async with self._session.request(method, url, data=data, headers=sent) as resp:
                body = await resp.read()
                if resp.status != 401:
                    return resp.status, dict(resp.headers), body
                challenge = resp.headers.get("WWW-Authenticate", "")
            self._auth[repo] = await self._answer(challenge, repo)
        raise PushError(f"{method} {url}: still 401 after authenticating")

    async def _answer(self, challenge: str, repo: str) -> str:
        if challenge.lower().startswith("basic"):
            if self._basic is None:
                raise PushError("registry wants basic auth and the pusher has no credentials")
            return self._basic
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        url = URL(params["realm"]).with_query(
            service=params.get("service", ""), scope=f"repository:{repo}:pull,push"
        )
        assert self._session is not None
        headers = {"Authorization": self._basic} if self._basic else {}
        async with self._session.get(url, headers=headers) as resp:
            if resp.status != 200:
                raise PushError(f"token service answered {resp.status}")
            doc = await resp.json()
        return f"Bearer {doc['token']}"

    async def push_blob(self, repo: str, data: bytes, *, chunk_size: int | None = None) -> str:
        """Upload a blob, monolithic or (``chunk_size``) in PATCH chunks; returns its digest."""
        digest = sha256(data)
        status, headers, _ = await self._request(
            "POST", self.base / "v2" / repo / "blobs/uploads/", repo
        )
        if status != 202:
            raise PushError(f"start upload of {digest}: HTTP {status}")
        location = self.base.join(URL(headers["Location"]))
        body: bytes | None = data
        if chunk_size is not None:
            for offset in range(0, len(data), chunk_size):
                piece = data[offset : offset + chunk_size]
                status, headers, _ = await self._request(
                    "PATCH",
                    location,
                    repo,
                    data=piece,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + len(piece) - 1}",
                    },
                )
                if status != 202:
                    raise PushError(f"PATCH chunk at {offset} of {digest}: HTTP {status}")
                location = self.base.join(URL(headers["Location"]))
            body = None
        status, _, _ = await self._request(
            "PUT",
            location.update_query(digest=digest),
            repo,
            data=body if body is not None else b"",
            headers={"Content-Type": "application/octet-stream"},
        )
        if status != 201:
            raise PushError(f"finish upload of {digest}: HTTP {status}")
        return digest

    async def delete_blob(self, repo: str, digest: str) -> None:
        status, _, _ = await self._request(
            "DELETE", self.base / "v2" / repo / "blobs" / digest, repo
        )
        if status != 202:
            raise PushError(f"DELETE blob {digest}: HTTP {status}")

    async def push_manifest(
        self, repo: str, reference: str, manifest: bytes, media_type: str
    ) -> str:
        url = self.base / "v2" / repo / "manifests" / reference
        status, _, body = await self._request(
            "PUT", url, repo, data=manifest, headers={"Content-Type": media_type}
        )
        if status != 201:
            raise PushError(f"PUT manifest {reference}: HTTP {status}: {body[:300]!r}")
        return sha256(manifest)

    async def push(
        self,
        repo: str,
        artifact: Artifact,
        tag: str | None = None,
        *,
        chunk_size: int | None = None,
    ) -> str:
        """Push every blob, then the manifest (by tag, else by digest); returns the digest."""
        for data in artifact.blobs.values():
            await self.push_blob(repo, data, chunk_size=chunk_size)
        return await self.push_manifest(
            repo, tag or artifact.digest, artifact.manifest, artifact.media_type
        )
