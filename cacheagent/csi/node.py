"""CSI Node service: publish a model as a read-only bind mount, unpublish it, report on it.

Decisions where the CSI spec leaves room (each one is what kubelet and a pod author expect):

- Every field is bounded first (limits.py, requests.py): INVALID_ARGUMENT names the field and
  the limit, and request strings are echoed escaped and truncated.
- The volume is always mounted ``ro,nosuid,nodev``, whatever ``readonly`` or the access mode says.
  Single-node writer modes are accepted (kubelet asks SINGLE_NODE_WRITER for inline ephemeral
  volumes even with ``readOnly: true``); MULTI_NODE_MULTI_WRITER (a ReadWriteMany PV) promises
  shared writes that a model volume never gives, so it is INVALID_ARGUMENT, like the block access
  type. PV ``mountOptions``: ``noexec`` is honoured, ``ro``/``nosuid``/``nodev`` are given anyway,
  anything else is INVALID_ARGUMENT naming it. ``fs_type`` is ignored.
- SELinux nodes (selinux.py): bind-mode model trees are labelled ``container_ro_file_t``, and
  ``readonly=false`` is INVALID_ARGUMENT asking for ``readOnly: true``; elsewhere it is accepted.
- Target outside the kubelet directory: INVALID_ARGUMENT. A symlink below it: PERMISSION_DENIED.
- A model still downloading in bind mode: UNAVAILABLE within ``publish_wait_seconds`` (and
  always before the request's own deadline), with the progress in the message; the pull goes on
  and kubelet's retry finds it done. Never a second pull, never a hang.
- ``prefetch: "true"``: the publish waits for the page-cache warm-up within the same deadline,
  then returns OK and lets it finish in the background; a failed warm-up is logged, not fatal.
- Unpublish of a busy mount (open files, a cwd inside): FAILED_PRECONDITION, the mount, its
  journal row and its lease stay, so nothing is freed under a running process; kubelet retries.
  Unpublish takes down only our own mount (unpublish.py, ownership.py).
- Idempotency: the same volume on the same target is OK without a second mount; another volume,
  another model or another mode on an occupied target is ALREADY_EXISTS.

Requests for one target are serialised (per-target asyncio locks), but the wait for a download
is made outside any lock: the pods of a static PV shared on a node publish one volume id at
several targets, and their waits run side by side. Every mount, unmount, directory, label and
journal operation runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc

from cacheagent import logs
from cacheagent._proto.csi.v1 import csi_pb2 as pb
from cacheagent._proto.csi.v1 import csi_pb2_grpc as pb_grpc
from cacheagent.mountinfo import mounts_at, read_mountinfo
from cacheagent.store.crashpoints import crashpoint
from cacheagent.volumes import LEASE_KIND, CsiBackend, ReadyModel, StillPulling

from . import requests
from .attributes import VolumeAttributes, parse_volume_context
from .journal import Publish, PublishJournal, ReconcilePlan
from .limits import shown
from .mounts import DIR_PATH_FLAGS, bind_mount_read_only, is_mountpoint
from .restart import forget, reconcile
from .rpc import Context, KeyedLocks, RpcRunner
from .selinux import LabelError, SELinux
from .stats import volume_stats
from .status import CsiFailure, invalid
from .targets import KubeletDir, Target, check_target, make_target_dir, open_parent
from .unpublish import unpublish

log = logging.getLogger(__name__)

_NODE_CAPABILITIES = (
    pb.NodeServiceCapability.RPC.GET_VOLUME_STATS,
    pb.NodeServiceCapability.RPC.VOLUME_CONDITION,
)
PUBLISH_WAIT_SECONDS = 110.0
"""Inside kubelet's 2-minute CSI deadline, so a download that finishes is seen by this call,
not after a retry's backoff gap."""


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    kubelet: KubeletDir
    models_dir: Path | None = None  # the store's model trees: orphaned mounts are adopted from here
    publish_wait_seconds: float = PUBLISH_WAIT_SECONDS
    prefetch_wait_seconds: float = 90.0
    deadline_margin_seconds: float = 2.0
    selinux: SELinux = field(default_factory=lambda: SELinux(enabled=False))

    @property
    def store_dir(self) -> Path:
        """A directory on the store's filesystem (its free space is the volume's ``available``)."""
        return self.models_dir if self.models_dir is not None else Path(self.kubelet.real)


