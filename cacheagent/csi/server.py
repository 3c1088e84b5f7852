"""Serve the CSI Identity and Node services on kubelet's unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from cacheagent._proto.csi.v1 import csi_pb2_grpc as pb_grpc
from cacheagent.errors import ConfigError
from cacheagent.sockets import prepare_socket
from cacheagent.store.paths import Layout
from cacheagent.volumes import CsiBackend

from .identity import IdentityService, check_driver_name
from .journal import PublishJournal
from .node import PUBLISH_WAIT_SECONDS, NodeConfig, NodeService
from .rpc import OperationObserver, RpcRunner
from .selinux import SELinux
from .targets import KubeletDir

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
SOCKET_DIR_MODE = 0o750


@dataclass
class CsiServer:
    """A serving CSI endpoint; ``stop`` also closes the journal and removes the socket."""

    server: aio.Server
    node: NodeService
    journal: PublishJournal
    socket_path: Path

    async def stop(self, grace: float | None = 5.0) -> None:
        await self.server.stop(grace)
        await self.node.aclose()
        self.journal.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def resolve_node_id(node_id: str | None) -> str:
    """The configured node id, else $NODE_NAME (the DaemonSet sets it from spec.nodeName)."""
    resolved = node_id or os.environ.get("NODE_NAME", "")
    if not resolved:
        raise ConfigError(
            "csi.node_id", "not set and $NODE_NAME is empty (set it from spec.nodeName)"
        )
    return resolved


def _prepare_socket(path: Path) -> None:
    """Replace a stale socket, refuse a live one or a non-socket (``cacheagent.sockets``)."""
    prepare_socket(path, "csi.socket", dir_mode=SOCKET_DIR_MODE)


def _node_config(
    node_id: str | None,
    kubelet_dir: Path,
    store_root: Path,
    publish_wait_seconds: float,
    prefetch_wait_seconds: float,
    selinux: SELinux | None,
) -> NodeConfig:
    if not kubelet_dir.is_dir():
        raise ConfigError("csi.kubelet_dir", f"{kubelet_dir} is not a directory")
    if not 0 <= publish_wait_seconds < 120:
        raise ConfigError(
            "csi.publish_wait_seconds", "must be at least 0 and below 120 (kubelet's deadline)"
        )
    return NodeConfig(
        node_id=resolve_node_id(node_id),
        kubelet=KubeletDir.resolve(kubelet_dir),
        models_dir=Layout(store_root.resolve()).models_dir,
        publish_wait_seconds=publish_wait_seconds,
        prefetch_wait_seconds=prefetch_wait_seconds,
        selinux=SELinux.detect() if selinux is None else selinux,
    )


async def start_csi_server(
    socket_path: Path,
    driver_name: str,
    node_id: str | None,
    kubelet_dir: Path,
    backend: CsiBackend,
    *,
    store_root: Path,
    publish_wait_seconds: float = PUBLISH_WAIT_SECONDS,
    prefetch_wait_seconds: float = 90.0,
    on_operation: OperationObserver | None = None,
    selinux: SELinux | None = None,
) -> CsiServer:
    """Reconcile the publish journal with the host's mounts, then serve on ``socket_path``.

    The journal lives in ``<store_root>/index.db``; the store's model trees (store.paths.Layout)
    are where adoptable orphan mounts come from. ``publish_wait_seconds`` bounds how long
    NodePublishVolume waits for a download before answering UNAVAILABLE (kubelet's own
    deadline is 2 minutes); the request's own gRPC deadline caps it further. ``selinux``
    None: detected on this node (tests pass one with the syscalls replaced).
    """
    check_driver_name(driver_name)
    config = await asyncio.to_thread(
        _node_config,
        node_id,
        kubelet_dir,
        store_root,
        publish_wait_seconds,
        prefetch_wait_seconds,
        selinux,
    )
    journal = await asyncio.to_thread(PublishJournal.open, store_root / "index.db")
    rpc = RpcRunner(on_operation)
    node = NodeService(config, backend, journal, rpc)
    try:
        await node.reconcile()
        await asyncio.to_thread(_prepare_socket, socket_path)
        server = aio.server()
        pb_grpc.add_IdentityServicer_to_server(IdentityService(driver_name, backend, rpc), server)
        pb_grpc.add_NodeServicer_to_server(node, server)
        server.add_insecure_port(f"unix://{socket_path}")
        await server.start()
    except BaseException:
        journal.close()
        raise
    await asyncio.to_thread(socket_path.chmod, SOCKET_MODE)
    log.info("CSI driver %s serving on %s (node %s)", driver_name, socket_path, config.node_id)
    return CsiServer(server=server, node=node, journal=journal, socket_path=socket_path)
