"""The blob singleflight: one download per blob digest, agent-wide, shared by every model pull
that needs it, and the progress of a model pull computed from the downloads it waits on.

A blob download is shielded from any one model pull's cancellation and cancelled only when no
pull waits for it any more. Raw blobs are committed as soon as their bytes are verified; tar
layers are unpacked member by member into blobs, and the archive's partial file (and its share
of the pull's reservation) is given back once unpacked.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cacheagent.aio import Signal
from cacheagent.errors import DISK_FULL_ERRNOS, DigestMismatchError, DiskFullError, SourceError
from cacheagent.pull.download import BlobDownload, DownloadSettings, Limits
from cacheagent.pull.partial_file import sidecar_path
from cacheagent.pull.progress import BlobProgress, PullProgress, PullState, RateMeter, eta_seconds
from cacheagent.refs import ModelRef
from cacheagent.sources.base import Layer, ResolvedModel, Source
from cacheagent.sources.tarsafe import UnpackedFile, unpack_tar
from cacheagent.store import Model, ModelFile, Store
from cacheagent.store.crashpoints import crashpoint
from cacheagent.store.evict import Reservation
from cacheagent.store.paths import safe_relpath

log = logging.getLogger(__name__)

ProgressCallback = Callable[[PullProgress], None]


class _Tuning(Protocol):
    @property
    def max_unpack_ratio(self) -> float: ...


@dataclass
class BlobJob:
    """One download of one blob, shared by every model pull that needs it."""

    unpack: str
    source_kind: str
    task: asyncio.Task[tuple[UnpackedFile, ...]] | None = None
    download: BlobDownload | None = None
    waiters: int = 0
    abandoned: bool = False


@dataclass
class ModelJob:
    """One pull of one manifest, shared by every caller that asked for it."""

    ref: ModelRef
    resolved: ResolvedModel
    source: Source
    task: asyncio.Task[Model] | None = None
    listeners: list[ProgressCallback] = field(default_factory=list)
    blobs: dict[str, BlobJob] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)
    state: PullState = "downloading"
    snapshot: PullProgress | None = None
    changed: Signal = field(default_factory=Signal)
    rate: RateMeter = field(default_factory=RateMeter)
    blob_rates: dict[str, RateMeter] = field(default_factory=dict)
    pending_recorded: bool = False  # the store lists the model (lazy mode can show it)
    reservation: Reservation | None = None  # room held for the bytes still to land


class BlobJobs:
    """Every blob download in flight, by digest (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        settings: DownloadSettings,
        limits: Limits,
        changed: Signal,
        tuning: _Tuning,
    ) -> None:
        self.store = store
        self.settings = settings
        self._limits = limits
        self._changed = changed
        self._tuning = tuning
        self._blobs: dict[str, BlobJob] = {}
        self._fetched: Counter[str] = Counter()

    def get(self, digest: str) -> BlobJob | None:
        return self._blobs.get(digest)

    def tasks(self) -> list[asyncio.Task[Any]]:
        return [j.task for j in list(self._blobs.values()) if j.task is not None]

    def fetched_bytes(self) -> dict[str, int]:
        """Bytes received from origins, by source kind, downloads in flight included."""
        totals = Counter(self._fetched)
        for bj in list(self._blobs.values()):
            if bj.download is not None:
                totals[bj.source_kind] += bj.download.fetched_bytes
        return dict(totals)

    async def shared(self, job: ModelJob, layer: Layer) -> tuple[UnpackedFile, ...]:
        digest = layer.blob.digest
        while True:
            bj = self._blobs.get(digest)
            unpack = f"{layer.unpack}:{layer.subtree}" if layer.subtree else layer.unpack
            if bj is None:
                bj = BlobJob(unpack, job.source.kind)
                self._blobs[digest] = bj
                bj.task = asyncio.create_task(self._run(bj, layer, job))
                bj.task.add_done_callback(functools.partial(self._finished, digest, bj))
                self._changed.fire()
                break
            if bj.unpack == unpack and not bj.abandoned:
                break
            # Being cancelled (its last waiter left), or the same bytes wanted raw by one model
            # and unpacked by another: let it finish, then start afresh.
            assert bj.task is not None
            await asyncio.wait([bj.task])
        assert bj.task is not None
        bj.waiters += 1
        job.blobs[digest] = bj
        try:
            return await asyncio.shield(bj.task)
        finally:
            bj.waiters -= 1
            if bj.waiters == 0 and not bj.task.done():
                bj.abandoned = True
                bj.task.cancel()
                # Wait for it to stop (its threads to finish with the partial file), so a
                # failed model pull never leaves a download winding down behind it.
                await asyncio.wait([bj.task])

    def _finished(self, digest: str, bj: BlobJob, task: asyncio.Task[Any]) -> None:
        retrieve(task)
        if bj.download is not None:
            self._fetched[bj.source_kind] += bj.download.fetched_bytes
        if self._blobs.get(digest) is bj:
            del self._blobs[digest]
        self._changed.fire()

    async def _run(self, bj: BlobJob, layer: Layer, job: ModelJob) -> tuple[UnpackedFile, ...]:
        blob, store = layer.blob, self.store
        raw_entry = (UnpackedFile("", blob.digest, blob.size, 0o444),)
        if layer.unpack == "raw" and await asyncio.to_thread(store.has_blob, blob.digest):
            return raw_entry
        partial = store.partial_path(blob.digest)
        download = BlobDownload(
            blob, job.source, job.ref.origin, partial, self.settings, self._limits
        )
        bj.download = download
        self._changed.fire()
        try:
            await download.run()
        except DigestMismatchError:
            retry = job.source.after_mismatch(blob)
            if retry is None:
                raise
            # The mismatched partial is gone; count its bytes, then once more from the origin.
            self._fetched[bj.source_kind] += download.fetched_bytes
            download = BlobDownload(
                blob, retry, job.ref.origin, partial, self.settings, self._limits
            )
            bj.download = download
            self._changed.fire()
            await download.run()
        if layer.unpack == "raw":
            crashpoint("pull.before_commit")
            # commit_blob renames the partial file into blobs/ and drops its ranges record
            await asyncio.to_thread(
                store.commit_blob,
                blob.digest,
                blob.size,
                partial,
                verified=True,
                reservation=job.reservation,
            )
            return raw_entry
        try:
            return await asyncio.to_thread(self._unpack, layer, partial, job.reservation)
        finally:
            await asyncio.to_thread(remove_partial, partial)
            if job.reservation is not None:
                await asyncio.to_thread(store.release, job.reservation, blob.size)

    def _unpack(
        self, layer: Layer, partial: Path, reservation: Reservation | None
    ) -> tuple[UnpackedFile, ...]:
        ratio = 1.0 if layer.unpack == "tar" else self._tuning.max_unpack_ratio

        def commit(entry: UnpackedFile, tmp: Path) -> None:
            # tarsafe hashed every byte as it copied the member out
            self.store.commit_blob(
                entry.digest, entry.size, tmp, verified=True, reservation=reservation
            )

        return unpack_tar(
            partial,
            layer.unpack,
            partial.parent,
            commit,
            max_total_bytes=int(layer.blob.size * ratio),
            subtree=layer.subtree,
        )


