"""Read-only FUSE filesystem over the model cache, serving files while they download.

``provider.ContentProvider`` is what the filesystem needs from the agent; ``mount.FuseMount``
mounts ``fs.CacheFilesystem`` over one; ``directory.DirectoryProvider`` serves plain directories.
Importing ``fs`` or ``mount`` loads libfuse 3 (see ``libfuse``); this package itself does not.
"""

from __future__ import annotations

from cacheagent.fuse.provider import ContentProvider, FuseFile, ModelListing
from cacheagent.fuse.stats import FuseStats, FuseStatsSnapshot

__all__ = ["ContentProvider", "FuseFile", "FuseStats", "FuseStatsSnapshot", "ModelListing"]
