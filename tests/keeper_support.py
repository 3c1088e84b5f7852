"""Helpers for the FUSE keeper's tests: the keeper as a real process, and a real FUSE connection.

``raw_fuse_mount`` mounts a FUSE filesystem with the bare mount(2) syscall and nobody serving
it: the kernel queues its FUSE_INIT request on the descriptor, which is then a live FUSE
connection to pass around (reading it gives that request back), and aborting the connection
(closing every descriptor, or unmounting) makes any access to the mount fail with ENOTCONN.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cacheagent.sockets import is_live
from tests.child_process import stop_child, wait_ready

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2
FUSE_INIT = 26
_IN_HEADER = struct.Struct("=IIQ")  # len, opcode, unique (the start of fuse_in_header)


@contextlib.contextmanager
def raw_fuse_mount(mountpoint: Path) -> Iterator[int]:
    """A live FUSE connection mounted on ``mountpoint``: yields its /dev/fuse descriptor (the
    caller may close it); detached and closed on exit."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    flags = ctypes.c_ulong(MS_RDONLY | MS_NOSUID | MS_NODEV)
    if _libc.mount(b"keeper-test", os.fsencode(mountpoint), b"fuse.keeper-test", flags, options):
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"mount fuse on {mountpoint}: {os.strerror(err)}")
    try:
        yield fd
    finally:
        _libc.umount2(os.fsencode(mountpoint), MNT_DETACH)
        with contextlib.suppress(OSError):
            os.close(fd)


def first_request_opcode(fd: int, timeout: float = 10.0) -> int:
    """The opcode of the first request queued on a FUSE descriptor (FUSE_INIT for a new mount)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    assert poller.poll(int(timeout * 1000)), "no FUSE request arrived"
    data = os.read(fd, 1 << 20)
    _, opcode, _ = _IN_HEADER.unpack_from(data)
    return int(opcode)


def stat_errno(path: Path, timeout: float = 10.0) -> int:
    """errno of stat(``path``), from a child that is killed after ``timeout`` s (a FUSE mount
    whose connection lives but is not served blocks the caller)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import os\ntry: os.stat({str(path)!r})\nexcept OSError as e:"
            " print(e.errno)\nelse: print(0)",
        ],
        capture_output=True,
        timeout=timeout,
        check=True,
    )
    return int(proc.stdout)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def writer_closed(read_fd: int, timeout: float) -> bool:
    """Whether the last write end of the pipe ``read_fd`` reads closes within ``timeout`` s."""
    try:
        read_until_closed(read_fd, timeout)
    except TimeoutError:
        return False
    return True


def read_until_closed(read_fd: int, timeout: float) -> bytes:
    """Everything written to the pipe ``read_fd`` until its last writer closes it;
    TimeoutError if that takes over ``timeout`` s."""
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        if poller.poll(max(1, int(left * 1000))):
            chunk = os.read(read_fd, 4096)
            if not chunk:
                return data
            data += chunk
    raise TimeoutError(f"the pipe's writers stayed open for {timeout}s")


class KeeperProcess:
    """``cacheagent fuse-keeper`` as the DaemonSet starts it, logging to a file."""

    def __init__(
        self, socket_path: Path, log_path: Path, *extra: str, command: list[str] | None = None
    ) -> None:
        """``extra``: interpreter options; ``command``: the whole command line instead."""
        self.socket_path = socket_path
        self.log_path = log_path
        self.command = command or [
            sys.executable, *extra, "-m", "cacheagent.cli", "fuse-keeper",
            "--socket", str(socket_path), "--log-level", "debug",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> KeeperProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        wait_ready(
            self.proc,
            lambda: is_live(self.socket_path, socket.SOCK_SEQPACKET),
            what="fuse-keeper",
            timeout=30,
            log=self.log,
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        stop_child(self.proc)
        return None if self.proc is None else self.proc.returncode


@contextlib.contextmanager
def keeper_running(
    socket_path: Path, log_path: Path, command: list[str] | None = None
) -> Iterator[KeeperProcess]:
    keeper = KeeperProcess(socket_path, log_path, command=command)
    try:
        yield keeper.start()
    finally:
        keeper.stop()
