"""The CSI node driver: Identity and Node services, read-only bind mounts, the publish journal.

The composition root builds a ``CsiBackend`` over the store and the pull engine and calls
``start_csi_server``; nothing else here needs to be known outside this package.
"""

from __future__ import annotations

from cacheagent.volumes import (
    LEASE_KIND,
    CsiBackend,
    LazyModeUnavailableError,
    ModelStats,
    ReadyModel,
    StillPulling,
)

from .rpc import OperationObserver
from .server import CsiServer, resolve_node_id, start_csi_server

__all__ = [
    "LEASE_KIND",
    "CsiBackend",
    "CsiServer",
    "LazyModeUnavailableError",
    "ModelStats",
    "OperationObserver",
    "ReadyModel",
    "StillPulling",
    "resolve_node_id",
    "start_csi_server",
]
