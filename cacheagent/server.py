"""The daemon: the one place where the agent's parts are built, started and stopped.

Start order: HTTP (/metrics, /healthz, /readyz) → store (lock + reconcile) → origins and pull
engine → model service → FUSE mount → agent API socket → CSI socket. HTTP comes first so that
/healthz answers during a long start-up reconcile (kubelet's probes must not kill it) while
/readyz says what is still missing. Shutdown runs the same list
backwards, each step bounded in time: readiness goes false first, the sockets stop taking calls,
pulls in flight are cancelled at a consistent point (their partial files and ranges records stay
for the next start to resume), the FUSE mount is unmounted, and the store is closed last.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from cacheagent import __version__
from cacheagent._proto.csi.v1 import csi_pb2, csi_pb2_grpc
from cacheagent.api import AgentService, ApiLimits
from cacheagent.api_server import TcpTls, start_agent_api
from cacheagent.config import Config
from cacheagent.csi.server import CsiServer, resolve_node_id, start_csi_server
from cacheagent.errors import ConfigError
from cacheagent.fuse.handover import HandedOverMount
from cacheagent.fuse.keeper_client import KeeperLink
from cacheagent.fuse.mount import FuseMount, MountOptions
from cacheagent.fuse.stats import FuseStats
from cacheagent.fuse.store_provider import StoreProvider
from cacheagent.fuse.waits import OriginWaits, origin_wait_limit
from cacheagent.http_listener import (
    Coalesced,
    Handler,
    HttpListener,
    Response,
    ThreadedListener,
)
from cacheagent.logs import setup_logging
from cacheagent.memory.gpu import GpuInfo, GpuInventory
from cacheagent.memory.pagecache import residency
from cacheagent.memory.prefetch import MemoryLocker, prefetcher_from_config
from cacheagent.metrics import GpuFigures, Metrics, ModelFigures, Snapshot, StoreFigures
from cacheagent.peers.fleet import Fleet
from cacheagent.pull.engine import PullEngine, SourceRegistry
from cacheagent.pull.tuning import tuning_from_config
from cacheagent.service import ModelService
from cacheagent.sockets import prepare_socket, resolve_gid
from cacheagent.sources.factory import Origins, build_sources
from cacheagent.store import Store

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 5.0
SNAPSHOT_INTERVAL_SECONDS = 10.0
WORKER_THREADS = 32
CSI_PROBE_TIMEOUT_SECONDS = 3.0


@dataclass
class Health:
    """What /readyz reports: each part says whether it is serving."""

    store: bool = False
    api: bool = False
    csi: bool = False
    fuse: FuseMount | None = None
    fuse_required: bool = False
    stopping: bool = False
    csi_socket: Path | None = None
    store_problem: Callable[[], str | None] = lambda: None

    def check(self) -> list[str]:
        problems = []
        if self.stopping:
            problems.append("shutting down")
        if not self.store:
            problems.append("store not open")
        elif (store_problem := self.store_problem()) is not None:
            problems.append(store_problem)
        if not self.api:
            problems.append("agent API socket not serving")
        if not self.csi:
            problems.append("CSI socket not serving")
        if self.fuse_required and (self.fuse is None or not self.fuse.healthy()):
            problems.append("FUSE mount not serving")
        return problems

    async def liveness(self) -> str | None:
        """What /healthz reports: the process answers, its FUSE session (when it has one) has
        not ended, and once the CSI socket serves, the driver answers Probe through it (what
        the CSI livenessprobe sidecar would check). Only what a restart repairs: a FUSE
        session that ended (its mount detached, its connection aborted) never comes back
        in-process.

        The probe is a blocking call in a thread of the caller's loop: the HTTP port runs on
        a loop of its own (``http_listener.ThreadedListener``), where the agent's grpc.aio
        objects must not be used."""
        if self.stopping:
            return None
        if self.fuse_required and (
            self.fuse is None or not await asyncio.to_thread(self.fuse.healthy)
        ):
            return "FUSE session dead (lazy volumes answer ENOTCONN); restart the agent"
        if not self.csi or self.csi_socket is None:
            return None
        return await asyncio.to_thread(probe_csi, self.csi_socket)


def probe_csi(socket_path: Path) -> str | None:
    """Call CSI Identity.Probe over ``socket_path``; None when the driver answers ready."""
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        try:
            reply = csi_pb2_grpc.IdentityStub(channel).Probe(
                csi_pb2.ProbeRequest(), timeout=CSI_PROBE_TIMEOUT_SECONDS
            )
        except grpc.RpcError as err:
            code = getattr(err, "code", None)  # the sync API's errors are also grpc.Call
            what = code().name if callable(code) else type(err).__name__
            return f"CSI Probe on {socket_path} failed: {what}"
    if reply.HasField("ready") and not reply.ready.value:
        return "CSI Probe answered not ready"
    return None


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_MIN_INTERVAL_SECONDS = 0.1


def http_routes(
    metrics: Metrics,
    health: Health,
    refresh: Callable[[], None] | None = None,
    *,
    scrape_min_interval: float = SCRAPE_MIN_INTERVAL_SECONDS,
) -> tuple[dict[str, Handler], Coalesced]:
    """The HTTP port's paths; the ``Coalesced`` scrape must be closed with the listener.

    A scrape refreshes the store's figures and renders the exposition in the scrape's own
    thread, at most once per ``scrape_min_interval`` however many scrapers ask, and never
    from before the request (see ``cacheagent.http_listener``), so a /metrics flood cannot
    occupy the worker threads the CSI driver and the agent API use.
    """

    def render() -> bytes:
        if refresh is not None:
            refresh()
        return metrics.exposition()

    scrape = Coalesced(render, min_interval=scrape_min_interval)

    async def metrics_handler() -> Response:
        return Response(200, await scrape.get(), METRICS_CONTENT_TYPE)

    async def healthz() -> Response:
        problem = await health.liveness()
        if problem is not None:
            return Response(503, f"unhealthy: {problem}\n".encode())
        return Response(200, b"ok\n")

    async def readyz() -> Response:
        problems = health.check()
        if problems:
            return Response(503, ("not ready: " + "; ".join(problems) + "\n").encode())
        return Response(200, b"ready\n")

    routes: dict[str, Handler] = {
        "/metrics": metrics_handler,
        "/healthz": healthz,
        "/readyz": readyz,
    }
    return routes, scrape


def store_figures(store: Store) -> StoreFigures:
    usage = store.usage()
    return StoreFigures(usage.capacity or 0, usage.used, usage.models, usage.blobs)


def take_snapshot(
    store: Store, gpus: GpuInventory, volumes: Callable[[], dict[str, int]]
) -> Snapshot:
    """The slow figures (mincore over every model, NVML); blocking, so run it in a thread.

    Residency costs about 10 ms per GiB of model, which is why it is refreshed on a timer
    rather than on every scrape; the store's own counts are refreshed per scrape.
    """
    models = []
    for model in store.list_models():
        root = store.model_path(model.digest)
        try:
            resident: int | None = residency([root / f.path for f in model.files]).bytes_resident
        except OSError:
            resident = None
        name = (model.ref or "").rsplit("/", 1)[-1][:64]
        models.append(ModelFigures(model.digest, name, model.size, resident))
    snap = gpus.snapshot()
    return Snapshot(
        store=store_figures(store),
        models=models,
        nvml_up=snap.up,
        gpus=[gpu_figures(g) for g in snap.gpus],
        volumes=volumes(),
    )


def gpu_figures(g: GpuInfo) -> GpuFigures:
    utilization = g.utilization_gpu_percent
    return GpuFigures(
        index=g.index,
        uuid=g.uuid or "",
        name=g.name or "",
        memory_total_bytes=g.memory_total_bytes,
        memory_used_bytes=g.memory_used_bytes,
        utilization_ratio=None if utilization is None else utilization / 100,
        temperature_celsius=g.temperature_celsius,
        power_watts=g.power_watts,
    )


class Agent:
    """The running daemon: ``start`` builds and starts every part, ``stop`` undoes it in
    reverse (``serve`` calls it on SIGTERM/SIGINT)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.health = Health()
        self._cleanup: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        self.store: Store | None = None
        self.csi: CsiServer | None = None

    def _on_stop(self, name: str, action: Callable[[], Awaitable[object]]) -> None:
        self._cleanup.append((name, action))

    async def start(self) -> None:
        cfg = self.config
        await self._start_http()
        store = await asyncio.to_thread(Store.open_configured, cfg.store)
        self.store = store
        self._on_stop("store", lambda: asyncio.to_thread(store.close))
        # Before anything else that is shared by path (the FUSE mountpoint, the sockets): an
        # agent already serving these sockets keeps them, and this one stops here.
        gid = await asyncio.to_thread(resolve_gid, cfg.agent.socket_group)
        await asyncio.to_thread(prepare_socket, cfg.agent.socket, "agent.socket", gid=gid)
        await asyncio.to_thread(prepare_socket, cfg.csi.socket_path, "csi.socket")
        self.metrics.removals = lambda: (store.removed_models, store.removed_bytes)
        self.health.store = True

        origins: Origins = build_sources(cfg)
        self._on_stop("origins", origins.aclose)
        # Fleet reads resolv.conf, interface addresses: off the loop
        fleet = await asyncio.to_thread(Fleet, cfg.peers) if cfg.peers.enabled else None
        engine = PullEngine(
            store,
            SourceRegistry(fleet.wrap(origins.sources) if fleet else origins.sources),
            cfg.pull,
            tuning=tuning_from_config(cfg.pull, tag_ttl_seconds=cfg.store.tag_ttl_seconds),
        )
        self._on_stop("pull engine", engine.aclose)
        self.metrics.pulled_bytes = engine.fetched_bytes
        if fleet is not None:
            await fleet.start(store, engine, self.metrics.registry)
            self._on_stop("peers", fleet.stop)

        gpus = GpuInventory()
        self._on_stop("nvml", lambda: asyncio.to_thread(gpus.close))
        locker = MemoryLocker(cfg.prefetch.mlock_limit_bytes)
        self._on_stop("mlock", lambda: asyncio.to_thread(locker.release_all))
        service = ModelService(
            store,
            engine,
            cfg.policy,
            metrics=self.metrics,
            prefetcher=prefetcher_from_config(cfg.prefetch, gpus.numa_cpus_for),
            locker=locker,
        )
        await self._start_fuse(service)

        node_id = self._node_id()
        limits = ApiLimits(
            preheat_max_refs=cfg.agent.preheat_max_refs,
            preheat_max_concurrent=cfg.agent.preheat_max_concurrent,
        )
        api = await start_agent_api(
            cfg.agent.socket,
            AgentService(service, gpus=gpus, node_id=node_id, limits=limits),
            TcpTls.from_config(cfg),
            max_calls=cfg.agent.api_max_concurrent_calls,
            mode=cfg.agent.socket_mode,
            group=cfg.agent.socket_group,
        )
        self._on_stop("agent API", lambda: api.stop(STOP_GRACE_SECONDS))
        self.health.api = True

        csi = await start_csi_server(
            cfg.csi.socket_path,
            cfg.csi.driver_name,
            node_id,
            cfg.csi.kubelet_dir,
            service,
            store_root=cfg.store.root,
            publish_wait_seconds=cfg.csi.publish_wait_seconds,
            on_operation=self.metrics.observe_csi,
        )
        self.csi = csi
        self._on_stop("CSI", lambda: csi.stop(STOP_GRACE_SECONDS))
        self.health.csi_socket = cfg.csi.socket_path
        self.health.csi = True

        watch = asyncio.create_task(service.watch_store())
        self._on_stop("store watch", lambda: _cancel(watch))
        scrub = asyncio.create_task(service.scrub(cfg.store.scrub_bytes_per_second))
        self._on_stop("scrub", lambda: _cancel(scrub))
        self.health.store_problem = lambda: service.store_problem
        snapshots = asyncio.create_task(self._refresh_snapshots(store, gpus))
        self._on_stop("metrics snapshots", lambda: _cancel(snapshots))
        log.info("cacheagent %s ready (store %s)", __version__, cfg.store.root)

    def _node_id(self) -> str:
        try:
            return resolve_node_id(self.config.csi.node_id)
        except ConfigError:
            return os.uname().nodename

    async def _start_fuse(self, service: ModelService) -> None:
        cfg = self.config.fuse
        if not cfg.enabled:
            log.info("FUSE lazy mode disabled by config")
            return
        if not await asyncio.to_thread(Path("/dev/fuse").exists):
            log.warning("no /dev/fuse: mode: lazy volumes are unavailable on this node")
            return
        loop = asyncio.get_running_loop()
        stats = FuseStats()
        waits = OriginWaits(origin_wait_limit(cfg.max_threads), cfg.origin_waits_per_model)
        provider = StoreProvider(
            service, loop, stats=stats, read_timeout=cfg.origin_wait_seconds, waits=waits
        )
        mount = FuseMount(
            cfg.mountpoint,
            provider,
            stats=stats,
            options=MountOptions(read_ahead_kb=cfg.read_ahead_kb, max_threads=cfg.max_threads),
        )
        self.metrics.fuse_counts = stats.snapshot
        link = (
            KeeperLink(
                cfg.keeper_socket, str(mount.mountpoint), handover_seconds=cfg.handover_seconds
            )
            if cfg.keeper_socket is not None
            else None
        )
        managed = HandedOverMount(mount, link, detach_timeout=STOP_GRACE_SECONDS)
        # A resumed connection's readers wait for the bytes of pulls the previous agent ran.
        await asyncio.to_thread(service.interrupted.find)
        resuming = asyncio.create_task(service.interrupted.resume_all())
        self._on_stop("resumed pulls", lambda: _cancel(resuming))
        await asyncio.to_thread(managed.open)
        self._on_stop("FUSE", lambda: asyncio.to_thread(managed.close))
        service.fuse_root = cfg.mountpoint
        service.on_evicted = mount.fs.forget
        provider.on_unverified = mount.fs.invalidate
        self._on_stop("FUSE page-cache watchers", provider.aclose)
        self.health.fuse = mount
        self.health.fuse_required = True

    async def _start_http(self) -> None:
        host, _, port_text = self.config.agent.http_listen.rpartition(":")
        host, port = host.strip("[]") or "0.0.0.0", int(port_text)
        routes, scrape = http_routes(self.metrics, self.health, self._refresh_store_figures)
        listener = ThreadedListener(HttpListener(routes))  # off the loop CSI runs on
        await listener.start(host, port)
        self._on_stop("metrics scrapes", lambda: asyncio.to_thread(scrape.close))
        self._on_stop("HTTP", listener.stop)
        log.info("metrics and health on http://%s:%d", host, port)

    async def _refresh_snapshots(self, store: Store, gpus: GpuInventory) -> None:
        while True:
            try:
                self.metrics.snapshot = await asyncio.to_thread(
                    take_snapshot, store, gpus, self._volume_counts
                )
            except Exception:
                log.exception("refreshing metrics failed")
            await asyncio.sleep(SNAPSHOT_INTERVAL_SECONDS)

    def _refresh_store_figures(self) -> None:
        if self.store is not None:
            figures = store_figures(self.store)
            self.metrics.snapshot = dataclasses.replace(
                self.metrics.snapshot, store=figures, volumes=self._volume_counts()
            )

    def _volume_counts(self) -> dict[str, int]:
        return self.csi.node.volume_counts() if self.csi is not None else {}

    async def stop(self) -> None:
        self.health.stopping = True
        for name, action in reversed(self._cleanup):
            started = time.monotonic()
            try:
                await asyncio.wait_for(action(), timeout=STOP_GRACE_SECONDS * 2)
            except Exception:
                log.exception("stopping %s failed", name)
            log.debug("stopped %s in %.2fs", name, time.monotonic() - started)
        self._cleanup.clear()


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _ignore_sighup() -> None:
    log.info(
        "SIGHUP ignored: the agent reads its configuration only at start; "
        "restart it (a DaemonSet rollout) to apply a change"
    )


async def serve(config: Config) -> int:
    setup_logging(fmt=config.agent.log_format, level=config.agent.log_level)
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    # asyncio.to_thread's pool, shared by the CSI driver, the pull engine and the agent API:
    # Python's default (CPUs + 4) is 6 threads on a small node, which a few slow API calls
    # would fill; the API meters its own share (api.ApiLimits), the rest stays free for CSI.
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="agent")
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP must not end the agent (the FUSE mount would go with it): ignored, and logged.
    loop.add_signal_handler(signal.SIGHUP, _ignore_sighup)
    try:
        await agent.start()
        await stop.wait()
        log.info("shutting down")
    finally:
        await agent.stop()
    return 0
