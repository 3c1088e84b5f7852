"""Read-only FUSE filesystem over the model cache, serving files while they download.

``provider.ContentProvider`` is what the filesystem needs from the agent; ``mount.FuseMount``
mounts ``fs.CacheFilesystem`` over one; ``directory.DirectoryProvider`` serves plain directories.
The FUSE protocol itself is spoken here (``protocol``, ``dispatch``, ``session``): no libfuse.
"""

from __future__ import annotations

from cacheagent.fuse.provider import ContentProvider, FuseFile, ModelListing
from cacheagent.fuse.stats import FuseStats, FuseStatsSnapshot

__all__ = ["ContentProvider", "FuseFile", "FuseStats", "FuseStatsSnapshot", "ModelListing"]
