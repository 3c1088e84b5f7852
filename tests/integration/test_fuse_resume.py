"""A live FUSE mount changes server process under a streaming reader (detach, or SIGKILL).

The test process plays the keeper: it holds a duplicate of the /dev/fuse descriptor between
servers, so the connection survives; each server is a child (tests/fuse_child.py). A reader
process streams a big file and must see every byte right, across the switch.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cacheagent.fuse.directory import DirectoryProvider
from cacheagent.fuse.mount import FuseMount, MountError, SessionState, unmount
from cacheagent.mountinfo import find_mount
from tests.files import MiB, fake_digest, write_random_file
from tests.support import require_fuse

REPO = Path(__file__).resolve().parents[2]
DIGEST = fake_digest("resumable")
BIG = 96 * MiB + 4321

_READER = """
import hashlib, json, os, sys, time
model, ready = sys.argv[1], sys.argv[2]
os.chdir(os.path.join(model, "weights"))  # a directory node issued before the switch
fd = os.open("big.bin", os.O_RDONLY)  # a file handle issued before the switch
print("opened", flush=True)
digest, pause, last = hashlib.sha256(), 0.0, time.monotonic()
while chunk := os.read(fd, 1 << 20):
    digest.update(chunk)
    now = time.monotonic()
    pause, last = max(pause, now - last), now
os.close(fd)
with open(os.path.join(model, "config.json"), "rb") as f:  # opened after the switch
    small = f.read()
print(json.dumps({"sha256": digest.hexdigest(), "pause": pause, "listing": sorted(os.listdir(".")),
                  "size": os.stat("big.bin").st_size, "small": small.decode()}), flush=True)
