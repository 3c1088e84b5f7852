"""The one interface every origin implements: resolve a reference, then fetch blob bytes."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from cacheagent.refs import ModelRef

UnpackKind = Literal["raw", "tar", "tar+gzip", "tar+zstd"]


@dataclass(frozen=True)
class BlobRef:
    """A blob the origin serves, as the manifest declares it."""

    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Layer:
    """One manifest layer and where its content goes in the model tree.

    ``path`` is the file path for raw layers and the directory to unpack into for tar layers
    ("" for the model root); it has already been checked with ``store.paths.safe_relpath``.
    ``subtree`` set means a container image layer (a modelcar, see ``sources.modelcar``): only
    members below that directory are unpacked, and the layers are stacked as an overlay.
    """

    blob: BlobRef
    path: str
    unpack: UnpackKind = "raw"
    subtree: str = ""


@dataclass(frozen=True)
class ResolvedModel:
    """A reference resolved to an immutable manifest and its layers."""

    ref: ModelRef
    manifest_digest: str
    manifest: bytes
    layers: tuple[Layer, ...]
    artifact_type: str = ""
    # Small files the agent writes itself (a view's Hugging Face ``refs/<revision>``): path, bytes.
    inline_files: tuple[tuple[str, bytes], ...] = ()

    @property
    def total_size(self) -> int:
        return sum(layer.blob.size for layer in self.layers)


class Source(abc.ABC):
    """An origin. Implementations are async and safe to share between concurrent pulls."""

    kind: str = ""
    supports_ranges: bool = False

    @abc.abstractmethod
    async def resolve(self, ref: ModelRef) -> ResolvedModel:
        """Resolve ``ref`` to a manifest. Raises ModelNotFoundError, SourceError,
        OriginUnavailableError."""

    @abc.abstractmethod
    def fetch(self, blob: BlobRef, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Yield bytes ``[start, end)`` of ``blob`` (``end`` None means to the end)."""

    def waiting(self) -> str:
        """Why fetches from this source are paused right now (a rate limit's wait), else ""."""
        return ""

    def limit_key(self, blob: BlobRef, origin: str) -> str:
        """Which connection limit a fetch of ``blob`` counts against (per origin by default).
        A source that may get the bytes elsewhere (peers) names that, so waiting on a peer
        never holds a slot the origin's own downloads need."""
        return origin

    def after_mismatch(self, blob: BlobRef) -> Source | None:
        """Where to download ``blob`` once more after its bytes failed verification: a source
        that assembled it from untrusted helpers (peers) names its origin; None means the
        mismatch is final."""
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most sources hold nothing
        """Release connections and files."""
