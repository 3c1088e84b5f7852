"""What the FUSE filesystem needs from the rest of the agent, and nothing more.

The filesystem never touches the store or the pull engine itself: the composition root hands it a
``ContentProvider``. That keeps the FUSE layer testable with plain directories or a simulated
download, and keeps every store rule (leases, eviction, verification) in one place.

Threading contract
------------------
Every method is called from the FUSE session's worker threads (``session``), several at once,
never from an asyncio loop.
A provider must therefore be thread-safe and may block: ``read`` of bytes not on disk yet is
*expected* to block until that range has been fetched. A provider backed by the asyncio agent
(store + pull engine) bridges with ``asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)``;
it must never run that from the loop's own thread, and it should bound the wait so that a dead
origin turns into an error (EIO) instead of a hung reader.

Errors
------
Methods raise ``ModelNotFoundError`` (or ``FileNotFoundError``) for a model or path that does not
exist, which the filesystem answers with ENOENT; any other ``CacheAgentError`` (a failed
verification, an unreachable origin) or ``OSError`` becomes EIO. See ``cacheagent.fuse.errmap``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

FILE_MODE = 0o444


@dataclass(frozen=True)
class FuseFile:
    """One file of a model as the manifest declares it (known before any byte is on disk)."""

    path: (
        str  # relative to the model root, "/"-separated, already normalised (no "..", no "/" first)
    )
    size: int
    mode: int = FILE_MODE  # permission bits; the filesystem keeps only read and execute bits
    blob: str | None = None  # blob digest, for the provider's own use; the filesystem ignores it


@dataclass(frozen=True)
class ModelListing:
    """Everything the filesystem shows of a model: its files and when it was created."""

    files: tuple[FuseFile, ...]
    created: float  # seconds since the epoch; used as the mtime/ctime/atime of the whole tree


class ContentProvider(Protocol):
    """The source of models, metadata and bytes for the FUSE filesystem (see module docstring)."""

    def models(self) -> Sequence[str]:
        """Names of the model directories at the mount root: manifest digests.

        Includes models whose manifest is known but whose blobs are still downloading. Called on
        every listing of the root, so it must be cheap.
        """
        ...

    def listing(self, digest: str) -> ModelListing:
        """The model's files. Raises ModelNotFoundError for an unknown model.

        Models are immutable (content-addressed), so the filesystem caches the answer until
        ``CacheFilesystem.forget(digest)`` is called.
        """
        ...

    def open_file(self, digest: str, path: str) -> int:
        """Open one file for reading and take a lease on its model so eviction skips it.

        Returns a handle (an int, unique among the handles open at the same time) that the
        filesystem passes back to ``read`` and ``release``.
        """
        ...

    def read(self, handle: int, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``offset`` (the filesystem never asks past the end of file).

        Bytes on disk come from the complete blob, or from the partial download when the range is
        held; a range not there yet is fetched first, ahead of the background pull, and the call
        blocks until it is. A short answer would read as end-of-file to the kernel, so a provider
        that cannot deliver raises instead.
        """
        ...

    def release(self, handle: int) -> None:
        """Close the handle and drop the lease it took."""
        ...
