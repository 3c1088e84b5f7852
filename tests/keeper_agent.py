"""A stand-in agent for the keeper tests: mounts a raw FUSE connection, hands the keeper a copy,
says ``held`` and waits to be killed (``python -m tests.keeper_agent SOCKET MOUNTPOINT SECONDS``).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from cacheagent.fuse.keeper_client import KeeperLink
from tests.keeper_support import raw_fuse_mount


def main(socket_path: str, mountpoint: str, handover: str) -> None:
    with raw_fuse_mount(Path(mountpoint)) as fd:
        link = KeeperLink(Path(socket_path), mountpoint, handover_seconds=float(handover))
        assert link.take() is None
        link.hold(fd, {"agent_pid": os.getpid()})
        print("held", flush=True)
        threading.Event().wait(120)  # the test kills us long before


if __name__ == "__main__":
    main(*sys.argv[1:])
