"""The agent API (proto/cacheagent/v1/agent.proto) over grpc.aio: a thin translation layer.

Each handler turns a request into a ModelService call and the result into a message; errors map
to status codes a client can act on (see ``grpc_code``). Every call is counted by method and
code in ``cacheagent_api_requests_total``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc

from cacheagent import __version__
from cacheagent._proto.cacheagent.v1 import agent_pb2 as pb
from cacheagent._proto.cacheagent.v1 import agent_pb2_grpc as pb_grpc
from cacheagent.logs import request_context
from cacheagent.memory.gpu import GpuInventory
from cacheagent.memory.prefetch import MemoryLockError
from cacheagent.pull.progress import PullProgress
from cacheagent.reclaim import ReclaimTarget, ReclaimTargetError, need_for
from cacheagent.service import ModelService, PreheatUpdate
from cacheagent.status_codes import ErrorCodes, grpc_code
from cacheagent.store import Lease, Model

log = logging.getLogger(__name__)

T = TypeVar("T")
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

# Errors of the API's own engines, before the agent-wide table.
_API_CODES: ErrorCodes = (
    (MemoryLockError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ReclaimTargetError, grpc.StatusCode.INVALID_ARGUMENT),
)

_PHASES: dict[str, pb.PreheatEvent.Phase.ValueType] = {
    "resolving": pb.PreheatEvent.RESOLVING,
    "downloading": pb.PreheatEvent.DOWNLOADING,
    "unpacking": pb.PreheatEvent.MATERIALIZING,
    "committing": pb.PreheatEvent.MATERIALIZING,
    "warming": pb.PreheatEvent.WARMING,
    "done": pb.PreheatEvent.DONE,
    "failed": pb.PreheatEvent.FAILED,
}


def pulling_info(snap: PullProgress) -> pb.ModelInfo:
    """A model still being pulled, as ``ls`` and ``stat`` show it."""
    return pb.ModelInfo(
        manifest_digest=snap.manifest_digest,
        ref=snap.ref,
        size_bytes=snap.total_bytes,
        state="pulling",
        done_bytes=snap.done_bytes,
        bytes_per_second=snap.rate,
    )


def model_info(
    model: Model,
    *,
    path: str = "",
    state: str = "ready",
    resident: int = 0,
    leases: list[pb.Lease] | None = None,
) -> pb.ModelInfo:
    return pb.ModelInfo(
        manifest_digest=model.digest,
        ref=model.ref or "",
        refs=list(model.refs),
        size_bytes=model.size,
        files=[pb.ModelFile(path=f.path, size=f.size, blob=f.blob) for f in model.files],
        state=state,
        pinned=model.pinned,
        leases=leases or [],
        last_used_unix=model.last_used,
        created_unix=model.created,
        resident_bytes=resident,
        source_kind=model.source_kind,
        path=path,
    )


def pull_info(progress: PullProgress) -> pb.PullInfo:
    info = pb.PullInfo(
        ref=progress.ref,
        manifest_digest=progress.manifest_digest,
        bytes_done=progress.done_bytes,
        bytes_total=progress.total_bytes,
        bytes_per_second=progress.rate,
        state=progress.state,
    )
    if progress.eta_seconds is not None:
        info.eta_seconds = progress.eta_seconds
    return info


def reclaim_target(request: pb.ReclaimRequest) -> ReclaimTarget:
    kind = request.WhichOneof("target")
    if kind == "to_used_bytes":
        return ReclaimTarget("to_bytes", request.to_used_bytes)
    if kind == "to_capacity_fraction":
        return ReclaimTarget("to_fraction", request.to_capacity_fraction)
    if kind == "free_bytes":
        return ReclaimTarget("free", request.free_bytes)
    return ReclaimTarget("watermarks")


def reclaimed(model: Model, reason: str) -> pb.ReclaimedModel:
    return pb.ReclaimedModel(
        manifest_digest=model.digest,
        ref=model.ref or "",
        size_bytes=model.size,
        last_used_unix=model.last_used,
        reason=reason,
    )


_LEASE_REASONS = {"csi": "in use by a volume", "fuse": "open through FUSE", "pull": "being pulled"}


def kept_models(models: Iterable[Model], leases: Iterable[Lease]) -> list[tuple[Model, str]]:
    """Models eviction may not touch, with why (the store's rules: pins and leases)."""
    held: dict[str, set[str]] = {}
    for lease in leases:
        held.setdefault(lease.manifest_digest, set()).add(lease.kind)
    kept = []
    for model in models:
        reasons = ["pinned"] if model.pinned else []
        reasons += [_LEASE_REASONS.get(k, k) for k in sorted(held.get(model.digest, ()))]
        if reasons:
            kept.append((model, ", ".join(reasons)))
    return kept


def _model_blobs(blobs: Sequence[str], evicted: Sequence[str], models: dict[str, Model]) -> int:
    """How many of a plan's blobs belong to the models it evicts (the rest are orphans)."""
    owned = {f.blob for d in evicted if d in models for f in models[d].files}
    return sum(1 for blob in blobs if blob in owned)


def _refs_for_log(refs: Sequence[str], shown: int = 3) -> str:
    """The first few references, for the request's log context (not hundreds of them)."""
    text = ",".join(refs[:shown])
    return text if len(refs) <= shown else f"{text},... ({len(refs)} refs)"


def preheat_event(update: PreheatUpdate) -> pb.PreheatEvent:
    event = pb.PreheatEvent(
        ref=update.ref, phase=_PHASES.get(update.phase, pb.PreheatEvent.PHASE_UNSPECIFIED)
    )
    snap: PullProgress | None = update.progress
    if snap is not None:
        event.phase = _PHASES.get(snap.state, pb.PreheatEvent.DOWNLOADING)
        event.manifest_digest = snap.manifest_digest
        event.bytes_done = snap.done_bytes
        event.bytes_total = snap.total_bytes
        event.bytes_per_second = snap.rate
        event.eta_seconds = snap.eta_seconds or 0.0
        event.waiting = snap.waiting
        event.blobs.extend(
            pb.BlobProgress(digest=b.digest, bytes_done=b.done_bytes, bytes_total=b.total_bytes)
            for b in snap.blobs
        )
    if update.model is not None:
        event.manifest_digest = update.model.digest
        event.bytes_total = event.bytes_done = update.model.size
        event.cache_hit = update.cache_hit
    if update.warmed is not None:
        event.bytes_warmed = update.warmed.bytes_warmed
    if update.error is not None:
        event.error_code = grpc_code(update.error, _API_CODES).name
        event.error = str(update.error)
    return event


@dataclass(frozen=True)
class ApiLimits:
    """Bounds on what API callers can make the agent do at once.

    The agent's worker threads are shared with the CSI driver, so API work is metered: at most
    ``work_slots`` unary calls touch the store at a time (others wait their turn), a Preheat
    names at most ``preheat_max_refs`` references (INVALID_ARGUMENT beyond), at most
    ``preheat_max_concurrent`` Preheats run at once (RESOURCE_EXHAUSTED beyond, nothing is
    queued), and all of them together pull at most ``preheat_parallel_refs`` references at a
    time.
    """

    preheat_max_refs: int = 256
    preheat_max_concurrent: int = 4
    preheat_parallel_refs: int = 2
    work_slots: int = 4


class AgentService(pb_grpc.AgentServicer):
    def __init__(
        self,
        service: ModelService,
        *,
        gpus: GpuInventory | None = None,
        node_id: str = "",
        limits: ApiLimits | None = None,
    ) -> None:
        self.service = service
        self.gpus = gpus
        self.node_id = node_id
        self.limits = limits or ApiLimits()
        self.started = time.monotonic()
        self._work = asyncio.Semaphore(self.limits.work_slots)
        self._preheats = 0
        self._preheat_slots = asyncio.Semaphore(self.limits.preheat_parallel_refs)

    async def _call(self, method: str, context: Context, work: Callable[[], Awaitable[T]]) -> T:
        code = grpc.StatusCode.OK
        with request_context():
            try:
                async with self._work:
                    return await work()
            except Exception as err:
                code = grpc_code(err, _API_CODES)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", method)
                await context.abort(code, str(err))
                raise AssertionError("abort() raises") from err
            finally:
                self._count(method, code)

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        if self.service.metrics is not None:
            self.service.metrics.api_requests.labels(method, code.name).inc()

    async def Preheat(  # noqa: N802 - gRPC method names
        self, request: pb.PreheatRequest, context: Context
    ) -> AsyncIterator[pb.PreheatEvent]:
        refused = self._refuse_preheat(len(request.refs))
        if refused is not None:
            self._count("Preheat", refused[0])
            await context.abort(*refused)
        # Per-model failures travel in the stream (FAILED events); the call itself succeeds.
        self._preheats += 1
        try:
            with request_context(ref=_refs_for_log(request.refs)):
                async for update in self.service.preheat(
                    list(request.refs),
                    warm_memory=request.warm_memory,
                    gpus=list(request.gpus),
                    lock_memory=request.lock_memory,
                    slots=self._preheat_slots,
                ):
                    yield preheat_event(update)
        finally:
            self._preheats -= 1
        self._count("Preheat", grpc.StatusCode.OK)

    def _refuse_preheat(self, refs: int) -> tuple[grpc.StatusCode, str] | None:
        limits = self.limits
        if refs == 0:
            return grpc.StatusCode.INVALID_ARGUMENT, "preheat needs at least one ref"
        if refs > limits.preheat_max_refs:
            return grpc.StatusCode.INVALID_ARGUMENT, (
                f"preheat names {refs} references; at most {limits.preheat_max_refs} per call "
                "(agent.preheat_max_refs): split the list into several calls"
            )
        if self._preheats >= limits.preheat_max_concurrent:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"{self._preheats} preheats are running already, the most this agent allows "
                "(agent.preheat_max_concurrent); retry when one has finished"
            )
        return None

    async def Stat(  # noqa: N802
        self, request: pb.StatRequest, context: Context
    ) -> pb.ModelInfo:
        return await self._call("Stat", context, lambda: self._stat(request.model))

    async def _stat(self, text: str) -> pb.ModelInfo:
        service = self.service
        pulling = service.find_pull(text)
        if pulling is not None:
            return pulling_info(pulling)
        model = await service.find(text)
        leases = await asyncio.to_thread(service.store.leases, model.digest)
        resident = await service.residency(model)
        return model_info(
            model,
            path=str(service.store.model_path(model.digest)),
            resident=resident.bytes_resident,
            leases=[pb.Lease(holder=x.holder, kind=x.kind, created_unix=x.created) for x in leases],
        )

    async def List(  # noqa: N802
        self, request: pb.ListRequest, context: Context
    ) -> pb.ListResponse:
        async def work() -> pb.ListResponse:
            models = await self.service.list_models()
            infos = []
            for model in models:
                resident = await self.service.residency(model)
                infos.append(model_info(model, resident=resident.bytes_resident))
            ready = {m.digest for m in models}
            infos += [
                pulling_info(p) for p in self.service.pulls() if p.manifest_digest not in ready
            ]
            return pb.ListResponse(models=infos)

        return await self._call("List", context, work)

    async def Evict(  # noqa: N802
        self, request: pb.EvictRequest, context: Context
    ) -> pb.EvictResponse:
        async def work() -> pb.EvictResponse:
            digest, freed = await self.service.evict(request.model, force=request.force)
            return pb.EvictResponse(manifest_digest=digest, bytes_freed=freed)

        return await self._call("Evict", context, work)

    async def Pin(  # noqa: N802
        self, request: pb.PinRequest, context: Context
    ) -> pb.ModelInfo:
        async def work() -> pb.ModelInfo:
            return model_info(await self.service.set_pinned(request.model, True))

        return await self._call("Pin", context, work)

    async def Unpin(  # noqa: N802
        self, request: pb.PinRequest, context: Context
    ) -> pb.ModelInfo:
        async def work() -> pb.ModelInfo:
            return model_info(await self.service.set_pinned(request.model, False))

        return await self._call("Unpin", context, work)

    async def Status(  # noqa: N802
        self, request: pb.StatusRequest, context: Context
    ) -> pb.StatusResponse:
        return await self._call("Status", context, lambda: self._status(request.memory))

    async def _status(self, memory: bool) -> pb.StatusResponse:
        store = self.service.store
        usage = await asyncio.to_thread(store.usage)
        response = pb.StatusResponse(
            version=__version__,
            store_root=str(store.root),
            capacity_bytes=usage.capacity or 0,
            used_bytes=usage.used,
            models=usage.models,
            blobs=usage.blobs,
            pulls=[pull_info(p) for p in self.service.engine.in_flight.values()],
            node_id=self.node_id,
            uptime_seconds=time.monotonic() - self.started,
        )
        locker = self.service.locker
        if locker is not None:
            response.memory_locked_bytes = locker.locked_bytes
            if locker.limit_bytes is not None:
                response.memory_lock_limit_bytes = locker.limit_bytes
        if memory:
            await self._add_memory(response, locker.locked() if locker is not None else {})
        if self.gpus is not None:
            snap = await asyncio.to_thread(self.gpus.snapshot)
            response.nvml_up = snap.up
            response.nvml_reason = snap.reason or ""
            for gpu in snap.gpus:
                response.gpus.append(
                    pb.GpuInfo(
                        index=gpu.index,
                        uuid=gpu.uuid or "",
                        name=gpu.name or "",
                        memory_total_bytes=gpu.memory_total_bytes or 0,
                        memory_used_bytes=gpu.memory_used_bytes or 0,
                        numa_node=-1 if gpu.numa_node is None else gpu.numa_node,
                        utilization_gpu_percent=gpu.utilization_gpu_percent,
                        utilization_memory_percent=gpu.utilization_memory_percent,
                        temperature_celsius=gpu.temperature_celsius,
                        power_watts=gpu.power_watts,
                    )
                )
        return response

    async def _add_memory(self, response: pb.StatusResponse, locked: dict[str, int]) -> None:
        for model in await self.service.list_models():
            resident = (await self.service.residency(model)).bytes_resident
            response.memory_resident_bytes += resident
            if resident or locked.get(model.digest):
                response.memory.append(
                    pb.ModelMemory(
                        manifest_digest=model.digest,
                        ref=model.ref or "",
                        size_bytes=model.size,
                        resident_bytes=resident,
                        locked_bytes=locked.get(model.digest, 0),
                    )
                )

    async def Reclaim(  # noqa: N802
        self, request: pb.ReclaimRequest, context: Context
    ) -> pb.ReclaimResponse:
        return await self._call("Reclaim", context, lambda: self._reclaim(request))

    async def _reclaim(self, request: pb.ReclaimRequest) -> pb.ReclaimResponse:
        store = self.service.store
        usage = await asyncio.to_thread(store.usage)
        need = need_for(
            reclaim_target(request),
            used=usage.used,
            capacity=usage.capacity,
            high=usage.high_watermark,
            low=usage.low_watermark,
        )
        models = {m.digest: m for m in await self.service.list_models()}
        leases = await asyncio.to_thread(store.leases)
        plan, freed = await self.service.reclaim(need.bytes, dry_run=request.dry_run)
        return pb.ReclaimResponse(
            dry_run=request.dry_run,
            capacity_bytes=usage.capacity or 0,
            used_bytes=usage.used,
            high_watermark=usage.high_watermark,
            low_watermark=usage.low_watermark,
            need_bytes=need.bytes,
            reason=need.reason,
            bytes_freed=plan.bytes_freed if request.dry_run else freed,
            satisfied=plan.satisfied,
            models=[
                reclaimed(models[d], f"least recently used, #{n} in eviction order")
                for n, d in enumerate(plan.models, start=1)
                if d in models
            ],
            orphan_blobs=len(plan.blobs) - _model_blobs(plan.blobs, plan.models, models),
            kept=[reclaimed(m, why) for m, why in kept_models(models.values(), leases)],
        )