@dataclass(frozen=True)
class Budget:
    """Time left for a request: its gRPC deadline less a margin to answer in, if it has one."""

    deadline: float | None  # time.monotonic() based
    margin: float

    @classmethod
    def of(cls, context: Context, margin: float) -> Budget:
        remaining = context.time_remaining()
        return cls(None if remaining is None else time.monotonic() + remaining, margin)

    def cap(self, seconds: float) -> float:
        if self.deadline is None:
            return seconds
        return max(0.0, min(seconds, self.deadline - time.monotonic() - self.margin))


@dataclass(frozen=True)
class _Publishing:
    """One checked NodePublishVolume request."""

    volume_id: str
    target: Target
    attrs: VolumeAttributes
    extra_flags: int


class NodeService(pb_grpc.NodeServicer):
    def __init__(
        self, config: NodeConfig, backend: CsiBackend, journal: PublishJournal, rpc: RpcRunner
    ) -> None:
        self._config = config
        self._backend = backend
        self._journal = journal
        self._rpc = rpc
        self._locks = KeyedLocks()
        self._background: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def reconcile(self) -> ReconcilePlan:
        """Match the journal with the mounts that exist now; call once before serving."""
        config = self._config
        return await asyncio.to_thread(
            reconcile, self._journal, self._backend, config.kubelet, config.models_dir
        )

    async def aclose(self) -> None:
        """Cancel background prefetches (the daemon is stopping)."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def volume_counts(self) -> dict[str, int]:
        """Published volumes per mode, for the cacheagent_csi_volumes gauge (reads SQLite)."""
        return self._journal.count_by_mode()

    # ------------------------------------------------------------------ simple RPCs

    async def NodeGetInfo(  # noqa: N802 (gRPC method name)
        self, request: pb.NodeGetInfoRequest, context: Context
    ) -> pb.NodeGetInfoResponse:
        async def answer() -> pb.NodeGetInfoResponse:
            return pb.NodeGetInfoResponse(node_id=self._config.node_id)

        return await self._rpc.run("NodeGetInfo", context, answer)

    async def NodeGetCapabilities(  # noqa: N802 (gRPC method name)
        self, request: pb.NodeGetCapabilitiesRequest, context: Context
    ) -> pb.NodeGetCapabilitiesResponse:
        async def answer() -> pb.NodeGetCapabilitiesResponse:
            return pb.NodeGetCapabilitiesResponse(
                capabilities=[
                    pb.NodeServiceCapability(rpc=pb.NodeServiceCapability.RPC(type=t))
                    for t in _NODE_CAPABILITIES
                ]
            )

        return await self._rpc.run("NodeGetCapabilities", context, answer)

    async def NodeStageVolume(  # noqa: N802 (gRPC method name)
        self, request: pb.NodeStageVolumeRequest, context: Context
    ) -> pb.NodeStageVolumeResponse:
        return await self._rpc.run("NodeStageVolume", context, _unimplemented("NodeStageVolume"))

    async def NodeUnstageVolume(  # noqa: N802 (gRPC method name)
        self, request: pb.NodeUnstageVolumeRequest, context: Context
    ) -> pb.NodeUnstageVolumeResponse:
        return await self._rpc.run(
            "NodeUnstageVolume", context, _unimplemented("NodeUnstageVolume")
        )

    async def NodeExpandVolume(  # noqa: N802 (gRPC method name)
        self, request: pb.NodeExpandVolumeRequest, context: Context
    ) -> pb.NodeExpandVolumeResponse:
        return await self._rpc.run("NodeExpandVolume", context, _unimplemented("NodeExpandVolume"))

    # ------------------------------------------------------------------ publish

    async def NodePublishVolume(  # noqa: N802 (gRPC method name)
        self, request: pb.NodePublishVolumeRequest, context: Context
    ) -> pb.NodePublishVolumeResponse:
        async def answer() -> pb.NodePublishVolumeResponse:
            job = self._check_publish(request)
            logs.model_ref.set(job.attrs.ref.canonical)
            self._backend.check_mount_policy(job.attrs.pod.namespace or None, job.attrs.ref)
            budget = Budget.of(context, self._config.deadline_margin_seconds)
            # Shielded: a caller that gives up must not leave a half-made mount or a lock held
            # by a cancelled task; the work is bounded by the budget anyway.
            work = asyncio.ensure_future(self._publish(job, budget))
            work.add_done_callback(_consume_result)
            await asyncio.shield(work)
            return pb.NodePublishVolumeResponse()

        return await self._rpc.run("NodePublishVolume", context, answer)

    def _check_publish(self, request: pb.NodePublishVolumeRequest) -> _Publishing:
        fields = requests.check_publish(request)
        target = check_target(fields.target_path, self._config.kubelet)
        attrs = parse_volume_context(request.volume_context)
        if self._config.selinux.enabled and not request.readonly:
            raise invalid(
                "this node runs SELinux, and a CSI volume that is not readOnly makes the "
                "container runtime relabel it, which fails on a read-only model volume: set "
                "readOnly: true on the pod's csi volume (or on its persistentVolumeClaim)"
            )
        return _Publishing(fields.volume_id, target, attrs, fields.extra_flags)

    async def _publish(self, job: _Publishing, budget: Budget) -> None:
        model = await self._publish_once(job, budget)
        if model is not None and job.attrs.prefetch:
            await self._prefetch(model.digest, job.attrs.gpus, budget)

    async def _publish_once(self, job: _Publishing, budget: Budget) -> ReadyModel | None:
        """Mount unless already mounted; the model mounted, or None for an idempotent repeat.

        The wait for the model holds no lock (pods sharing one volume id wait side by side);
        the check-and-mount holds the target's lock, and checks again after the wait.
        """
        key = f"target:{job.target.path}"
        async with self._locks.hold(key):
            if await self._already_published(job):
                return None
        model = await self._resolve(job.attrs, budget)
        logs.model_digest.set(model.digest)
        async with self._locks.hold(key):
            if await self._already_published(job):
                return None
            row = Publish(
                volume_id=job.volume_id,
                target_path=job.target.path,
                manifest_digest=model.digest,
                ref=job.attrs.ref.canonical,
                mode=job.attrs.mode,
                namespace=job.attrs.pod.namespace,
                pod=job.attrs.pod.name,
                created=time.time(),
            )
            await asyncio.to_thread(self._mount, row, model.path, job)
            crashpoint("publish.after_mount")
            log.info("published %s (%s) at %s", job.attrs.ref, model.digest, job.target.path)
            return model

    async def _already_published(self, job: _Publishing) -> bool:
        target, attrs = job.target, job.attrs
        row = await asyncio.to_thread(self._journal.get, target.path)
        if row is None or row.adopted:
            return False  # an adopted mount is matched by digest once the model is resolved
        if row.volume_id != job.volume_id:
            raise _occupied(target, row)
        if row.ref != attrs.ref.canonical or row.mode != attrs.mode:
            raise CsiFailure(
                grpc.StatusCode.ALREADY_EXISTS,
                f"volume {shown(job.volume_id)} is already published at {target.path} with "
                f"model {row.ref} (mode {row.mode}); unpublish it before publishing {attrs.ref} "
                f"(mode {attrs.mode}) there",
            )
        if await asyncio.to_thread(is_mountpoint, target.path):
            return True
        log.warning("journalled mount at %s is gone; mounting it again", target.path)
        await asyncio.to_thread(forget, self._journal, self._backend, row)
        return False

    async def _resolve(self, attrs: VolumeAttributes, budget: Budget) -> ReadyModel:
        wait = budget.cap(self._config.publish_wait_seconds)
        if attrs.mode == "lazy":
            # Bounded like bind mode: resolving the reference may hang on its origin, and
            # this runs under the volume lock; the pull goes on and kubelet retries.
            try:
                return await asyncio.wait_for(self._backend.lazy_model_dir(attrs.ref), wait)
            except TimeoutError:
                raise CsiFailure(
                    grpc.StatusCode.UNAVAILABLE,
                    f"model {attrs.ref} is still being resolved for lazy mode after "
                    f"{wait:.0f}s; the volume will be published once it is (kubelet retries)",
                ) from None
        try:
            # The backend is asked to return by `wait`; the hard bound guards against a backend
            # that does not (an origin that hangs while resolving a tag, say).
            result = await asyncio.wait_for(
                self._backend.ensure_model(attrs.ref, wait_seconds=wait),
                timeout=wait + self._config.deadline_margin_seconds / 2,
            )
        except TimeoutError:
            result = StillPulling()
        if isinstance(result, StillPulling):
            raise CsiFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"model {attrs.ref} is still downloading: {result.describe()}; "
                "the volume will be published when it is complete (kubelet retries)",
            )
        return result

    def _mount(self, row: Publish, source: Path, job: _Publishing) -> None:
        """Label, journal, lease, then mount (in a worker thread); undo if mounting fails."""
        target = job.target
        with open_parent(target) as parent:
            if parent is None:
                raise CsiFailure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the parent directory of target {target.path} does not exist "
                    "(the CO creates it)",
                )
            make_target_dir(parent, target)
            existing = self._journal.get(target.path)
            if mounts_at(target.path, read_mountinfo()):
                self._claim_adopted(existing, row, target)
                return
            if row.mode == "bind":
                self._label(source)
            if existing is not None:
                forget(self._journal, self._backend, existing)
            self._journal.put(row)
            crashpoint("publish.after_journal")
            self._backend.add_lease(row.manifest_digest, row.holder, LEASE_KIND)
            crashpoint("publish.after_lease")
            try:
                self._bind(source, parent, target, job.extra_flags)
            except BaseException:
                forget(self._journal, self._backend, row)
                raise

    def _label(self, source: Path) -> None:
        try:
            written = self._config.selinux.label_tree(source)
        except LabelError as exc:
            raise CsiFailure(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot label the model for containers on this SELinux node: {exc}",
            ) from exc
        if written:
            log.info("labelled %d entries of %s %s", written, source, self._config.selinux.label)

    def _bind(self, source: Path, parent: int, target: Target, extra_flags: int) -> None:
        try:
            source_fd = os.open(source, DIR_PATH_FLAGS)
        except FileNotFoundError as exc:
            raise CsiFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"model directory {source} disappeared while publishing (evicted?); retry",
            ) from exc
        try:
            bind_mount_read_only(source_fd, parent, target.name, target.path, extra_flags)
        finally:
            os.close(source_fd)

    def _claim_adopted(self, existing: Publish | None, row: Publish, target: Target) -> None:
        """The target is already mounted: fine only if it is an adopted mount of this model."""
        if existing is None or not existing.adopted:
            raise _occupied(target, existing)
        if existing.manifest_digest != row.manifest_digest:
            raise _occupied(target, existing)
        self._journal.put(row)
        self._backend.add_lease(row.manifest_digest, row.holder, LEASE_KIND)
        self._backend.release_lease(existing.holder)

    async def _prefetch(self, digest: str, gpus: Sequence[str], budget: Budget) -> None:
        task = asyncio.ensure_future(self._backend.prefetch(digest, gpus))
        self._background.add(task)
        task.add_done_callback(self._prefetch_done)
        wait = budget.cap(self._config.prefetch_wait_seconds)
        done, _ = await asyncio.wait({task}, timeout=wait)
        if not done:
            log.info("prefetch of %s continues in the background after %.1f s", digest, wait)

    def _prefetch_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("prefetch failed (the volume is published anyway): %s", task.exception())

    # ------------------------------------------------------------------ unpublish

    async def NodeUnpublishVolume(  # noqa: N802 (gRPC method name)
        self, request: pb.NodeUnpublishVolumeRequest, context: Context
    ) -> pb.NodeUnpublishVolumeResponse:
        async def answer() -> pb.NodeUnpublishVolumeResponse:
            volume_id = requests.volume_id(request.volume_id)
            path = requests.path(request.target_path, "target_path")
            target = check_target(path, self._config.kubelet)
            async with self._locks.hold(f"target:{target.path}"):
                await asyncio.to_thread(
                    unpublish,
                    self._journal,
                    self._backend,
                    self._config.models_dir,
                    volume_id,
                    target,
                )
            return pb.NodeUnpublishVolumeResponse()

        return await self._rpc.run("NodeUnpublishVolume", context, answer)

    # ------------------------------------------------------------------ stats

    async def NodeGetVolumeStats(  # noqa: N802 (gRPC method name)
        self, request: pb.NodeGetVolumeStatsRequest, context: Context
    ) -> pb.NodeGetVolumeStatsResponse:
        async def answer() -> pb.NodeGetVolumeStatsResponse:
            volume_id = requests.volume_id(request.volume_id)
            path = requests.required(request.volume_path, "volume_path")
            # The volume id first: an unknown volume is NOT_FOUND whatever the path says
            # (conformance suites send odd paths for unknown volumes).
            if not await asyncio.to_thread(self._known_volume, volume_id):
                raise CsiFailure(
                    grpc.StatusCode.NOT_FOUND,
                    f"volume {shown(volume_id)} is not published on this node",
                )
            target = check_target(requests.path(path, "volume_path"), self._config.kubelet)
            row = await asyncio.to_thread(self._journal.get, target.path)
            if row is None or (row.volume_id != volume_id and not row.adopted):
                raise CsiFailure(
                    grpc.StatusCode.NOT_FOUND,
                    f"volume {shown(volume_id)} is not published at {shown(path)}",
                )
            return await asyncio.to_thread(self._stats, row)

        return await self._rpc.run("NodeGetVolumeStats", context, answer)

    def _known_volume(self, volume_id: str) -> bool:
        """Journaled under this id, or possibly an adopted mount (whose id was lost)."""
        return bool(self._journal.for_volume(volume_id) or self._journal.for_volume(""))

    def _stats(self, row: Publish) -> pb.NodeGetVolumeStatsResponse:
        model = self._backend.model_stats(row.manifest_digest)
        return volume_stats(row, model, self._config.store_dir)


def _occupied(target: Target, row: Publish | None) -> CsiFailure:
    holder = (
        f"volume {shown(row.volume_id) if row.volume_id else '(adopted)'} with model "
        f"{row.ref or row.manifest_digest}"
        if row is not None
        else "a mount not made by this driver"
    )
    return CsiFailure(
        grpc.StatusCode.ALREADY_EXISTS, f"target {target.path} is already in use by {holder}"
    )


def _unimplemented(method: str) -> Callable[[], Awaitable[NoReturn]]:
    async def refuse() -> NoReturn:
        raise CsiFailure(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method} is not implemented: this driver publishes volumes directly "
            "(no STAGE_UNSTAGE_VOLUME or EXPAND_VOLUME capability)",
        )

    return refuse


def _consume_result(task: asyncio.Future[None]) -> None:
    """Mark a shielded task's outcome as seen; its awaiting caller, if any, reports it."""
    if not task.cancelled():
        task.exception()
