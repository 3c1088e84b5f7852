"""The agent's side of the FUSE keeper (``cacheagent.fuse.keeper``): one link per mount.

``take`` at start-up gets the connection a previous agent left (or None); ``hold`` hands the
keeper a copy of the live one; ``release`` after an unmount; ``close`` when the agent stops, so
the keeper keeps the connection for the next agent. The link keeps its connection to the keeper
open (the keeper learns the agent has gone when it closes) and, if the keeper restarts, a
background thread reconnects and holds again: a keeper upgrade never costs a running agent its
volumes.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from pathlib import Path

from cacheagent.fuse import keeper_wire as wire
from cacheagent.fuse.keeper_wire import KeeperError, KeeperRefusedError

__all__ = ["KeeperError", "KeeperLink", "KeeperRefusedError"]

log = logging.getLogger(__name__)

BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 10.0
REPLY_TIMEOUT_SECONDS = 5.0
#: The watcher also looks again this often, in case a caller replaced the connection.
WATCH_POLL_MS = 1000


class KeeperLink:
    """One persistent connection from the agent to the keeper, for one mount (key = mount point)."""

    def __init__(
        self, socket_path: Path, key: str, *, handover_seconds: float, connect_timeout: float = 5.0
    ) -> None:
        self.socket_path = socket_path
        self.key = wire.check_key(key)
        self.handover_seconds = wire.check_handover(handover_seconds)
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._held: tuple[int, dict[str, object]] | None = None  # our own dup, and its state
        self._ended = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._watcher: threading.Thread | None = None

    def take(self) -> tuple[int, dict[str, object]] | None:
        """Claim the key and get the descriptor the keeper holds for it (the caller owns it),
        or None. KeeperError if the keeper cannot be reached, KeeperRefusedError (a KeeperError)
        if another live agent holds the key. Blocking, like ``hold``."""
        with self._lock:
            sock = self._connected()
            reply, fd = self._exchange(sock, wire.Take(self.key))
        if fd is None:
            return None
        return fd, reply.state

    def hold(self, fd: int, state: dict[str, object]) -> None:
        """Hand the keeper a copy of ``fd`` with ``state`` (the link keeps a dup of its own
        until ``release``/``close``). Keeper failures never raise: they are logged and retried
        in the background. Only a state that cannot travel (not JSON, over 64 KiB) raises
        ``WireError``, before anything changes. Blocking (up to a few seconds if the keeper is
        slow): call it from a worker thread, not the event loop."""
        request = wire.Hold(self.key, wire.check_state(state), self.handover_seconds)
        wire.encode_request(request)  # a state that cannot travel is the caller's bug: say so now
        with self._lock:
            if self._held is not None:
                os.close(self._held[0])
            self._held = (os.dup(fd), state)
            try:
                self._send_hold(self._connected())
            except KeeperError as err:
                log.warning("%s; retrying in the background", err)
                self._drop_connection()
        self._watch()

    def release(self) -> None:
        """We unmounted: the keeper closes its copy and forgets the key; the link ends. Logs,
        never raises: a release that fails costs only the keeper's copy living out its window."""
        with self._lock:
            if self._sock is not None:
                try:
                    self._exchange(self._sock, wire.Release(self.key))
                except KeeperError as err:
                    log.warning("%s", err)
        self._end()

    def close(self) -> None:
        """End the link without release (hand-over): the keeper keeps the descriptor for
        ``handover_seconds`` for the next agent, then closes it."""
        self._end()

    # -- internals ------------------------------------------------------------------------

    def _connected(self) -> socket.socket:
        if self._ended.is_set():
            raise KeeperError(f"keeper link for {self.key} at {self.socket_path} is closed")
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.settimeout(self.connect_timeout)
            try:
                sock.connect(os.fspath(self.socket_path))
            except OSError as err:
                sock.close()
                raise KeeperError(
                    f"cannot connect to the FUSE keeper at {self.socket_path}: {err}"
                ) from None
            sock.settimeout(REPLY_TIMEOUT_SECONDS)
            self._sock = sock
        return self._sock

    def _send_hold(self, sock: socket.socket) -> None:
        assert self._held is not None
        fd, state = self._held
        self._exchange(sock, wire.Hold(self.key, state, self.handover_seconds), fd)

    def _exchange(
        self, sock: socket.socket, request: wire.Request, fd: int | None = None
    ) -> tuple[wire.Reply, int | None]:
        """Send ``request`` and read its reply: (reply, the descriptor it carried or None)."""
        what = f"FUSE keeper at {self.socket_path}: {type(request).__name__.lower()} {self.key}"
        try:
            socket.send_fds(sock, [wire.encode_request(request)], [] if fd is None else [fd])
            data, fds, flags, _ = socket.recv_fds(sock, wire.MAX_MESSAGE, 1)
        except OSError as err:
            self._drop_connection()
            raise KeeperError(f"{what}: {err}") from None
        try:
            if not data and not fds:
                raise wire.WireError("the keeper closed the connection")
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise wire.WireError("reply too large")
            reply = wire.decode_reply(data, fds=len(fds))
        except wire.WireError as err:
            for extra in fds:
                os.close(extra)
            self._drop_connection()
            raise KeeperError(f"{what}: {err}") from None
        if not reply.ok:
            for extra in fds:
                os.close(extra)
            raise KeeperRefusedError(f"{what}: refused: {reply.error}")
        return reply, fds[0] if fds else None

    def _drop_connection(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _watch(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._keep, name=f"keeper-link {self.key}", daemon=True
            )
            self._watcher.start()

    def _keep(self) -> None:
        """Wait for the keeper's side to close; then reconnect with backoff and hold again."""
        backoff = BACKOFF_FIRST_SECONDS
        while not self._ended.is_set():
            with self._lock:
                sock = self._sock
            if sock is not None and not self._wait_closed(sock):
                continue
            if self._ended.wait(backoff):
                return
            with self._lock:
                if self._ended.is_set():
                    return
                try:
                    self._send_hold(self._connected())
                except KeeperRefusedError as err:
                    log.error("%s; no longer holding it", err)
                    return  # another agent owns the mount now: never compete for it
                except KeeperError as err:
                    backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)
                    log.warning("%s; retrying in %gs", err, backoff)
                    continue
            log.info("holding %s at the FUSE keeper %s again", self.key, self.socket_path)
            backoff = BACKOFF_FIRST_SECONDS

    def _wait_closed(self, sock: socket.socket) -> bool:
        """Block until the keeper closes ``sock`` (True) or something else wakes us (False)."""
        poller = select.poll()
        with self._lock:
            if self._sock is not sock:
                return self._sock is None
            poller.register(sock.fileno(), select.POLLIN | select.POLLHUP)
        poller.register(self._wake_r, select.POLLIN)
        events = poller.poll(WATCH_POLL_MS)
        if self._ended.is_set() or not events:
            return False
        with self._lock:
            if self._sock is not sock:
                return self._sock is None
            try:
                closed = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                return False  # a reply a caller already read woke us
            except OSError:
                closed = True
            if closed:
                log.warning(
                    "the FUSE keeper at %s went away; holding %s again when it is back",
                    self.socket_path,
                    self.key,
                )
                self._drop_connection()
            return closed

    def _end(self) -> None:
        if self._ended.is_set():
            return
        self._ended.set()
        os.write(self._wake_w, b"x")
        if self._watcher is not None:
            self._watcher.join(timeout=REPLY_TIMEOUT_SECONDS + 1)
        with self._lock:
            self._drop_connection()
            if self._held is not None:
                os.close(self._held[0])
                self._held = None
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
