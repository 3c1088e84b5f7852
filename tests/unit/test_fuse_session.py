"""The session loop over a socket pair standing in for /dev/fuse: the test plays the kernel."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheagent.fuse.directory import DirectoryProvider
from cacheagent.fuse.dispatch import Dispatcher
from cacheagent.fuse.fs import CacheFilesystem
from cacheagent.fuse.protocol import IN_HEADER, OUT_HEADER, ROOT_ID, Opcode
from cacheagent.fuse.session import DeviceChannel, Session


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[tuple[socket.socket, Session]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.settimeout(10)
    fs = CacheFilesystem(DirectoryProvider(tmp_path))
    session = Session(DeviceChannel(theirs.detach()), Dispatcher(fs), workers=2)
    session.start()
    try:
        yield ours, session
    finally:
        session.stop_reading()
        session.drain(10)
        session.channel.close(10)  # a second close after a test's own is a no-op
        ours.close()


def _send(
    sock: socket.socket, opcode: int, unique: int, body: bytes = b"", length: int = 0
) -> None:
    size = length or IN_HEADER.size + len(body)
    sock.send(IN_HEADER.pack(size, opcode, unique, ROOT_ID, 0, 0, 0, 0, 0) + body)


def _reply(sock: socket.socket) -> tuple[int, int, int]:
    length, error, unique = OUT_HEADER.unpack_from(sock.recv(1 << 16))
    return length, -error, unique


def test_requests_are_answered_and_forgets_are_not(kernel: tuple[socket.socket, Session]) -> None:
    sock, session = kernel
    _send(sock, Opcode.FORGET, 1, bytes(8))  # no reply: the next one read is GETATTR's
    _send(sock, Opcode.GETATTR, 2, bytes(16))
    assert _reply(sock) == (16 + 104, 0, 2)
    assert session.running()


def test_a_malformed_request_is_answered_eio_not_left_hanging(
    kernel: tuple[socket.socket, Session],
) -> None:
    sock, _ = kernel
    _send(sock, Opcode.GETATTR, 3, bytes(16), length=99)  # the header lies about its length
    assert _reply(sock) == (16, errno.EIO, 3)


def test_after_a_drain_nothing_is_read_or_answered(kernel: tuple[socket.socket, Session]) -> None:
    sock, session = kernel
    session.stop_reading()
    assert session.drain(10) is True
    assert not session.running()
    _send(sock, Opcode.GETATTR, 4, bytes(16))  # stays queued for the next process
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(64)  # the reader has ended: nobody answers
    assert session.channel.close(10) is True
    with pytest.raises(OSError) as closed:
        session.channel.write([b"x"])
    assert closed.value.errno == errno.EBADF


def test_a_vanished_peer_ends_the_session(kernel: tuple[socket.socket, Session]) -> None:
    sock, session = kernel
    sock.shutdown(socket.SHUT_RDWR)
    deadline = time.monotonic() + 10
    while session.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.connection_lost
