"""The values the store hands out. Plain frozen data: no file handles, no index connection."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

LEASE_KINDS = ("csi", "fuse", "pull")


@dataclass(frozen=True, slots=True)
class ModelFile:
    """One file of a model tree.

    ``mode`` is recorded for consumers that present their own view (FUSE); the hard-link tree
    always shows the blob's 0444, because every path linking one blob shares its inode.
    """

    path: str
    blob: str
    size: int
    mode: int = 0o444


class ModelFiles(Sequence[ModelFile]):
    """A model's files, decoded on first use from the compact JSON the index keeps per model.

    Listing 10,000 models must not build 100,000 ModelFile objects that nobody reads; this
    keeps ``list_models`` cheap while every Model still carries its whole, immutable file list
    (no link back to the store: it stays valid after the store is closed). Compares equal to
    any sequence of the same ModelFiles."""

    __slots__ = ("_decoded", "_raw")

    def __init__(self, raw: str) -> None:
        self._raw = raw
        self._decoded: tuple[ModelFile, ...] | None = None

    @classmethod
    def encode(cls, files: Sequence[ModelFile]) -> str:
        return json.dumps([[f.path, f.blob, f.size, f.mode] for f in files], separators=(",", ":"))

    def _files(self) -> tuple[ModelFile, ...]:
        if self._decoded is None:
            self._decoded = tuple(ModelFile(*item) for item in json.loads(self._raw))
        return self._decoded

    @overload
    def __getitem__(self, index: int) -> ModelFile: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[ModelFile, ...]: ...
    def __getitem__(self, index: int | slice) -> ModelFile | tuple[ModelFile, ...]:
        return self._files()[index]

    def __len__(self) -> int:
        return len(self._files())

    def __iter__(self) -> Iterator[ModelFile]:
        return iter(self._files())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return self._files() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._files())

    def __repr__(self) -> str:
        return repr(self._files())


@dataclass(frozen=True, slots=True)
class Model:
    """A fully materialised model. ``size`` is the sum of its file sizes (what the tree shows);
    ``ref`` is the reference it was pulled as, ``refs`` every tag that currently points at it."""

    digest: str
    ref: str | None
    refs: tuple[str, ...]
    size: int
    files: Sequence[ModelFile]
    created: float
    last_used: float
    pinned: bool
    source_kind: str


@dataclass(frozen=True, slots=True)
class PendingModel:
    """A model whose manifest is known but whose blobs are not all committed yet.

    ``missing`` lists the blob digests not in the store yet (a lazy FUSE view fetches those)."""

    digest: str
    ref: str | None
    size: int
    files: tuple[ModelFile, ...]
    created: float
    source_kind: str
    missing: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Lease:
    """Something using a model right now: a published CSI volume, an open FUSE file, a pull."""

    manifest_digest: str
    holder: str
    kind: str
    created: float


@dataclass(frozen=True, slots=True)
class Usage:
    """Bytes and counts. ``used`` counts every committed blob, referenced by a model or not;
    ``reserved`` what pulls in flight will still write; ``abandoned`` partial downloads no pull
    covers (and bytes being deleted); ``disk_free`` what the filesystem can still take. All
    three count against the capacity (``held``)."""

    capacity: int | None
    used: int
    models: int
    blobs: int
    high_watermark: float
    low_watermark: float
    reserved: int = 0
    abandoned: int = 0
    disk_free: int | None = None

    @property
    def held(self) -> int:
        return self.used + self.reserved + self.abandoned

    @property
    def free(self) -> int | None:
        return None if self.capacity is None else max(self.capacity - self.held, 0)
