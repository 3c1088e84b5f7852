"""The FUSE keeper as a real process, with real FUSE connections, real SCM_RIGHTS and real peers.

Each test starts ``cacheagent fuse-keeper`` and stops it by PID. A live FUSE connection is a raw
mount(2) nobody serves (``tests.keeper_support.raw_fuse_mount``): reading its descriptor gives
the kernel's FUSE_INIT request, so a descriptor taken back from the keeper is proved to be the
same live connection; once the connection is aborted the mount answers ENOTCONN. Pipes stand in
where only "the keeper closed its copy" matters: the read end sees EOF when the last write end
(the keeper's) closes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheagent.fuse import keeper_wire as wire
from cacheagent.fuse.keeper import MAX_CONNECTIONS
from cacheagent.fuse.keeper_client import KeeperError, KeeperLink, KeeperRefusedError
from tests.child_process import stop_child
from tests.files import MiB, fake_digest, write_random_file
from tests.keeper_support import (
    FUSE_GETATTR,
    FUSE_INIT,
    ROOT_MODE,
    KeeperProcess,
    first_request_opcode,
    keeper_running,
    raw_fuse_mount,
    read_until_closed,
    serve_root_stat,
    stat_errno,
    wait_for,
    waiting_in_fuse,
    writer_closed,
)
from tests.mounts import force_unmount, mounts_under
from tests.support import require_fuse, require_root

ROOT = Path(__file__).resolve().parents[2]
KEY = "/run/cacheagent/fuse"
DIGEST = fake_digest("keeper")


@pytest.fixture
def root() -> Iterator[Path]:
    """A short directory (socket paths are limited to 107 bytes); nothing mounted is left."""
    path = Path(tempfile.mkdtemp(prefix="kp-", dir="/tmp"))
    yield path
    leftover = mounts_under(path)
    for mount in leftover:
        force_unmount(mount)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False, timeout=60)
    assert not leftover, f"mounts left behind: {leftover}"


@pytest.fixture
def keeper(root: Path) -> Iterator[KeeperProcess]:
    with keeper_running(root / "keeper" / "keeper.sock", root / "keeper.log") as running:
        yield running


def _link(keeper: KeeperProcess, key: str = KEY, handover: float = 60.0) -> KeeperLink:
    return KeeperLink(keeper.socket_path, key, handover_seconds=handover)


def _killed_raw_agent(keeper: KeeperProcess, mountpoint: Path) -> int:
    """A stand-in agent mounts a raw FUSE connection at ``mountpoint``, hands the keeper a copy
    and is SIGKILLed; its PID."""
    command = ["-m", "tests.keeper_agent", "raw", str(keeper.socket_path), str(mountpoint), "60"]
    agent = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert agent.stdout is not None and agent.stdout.readline() == b"held\n"
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=10)
    finally:
        stop_child(agent)
        if agent.stdout is not None:
            agent.stdout.close()
    return agent.pid


def test_a_killed_agents_fuse_connection_lives_on_and_passes_to_the_next(
    keeper: KeeperProcess, root: Path
) -> None:
    require_fuse()
    mountpoint = root / "fuse"
    try:
        agent_pid = _killed_raw_agent(keeper, mountpoint)
        next_agent = _link(keeper, str(mountpoint))
        taken = next_agent.take()
        assert taken is not None, keeper.log()
        fd, state = taken
        assert state == {"agent_pid": agent_pid}
        assert first_request_opcode(fd) == FUSE_INIT, "not the mount's live connection"
        next_agent.release()
        os.close(fd)
        assert stat_errno(mountpoint) == errno.ENOTCONN, "the connection outlived every holder"
    finally:
        force_unmount(str(mountpoint))


def test_a_reader_waiting_through_the_hand_over_is_answered_by_the_next_holder(
    keeper: KeeperProcess, root: Path
) -> None:
    """While only the keeper holds the connection a reader waits (it does not fail); the
    process that takes the descriptor next answers it."""
    require_fuse()
    mountpoint = root / "fuse"
    reader = None
    try:
        _killed_raw_agent(keeper, mountpoint)
        reader = subprocess.Popen(
            [sys.executable, "-c", f"import os; print(oct(os.stat({str(mountpoint)!r}).st_mode))"],
            stdout=subprocess.PIPE,
        )
        wait_for(lambda: waiting_in_fuse(reader.pid), "the reader waiting on the connection")
        assert reader.poll() is None, "the reader did not wait for an agent"
        link = _link(keeper, str(mountpoint))
        taken = link.take()
        assert taken is not None
        seen = serve_root_stat(taken[0], lambda: reader.poll() is not None)
        out, _ = reader.communicate(timeout=10)
        assert reader.returncode == 0 and out.strip() == oct(ROOT_MODE).encode(), seen
        assert seen[:2] == [FUSE_INIT, FUSE_GETATTR]
        link.release()
        os.close(taken[0])
    finally:
        stop_child(reader)
        force_unmount(str(mountpoint))


_STREAM = """
import hashlib, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
digest = hashlib.sha256(os.read(fd, 1 << 20))
print("started", flush=True)
sys.stdin.readline()  # the test replaces the server meanwhile
while chunk := os.read(fd, 1 << 20):
    digest.update(chunk)
