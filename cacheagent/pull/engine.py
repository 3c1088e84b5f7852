"""The pull engine: reference in, verified model tree in the store out, each byte fetched once.

Dedupe happens at three levels, all keyed so that concurrent callers share one piece of work:
resolving a reference (by canonical ref), pulling a model (by manifest digest) and downloading a
blob (by digest, agent-wide). A hundred pods asking for one model at once therefore cost the
origin one manifest and one copy of each blob; every caller awaits the same tasks. The shared
tasks are shielded from any one caller's cancellation; a blob download is cancelled only when no
model pull is waiting for it any more.

A model pull: record the model as pending, hold a "pull" lease on it (eviction skips it), make
room for the bytes still missing (``CacheFullError`` before anything is written), download every
blob not already in the store (``download.BlobDownload``), unpack tar layers member by member
into blobs, then build the tree atomically (``Store.put_model``), set the tag and release the
lease.

Tags resolve through the store's tag cache first (TTL), so a warm node answers a tag without the
network; an immutable reference already in the store is a cache hit with no network at all. If
the origin is unreachable, a tag falls back to the last digest it pointed to when that model is
still in the store.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cacheagent.aio import Signal, all_or_nothing
from cacheagent.config import PullConfig
from cacheagent.errors import (
    ModelNotFoundError,
    OriginUnavailableError,
    SourceError,
)
from cacheagent.pull.blobjobs import (
    BlobJobs,
    ModelJob,
    ProgressCallback,
    disk_full,
    finished_snapshot,
    member_path,
    notify,
    raw_file,
    reserve_room,
    retrieve,
    snapshot,
)
from cacheagent.pull.download import (
    DownloadSettings,
    HashMode,
    Limits,
)
from cacheagent.pull.progress import PullProgress, PullState
from cacheagent.refs import ModelRef, parse_ref
from cacheagent.sources.base import Layer, Source
from cacheagent.sources.factory import retry_policy
from cacheagent.sources.views import assemble, resolve_model
from cacheagent.store import Model, ModelFile, Store
from cacheagent.store.crashpoints import crashpoint

log = logging.getLogger(__name__)


_FAILURES_KEPT = 256


@dataclass(frozen=True)
class PullTuning:
    """Engine knobs that are not (yet) user configuration; the defaults are the measured ones."""

    ranges_per_blob: int = 8
    batch_bytes: int = 1 << 20
    hash_mode: HashMode = "running"
    record_interval_seconds: float = 1.0
    tag_ttl_seconds: float = 300.0
    progress_interval_seconds: float = 0.25
    max_blob_bytes: int | None = None
    # A compressed tar layer may unpack to at most this many times its size (zip-bomb guard).
    max_unpack_ratio: float = 32.0


class SourceRegistry:
    """Which Source serves which kind of reference ("oci", "oci-layout", "hf", "http")."""

    def __init__(self, sources: Mapping[str, Source] | Iterable[Source]) -> None:
        items = sources.items() if isinstance(sources, Mapping) else ((s.kind, s) for s in sources)
        self._by_kind: dict[str, Source] = dict(items)

    def for_ref(self, ref: ModelRef) -> Source:
        source = self._by_kind.get(ref.kind)
        if source is None:
            raise SourceError(f"no source configured for {ref.kind} references ({ref})")
        return source

    async def aclose(self) -> None:
        for source in self._by_kind.values():
            await source.aclose()


class PullEngine:
    def __init__(
        self,
        store: Store,
        sources: SourceRegistry,
        config: PullConfig | None = None,
        *,
        tuning: PullTuning | None = None,
    ) -> None:
        self.store = store
        self.sources = sources
        self.config = config or PullConfig()
        self.tuning = tuning or PullTuning()
        cfg, tun = self.config, self.tuning
        self.settings = DownloadSettings(
            range_threshold_bytes=cfg.range_threshold_bytes,
            range_chunk_bytes=cfg.range_chunk_bytes,
            ranges_per_blob=tun.ranges_per_blob,
            batch_bytes=tun.batch_bytes,
            idle_timeout_seconds=cfg.timeout_seconds,
            record_interval_seconds=tun.record_interval_seconds,
            hash_mode=tun.hash_mode,
            retry=retry_policy(cfg),
        )
        self.in_flight: dict[str, PullProgress] = {}
        self._limits = Limits(cfg.max_connections_per_origin, cfg.max_connections_total)
        self._resolving: dict[str, asyncio.Task[ModelJob | Model]] = {}
        self._models: dict[str, ModelJob] = {}
        self._changed = Signal()
        self._blobs = BlobJobs(self.store, self.settings, self._limits, self._changed, self.tuning)
        self._failures: dict[str, BaseException] = {}

    # -- public API ----------------------------------------------------------------------------

    async def pull(self, ref: ModelRef | str, *, progress: ProgressCallback | None = None) -> Model:
        """Make ``ref`` a complete, verified model in the store and return it."""
        model_ref = parse_ref(ref) if isinstance(ref, str) else ref
        digest = await self._known_digest(model_ref)
        if digest is not None:
            cached = await self._stored_model(digest)
            if cached is not None:
                notify(progress, finished_snapshot(model_ref, cached))
                return cached
            job = self._models.get(digest)
            if job is not None:  # resolved moments ago by another caller: join that pull
                return await self._join(job, model_ref, progress)
        if progress is not None:
            notify(progress, PullProgress(str(model_ref), "", "resolving", 0, 0))
        try:
            outcome = await self._resolve(model_ref)
        except OriginUnavailableError:
            offline = await self._offline_fallback(model_ref)
            if offline is None:
                raise
            outcome = offline
        if isinstance(outcome, ModelJob):
            return await self._join(outcome, model_ref, progress)
        notify(progress, finished_snapshot(model_ref, outcome))
        return outcome

    async def start_background(
        self,
        ref: ModelRef | str,
        *,
        run: Callable[[ModelRef], Awaitable[Model]] | None = None,
    ) -> str:
        """Start (or join) the pull of ``ref``; return its manifest digest as soon as the store
        lists the model as pending, without waiting for its bytes (the FUSE lazy mode serves it
        meanwhile). The pull goes on in the background; a failure is logged, and readers of
        the model see it as EIO. Callers bound the wait (resolution) with ``asyncio.timeout``.
        ``run`` pulls the reference (default: ``pull``; the model service counts its pulls).
        """
        model_ref = parse_ref(ref) if isinstance(ref, str) else ref
        pull = asyncio.ensure_future((run or self.pull)(model_ref))
        pull.add_done_callback(log_background_failure)
        # A cache hit finishes without starting a job, so nothing else would wake the loop.
        pull.add_done_callback(lambda _: self._changed.fire())
        while True:
            event = self._changed.next
            if pull.done():
                return (await pull).digest
            digest = await self._known_digest(model_ref)
            job = None if digest is None else self._models.get(digest)
            if digest is not None and job is not None and job.pending_recorded:
                return digest
            # The pull task may end after the engine's last signal (``run`` wraps the pull).
            woken = asyncio.ensure_future(event.wait())
            try:
                await asyncio.wait({pull, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()

    def last_failure(self, manifest_digest: str) -> BaseException | None:
        """Why the last pull of this model failed (None if it did not, or long ago): lazy
        readers report it instead of a bare "not found"."""
        return self._failures.get(manifest_digest)

    def fetched_bytes(self) -> dict[str, int]:
        """Bytes received from origins since start, by source kind, downloads in flight
        included (what ``cacheagent_pull_bytes_total`` exports)."""
        return self._blobs.fetched_bytes()

    def progress(self, manifest_digest: str) -> PullProgress | None:
        return self.in_flight.get(manifest_digest)

    async def watch(self, manifest_digest: str) -> AsyncIterator[PullProgress]:
        """Every progress snapshot of a pull in flight until it finishes (nothing if none is)."""
        job = self._models.get(manifest_digest)
        if job is None:
            return
        last: PullProgress | None = None
        while True:
            event = job.changed.next
            snap = job.snapshot
            if snap is not None and snap is not last:
                last = snap
                yield snap
                if snap.finished:
                    return
            await event.wait()

    async def ensure_range(self, blob_digest: str, start: int, end: int) -> Path:
        """Return once bytes ``[start, end)`` of a raw blob can be read, fetching them ahead of
        the background order if needed (the FUSE lazy mode's read path).

        The path returned is the partial file while the blob downloads, else the committed blob.
        A reader that finds the partial file gone opens ``store.blob_path`` instead: the commit
        renames the same inode, so an already open descriptor stays valid. Callers bound the
        wait with ``asyncio.timeout``.
        """
        while True:
            event = self._changed.next
            job = self._blobs.get(blob_digest)
            if job is not None and job.download is not None:
                await job.download.ensure_range(start, end)
                return self.store.partial_path(blob_digest)
            if await asyncio.to_thread(self.store.has_blob, blob_digest):
                return self.store.blob_path(blob_digest)
            if job is None and not self._resolving_now() and not self._wanted(blob_digest):
                raise ModelNotFoundError(
                    f"blob {blob_digest} is neither in the store nor being pulled"
                )
            await event.wait()

    async def cancel(self, manifest_digest: str) -> bool:
        """Cancel the pull of this model, if one is in flight, and wait for it to end (its
        pending record, lease and reservation go with it). True if there was one."""
        job = self._models.get(manifest_digest)
        if job is None or job.task is None:
            return False
        job.task.cancel()
        await asyncio.gather(job.task, return_exceptions=True)
        return True

    async def aclose(self) -> None:
        """Cancel every pull in flight (partial files keep their ranges records)."""
        tasks: list[asyncio.Task[Any]] = list(self._resolving.values())
        tasks += [j.task for j in self._models.values() if j.task is not None]
        tasks += self._blobs.tasks()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- resolving -----------------------------------------------------------------------------

    async def _known_digest(self, ref: ModelRef) -> str | None:
        """The manifest digest ``ref`` names without asking the origin: an unexpired tag
        resolution, or any resolution of an immutable reference."""
        store = self.store
        lookup = store.lookup_ref if ref.is_immutable else store.resolve_tag
        digest = await asyncio.to_thread(lookup, ref.canonical)
        return digest or getattr(ref, "digest", None)

    async def _stored_model(self, digest: str) -> Model | None:
        model = await asyncio.to_thread(self.store.get_model, digest)
        if model is not None:
            await asyncio.to_thread(self.store.touch, digest)
        return model

    async def _offline_fallback(self, ref: ModelRef) -> Model | None:
        digest = await asyncio.to_thread(self.store.lookup_ref, ref.canonical)
        model = None if digest is None else await self._stored_model(digest)
        if model is not None:
            log.warning("origin of %s unreachable; using the cached %s", ref, model.digest)
        return model

    async def _resolve(self, ref: ModelRef) -> ModelJob | Model:
        """Resolve ``ref`` once however many callers ask, and start (or find) its pull.

        The shared task stays in ``_resolving`` until the pull it started ends, so a caller
        whose tag-cache lookup raced the resolution still gets the answer without the origin.
        """
        key = ref.canonical
        task = self._resolving.get(key)
        if task is None:
            task = asyncio.create_task(self._resolve_and_start(ref))
            self._resolving[key] = task
            task.add_done_callback(self._resolved)
        return await asyncio.shield(task)

    def _resolving_now(self) -> bool:
        return any(not task.done() for task in self._resolving.values())

    def _resolved(self, task: asyncio.Task[ModelJob | Model]) -> None:
        self._changed.fire()
        outcome = None if task.cancelled() or task.exception() else task.result()
        if isinstance(outcome, ModelJob):
            assert outcome.task is not None
            outcome.task.add_done_callback(lambda _: self._forget_resolution(task))
        else:
            self._forget_resolution(task)

    def _forget_resolution(self, task: asyncio.Task[ModelJob | Model]) -> None:
        for key, value in list(self._resolving.items()):
            if value is task:
                del self._resolving[key]

    async def _resolve_and_start(self, ref: ModelRef) -> ModelJob | Model:
        resolved = await resolve_model(self.sources.for_ref(ref), ref)
        digest = resolved.manifest_digest
        # Cache the answer at once: callers arriving while the model downloads find the pull
        # through the tag cache instead of asking the origin again.
        await asyncio.to_thread(
            self.store.set_tag, ref.canonical, digest, self.tuning.tag_ttl_seconds
        )
        existing = await self._stored_model(digest)
        if existing is not None:
            return existing
        job = self._models.get(digest)
        if job is None:
            job = ModelJob(ref, resolved, self.sources.for_ref(ref))
            self._models[digest] = job
            job.task = asyncio.create_task(self._run_model(job))
            job.task.add_done_callback(lambda _: self._model_finished(job))
            self._changed.fire()
        return job

    # -- model pulls ---------------------------------------------------------------------------

    async def _join(self, job: ModelJob, ref: ModelRef, progress: ProgressCallback | None) -> Model:
        """Wait for a model pull in flight (shielded: this caller leaving does not stop it)."""
        if progress is not None:
            job.listeners.append(progress)
            if job.snapshot is not None:
                notify(progress, job.snapshot)
        assert job.task is not None
        try:
            model = await asyncio.shield(job.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if job.task.cancelled() and (current is None or not current.cancelling()):
                raise SourceError(
                    f"the pull of {job.resolved.manifest_digest} was cancelled (rm)"
                ) from None
            raise
        finally:
            if progress is not None:
                job.listeners.remove(progress)
        if ref.canonical != job.ref.canonical:
            await self._record_ref(ref, model.digest)
        return model

    def _model_finished(self, job: ModelJob) -> None:
        assert job.task is not None
        retrieve(job.task)
        digest = job.resolved.manifest_digest
        task = job.task
        if not task.cancelled() and (error := task.exception()) is not None:
            self._failures[digest] = error
            while len(self._failures) > _FAILURES_KEPT:
                del self._failures[next(iter(self._failures))]
        else:
            self._failures.pop(digest, None)
        if self._models.get(digest) is job:
            del self._models[digest]
            self.in_flight.pop(digest, None)
        self._changed.fire()

    async def _run_model(self, job: ModelJob) -> Model:
        store, resolved = self.store, job.resolved
        digest = resolved.manifest_digest
        holder = f"pull:{uuid.uuid4().hex}"
        ticker: asyncio.Task[None] | None = None
        recorded = False
        try:
            inline = [
                ModelFile(path, await asyncio.to_thread(store.add_blob_bytes, data), len(data))
                for path, data in resolved.inline_files
            ]
            await asyncio.to_thread(
                store.put_pending,
                digest,
                [raw_file(layer) for layer in resolved.layers if layer.unpack == "raw"] + inline,
                ref=job.ref.canonical,
                source_kind=job.source.kind,
                manifest=resolved.manifest,
                holder=holder,
            )
            recorded = True
            job.pending_recorded = True
            self._changed.fire()
            crashpoint("pull.after_pending")
            self._publish(job)
            ticker = asyncio.create_task(self._tick(job))
            job.reservation = await reserve_room(
                self.store, job, holder, self.tuning.max_blob_bytes
            )
            groups = await all_or_nothing(
                self._layer_files(job, layer) for layer in resolved.layers
            )
            job.state = "committing"
            self._publish(job)
            files = assemble(resolved, groups) + inline
            crashpoint("pull.before_tree")
            model = await asyncio.to_thread(
                store.put_model,
                digest,
                files,
                ref=job.ref.canonical,
                source_kind=job.source.kind,
                manifest=resolved.manifest,
            )
            crashpoint("pull.after_tree")
            await self._record_ref(job.ref, digest)
        except BaseException as exc:
            error = disk_full(exc, store.root)
            self._publish(job, state="failed", error=str(error) or type(error).__name__)
            if recorded:  # no ghost: the pending record goes with the pull
                await asyncio.to_thread(store.drop_pending, digest, holder)
            if error is not exc:
                raise error from exc
            raise
        finally:
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            if job.reservation is not None:
                await asyncio.to_thread(store.release, job.reservation)
            if recorded:
                await asyncio.to_thread(store.release_lease, holder)
        self._publish(job, state="done")
        return model

    async def _record_ref(self, ref: ModelRef, digest: str) -> None:
        await asyncio.to_thread(
            self.store.set_tag, ref.canonical, digest, self.tuning.tag_ttl_seconds
        )
        await asyncio.to_thread(self.store.touch, digest)

    # -- layers and blobs ----------------------------------------------------------------------

    async def _layer_files(self, job: ModelJob, layer: Layer) -> list[ModelFile]:
        blob = layer.blob
        if layer.unpack == "raw" and await asyncio.to_thread(self.store.has_blob, blob.digest):
            job.done[blob.digest] = blob.size
            return [raw_file(layer)]
        entries = await self._blobs.shared(job, layer)
        job.done[blob.digest] = blob.size
        if layer.unpack == "raw":
            return [raw_file(layer)]
        return [
            ModelFile(member_path(layer.path, e.path), e.digest, e.size, e.mode) for e in entries
        ]

    def _wanted(self, blob_digest: str) -> bool:
        return any(
            layer.blob.digest == blob_digest
            for job in self._models.values()
            for layer in job.resolved.layers
        )

    # -- progress ------------------------------------------------------------------------------

    async def _tick(self, job: ModelJob) -> None:
        while True:
            await asyncio.sleep(self.tuning.progress_interval_seconds)
            self._publish(job)

    def _publish(
        self, job: ModelJob, *, state: PullState | None = None, error: str | None = None
    ) -> None:
        if state is not None:
            job.state = state
        snap = snapshot(job, error)
        job.snapshot = snap
        digest = job.resolved.manifest_digest
        if not snap.finished:
            self.in_flight[digest] = snap
        for listener in list(job.listeners):
            notify(listener, snap)
        job.changed.fire()


def log_background_failure(task: asyncio.Future[Any]) -> None:
    """Done-callback for a pull nobody awaits: log its failure (and mark it retrieved)."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("background pull failed: %s", error)