"""


@pytest.fixture(autouse=True)
def _fuse() -> None:
    require_fuse()


@dataclass
class Stand:
    """Models, a mount point, a control directory, and every process and fd to clean up."""

    root: Path
    mountpoint: Path
    control: Path
    expected_sha: str
    servers: list[subprocess.Popen[str]] = field(default_factory=list)
    readers: list[subprocess.Popen[str]] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def clean_up(self) -> None:
        """Servers first, then our descriptors: with no server and no descriptor left the
        connection aborts, which is what frees a reader waiting on a request nobody answers
        (it cannot be killed before that), and lets umount(8) look at the mount point."""
        for child in self.servers:
            _kill(child)
        for fd in self.fds:
            os.close(fd)
        for child in self.readers:
            _kill(child)
        unmount(self.mountpoint)

    def server(
        self, first: bytes, fd: int | None = None
    ) -> tuple[subprocess.Popen[str], socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.fuse_child", str(theirs.fileno()),
             str(self.mountpoint), str(self.root / "models"), str(self.control)],
            cwd=REPO, pass_fds=[theirs.fileno()], text=True,
        )  # fmt: skip
        theirs.close()
        self.servers.append(child)
        ours.settimeout(30)
        socket.send_fds(ours, [first], [] if fd is None else [fd])
        return child, ours

    def reader(self) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", _READER, str(self.mountpoint / DIGEST), "x"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.readers.append(child)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "opened"
        return child

    def delay(self, seconds: float) -> None:
        (self.control / "in_read").unlink(missing_ok=True)
        (self.control / "delay").write_text(str(seconds))

    def wait_in_read(self) -> None:
        _wait_for(lambda: (self.control / "in_read").exists(), "a read inside the server")


@pytest.fixture
def stand(tmp_path: Path) -> Iterator[Stand]:
    model = tmp_path / "models" / DIGEST
    big = write_random_file(model / "weights" / "big.bin", BIG, seed=11)
    write_random_file(model / "weights" / "other.bin", MiB, seed=12)
    (model / "config.json").write_text('{"layers": 2}')
    control = tmp_path / "control"
    control.mkdir()
    sha = hashlib.sha256(big.read_bytes()).hexdigest()
    stand = Stand(tmp_path, tmp_path / "mnt", control, sha)
    try:
        yield stand
    finally:
        stand.clean_up()


def _kill(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.kill()
    child.wait(30)
    if child.stdout is not None:
        child.stdout.close()


def _start_first(stand: Stand) -> tuple[subprocess.Popen[str], socket.socket, int, SessionState]:
    server, sock = stand.server(b"start")
    payload, fds, _, _ = socket.recv_fds(sock, 4096, 1)
    assert len(fds) == 1, payload
    stand.fds.append(fds[0])  # the test is the keeper: the connection outlives the server
    return server, sock, fds[0], SessionState.from_json(json.loads(payload))


def _resume(stand: Stand, fd: int, state: SessionState) -> socket.socket:
    message = b"resume " + json.dumps(state.to_json()).encode()
    _, sock = stand.server(message, fd)
    assert sock.recv(64) == b"resumed"
    return sock


def _finish(stand: Stand, reader: subprocess.Popen[str], sock: socket.socket) -> None:
    out, _ = reader.communicate(timeout=120)
    assert reader.returncode == 0
    result = json.loads(out)
    print(f"\nlongest pause the reader saw across the switch: {result['pause']:.3f}s")
    assert result["sha256"] == stand.expected_sha
    assert result["size"] == BIG
    assert result["listing"] == ["big.bin", "other.bin"]
    assert result["small"] == '{"layers": 2}'
    assert result["pause"] < 10
    top = stand.mountpoint / DIGEST
    assert sorted(os.listdir(top)) == ["config.json", "weights"]
    assert (top / "weights" / "other.bin").read_bytes() == (
        stand.root / "models" / DIGEST / "weights" / "other.bin"
    ).read_bytes()
    sock.send(b"stop")
    assert sock.recv(64) == b"stopped"
    assert find_mount(stand.mountpoint) is None


def test_a_detached_session_is_resumed_by_another_process(stand: Stand) -> None:
    first, sock, fd, state = _start_first(stand)
    stand.delay(0.3)  # reads in flight while the first server detaches
    reader = stand.reader()
    stand.wait_in_read()
    sock.send(b"detach")
    assert sock.recv(64) == b"detached"
    assert first.wait(30) == 0
    assert find_mount(stand.mountpoint) is not None  # detaching leaves the mount
    assert reader.poll() is None  # still streaming: nothing serves it until the resume
    stand.delay(0)
    _finish(stand, reader, _resume(stand, fd, state))


def test_a_killed_server_is_replaced_and_its_unanswered_reads_are_resent(stand: Stand) -> None:
    first, _, fd, state = _start_first(stand)
    stand.delay(60)  # the read stays inside the server until it dies
    reader = stand.reader()
    stand.wait_in_read()
    os.kill(first.pid, signal.SIGKILL)
    first.wait(30)
    assert reader.poll() is None
    stand.delay(0)
    _finish(stand, reader, _resume(stand, fd, state))


def test_reads_a_detach_gave_up_on_are_answered_by_the_next_process(stand: Stand) -> None:
    first, sock, fd, state = _start_first(stand)
    stand.delay(60)  # longer than the detach waits
    reader = stand.reader()
    stand.wait_in_read()
    began = time.monotonic()
    sock.send(b"detach 0.5")
    assert sock.recv(64) == b"detached"
    assert time.monotonic() - began < 10  # it did not wait for the stuck read
    assert first.wait(30) == 0
    assert reader.poll() is None
    stand.delay(0)
    _finish(stand, reader, _resume(stand, fd, state))


def test_resume_on_the_wrong_device_is_refused(stand: Stand) -> None:
    _, sock, fd, state = _start_first(stand)
    wrong = SessionState.from_json({**state.to_json(), "device": "0:1"})
    mount = FuseMount(stand.mountpoint, DirectoryProvider(stand.root / "models"))
    with pytest.raises(MountError, match="0:1"):
        mount.resume(fd, wrong)
    os.fstat(fd)  # still open: the caller's to close
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(MountError, match="not /dev/fuse"):
            mount.resume(read_end, state)
    finally:
        os.close(read_end)
        os.close(write_end)
    elsewhere = FuseMount(stand.root / "elsewhere", DirectoryProvider(stand.root / "models"))
    with pytest.raises(MountError, match="nothing"):
        elsewhere.resume(fd, state)
    sock.send(b"stop")
    assert sock.recv(64) == b"stopped"


@pytest.mark.parametrize(
    "bad",
    [{"device": "sda"}, {"proto_minor": 7}, {"proto_minor": "40"}, {"max_pages": 0}],
    ids=["device", "old-minor", "minor-type", "max-pages"],
)
def test_session_state_names_the_bad_field(bad: dict[str, object]) -> None:
    good = SessionState("0:42", 40).to_json()
    assert SessionState.from_json(good) == SessionState("0:42", 40)
    field_name = next(iter(bad))
    with pytest.raises(ValueError, match=f"SessionState.{field_name}"):
        SessionState.from_json({**good, **bad})


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
