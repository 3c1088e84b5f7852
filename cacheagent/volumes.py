"""The contract between volume frontends (the CSI driver) and the rest of the agent.

``cacheagent.service.ModelService`` implements ``CsiBackend`` over the real Store, PullEngine,
policy and prefetcher; the tests implement it over plain directories. Keeping it this narrow is
what lets the driver be tested with real mounts and real gRPC without a registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cacheagent.errors import CacheAgentError
from cacheagent.refs import ModelRef

LEASE_KIND = "csi"


class LazyModeUnavailableError(CacheAgentError):
    """``mode: lazy`` was asked for but this agent serves no FUSE mount (disabled or failed)."""


@dataclass(frozen=True)
class ReadyModel:
    """A model whose file tree can be bind-mounted now."""

    digest: str  # manifest digest, "sha256:<hex>"
    path: Path  # the directory to bind-mount (models/<digest>, or its FUSE view in lazy mode)


@dataclass(frozen=True)
class StillPulling:
    """The model is being downloaded; the publish answers UNAVAILABLE and kubelet retries."""

    bytes_done: int = 0
    bytes_total: int | None = None
    bytes_per_second: float | None = None

    def describe(self) -> str:
        if not self.bytes_total:
            return f"{_mib(self.bytes_done)} so far"
        percent = 100.0 * self.bytes_done / self.bytes_total
        text = f"{percent:.0f}% ({_mib(self.bytes_done)} of {_mib(self.bytes_total)})"
        if self.bytes_per_second:
            eta = (self.bytes_total - self.bytes_done) / self.bytes_per_second
            text += f", about {eta:.0f} s left"
        return text


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class ModelStats:
    """Size and health of a model's file tree, for NodeGetVolumeStats."""

    bytes: int
    inodes: int
    healthy: bool
    message: str = ""
    downloading: bool = False  # a pending model (lazy mode serves it while it downloads)


class CsiBackend(Protocol):
    """The agent as the node driver sees it.

    Sync methods are cheap or thread-safe (the driver runs the store-touching ones through
    ``asyncio.to_thread``); async ones run on the agent's event loop.
    """

    def store_ready(self) -> bool:
        """True once the store is open and reconciled (the answer to Probe)."""
        ...

    def check_mount_policy(self, namespace: str | None, ref: ModelRef) -> None:
        """Raise PolicyDeniedError (naming the rule) if ``namespace`` may not mount ``ref``.

        ``namespace`` is None when the CSIDriver does not set podInfoOnMount.
        """
        ...

    async def ensure_model(
        self, ref: ModelRef, *, wait_seconds: float
    ) -> ReadyModel | StillPulling:
        """Return the model once it is complete in the store, waiting at most ``wait_seconds``.

        Cheap when the model is cached (a tag answered from the store's tag cache, offline
        fallback included) and marks it used (``Store.touch``: last access = last publish).
        Otherwise starts the pull, or joins the one already running (never a second pull of the
        same model); a pull outlives the wait, so a later call finds it done. Raises the
        cacheagent errors (ModelNotFoundError, OriginUnavailableError, CacheFullError,
        PolicyDeniedError, RefError...) when the pull cannot succeed.
        """
        ...

    async def lazy_model_dir(self, ref: ModelRef) -> ReadyModel:
        """The model's directory inside the FUSE mount (serving while it downloads).

        Raises LazyModeUnavailableError when no FUSE mount is serving.
        """
        ...

    def add_lease(self, digest: str, holder: str, kind: str) -> None:
        """Keep ``digest`` from eviction while ``holder`` uses it. Idempotent per holder."""
        ...

    def release_lease(self, holder: str) -> None:
        """Drop ``holder``'s lease; a no-op for an unknown holder."""
        ...

    async def prefetch(self, digest: str, gpus: Sequence[str]) -> None:
        """Bring the model's files into the page cache (near ``gpus`` when given)."""
        ...

    def model_stats(self, digest: str) -> ModelStats:
        """Bytes, inodes and health (files present, sizes right) of the model's file tree."""
        ...


class TreeFile(Protocol):
    """One file of a model as its manifest declares it (``cacheagent.store.ModelFile``)."""

    @property
    def path(self) -> str: ...
    @property
    def blob(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def mode(self) -> int: ...


class LazyBackend(Protocol):
    """The agent as the FUSE view (the lazy mode's read path) sees it; ``ModelService``
    implements it, so the FUSE layer, like the CSI driver, goes through the model service.

    Sync methods are thread-safe (FUSE calls them from its worker threads); async ones run on
    the agent's event loop (the provider bridges with ``run_coroutine_threadsafe``)."""

    def model_digests(self) -> Sequence[str]:
        """Every model in the store, ready or still downloading."""
        ...

    def model_files(self, digest: str) -> tuple[Sequence[TreeFile], float]:
        """A model's files (ready or pending) and when it was created; ModelNotFoundError."""
        ...

    def model_is_ready(self, digest: str) -> bool:
        """The model is complete (its file list will not change any more)."""
        ...

    def add_lease(self, digest: str, holder: str, kind: str) -> None: ...

    def release_lease(self, holder: str) -> None: ...

    def touch(self, digest: str) -> None: ...

    def committed_blob(self, blob: str) -> Path | None:
        """The blob's file if it is committed (verified), else None."""
        ...

    def blob_path(self, blob: str) -> Path:
        """Where the blob's file is once committed (a partial file is renamed there)."""
        ...

    async def ensure_range(self, blob: str, start: int, end: int) -> Path:
        """Return once bytes ``[start, end)`` of a raw blob can be read; the file to read."""
        ...

    async def resume_pull(self, digest: str) -> bool:
        """Restart the pull of a pending model no pull is running for (a previous agent's);
        False when there is none to resume."""
        ...

    async def wait_model(self, digest: str) -> None:
        """Return once the model's pull has finished and it is ready; raise why not."""
        ...
