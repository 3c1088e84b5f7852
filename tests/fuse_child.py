"""A FUSE server in a process of its own, for the hand-over tests (test_fuse_resume.py).

``python -m tests.fuse_child SOCK_FD MOUNTPOINT MODELS CONTROL`` serves ``MODELS`` (a
DirectoryProvider root) at ``MOUNTPOINT`` and talks to the test over the SOCK_SEQPACKET socket
``SOCK_FD``. The test's first message is ``start`` (mount afresh; we answer with the
SessionState as JSON and the /dev/fuse descriptor attached) or ``resume`` (with the state as
JSON and the descriptor attached; we answer ``resumed``). Then ``detach [SECONDS]`` or ``stop``,
answered
``detached`` / ``stopped``, after which we exit. The test may also SIGKILL us at any time.

Reads obey ``CONTROL/delay`` (seconds to sleep in every read, when the file exists) and
touch ``CONTROL/in_read`` before sleeping, so the test knows a read is inside this server.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from pathlib import Path

from cacheagent.fuse.directory import DirectoryProvider
from cacheagent.fuse.mount import FuseMount, MountOptions, SessionState

_MESSAGE = 4096


class ControlledProvider(DirectoryProvider):
    """A DirectoryProvider whose reads the test can slow down (see the module docstring)."""

    def __init__(self, root: Path, control: Path) -> None:
        super().__init__(root)
        self.control = control

    def read(self, handle: int, offset: int, size: int) -> bytes:
        try:
            delay = float((self.control / "delay").read_text())
        except FileNotFoundError:
            delay = 0.0
        if delay > 0:
            (self.control / "in_read").touch()
            time.sleep(delay)
        return super().read(handle, offset, size)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="child %(process)d: %(message)s")
    sock = socket.socket(fileno=int(argv[1]))
    mountpoint, models, control = Path(argv[2]), Path(argv[3]), Path(argv[4])
    mount = FuseMount(
        mountpoint, ControlledProvider(models, control), options=MountOptions(max_threads=16)
    )
    message, fds, _, _ = socket.recv_fds(sock, _MESSAGE, 1)
    if message == b"start":
        mount.start()
        payload = json.dumps(mount.state().to_json()).encode()
        socket.send_fds(sock, [payload], [mount.device_fd])
    else:
        command, _, state = message.partition(b" ")
        assert command == b"resume" and len(fds) == 1, message
        mount.resume(fds[0], SessionState.from_json(json.loads(state)))
        sock.send(b"resumed")
    command, _, seconds = sock.recv(_MESSAGE).partition(b" ")
    if command == b"detach":
        mount.detach(timeout=float(seconds or 10))
        sock.send(b"detached")
    else:
        mount.stop()
        sock.send(b"stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
