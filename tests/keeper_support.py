"""Helpers for the FUSE keeper's tests: the keeper as a real process, and a real FUSE connection.

``raw_fuse_mount`` mounts a FUSE filesystem with the bare mount(2) syscall and nobody serving
it: the kernel queues its FUSE_INIT request on the descriptor, which is then a live FUSE
connection to pass around (reading it gives that request back), and aborting the connection
(closing every descriptor, or unmounting) makes any access to the mount fail with ENOTCONN.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
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


_OUT_HEADER = struct.Struct("=IiQ")  # len, error, unique
# fuse_init_out (protocol 7.31): major, minor, max_readahead, flags, max_background,
# congestion_threshold, max_write, time_gran, max_pages, map_alignment, flags2, unused[7]
_INIT_OUT = struct.Struct("=IIIIHHIIHHI7I")
# fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then fuse_attr: ino, size, blocks, atime,
# mtime, ctime, their nsecs, mode, nlink, uid, gid, rdev, blksize, flags
_ATTR_OUT = struct.Struct("=QII6Q3I7I")
FUSE_GETATTR = 3
ROOT_MODE = 0o40555


def serve_root_stat(fd: int, done: Callable[[], bool], timeout: float = 15.0) -> list[int]:
    """Answer FUSE requests on ``fd`` as a filesystem with an empty root (INIT, then GETATTR;
    ENOSYS for anything else) until ``done()``; the opcodes seen, in order."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"still not done after {timeout}s; saw {seen}"
        if not poller.poll(50):
            continue
        data = os.read(fd, 1 << 20)
        _, opcode, unique = _IN_HEADER.unpack_from(data)
        seen.append(opcode)
        if opcode == FUSE_INIT:
            body = _INIT_OUT.pack(7, 31, 0, 0, 0, 0, 4096, 1, 0, 0, 0, *[0] * 7)
        elif opcode == FUSE_GETATTR:
            body = _ATTR_OUT.pack(
                1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, ROOT_MODE, 2, 0, 0, 0, 4096, 0
            )
        else:
            os.write(fd, _OUT_HEADER.pack(_OUT_HEADER.size, -errno.ENOSYS, unique))
            continue
        os.write(fd, _OUT_HEADER.pack(_OUT_HEADER.size + len(body), 0, unique) + body)
    return seen


def waiting_in_fuse(pid: int) -> bool:
    """Whether process ``pid`` is blocked waiting for a FUSE connection to answer."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text().startswith("fuse_")
    except FileNotFoundError:
        return False


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
