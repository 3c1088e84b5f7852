"""The FUSE keeper: a tiny long-lived process that keeps lazy volumes alive across agent restarts.

A FUSE connection ends when the last descriptor to its ``/dev/fuse`` file closes, so a lazy
volume dies with the agent that mounted it. The agent therefore hands the keeper a copy of its
descriptor (SCM_RIGHTS over a unix socket); when the agent stops, the keeper's copy keeps the
connection open (readers wait, they do not fail) and hands it to the next agent, which resumes
serving it. An agent that does not come back within the hand-over window the agent asked for
loses its volumes: the keeper closes the copy, which aborts the connection, so readers get an
error instead of hanging forever.

The keeper runs in its own DaemonSet (``updateStrategy: OnDelete``) so that a rollout of the
agent never replaces it. Stopping it (SIGTERM) closes every descriptor it holds: that does not
hurt a running agent (it keeps its own descriptor and holds again when a keeper returns) but
ends the volumes of an agent that is down at that moment.

Only root or the keeper's own uid may talk to it (SO_PEERCRED): whoever gets a descriptor can
serve files to every lazy pod on the node. The socket is 0600 in a 0700 directory. Stdlib only,
no asyncio: it must start fast and stay small.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import selectors
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cacheagent.fuse import keeper_wire as wire
from cacheagent.fuse.keeper_table import Entry, KeeperTable, RefusedError
from cacheagent.sockets import MAX_SOCKET_PATH, is_live

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
TICK_SECONDS = 0.5
#: Used for a key claimed by ``take`` before any ``hold`` says otherwise.
DEFAULT_HANDOVER_SECONDS = 120.0
_DEAD = select.POLLERR | select.POLLNVAL
_UCRED = struct.Struct("3i")


@dataclass
class _Peer:
    sock: socket.socket
    uid: int
    pid: int
    refusal: str = ""


def serve_keeper(socket_path: Path, *, stop: threading.Event | None = None) -> None:
    """Serve on ``socket_path`` until ``stop`` is set; close every held descriptor on the way out.

    KeeperError if the path cannot be claimed (a live keeper answers there, or it is not a
    socket)."""
    listener = _listen(socket_path)
    try:
        _Keeper(listener, stop or threading.Event()).run()
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        log.info("keeper on %s stopped", socket_path)


def _listen(path: Path) -> socket.socket:
    """Bind ``path`` (0600, its directory 0700 when ours), replacing only a dead socket."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise wire.KeeperError(f"keeper socket {path} is longer than {MAX_SOCKET_PATH} bytes")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.parent.stat().st_uid == os.geteuid():
        path.parent.chmod(0o700)
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise wire.KeeperError(f"keeper socket {path} exists and is not a socket")
        if is_live(path, socket.SOCK_SEQPACKET):
            raise wire.KeeperError(f"keeper socket {path} is in use (is a keeper running?)")
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # The socket file takes the mode of the socket's inode at bind (less the umask): 0600 from
    # its first moment, without touching the process-wide umask.
    os.fchmod(listener.fileno(), 0o600)
    listener.bind(os.fspath(path))
    listener.listen(16)
    listener.setblocking(False)
    log.info("keeper serving on %s", path)
    return listener


