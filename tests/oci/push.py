"""Copy a model from an OCI image layout to a registry (the OCI distribution push flow).

Not part of the agent's serving path: the demo, the benchmarks and CI seed registries with it,
and a platform team can use it to publish a ModelPack layout built elsewhere. Blobs stream
from their files (monolithic POST + PUT upload), blobs the registry already has are skipped,
and the manifest goes last so a reader never sees a manifest whose blobs are missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from yarl import URL

from cacheagent.errors import ModelNotFoundError, SourceError
from cacheagent.sources.layout import blob_path
from cacheagent.sources.manifest import ANNOTATION_REF_NAME

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass(frozen=True)
class PushResult:
    manifest_digest: str
    blobs_pushed: int
    blobs_skipped: int
    bytes_pushed: int


def layout_manifest(layout: Path, tag: str) -> tuple[str, bytes]:
    """The digest and bytes of the manifest ``tag`` names in the layout's index.json."""
    index = json.loads((layout / "index.json").read_text())
    for entry in index.get("manifests", []):
        if entry.get("annotations", {}).get(ANNOTATION_REF_NAME) == tag:
            digest = str(entry["digest"])
            return digest, blob_path(layout, digest).read_bytes()
    raise ModelNotFoundError(f"tag {tag!r} not found in the OCI layout {layout}")


async def push_layout(
    layout: Path, tag: str, registry_url: str, repository: str, *, target_tag: str | None = None
) -> PushResult:
    """Push ``layout:tag`` to ``registry_url`` (``http://host:port``) as ``repository:tag``."""
    digest, manifest_bytes = layout_manifest(layout, tag)
    manifest = json.loads(manifest_bytes)
    base = URL(registry_url) / "v2" / repository
    pushed = skipped = nbytes = 0
    async with aiohttp.ClientSession() as session:
        for desc in [manifest["config"], *manifest["layers"]]:
            if await _has_blob(session, base, desc["digest"]):
                skipped += 1
                continue
            await _upload(session, base, blob_path(layout, desc["digest"]), desc["digest"])
            pushed += 1
            nbytes += int(desc["size"])
        url = base / "manifests" / (target_tag or tag)
        headers = {"Content-Type": manifest.get("mediaType", OCI_MANIFEST)}
        async with session.put(url, data=manifest_bytes, headers=headers) as resp:
            await _expect(resp, 201, f"manifest {digest}")
    return PushResult(digest, pushed, skipped, nbytes)


async def _has_blob(session: aiohttp.ClientSession, base: URL, digest: str) -> bool:
    async with session.head(base / "blobs" / digest) as resp:
        return resp.status == 200


async def _upload(session: aiohttp.ClientSession, base: URL, path: Path, digest: str) -> None:
    async with session.post(base / "blobs/uploads/") as resp:
        await _expect(resp, 202, f"upload of {digest}")
        location = base.join(URL(resp.headers["Location"]))
    with path.open("rb") as f:
        async with session.put(
            location.update_query(digest=digest),
            data=f,
            headers={"Content-Type": "application/octet-stream"},
        ) as resp:
            await _expect(resp, 201, f"blob {digest}")


async def _expect(resp: aiohttp.ClientResponse, status: int, what: str) -> None:
    if resp.status != status:
        body = (await resp.text())[:200]
        raise SourceError(f"push {what}: registry answered HTTP {resp.status}: {body}")
