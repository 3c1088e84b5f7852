"""Origins for the pull-engine tests: a layout served over the registry API, and a layout source
that counts (or slows, or corrupts) what it serves.

``serve_layout`` puts an OCI layout's tagged manifest and its blobs on a ``FaultServer`` under the
distribution API paths (``/v2/<repo>/manifests/<tag|digest>``, ``/v2/<repo>/blobs/<digest>``),
so the real ``RegistrySource`` pulls from it over real HTTP with Range support, and the server's
per-path byte counters and fault injection apply to each blob.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cacheagent.refs import ModelRef
from cacheagent.sources.base import BlobRef, ResolvedModel, Source
from cacheagent.sources.layout import OciLayoutSource, blob_path
from cacheagent.sources.manifest import ANNOTATION_REF_NAME, OCI_MANIFEST
from cacheagent.sources.registry import RegistryOptions, RegistrySource
from cacheagent.sources.retry import RetryPolicy
from cacheagent.sources.transport import Transport, TransportOptions
from tests.fault_server import FaultServer


@dataclass(frozen=True)
class ServedModel:
    """What ``serve_layout`` published: the ref to pull and the server path of each layer blob."""

    ref: str
    manifest_digest: str
    blob_paths: dict[str, str]  # digest -> FaultServer item name
    blob_sizes: dict[str, int]

    def served(self, server: FaultServer) -> dict[str, int]:
        return {d: server.served[p] for d, p in self.blob_paths.items()}


def serve_layout(server: FaultServer, layout: Path, repo: str, tag: str = "v1") -> ServedModel:
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"][ANNOTATION_REF_NAME] == tag)
    digest = entry["digest"]
    data = blob_path(layout, digest).read_bytes()
    headers = {"Docker-Content-Digest": digest}
    for reference in (tag, digest):
        server.add(f"v2/{repo}/manifests/{reference}", data, OCI_MANIFEST, headers)
    manifest = json.loads(data)
    paths: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for desc in [manifest["config"], *manifest["layers"]]:
        name = f"v2/{repo}/blobs/{desc['digest']}"
        server.add(name, blob_path(layout, desc["digest"]).read_bytes())
        if desc is not manifest["config"]:  # the engine never needs the config blob
            paths[desc["digest"]] = name
            sizes[desc["digest"]] = desc["size"]
    return ServedModel(f"{server.host}/{repo}:{tag}", digest, paths, sizes)


class LoopbackRegistrySource(RegistrySource):
    """A RegistrySource for 127.0.0.1 over plain HTTP that closes its own transport.

    ``received`` counts, per blob, the bytes this client received and handed to the engine.
    Resume tests compare it, not the server's count of bytes sent: a server handler of a
    connection the client abandoned may still count bytes after the client gave up on them
    (they were sent into a socket nobody reads), so the server's figure is not a fixed number.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: Counter[str] = Counter()

    async def fetch(
        self, blob: BlobRef, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        stream = super().fetch(blob, start, end)
        try:
            async for chunk in stream:
                self.received[blob.digest] += len(chunk)
                yield chunk
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def aclose(self) -> None:
        await super().aclose()
        await self.transport.aclose()


def registry_source(*, attempts: int = 5, per_host: int = 8) -> LoopbackRegistrySource:
    """A registry source for the test origin, with fast retries."""
    transport = Transport(
        TransportOptions(insecure=frozenset({"127.0.0.1"}), max_connections_per_host=per_host)
    )
    policy = RetryPolicy(max_attempts=attempts, base_delay=0.01, max_delay=0.05)
    return LoopbackRegistrySource(transport, options=RegistryOptions(retry=policy))


@dataclass
class CountingSource(Source):
    """An OCI layout source that counts resolves and bytes per blob, and can be slowed down or
    made to lie (append bytes past a blob's end) for the failure tests."""

    inner: OciLayoutSource = field(default_factory=lambda: OciLayoutSource(chunk_bytes=100_000))
    delay: float = 0.0
    extra: bytes = b""
    ranges: bool = True
    resolves: int = 0
    fetched: Counter[str] = field(default_factory=Counter)
    requests: list[tuple[str, int, int | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kind = self.inner.kind
        self.supports_ranges = self.inner.supports_ranges and self.ranges

    async def resolve(self, ref: ModelRef) -> ResolvedModel:
        self.resolves += 1
        return await self.inner.resolve(ref)

    async def fetch(
        self, blob: BlobRef, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        self.requests.append((blob.digest, start, end))
        async for chunk in self.inner.fetch(blob, start, end):
            if self.delay:
                await asyncio.sleep(self.delay)
            self.fetched[blob.digest] += len(chunk)
            yield chunk
        if self.extra and (end is None or end == blob.size):
            for _ in range(1000):
                self.fetched[blob.digest] += len(self.extra)
                yield self.extra
