"""The agent's model service: what the agent API, the CSI driver and the FUSE view ask of it.

One object turns a reference into a ready model: it checks policy, counts hits and misses,
times pulls, makes a model visible in the lazy FUSE tree, warms the page cache and reports
residency. The gRPC servicers and the CSI driver are thin translations of this class; the
daemon (``cacheagent.server``) builds one and hands it to each.

Everything that touches SQLite or the disk goes through ``asyncio.to_thread``: the store is
synchronous and thread-safe, the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cacheagent.config import PolicyConfig
from cacheagent.errors import CacheAgentError, ModelInUseError, ModelNotFoundError
from cacheagent.memory.pagecache import Residency, residency
from cacheagent.memory.prefetch import MemoryLocker, Prefetcher, WarmResult
from cacheagent.metrics import Metrics
from cacheagent.policy import check_lazy, check_mount, check_pod_ref, check_source
from cacheagent.pull.engine import PullEngine, log_background_failure
from cacheagent.pull.progress import PullProgress
from cacheagent.refs import ModelRef, parse_ref
from cacheagent.store import Model, Store
from cacheagent.store.lookup import find_model
from cacheagent.volumes import LazyModeUnavailableError, ModelStats, ReadyModel, StillPulling

log = logging.getLogger(__name__)

PullProgressSink = Callable[[PullProgress], None]


@dataclass(frozen=True)
class PreheatUpdate:
    """One event of a preheat stream: pull progress, then a final outcome per reference."""

    ref: str
    progress: PullProgress | None = None
    model: Model | None = None
    cache_hit: bool = False
    warmed: WarmResult | None = None
    error: Exception | None = None  # a CacheAgentError, or whatever nobody anticipated
    phase: str = "downloading"


@dataclass
class _Hit:
    """Whether a pull fetched anything: a hit is a pull that never left the 'done' state."""

    fetched: bool = False

    def observe(self, snap: PullProgress) -> None:
        if snap.state not in ("done", "failed"):
            self.fetched = True


@dataclass
class ModelService:
    store: Store
    engine: PullEngine
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    metrics: Metrics | None = None
    prefetcher: Prefetcher | None = None
    locker: MemoryLocker | None = None
    fuse_root: Path | None = None
    # Called with a digest after an eviction (the FUSE view drops its cached tree).
    on_evicted: Callable[[str], None] = lambda digest: None

    # -- references and pulls ------------------------------------------------------------------

    def parse(self, text: str) -> ModelRef:
        """Parse and policy-check a reference (RefError, PolicyDeniedError)."""
        ref = parse_ref(text)
        check_source(self.policy, ref)
        return ref

    async def pull(
        self, ref: ModelRef, progress: PullProgressSink | None = None
    ) -> tuple[Model, bool]:
        """Pull ``ref`` (or join its pull); returns the model and whether it was a cache hit."""
        hit = _Hit()

        def observe(snap: PullProgress) -> None:
            hit.observe(snap)
            if progress is not None:
                progress(snap)

        started = time.monotonic()
        if self.metrics is not None:
            self.metrics.pulls_in_flight.inc()
        try:
            model = await self.engine.pull(ref, progress=observe)
        except CacheAgentError:
            self._observe_pull(ref, started, "error")
            raise
        finally:
            if self.metrics is not None:
                self.metrics.pulls_in_flight.dec()
        self._observe_pull(ref, started, "ok", hit=not hit.fetched)
        return model, not hit.fetched

    def _observe_pull(
        self, ref: ModelRef, started: float, result: str, *, hit: bool = False
    ) -> None:
        if self.metrics is None:
            return
        self.metrics.pull_duration.labels(ref.kind, result).observe(time.monotonic() - started)
        if result == "ok":
            (self.metrics.cache_hits if hit else self.metrics.cache_misses).labels(ref.kind).inc()

    async def preheat(
        self,
        refs: Sequence[str],
        *,
        warm_memory: bool = False,
        gpus: Sequence[str] = (),
        lock_memory: bool = False,
        slots: asyncio.Semaphore | None = None,
    ) -> AsyncIterator[PreheatUpdate]:
        """Pull the references concurrently (each holding one of ``slots``, if given, which
        callers share to bound preheat work agent-wide), yielding progress and one final
        update each."""
        queue: asyncio.Queue[PreheatUpdate | None] = asyncio.Queue()
        slots = slots or asyncio.Semaphore(max(len(refs), 1))

        def forward(text: str) -> PullProgressSink:
            # A finished snapshot is not the outcome: the final update below carries that (and
            # the error with its code), so a client sees exactly one DONE or FAILED per ref.
            def sink(snap: PullProgress) -> None:
                if not snap.finished:
                    queue.put_nowait(PreheatUpdate(text, progress=snap))

            return sink

        async def one(text: str) -> None:
            try:
                ref = self.parse(text)
                model, hit = await self.pull(ref, forward(text))
                warmed = None
                if warm_memory:
                    queue.put_nowait(PreheatUpdate(text, model=model, phase="warming"))
                    warmed = await self.warm(model.digest, gpus, lock=lock_memory)
                queue.put_nowait(
                    PreheatUpdate(text, model=model, cache_hit=hit, warmed=warmed, phase="done")
                )
            except Exception as err:
                if not isinstance(err, CacheAgentError):
                    log.exception("preheat of %s failed unexpectedly", text)
                queue.put_nowait(PreheatUpdate(text, error=err, phase="failed"))

        async def bounded(text: str) -> None:
            async with slots:
                await one(text)

        async def run_all() -> None:
            try:
                await asyncio.gather(*(bounded(text) for text in refs))
            finally:
                queue.put_nowait(None)

        runner = asyncio.create_task(run_all())
        try:
            while (update := await queue.get()) is not None:
                yield update
        finally:
            if not runner.done():
                runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    # -- lookups -------------------------------------------------------------------------------

    async def find(self, text: str) -> Model:
        """A model in the store by manifest digest, digest prefix or reference."""
        model = await asyncio.to_thread(find_model, self.store, text)
        if model is None:
            raise ModelNotFoundError(f"no model {text!r} in the store")
        return model

    async def list_models(self) -> list[Model]:
        return await asyncio.to_thread(self.store.list_models)

    async def residency(self, model: Model) -> Residency:
        root = self.store.model_path(model.digest)
        paths = [root / f.path for f in model.files]
        return await asyncio.to_thread(residency, paths)

    async def evict(self, text: str, *, force: bool = False) -> tuple[str, int]:
        model = await self.find(text)
        leases = await asyncio.to_thread(self.store.leases, model.digest)
        if leases:
            holders = ", ".join(sorted({lease.kind for lease in leases}))
            raise ModelInUseError(f"model {model.digest} is in use ({holders}); not evicted")
        freed = await asyncio.to_thread(self.store.remove_model, model.digest, force=force)
        if self.locker is not None:
            await asyncio.to_thread(self.locker.release, model.digest)
        self.on_evicted(model.digest)
        return model.digest, freed

    async def set_pinned(self, text: str, pinned: bool) -> Model:
        model = await self.find(text)
        action = self.store.pin if pinned else self.store.unpin
        await asyncio.to_thread(action, model.digest)
        if not pinned and self.locker is not None:
            await asyncio.to_thread(self.locker.release, model.digest)
        return await self.find(model.digest)

    # -- page cache ----------------------------------------------------------------------------

    async def warm(
        self, digest: str, gpus: Sequence[str] = (), *, lock: bool = False
    ) -> WarmResult:
        if self.prefetcher is None:
            raise CacheAgentError("page-cache warming is disabled in this agent")
        model = await self.find(digest)
        paths = [self.store.model_path(digest) / f.path for f in model.files]
        result = await self.prefetcher.warm_async(paths, gpus=gpus)
        if lock and self.locker is not None:
            await self.locker.lock_async(digest, paths)
        await asyncio.to_thread(self.store.touch, digest)
        return result

    # -- CSI backend ---------------------------------------------------------------------------

    def store_ready(self) -> bool:
        """Always: a service exists only over a store that is open and reconciled, and the
        daemon stops the CSI server before it closes the store."""
        return True

    def check_mount_policy(self, namespace: str | None, ref: ModelRef) -> None:
        """The pod trust boundary (``policy.pod_*``), then the rules every pull obeys."""
        check_pod_ref(self.policy, ref)
        check_source(self.policy, ref)
        check_mount(self.policy, namespace, ref)

    async def ensure_model(
        self, ref: ModelRef, *, wait_seconds: float
    ) -> ReadyModel | StillPulling:
        latest: list[PullProgress] = []  # the newest snapshot of this pull, one slot

        def keep(snap: PullProgress) -> None:
            latest[:] = [snap]

        pull = asyncio.ensure_future(self.pull(ref, keep))
        try:
            model, _ = await asyncio.wait_for(asyncio.shield(pull), timeout=max(wait_seconds, 0))
        except TimeoutError:
            # The pull goes on; the engine dedupes the next call onto the same work.
            pull.add_done_callback(log_background_failure)
            if not latest:
                return StillPulling()
            snap = latest[0]
            return StillPulling(snap.done_bytes, snap.total_bytes, snap.rate or None)
        return ReadyModel(model.digest, self.store.model_path(model.digest))

    async def lazy_model_dir(self, ref: ModelRef) -> ReadyModel:
        check_lazy(self.policy, ref)  # before any I/O: lazy serves unverified bytes
        if self.fuse_root is None:
            raise LazyModeUnavailableError(
                "mode: lazy needs the agent's FUSE mount, which is not serving on this node"
            )
        digest = await self.engine.start_background(ref)
        return ReadyModel(digest, self.fuse_root / digest)

    def add_lease(self, digest: str, holder: str, kind: str) -> None:
        self.store.add_lease(digest, holder, kind)
        self.store.touch(digest)

    def release_lease(self, holder: str) -> None:
        self.store.release_lease(holder)

    async def prefetch(self, digest: str, gpus: Sequence[str]) -> None:
        if self.prefetcher is not None:
            await self.warm(digest, gpus)

    def model_stats(self, digest: str) -> ModelStats:
        model = self.store.get_model(digest)
        if model is None:
            return self._pending_stats(digest)
        root = self.store.model_path(digest)
        dirs = {str(Path(f.path).parent) for f in model.files} - {"."}
        for f in model.files:
            try:
                size = (root / f.path).stat().st_size
            except OSError as err:
                return ModelStats(model.size, len(model.files), False, f"{f.path}: {err.strerror}")
            if size != f.size:
                return ModelStats(
                    model.size, len(model.files), False, f"{f.path}: {size} bytes, want {f.size}"
                )
        return ModelStats(model.size, len(model.files) + len(dirs) + 1, healthy=True)

    def _pending_stats(self, digest: str) -> ModelStats:
        """A model still downloading is healthy (lazy mode serves it); an unknown one is not."""
        pending = self.store.get_pending(digest)
        if pending is None:
            return ModelStats(0, 0, healthy=False, message=f"model {digest} is not in the store")
        missing = len(pending.missing)
        return ModelStats(
            pending.size,
            len(pending.files),
            healthy=True,
            message=f"model {digest} is downloading ({missing} blob(s) to go)",
            downloading=True,
        )