def snapshot(job: ModelJob, error: str | None) -> PullProgress:
    """The progress of a model pull now, blob by blob (rates from the job's meters)."""
    now = time.monotonic()
    blobs: dict[str, BlobProgress] = {}
    for layer in job.resolved.layers:
        digest, size = layer.blob.digest, layer.blob.size
        done = job.done.get(digest)
        if done is None:
            bj = job.blobs.get(digest)
            done = bj.download.done_bytes if bj and bj.download else 0
        if job.state == "done":
            done = size
        blob_rate = job.blob_rates.setdefault(digest, RateMeter()).sample(now, done)
        blobs[digest] = BlobProgress(
            digest, done, size, blob_rate, eta_seconds(size - done, blob_rate)
        )
    total = sum(b.total_bytes for b in blobs.values())
    done_bytes = sum(b.done_bytes for b in blobs.values())
    rate = job.rate.sample(now, done_bytes)
    return PullProgress(
        ref=job.ref.canonical,
        manifest_digest=job.resolved.manifest_digest,
        state=job.state,
        done_bytes=done_bytes,
        total_bytes=total,
        rate=rate,
        eta_seconds=eta_seconds(total - done_bytes, rate),
        blobs=tuple(blobs.values()),
        error=error,
        waiting=job.source.waiting(),
    )


def raw_file(layer: Layer) -> ModelFile:
    return ModelFile(layer.path, layer.blob.digest, layer.blob.size)


def remove_partial(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    sidecar_path(partial).unlink(missing_ok=True)


def retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a shared task's failure as seen: its callers got it; nobody else should log it."""
    if not task.cancelled():
        task.exception()


def finished_snapshot(ref: ModelRef, model: Model) -> PullProgress:
    return PullProgress(
        ref=ref.canonical,
        manifest_digest=model.digest,
        state="done",
        done_bytes=model.size,
        total_bytes=model.size,
        eta_seconds=0.0,
    )


def notify(listener: ProgressCallback | None, snap: PullProgress) -> None:
    """Progress is advisory: a failing listener is logged, never allowed to break the pull."""
    if listener is None:
        return
    try:
        listener(snap)
    except Exception:
        log.exception("progress listener failed")


async def reserve_room(
    store: Store, job: ModelJob, holder: str, max_blob_bytes: int | None
) -> Reservation:
    """Reserve the bytes still to land before writing any (CacheFullError at once if they
    cannot fit). Tar layers count twice (the archive, then its members); the archive's
    share is given back once it is unpacked. A compressed one may unpack to more: each
    member then reserves the rest as it commits (``Capacity.grow``), refused past the
    capacity."""
    need = 0
    partials: list[str] = []
    for layer in job.resolved.layers:
        size = layer.blob.size
        cap = max_blob_bytes
        if cap is not None and size > cap:
            raise SourceError(
                f"blob {layer.blob.digest} declares {size} bytes, over the {cap}-byte limit "
                "(pull.max_blob_bytes)"
            )
        if layer.unpack != "raw":
            need += 2 * size
            partials.append(layer.blob.digest)
        elif not await asyncio.to_thread(store.has_blob, layer.blob.digest):
            need += size
            partials.append(layer.blob.digest)
    digest = job.resolved.manifest_digest
    return await asyncio.to_thread(
        store.reserve, need, holder=holder, blobs=partials, protect=(digest,)
    )


def disk_full(exc: BaseException, root: Path) -> BaseException:
    """ENOSPC/EDQUOT from any write of a pull (unpacking a tar layer, building the tree) as the
    DiskFullError a client can act on; any other exception unchanged."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return DiskFullError(root, exc.strerror or str(exc))
    return exc


def member_path(prefix: str, rel: str) -> str:
    """Where a tar member lands in the model tree (under the layer's path, if any)."""
    return safe_relpath(f"{prefix}/{rel}") if prefix else rel
