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
from cacheagent.errors import CacheAgentError, ModelNotFoundError, SourceError, StoreError
from cacheagent.memory.pagecache import Residency, residency
from cacheagent.memory.prefetch import MemoryLocker, Prefetcher, WarmResult
from cacheagent.metrics import Metrics
from cacheagent.policy import check_lazy, check_mount, check_pod_ref, check_source
from cacheagent.pull.engine import PullEngine, log_background_failure
from cacheagent.pull.interrupted import InterruptedPulls
from cacheagent.pull.progress import PullProgress
from cacheagent.refs import ModelRef, parse_ref
from cacheagent.store import EvictionPlan, Model, ModelFile, Store
from cacheagent.store.lookup import find_model
from cacheagent.store.removal import Removal
from cacheagent.volumes import LazyModeUnavailableError, ModelStats, ReadyModel, StillPulling

log = logging.getLogger(__name__)

PullProgressSink = Callable[[PullProgress], None]

STORE_CHECK_SECONDS = 2.0


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
    """Whether a pull fetched anything: a hit is a pull that never downloaded (re-resolving a
    tag whose cached answer expired, to find the model already stored, is still a hit)."""

    fetched: bool = False

    def observe(self, snap: PullProgress) -> None:
        if snap.state in ("downloading", "committing"):
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
    # Called with a digest after any removal (the FUSE view drops its cached tree).
    on_evicted: Callable[[str], None] = lambda digest: None

    # Why the store cannot write (index or lock file gone, disk full), refreshed by
    # ``watch_store``; None while it can.
    store_problem: str | None = field(default=None, init=False)
    _refetches: set[asyncio.Future[tuple[Model, bool]]] = field(default_factory=set, init=False)
    interrupted: InterruptedPulls = field(init=False)

    def __post_init__(self) -> None:
        self.interrupted = InterruptedPulls(self.store, self.engine, self._pull_model)
        # Every removal (rm, capacity eviction, a failed pull's record, a repair) comes
        # through the store's one removal path; this is the agent's one observer of it.
        self.store.add_removal_observer(self._removed)
        if self.metrics is not None:
            # Pulls, not callers: a hundred callers joining one pull are one pull in flight.
            engine = self.engine
            self.metrics.pulls_in_flight.set_function(lambda: len(engine.in_flight))

    def _removed(self, removal: Removal) -> None:
        """Drop what the agent holds of a removed model: its locked pages (a locked mmap
        would keep the deleted inodes, so neither RAM nor disk would be freed) and the FUSE
        view's cached tree. Runs in the thread that removed it."""
        if self.locker is not None:
            self.locker.release(removal.digest)
        self.on_evicted(removal.digest)

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
        try:
            model = await self.engine.pull(ref, progress=observe)
        except CacheAgentError:
            self._observe_pull(ref, started, "error")
            raise
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

    def pulls(self) -> list[PullProgress]:
        """The model pulls in flight (``ls`` shows them), newest snapshot of each."""
        return list(self.engine.in_flight.values())

    def find_pull(self, text: str) -> PullProgress | None:
        """The pull in flight that ``text`` names: its manifest digest, a digest prefix of at
        least 12 hex digits, or the reference it was asked for."""
        bare = text.removeprefix("sha256:")
        for snap in self.pulls():
            digest = snap.manifest_digest
            if text in (digest, snap.ref) or (
                len(bare) >= 12 and digest.removeprefix("sha256:").startswith(bare)
            ):
                return snap
        return None

    async def evict(self, text: str, *, force: bool = False) -> tuple[str, int]:
        """Remove a model (``force`` overrides a pin, never a lease); a pull in flight named
        by ``text`` is cancelled instead (its pending record goes with it)."""
        pulling = self.find_pull(text)
        if pulling is not None and await self.engine.cancel(pulling.manifest_digest):
            return pulling.manifest_digest, 0
        model = await self.find(text)
        freed = await asyncio.to_thread(self.store.remove_model, model.digest, force=force)
        return model.digest, freed

    async def set_pinned(self, text: str, pinned: bool) -> Model:
        model = await self.find(text)
        action = self.store.pin if pinned else self.store.unpin
        await asyncio.to_thread(action, model.digest)
        if not pinned and self.locker is not None:
            await asyncio.to_thread(self.locker.release, model.digest)
        return await self.find(model.digest)

    async def reclaim(self, need_bytes: int, *, dry_run: bool) -> tuple[EvictionPlan, int]:
        """On-demand capacity eviction: the store's LRU plan for ``need_bytes`` (never pinned,
        leased or pulling models), carried out unless ``dry_run`` through the store's one
        removal path (``_removed`` drops locks and FUSE trees). Returns the plan and the bytes
        freed (0 for a dry run)."""
        plan = await asyncio.to_thread(self.store.plan_eviction, need_bytes)
        if dry_run or not (plan.models or plan.blobs):
            return plan, 0
        return plan, await asyncio.to_thread(self.store.execute, plan)

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
        """A service exists only over a store that is open and reconciled (and the daemon
        stops the CSI server before it closes the store); it stays ready with its disk full
        (cached models still publish), not once its index or lock file was lost."""
        problem = self.store_problem
        return problem is None or problem.startswith("the disk of")

    async def watch_store(self, interval: float = STORE_CHECK_SECONDS) -> None:
        """Check every ``interval`` seconds whether the store can still write (store.health):
        the answer feeds /readyz and the CSI Probe; a full disk frees the index reserve."""
        while True:
            try:
                self.store_problem = await asyncio.to_thread(self.store.problem)
            except OSError as err:
                self.store_problem = f"cannot check the store: {err}"
            await asyncio.sleep(interval)

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

        deadline = asyncio.get_running_loop().time() + max(wait_seconds, 0)
        for attempt in range(2):
            pull = asyncio.ensure_future(self.pull(ref, keep))
            try:
                left = max(deadline - asyncio.get_running_loop().time(), 0)
                model, _ = await asyncio.wait_for(asyncio.shield(pull), timeout=left)
            except TimeoutError:
                # The pull goes on; the engine dedupes the next call onto the same work.
                pull.add_done_callback(log_background_failure)
                if not latest:
                    return StillPulling()
                snap = latest[0]
                return StillPulling(snap.done_bytes, snap.total_bytes, snap.rate or None)
            broken = await asyncio.to_thread(self.store.check_sizes, model.digest)
            if broken is None or attempt:
                break
            # A truncated or grown blob is never published: repair (in place if a pod uses
            # the model) and fetch it again.
            log.warning("model %s is damaged (%s); repairing it before publishing", ref, broken)
            await asyncio.to_thread(self.store.fsck)
        if broken is not None:
            raise StoreError(f"model {model.digest} is damaged and could not be repaired: {broken}")
        return ReadyModel(model.digest, self.store.model_path(model.digest))

    async def lazy_model_dir(self, ref: ModelRef) -> ReadyModel:
        check_lazy(self.policy, ref)  # before any I/O: lazy serves unverified bytes
        if self.fuse_root is None:
            raise LazyModeUnavailableError(
                "mode: lazy needs the agent's FUSE mount, which is not serving on this node"
            )
        digest = await self.engine.start_background(ref, run=self._pull_model)
        return ReadyModel(digest, self.fuse_root / digest)

    async def _pull_model(self, ref: ModelRef) -> Model:
        """A pull counted like any other (hit or miss, duration), for the lazy mode."""
        model, _ = await self.pull(ref)
        return model

    def add_lease(self, digest: str, holder: str, kind: str) -> None:
        self.store.add_lease(digest, holder, kind)
        self.store.touch(digest)

    def release_lease(self, holder: str) -> None:
        self.store.release_lease(holder)

    async def prefetch(self, digest: str, gpus: Sequence[str]) -> None:
        if self.prefetcher is not None:
            await self.warm(digest, gpus)

    # -- scrub ---------------------------------------------------------------------------------

    async def scrub(self, bytes_per_second: int, *, step_seconds: float = 1.0) -> None:
        """Re-hash the store's blobs forever at about ``bytes_per_second`` (0: never); blobs
        that fail are quarantined and the models using them fetched again."""
        if bytes_per_second <= 0:
            return
        budget = max(int(bytes_per_second * step_seconds), 1)
        while True:
            started = time.monotonic()
            await self.scrub_once(budget)
            spent = time.monotonic() - started
            await asyncio.sleep(max(step_seconds - spent, 0.0))

    async def scrub_once(self, budget_bytes: int) -> list[str]:
        """One scrub step; returns the digests of the models it sent to be fetched again."""
        result, _ = await asyncio.to_thread(self.store.scrub, budget_bytes)
        if self.metrics is not None:
            self.metrics.scrubbed_bytes.inc(result.hashed_bytes)
            self.metrics.scrub_failures.inc(len(result.failed))
        if not result.failed:
            return []
        pending = [
            p
            for digest in await asyncio.to_thread(self.store.model_digests)
            if (p := await asyncio.to_thread(self.store.get_pending, digest)) is not None
            and p.ref is not None
            and set(p.missing) & set(result.failed)
        ]
        for model in pending:
            assert model.ref is not None
            task = asyncio.ensure_future(self.pull(parse_ref(model.ref)))
            task.add_done_callback(log_background_failure)
            self._refetches.add(task)
            task.add_done_callback(self._refetches.discard)
        return [model.digest for model in pending]

    # -- FUSE backend (volumes.LazyBackend) ----------------------------------------------------

    def model_digests(self) -> Sequence[str]:
        return self.store.model_digests()

    def model_files(self, digest: str) -> tuple[Sequence[ModelFile], float]:
        for _ in range(2):  # a pull that completes between the two reads: look again
            model = self.store.get_model(digest)
            if model is not None:
                return model.files, model.created
            pending = self.store.get_pending(digest)
            if pending is not None:
                return pending.files, pending.created
        raise ModelNotFoundError(f"model {digest} is not in the store")

    def model_is_ready(self, digest: str) -> bool:
        return self.store.get_model(digest) is not None

    def touch(self, digest: str) -> None:
        self.store.touch(digest)

    def committed_blob(self, blob: str) -> Path | None:
        return self.store.blob_path(blob) if self.store.has_blob(blob) else None

    def blob_path(self, blob: str) -> Path:
        return self.store.blob_path(blob)

    async def ensure_range(self, blob: str, start: int, end: int) -> Path:
        return await self.engine.ensure_range(blob, start, end)

    async def resume_pull(self, digest: str) -> bool:
        """Resume (once) a pull a previous agent left unfinished; see ``pull/interrupted.py``."""
        return await self.interrupted.resume(digest)

    async def wait_model(self, digest: str) -> None:
        async for _ in self.engine.watch(digest):
            pass
        if await asyncio.to_thread(self.store.get_model, digest) is None:
            failure = self.engine.last_failure(digest)
            if isinstance(failure, CacheAgentError):
                raise failure
            raise SourceError(f"model {digest} did not finish downloading: {failure}")

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