print(digest.hexdigest(), flush=True)
"""


def test_a_served_mount_changes_agent_through_the_keeper_under_a_reader(
    keeper: KeeperProcess, root: Path
) -> None:
    """The shipped FuseMount with KeeperLink, as the agent uses them: the first server is
    SIGKILLed, a reader goes on reading while no server runs, the next one takes the
    connection from the keeper, resumes it, and the reader gets every byte right."""
    require_fuse()
    models, mountpoint = root / "models", root / "fuse"
    big = write_random_file(models / DIGEST / "big.bin", 48 * MiB, seed=5)
    expected = hashlib.sha256(big.read_bytes()).hexdigest()
    servers: list[subprocess.Popen[bytes]] = []
    readers: list[subprocess.Popen[bytes]] = []

    def start(
        kind: str, into: list[subprocess.Popen[bytes]], *args: str
    ) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        into.append(child)
        assert child.stdout is not None and child.stdout.readline().strip() == kind.encode()
        return child

    def server(kind: str) -> subprocess.Popen[bytes]:
        command = ["-m", "tests.keeper_agent", "serve", str(keeper.socket_path), str(mountpoint)]
        return start(kind, servers, *command, str(models))

    try:
        first = server("started")
        reader = start("started", readers, "-c", _STREAM, str(mountpoint / DIGEST / "big.bin"))
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        assert reader.stdin is not None and reader.stdout is not None
        reader.stdin.write(b"go\n")
        reader.stdin.flush()
        assert reader.poll() is None, "48 MiB read with no server running"
        server("resumed")
        assert reader.stdout.readline().strip().decode() == expected
        assert reader.wait(timeout=30) == 0
    finally:
        # Servers, then the keeper (the last holder: the connection aborts), then readers (one
        # waiting on an unanswered request cannot be killed before that).
        for child in servers:
            stop_child(child)
        keeper.stop()
        for child in readers:
            stop_child(child)
        force_unmount(str(mountpoint))


def test_an_orphan_nobody_takes_is_aborted_when_its_window_ends(
    keeper: KeeperProcess, root: Path
) -> None:
    require_fuse()
    mountpoint = root / "fuse"
    with raw_fuse_mount(mountpoint) as fd:
        link = _link(keeper, str(mountpoint), handover=1.0)
        link.hold(fd, {})
        os.close(fd)
        started = time.monotonic()
        link.close()
        wait_for(lambda: "no agent took it" in keeper.log(), "the keeper closing the orphan")
        assert time.monotonic() - started >= 1.0
        assert stat_errno(mountpoint) == errno.ENOTCONN, "readers would hang, not fail"
        assert _link(keeper, str(mountpoint)).take() is None


def test_a_connection_that_ended_is_dropped_at_once(keeper: KeeperProcess, root: Path) -> None:
    require_fuse()
    mountpoint = root / "fuse"
    link = _link(keeper, str(mountpoint))
    with raw_fuse_mount(mountpoint) as fd:
        link.hold(fd, {})
        force_unmount(str(mountpoint))  # the kernel aborts the connection: POLLERR
        wait_for(lambda: "its FUSE connection has ended" in keeper.log(), "dropping the dead fd")
    link.close()
    assert _link(keeper, str(mountpoint)).take() is None


def test_hand_over_within_the_window_gives_the_same_open_file(keeper: KeeperProcess) -> None:
    read_end, write_end = os.pipe()
    first = _link(keeper)
    assert first.take() is None
    first.hold(write_end, {"generation": 1})
    first.close()
    taken = _link(keeper).take()
    assert taken is not None
    fd, state = taken
    assert state == {"generation": 1}
    assert (os.fstat(fd).st_ino, os.fstat(fd).st_dev) == (
        os.fstat(write_end).st_ino,
        os.fstat(write_end).st_dev,
    )
    os.write(fd, b"x")
    assert os.read(read_end, 1) == b"x"
    for end in (fd, write_end, read_end):
        os.close(end)


def test_release_closes_the_keepers_copy_and_forgets_the_key(keeper: KeeperProcess) -> None:
    read_end, write_end = os.pipe()
    link = _link(keeper)
    link.hold(write_end, {})
    os.close(write_end)
    assert not writer_closed(read_end, 0.2), "the keeper let go before release"
    link.release()
    assert writer_closed(read_end, 10), "the keeper kept its copy after release"
    assert _link(keeper).take() is None
    os.close(read_end)


def test_a_second_live_agent_cannot_take_a_held_mount(keeper: KeeperProcess) -> None:
    read_end, write_end = os.pipe()
    holder = _link(keeper)
    holder.hold(write_end, {})
    rival = _link(keeper)
    with pytest.raises(KeeperRefusedError, match=f"{keeper.socket_path}.*held by another live"):
        rival.take()
    with pytest.raises(KeeperError, match="held by another live"):
        _link(keeper).take()
    rival.close()
    holder.close()
    taken = _link(keeper).take()
    assert taken is not None, "the refusals disturbed the holder's entry"
    for end in (taken[0], read_end, write_end):
        os.close(end)


def test_a_take_queued_behind_its_holders_death_is_not_refused(keeper: KeeperProcess) -> None:
    """The successor's request is read before the dead holder's hang-up (both wait while the
    keeper is stopped): the keeper notices the hang-up rather than refuse a dead holder's key."""
    assert keeper.proc is not None
    read_end, write_end = os.pipe()
    holder = _link(keeper)
    holder.hold(write_end, {"generation": 2})
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    successor.settimeout(10)
    successor.connect(str(keeper.socket_path))
    assert _ask(successor, wire.encode_request(wire.Take("/other")))["ok"] is True
    os.kill(keeper.proc.pid, signal.SIGSTOP)
    try:
        socket.send_fds(successor, [wire.encode_request(wire.Take(KEY))], [])
        holder.close()
    finally:
        os.kill(keeper.proc.pid, signal.SIGCONT)
    data, fds, _, _ = socket.recv_fds(successor, wire.MAX_MESSAGE, 1)
    reply = wire.decode_reply(data, fds=len(fds))
    assert reply.ok and reply.state == {"generation": 2}, reply
    assert os.fstat(fds[0]).st_ino == os.fstat(write_end).st_ino
    for end in (*fds, read_end, write_end):
        os.close(end)
    successor.close()


