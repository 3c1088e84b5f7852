"""Stand-in agents for the keeper tests, each waiting to be killed once it has said its word.

``python -m tests.keeper_agent raw SOCKET MOUNTPOINT SECONDS``: mounts a raw FUSE connection
nobody serves, hands the keeper a copy, says ``held``.

``python -m tests.keeper_agent serve SOCKET MOUNTPOINT MODELS``: what the agent does with the
keeper: take the connection a predecessor left and resume it (``resumed``), or mount afresh
(``started``), serving ``MODELS`` (a DirectoryProvider root); then hold it at the keeper.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from cacheagent.fuse.directory import DirectoryProvider
from cacheagent.fuse.keeper_client import KeeperLink
from cacheagent.fuse.mount import FuseMount, MountOptions, SessionState
from tests.keeper_support import raw_fuse_mount


def raw(socket_path: str, mountpoint: str, handover: str) -> None:
    with raw_fuse_mount(Path(mountpoint)) as fd:
        link = KeeperLink(Path(socket_path), mountpoint, handover_seconds=float(handover))
        assert link.take() is None
        link.hold(fd, {"agent_pid": os.getpid()})
        print("held", flush=True)
        threading.Event().wait(120)  # the test kills us long before


def serve(socket_path: str, mountpoint: str, models: str) -> None:
    mount = FuseMount(
        Path(mountpoint), DirectoryProvider(Path(models)), options=MountOptions(max_threads=16)
    )
    link = KeeperLink(Path(socket_path), mountpoint, handover_seconds=60)
    taken = link.take()
    if taken is None:
        mount.start()
        said = "started"
    else:
        fd, state = taken
        mount.resume(fd, SessionState.from_json(state))
        said = "resumed"
    link.hold(mount.device_fd, mount.state().to_json())
    print(said, flush=True)
    threading.Event().wait(120)


if __name__ == "__main__":
    {"raw": raw, "serve": serve}[sys.argv[1]](*sys.argv[2:])
