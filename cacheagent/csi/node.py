"""CSI Node service: publish a model as a read-only bind mount, unpublish it, report on it.

Decisions where the CSI spec leaves room (each one is what kubelet and a pod author expect):

- The volume is always mounted ``ro,nosuid,nodev``, whatever ``readonly`` or the access mode says.
  Single-node writer modes are accepted (kubelet asks SINGLE_NODE_WRITER for inline ephemeral
  volumes even with ``readOnly: true``); MULTI_NODE_MULTI_WRITER (a ReadWriteMany PV) promises
  shared writes that a model volume never gives, so it is INVALID_ARGUMENT, like the block access
  type. ``mount_flags``, ``fs_type`` and ``volume_mount_group`` are ignored.
- Target outside the kubelet directory: INVALID_ARGUMENT. A symlink below it: PERMISSION_DENIED.
- A model still downloading in bind mode: UNAVAILABLE within ``publish_wait_seconds`` (and
  always before the request's own deadline), with the progress in the message; the pull goes on
  and kubelet's retry finds it done. Never a second pull, never a hang.
- ``prefetch: "true"``: the publish waits for the page-cache warm-up within the same deadline,
  then returns OK and lets it finish in the background; a failed warm-up is logged, not fatal.
- Unpublish of a busy mount (open files, a cwd inside): FAILED_PRECONDITION, the mount, its
  journal row and its lease stay, so nothing is freed under a running process; kubelet retries.
- Idempotency: the same volume on the same target is OK without a second mount; another volume,
  another model or another mode on an occupied target is ALREADY_EXISTS.

Requests for one volume, and for one target, are serialised (per-key asyncio locks). Every mount,
unmount, directory and journal operation runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc

from cacheagent import logs
from cacheagent._proto.csi.v1 import csi_pb2 as pb
from cacheagent._proto.csi.v1 import csi_pb2_grpc as pb_grpc
from cacheagent.mountinfo import MountInfo, mounts_at, read_mountinfo
from cacheagent.store.crashpoints import crashpoint
from cacheagent.volumes import LEASE_KIND, CsiBackend, ReadyModel, StillPulling

from .attributes import VolumeAttributes, parse_volume_context
from .journal import Publish, PublishJournal, ReconcilePlan, plan_reconcile
from .mounts import (
    DIR_PATH_FLAGS,
    MountError,
    bind_mount_read_only,
    fs_location,
    is_mountpoint,
    remount_read_only,
    unmount_all,
)
from .rpc import Context, KeyedLocks, RpcRunner
from .status import CsiFailure, invalid
from .targets import (
    KubeletDir,
    Target,
    check_target,
    leaf_kind,
    make_target_dir,
    open_parent,
    remove_target_dir,
)

log = logging.getLogger(__name__)

_Mode = pb.VolumeCapability.AccessMode.Mode
_REFUSED_ACCESS_MODES = {
    _Mode.MULTI_NODE_MULTI_WRITER: "MULTI_NODE_MULTI_WRITER (ReadWriteMany)",
}
_NODE_CAPABILITIES = (
    pb.NodeServiceCapability.RPC.GET_VOLUME_STATS,
    pb.NodeServiceCapability.RPC.VOLUME_CONDITION,
)


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    kubelet: KubeletDir
    models_dir: Path | None = None  # the store's model trees: orphaned mounts are adopted from here
    publish_wait_seconds: float = 20.0
    prefetch_wait_seconds: float = 90.0
    deadline_margin_seconds: float = 2.0


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


def _required(value: str, field: str) -> str:
    if not value:
        raise invalid(f"{field} is required")
    return value


def check_capability(request: pb.NodePublishVolumeRequest) -> None:
    if not request.HasField("volume_capability"):
        raise invalid("volume_capability is required")
    capability = request.volume_capability
    access = capability.WhichOneof("access_type")
    if access == "block":
        raise invalid(
            "block access type is not supported: a model volume is a read-only directory "
            "(use a filesystem volume: volumeMode Filesystem)"
        )
    if access != "mount":
        raise invalid("volume_capability.mount is required (the only supported access type)")
    mode = capability.access_mode.mode
    if mode == _Mode.UNKNOWN:
        raise invalid("volume_capability.access_mode.mode is required")
    if mode in _REFUSED_ACCESS_MODES:
        raise invalid(
            f"access mode {_REFUSED_ACCESS_MODES[mode]} is not supported: model volumes are "
            "read-only (use ReadOnlyMany or an inline volume with readOnly: true)"
        )


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
        return await asyncio.to_thread(self._reconcile)

    def _reconcile(self) -> ReconcilePlan:
        mounts = read_mountinfo()
        models = self._config.models_dir
        location = None
        if models is not None and models.is_dir():
            location = fs_location(os.path.realpath(models), mounts)
        plan = plan_reconcile(
            self._journal.all(),
            mounts,
            kubelet_dir=self._config.kubelet.real,
            models_location=location,
        )
        for row in plan.keep:
            self._make_read_only(row, mounts)
            self._backend.add_lease(row.manifest_digest, row.holder, LEASE_KIND)
        for row in plan.drop:
            self._forget(row)
        for row in plan.adopt:
            self._journal.put(row)
            self._backend.add_lease(row.manifest_digest, row.holder, LEASE_KIND)
        log.info(
            "CSI journal reconciled: %d mounts kept, %d stale rows dropped, %d mounts adopted",
            len(plan.keep),
            len(plan.drop),
            len(plan.adopt),
        )
        return plan

    def _make_read_only(self, row: Publish, mounts: Sequence[MountInfo]) -> None:
        """A crash between a publish's bind mount and its read-only remount leaves the mount
        writable, and an idempotent retry would accept it: finish the remount now."""
        if all(m.read_only for m in mounts_at(row.target_path, mounts)):
            return
        log.warning(
            "mount at %s is writable (a publish was cut short); remounting read-only",
            row.target_path,
        )
        try:
            target = check_target(row.target_path, self._config.kubelet)
            with open_parent(target, self._config.kubelet) as parent:
                if parent is not None:
                    remount_read_only(parent, target.name, target.path)
        except (CsiFailure, OSError, MountError) as exc:
            log.error("could not make %s read-only: %s", row.target_path, exc)

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
            volume_id = _required(request.volume_id, "volume_id")
            target = check_target(
                _required(request.target_path, "target_path"), self._config.kubelet
            )
            check_capability(request)
            attrs = parse_volume_context(request.volume_context)
            logs.model_ref.set(attrs.ref.canonical)
            self._backend.check_mount_policy(attrs.pod.namespace or None, attrs.ref)
            budget = Budget.of(context, self._config.deadline_margin_seconds)
            # Shielded: a caller that gives up must not leave a half-made mount or a lock held
            # by a cancelled task; the work is bounded by the budget anyway.
            work = asyncio.ensure_future(self._publish(volume_id, target, attrs, budget))
            work.add_done_callback(_consume_result)
            await asyncio.shield(work)
            return pb.NodePublishVolumeResponse()

        return await self._rpc.run("NodePublishVolume", context, answer)

    async def _publish(
        self, volume_id: str, target: Target, attrs: VolumeAttributes, budget: Budget
    ) -> None:
        model = await self._publish_serialised(volume_id, target, attrs, budget)
        if model is not None and attrs.prefetch:
            await self._prefetch(model.digest, attrs.gpus, budget)

    async def _publish_serialised(
        self, volume_id: str, target: Target, attrs: VolumeAttributes, budget: Budget
    ) -> ReadyModel | None:
        """Mount unless already mounted; the model mounted, or None for an idempotent repeat."""
        async with (
            self._locks.hold(f"volume:{volume_id}"),
            self._locks.hold(f"target:{target.path}"),
        ):
            if await self._already_published(volume_id, target, attrs):
                return None
            model = await self._resolve(attrs, budget)
            logs.model_digest.set(model.digest)
            row = Publish(
                volume_id=volume_id,
                target_path=target.path,
                manifest_digest=model.digest,
                ref=attrs.ref.canonical,
                mode=attrs.mode,
                namespace=attrs.pod.namespace,
                pod=attrs.pod.name,
                created=time.time(),
            )
            await asyncio.to_thread(self._mount, row, model.path, target)
            crashpoint("publish.after_mount")
            log.info("published %s (%s) at %s", attrs.ref, model.digest, target.path)
            return model

    async def _already_published(
        self, volume_id: str, target: Target, attrs: VolumeAttributes
    ) -> bool:
        row = await asyncio.to_thread(self._journal.get, target.path)
        if row is None or row.adopted:
            return False  # an adopted mount is matched by digest once the model is resolved
        if row.volume_id != volume_id:
            raise _occupied(target, row)
        if row.ref != attrs.ref.canonical or row.mode != attrs.mode:
            raise CsiFailure(
                grpc.StatusCode.ALREADY_EXISTS,
                f"volume {volume_id} is already published at {target.path} with model "
                f"{row.ref} (mode {row.mode}); unpublish it before publishing {attrs.ref} "
                f"(mode {attrs.mode}) there",
            )
        if await asyncio.to_thread(is_mountpoint, target.path):
            return True
        log.warning("journalled mount at %s is gone; mounting it again", target.path)
        await asyncio.to_thread(self._forget, row)
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

    def _mount(self, row: Publish, source: Path, target: Target) -> None:
        """Journal, lease, then mount (in a worker thread); undo the first two if mounting fails."""
        with open_parent(target, self._config.kubelet) as parent:
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
            if existing is not None:
                self._forget(existing)
            self._journal.put(row)
            crashpoint("publish.after_journal")
            self._backend.add_lease(row.manifest_digest, row.holder, LEASE_KIND)
            crashpoint("publish.after_lease")
            try:
                self._bind(source, parent, target)
            except BaseException:
                self._forget(row)
                raise

    def _bind(self, source: Path, parent: int, target: Target) -> None:
        try:
            source_fd = os.open(source, DIR_PATH_FLAGS)
        except FileNotFoundError as exc:
            raise CsiFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"model directory {source} disappeared while publishing (evicted?); retry",
            ) from exc
        try:
            bind_mount_read_only(source_fd, parent, target.name, target.path)
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

    def _forget(self, row: Publish) -> None:
        self._backend.release_lease(row.holder)
        crashpoint("journal.after_release")
        self._journal.remove(row.target_path)

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
            volume_id = _required(request.volume_id, "volume_id")
            target = check_target(
                _required(request.target_path, "target_path"), self._config.kubelet
            )
            async with (
                self._locks.hold(f"volume:{volume_id}"),
                self._locks.hold(f"target:{target.path}"),
            ):
                await asyncio.to_thread(self._unpublish, volume_id, target)
            return pb.NodeUnpublishVolumeResponse()

        return await self._rpc.run("NodeUnpublishVolume", context, answer)

    def _unpublish(self, volume_id: str, target: Target) -> None:
        row = self._journal.get(target.path)
        if row is not None and not row.adopted and row.volume_id != volume_id:
            log.warning(
                "unpublish of volume %s at %s: the target holds volume %s; left alone",
                volume_id,
                target.path,
                row.volume_id,
            )
            return
        with open_parent(target, self._config.kubelet) as parent:
            if parent is not None and leaf_kind(parent, target) == "dir":
                count = unmount_all(target.path)  # MountBusyError: row and lease stay
                crashpoint("unpublish.after_unmount")
                remove_target_dir(parent, target)
                crashpoint("unpublish.after_rmdir")
                log.info("unpublished volume %s from %s (%d mounts)", volume_id, target.path, count)
        if row is not None:
            self._forget(row)

    # ------------------------------------------------------------------ stats

    async def NodeGetVolumeStats(  # noqa: N802 (gRPC method name)
        self, request: pb.NodeGetVolumeStatsRequest, context: Context
    ) -> pb.NodeGetVolumeStatsResponse:
        async def answer() -> pb.NodeGetVolumeStatsResponse:
            volume_id = _required(request.volume_id, "volume_id")
            path = _required(request.volume_path, "volume_path")
            target = check_target(path, self._config.kubelet, "volume_path")
            row = await asyncio.to_thread(self._journal.get, target.path)
            if row is None or (row.volume_id != volume_id and not row.adopted):
                raise CsiFailure(
                    grpc.StatusCode.NOT_FOUND,
                    f"volume {volume_id} is not published at {path}",
                )
            return await asyncio.to_thread(self._stats, row)

        return await self._rpc.run("NodeGetVolumeStats", context, answer)

    def _stats(self, row: Publish) -> pb.NodeGetVolumeStatsResponse:
        stats = self._backend.model_stats(row.manifest_digest)
        problems = [] if stats.healthy else [stats.message or "model files are missing or damaged"]
        if not is_mountpoint(row.target_path):
            problems.append(f"the read-only mount at {row.target_path} is gone")
        else:
            try:
                Path(row.target_path).stat()
            except OSError as exc:  # a lazy volume whose FUSE server died: ENOTCONN
                problems.append(f"the mount at {row.target_path} does not answer: {exc.strerror}")
        usage = pb.VolumeUsage
        return pb.NodeGetVolumeStatsResponse(
            usage=[
                usage(unit=usage.BYTES, total=stats.bytes, used=stats.bytes, available=0),
                usage(unit=usage.INODES, total=stats.inodes, used=stats.inodes, available=0),
            ],
            volume_condition=pb.VolumeCondition(
                abnormal=bool(problems),
                message="; ".join(problems) or f"model {row.manifest_digest} is complete",
            ),
        )


def _occupied(target: Target, row: Publish | None) -> CsiFailure:
    holder = (
        f"volume {row.volume_id or '(adopted)'} with model {row.ref or row.manifest_digest}"
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
