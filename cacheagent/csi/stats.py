"""NodeGetVolumeStats for a read-only model volume: figures that don't page anyone.

What the numbers mean (kubelet turns them into ``kubelet_volume_stats_*`` for PVC volumes):

- ``used`` is the model: its bytes, and its files plus directories as inodes.
- ``available`` is the room left on the filesystem that holds the node's model store
  (``statvfs``: what ``df`` inside the pod shows for the volume), and ``total`` is
  ``used + available``. Reporting ``available=0`` ("a read-only volume has no room") made every
  model volume of a ReadWriteOnce claim look 100% full and fired the standard
  ``KubePersistentVolumeFillingUp`` alert for ever; with the store's free space it fires only
  when the node's cache disk really is nearly full, which is worth a page.
- ``volume_condition`` is abnormal only for a real problem: model files missing or damaged,
  the mount gone, or a mount that does not answer (a lazy volume whose FUSE server died). A lazy
  model that is still downloading is normal (the pod reads it as it arrives); the message says
  it is downloading.

Blocking (statvfs, mountinfo, a stat on the mount): run in a worker thread.
"""

from __future__ import annotations

import os
from pathlib import Path

from cacheagent._proto.csi.v1 import csi_pb2 as pb
from cacheagent.volumes import ModelStats

from .journal import Publish
from .mounts import is_mountpoint


def volume_stats(row: Publish, model: ModelStats, store_dir: Path) -> pb.NodeGetVolumeStatsResponse:
    problems = [] if model.healthy else [model.message or "model files are missing or damaged"]
    problems += _mount_problems(row.target_path)
    space = os.statvfs(store_dir)
    free_bytes = space.f_bavail * space.f_frsize
    free_inodes = space.f_favail
    usage = pb.VolumeUsage
    if problems:
        message = "; ".join(problems)
    elif model.downloading:
        message = f"{model.message}; the volume serves files as they arrive (lazy mode)"
    else:
        message = f"model {row.manifest_digest} is complete"
    return pb.NodeGetVolumeStatsResponse(
        usage=[
            usage(
                unit=usage.BYTES,
                total=model.bytes + free_bytes,
                used=model.bytes,
                available=free_bytes,
            ),
            usage(
                unit=usage.INODES,
                total=model.inodes + free_inodes,
                used=model.inodes,
                available=free_inodes,
            ),
        ],
        volume_condition=pb.VolumeCondition(abnormal=bool(problems), message=message),
    )


def _mount_problems(target_path: str) -> list[str]:
    if not is_mountpoint(target_path):
        return [f"the read-only mount at {target_path} is gone"]
    try:
        Path(target_path).stat()
    except OSError as exc:  # a lazy volume whose FUSE server died: ENOTCONN
        return [f"the mount at {target_path} does not answer: {exc.strerror}"]
    return []