class _Keeper:
    """The select loop: one listener, at most ``MAX_CONNECTIONS`` peers, the table."""

    def __init__(self, listener: socket.socket, stop: threading.Event) -> None:
        self._listener = listener
        self._stop = stop
        self._table = KeeperTable()
        self._peers: dict[int, _Peer] = {}
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ)

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                for key, _ in self._selector.select(self._timeout()):
                    if key.fileobj is self._listener:
                        self._accept()
                    else:
                        self._serve(key.fd)
                self._expire()
                self._drop_dead()
        finally:
            for fd in list(self._peers):
                self._disconnect(fd, quiet=True)
            for fd in self._table.clear():
                os.close(fd)
            self._selector.close()

    def _timeout(self) -> float:
        deadline = self._table.next_deadline()
        if deadline is None:
            return TICK_SECONDS
        return max(0.0, min(TICK_SECONDS, deadline - time.monotonic()))

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        pid, uid, _ = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        if len(self._peers) >= MAX_CONNECTIONS:
            log.warning("refused pid %d: %d connections already", pid, MAX_CONNECTIONS)
            sock.close()
            return
        peer = _Peer(sock, uid, pid)
        if uid not in (0, os.geteuid()):
            log.warning(
                "refused pid %d uid %d: only root or uid %d may use the keeper",
                pid,
                uid,
                os.geteuid(),
            )
            peer.refusal = f"uid {uid} may not use the keeper (only root or uid {os.geteuid()})"
        self._peers[sock.fileno()] = peer
        self._selector.register(sock, selectors.EVENT_READ)
        log.debug("pid %d connected", pid)

    def _serve(self, conn: int) -> None:
        peer = self._peers.get(conn)
        if peer is None:
            return  # disconnected earlier in this round of events
        try:
            data, fds, flags, _ = socket.recv_fds(peer.sock, wire.MAX_MESSAGE, 2)
        except BlockingIOError:
            return
        except OSError as err:
            log.warning("pid %d: receive failed (%s); dropping the connection", peer.pid, err)
            self._disconnect(conn)
            return
        if (not data and not fds) or peer.refusal:
            # A refused peer hears why in answer to its first message (a refusal sent at
            # accept would be lost: closing with its request unread resets the connection).
            for fd in fds:
                os.close(fd)
            if peer.refusal and data:
                _send(peer.sock, wire.Reply(ok=False, error=peer.refusal))
            self._disconnect(conn)
            return
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) > 1:
                raise wire.WireError(
                    f"message over {wire.MAX_MESSAGE} bytes or with more than one descriptor"
                )
            request = wire.decode_request(data, fds=len(fds))
            reply, send_fd = self._apply_reaping(conn, request, fds[0] if fds else None)
            fds = []  # the table owns a held descriptor now
        except wire.WireError as err:
            log.warning("pid %d: bad message: %s", peer.pid, err)
            reply, send_fd = wire.Reply(ok=False, error=str(err)), None
        except RefusedError as err:
            reply = wire.Reply(ok=False, error=f"mount {err} is held by another live agent")
            send_fd = None
        finally:
            for fd in fds:
                os.close(fd)
        if not _send(peer.sock, reply, send_fd):
            log.warning("pid %d does not read its replies; dropping the connection", peer.pid)
            self._disconnect(conn)

    def _apply_reaping(
        self, conn: int, request: wire.Request, fd: int | None
    ) -> tuple[wire.Reply, int | None]:
        """``_apply``; if the key's owner has hung up but its end is not handled yet (an agent
        killed just before its successor asks), handle that first rather than refuse."""
        try:
            return self._apply(conn, request, fd)
        except RefusedError as refused:
            if not self._hung_up(refused.owner):
                raise
            self._disconnect(refused.owner)
            return self._apply(conn, request, fd)

    def _hung_up(self, conn: int) -> bool:
        peer = self._peers.get(conn)
        if peer is None:
            return True
        poller = select.poll()
        poller.register(peer.sock, select.POLLIN)
        return any(events & (select.POLLHUP | _DEAD) for _, events in poller.poll(0))

    def _apply(
        self, conn: int, request: wire.Request, fd: int | None
    ) -> tuple[wire.Reply, int | None]:
        if isinstance(request, wire.Take):
            entry = self._table.take(conn, request.key, handover_seconds=DEFAULT_HANDOVER_SECONDS)
            log.info(
                "pid %d took %s (%s)",
                self._peers[conn].pid,
                request.key,
                "held" if entry.fd is not None else "nothing held",
            )
            return wire.Reply(ok=True, fd=entry.fd is not None, state=entry.state), entry.fd
        if isinstance(request, wire.Hold):
            assert fd is not None  # decode_request checked it
            replaced = self._table.hold(
                conn, request.key, fd, request.state, request.handover_seconds
            )
            for old in replaced:
                os.close(old)
            log.info("pid %d holds %s", self._peers[conn].pid, request.key)
            return wire.Reply(ok=True), None
        for old in self._table.release(conn, request.key):
            os.close(old)
        log.info("pid %d released %s", self._peers[conn].pid, request.key)
        return wire.Reply(ok=True), None

    def _disconnect(self, conn: int, *, quiet: bool = False) -> None:
        peer = self._peers.pop(conn)
        self._selector.unregister(peer.sock)
        peer.sock.close()
        for entry in self._table.disconnect(conn, time.monotonic()):
            if not quiet:
                log.warning(
                    "agent pid %d left without releasing %s; keeping it %gs for the next agent",
                    peer.pid,
                    entry.key,
                    entry.handover_seconds,
                )

    def _expire(self) -> None:
        for entry in self._table.expire(time.monotonic()):
            _close_entry(entry, "no agent took it within its hand-over window")

    def _drop_dead(self) -> None:
        held = dict(self._table.held())
        if not held:
            return
        poller = select.poll()
        keys = {fd: key for key, fd in held.items()}
        for fd in keys:
            poller.register(fd, select.POLLIN)
        for fd, events in poller.poll(0):
            if events & _DEAD:
                entry = self._table.drop(keys[fd])
                if entry is not None:
                    _close_entry(entry, "its FUSE connection has ended (unmounted or aborted)")


def _close_entry(entry: Entry, why: str) -> None:
    log.warning("closing the FUSE connection of %s: %s", entry.key, why)
    if entry.fd is not None:
        os.close(entry.fd)


def _send(sock: socket.socket, reply: wire.Reply, fd: int | None = None) -> bool:
    """Send without blocking; False if the peer's buffer is full (it does not read)."""
    try:
        socket.send_fds(sock, [wire.encode_reply(reply)], [] if fd is None else [fd])
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        return False
    return True