def test_a_restarted_keeper_is_held_again(root: Path) -> None:
    socket_path = root / "keeper" / "keeper.sock"
    read_end, write_end = os.pipe()
    link = KeeperLink(socket_path, KEY, handover_seconds=60)
    with keeper_running(socket_path, root / "first.log"):
        link.hold(write_end, {"generation": 7})
    with keeper_running(socket_path, root / "second.log") as second:
        wait_for(lambda: f"holds {KEY}" in second.log(), "the link holding again", timeout=20)
        link.close()
        taken = KeeperLink(socket_path, KEY, handover_seconds=60).take()
        assert taken is not None
        assert taken[1] == {"generation": 7}
        assert os.fstat(taken[0]).st_ino == os.fstat(write_end).st_ino
        os.close(taken[0])
    for end in (read_end, write_end):
        os.close(end)


def test_a_hold_while_no_keeper_runs_is_retried_until_one_does(root: Path) -> None:
    socket_path = root / "keeper" / "keeper.sock"
    read_end, write_end = os.pipe()
    link = KeeperLink(socket_path, KEY, handover_seconds=60)
    link.hold(write_end, {})  # logs, does not raise
    with keeper_running(socket_path, root / "keeper.log") as keeper:
        wait_for(lambda: f"holds {KEY}" in keeper.log(), "the link holding", timeout=20)
        link.release()
        assert _link(keeper).take() is None
    for end in (read_end, write_end):
        os.close(end)


def _take_as_nobody(socket_path: Path) -> str:
    """What ``take`` says to a client running as ``nobody`` (a forked child: ``nobody`` may
    not be able to run this interpreter from where it is installed)."""
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, try, report, exit without running any cleanup
        said = "took it"
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            KeeperLink(socket_path, "/m", handover_seconds=5).take()
        except BaseException as err:  # everything goes back to the parent
            said = str(err)
        os.write(write_end, said.encode()[:4096])
        os._exit(0)
    os.close(write_end)
    try:
        return read_until_closed(read_end, timeout=30).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


def test_a_peer_that_is_not_root_is_refused(keeper: KeeperProcess) -> None:
    require_root()
    assert (keeper.socket_path.stat().st_mode & 0o777, keeper.socket_path.parent.stat().st_mode
            & 0o777) == (0o600, 0o700)  # fmt: skip
    assert "Permission denied" in _take_as_nobody(keeper.socket_path)
    # Even with the permissions opened up, SO_PEERCRED keeps it out.
    for directory in (keeper.socket_path.parent.parent, keeper.socket_path.parent):
        directory.chmod(0o755)
    keeper.socket_path.chmod(0o666)
    said = _take_as_nobody(keeper.socket_path)
    assert f"uid {pwd.getpwnam('nobody').pw_uid} may not use the keeper" in said, said
    assert "refused pid" in keeper.log()
    assert _link(keeper).take() is None, "the keeper stopped serving root"


def _ask(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> dict[str, object]:
    socket.send_fds(sock, [data], fds or [])
    reply, got, _, _ = socket.recv_fds(sock, wire.MAX_MESSAGE, 1)
    assert got == []
    body: dict[str, object] = json.loads(reply)
    return body


def test_bad_messages_get_an_error_and_lose_nothing(keeper: KeeperProcess) -> None:
    read_end, write_end = os.pipe()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(str(keeper.socket_path))
    cases = [
        (b"\xff garbage", [], "not a JSON message"),
        (b"{" + b" " * (100 * 1024) + b"}", [], "over 65536 bytes"),
        (wire.encode_request(wire.Take(KEY)), [write_end, write_end], "more than one"),
        (wire.encode_request(wire.Take(KEY)), [write_end], "take takes 0 file descriptor"),
        (b'{"v": 1, "op": "hold", "key": "/m", "state": {}, "handover_seconds": -1}',
         [write_end], "handover_seconds must be in"),
    ]  # fmt: skip
    for data, fds, problem in cases:
        reply = _ask(sock, data, fds)
        assert reply["ok"] is False and problem in str(reply["error"]), reply
    os.close(write_end)
    assert writer_closed(read_end, 10), "the keeper kept a descriptor from a refused message"
    assert _ask(sock, wire.encode_request(wire.Take(KEY))) == {"ok": True, "fd": False, "state": {}}
    sock.close()
    os.close(read_end)
    assert keeper.proc is not None and keeper.proc.poll() is None


def test_connections_are_bounded_and_a_freed_slot_serves_again(keeper: KeeperProcess) -> None:
    held = []
    try:
        for index in range(MAX_CONNECTIONS):
            take = wire.encode_request(wire.Take(f"/other/{index}"))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.settimeout(10)
            sock.connect(str(keeper.socket_path))
            held.append(sock)
            assert _ask(sock, take)["ok"] is True  # accepted and served, one at a time
        with pytest.raises(KeeperError, match=str(keeper.socket_path)):
            _link(keeper).take()
        assert f"{MAX_CONNECTIONS} connections already" in keeper.log()
        held.pop().close()
        wait_for(lambda: _take_outcome(keeper) == "ok", "a freed slot serving again")
    finally:
        for sock in held:
            sock.close()


def _take_outcome(keeper: KeeperProcess) -> str:
    link = _link(keeper)
    try:
        link.take()
    except KeeperError:
        return "refused"
    finally:
        link.close()
    return "ok"


def test_sigterm_closes_every_descriptor_and_the_socket(keeper: KeeperProcess) -> None:
    read_end, write_end = os.pipe()
    link = _link(keeper)
    link.hold(write_end, {})
    link.close()  # an orphan in its window: the keeper's copy is the only one left
    os.close(write_end)
    assert keeper.stop() == 0, keeper.log()
    assert writer_closed(read_end, 1), "the keeper exited without closing what it held"
    assert not keeper.socket_path.exists()
    os.close(read_end)


def test_a_live_keepers_socket_is_not_taken_over(keeper: KeeperProcess, root: Path) -> None:
    second = subprocess.run(
        KeeperProcess(keeper.socket_path, root / "second.log").command,
        capture_output=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert f"keeper socket {keeper.socket_path} is in use" in second.stderr.decode()
    assert _link(keeper).take() is None, "the first keeper lost its socket"


def test_an_unreachable_keeper_is_an_error_naming_its_socket(root: Path) -> None:
    missing = root / "nowhere" / "keeper.sock"
    with pytest.raises(KeeperError, match=f"cannot connect to the FUSE keeper at {missing}"):
        KeeperLink(missing, KEY, handover_seconds=5).take()


def test_the_keeper_loads_no_grpc_aiohttp_store_or_config(root: Path) -> None:
    keeper = KeeperProcess(root / "k" / "keeper.sock", root / "keeper.log", "-X", "importtime")
    keeper.start()
    assert keeper.stop() == 0
    loaded = {line.rpartition("|")[2].strip() for line in keeper.log().splitlines()
              if line.startswith("import time:")}  # fmt: skip
    assert "cacheagent.fuse.keeper" in loaded
    heavy = ("grpc", "aiohttp", "google.protobuf", "sqlite3", "yaml", "prometheus_client",
             "cacheagent.store", "cacheagent.config", "cacheagent.pull", "cacheagent.sources",
             "cacheagent.csi", "cacheagent.api", "cacheagent._proto")  # fmt: skip
    assert not {m for m in loaded if m.startswith(heavy)}
