"""The request loop on a ``/dev/fuse`` descriptor: one reader thread, N worker threads.

The reader polls the descriptor (non-blocking) together with a wake-up pipe, reads one request
at a time and queues it; the workers decode, answer through the ``Dispatcher`` and write each
reply with one ``writev``. One reader rather than N threads polling the descriptor: poll wakes
every poller for each request, so N pollers cost N wake-ups per request; reading is cheap, the
answers (provider reads that may wait for an origin) are what needs the N threads, and the
``waits.OriginWaits`` bounds are about those workers.

``stop_reading`` + ``drain`` is the hand-over: nothing more is read (the kernel keeps new
requests queued for whoever reads next), what was read is answered for up to a timeout, and
what is still unanswered then is dropped: the next process gets it again with
FUSE_NOTIFY_RESEND. Write errors ENOENT (the kernel gave up on that request: interrupted,
or resent elsewhere) and ENODEV (the connection is gone) are expected and ignored.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import select
import threading
import time

from cacheagent.fuse.dispatch import READ_BUFFER, Dispatcher
from cacheagent.fuse.protocol import ProtocolError, decode_request, encode_reply, malformed_unique

log = logging.getLogger(__name__)

_GONE = (errno.ENOENT, errno.ENODEV, errno.EBADF)


class DeviceChannel:
    """The descriptor, written by many threads, closed only once no write is under way.

    Closing while a worker is about to write would let that write land on whatever file
    reuses the number; so writes are counted and ``close`` waits for them.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._cond = threading.Condition()
        self._writing = 0
        self._closed = False

    def write(self, parts: list[bytes]) -> None:
        """One reply or notification; OSError (EBADF once closed) for the caller to judge."""
        with self._cond:
            if self._closed:
                raise OSError(errno.EBADF, "the FUSE session was handed over or stopped")
            self._writing += 1
        try:
            os.writev(self.fd, parts)
        finally:
            with self._cond:
                self._writing -= 1
                self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Close once no write is under way; False (descriptor left open) after ``timeout``."""
        with self._cond:
            if self._closed:
                return True
            self._closed = True
            idle = self._cond.wait_for(lambda: self._writing == 0, timeout)
        if not idle:
            log.warning("fuse: a reply is still being written; leaving fd %d open", self.fd)
            return False
        os.close(self.fd)
        return True


class Session:
    """Serves one FUSE connection from ``channel`` until stopped or the connection ends."""

    def __init__(self, channel: DeviceChannel, dispatcher: Dispatcher, *, workers: int) -> None:
        self.channel = channel
        self.dispatcher = dispatcher
        self.connection_lost = False
        self._workers = max(1, workers)
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_closed = False
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="fuse-reader", daemon=True)
        self._threads = [
            threading.Thread(target=self._work, name=f"fuse-worker-{n}", daemon=True)
            for n in range(self._workers)
        ]

    def start(self) -> None:
        os.set_blocking(self.channel.fd, False)
        for thread in self._threads:
            thread.start()
        self._reader.start()

    def running(self) -> bool:
        return self._reader.is_alive() and not self.connection_lost

    def stop_reading(self) -> None:
        """Read no more requests (the reader finishes the one it is reading, if any)."""
        self._stopping.set()
        if not self._wake_closed:
            with contextlib.suppress(BlockingIOError):  # full: already woken
                os.write(self._wake_w, b"x")

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for every request read to be answered; False if some were not
        (those are dropped, never answered by this process)."""
        deadline = time.monotonic() + timeout
        self._reader.join(max(0.0, deadline - time.monotonic()))
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        done = not self._reader.is_alive() and not any(t.is_alive() for t in self._threads)
        if not done:
            self._abandon.set()
            log.warning("fuse: requests still unanswered after %.1fs; dropping them", timeout)
        if not self._wake_closed:
            self._wake_closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        return done

    def _read_loop(self) -> None:
        buffer = bytearray(READ_BUFFER)
        view = memoryview(buffer)
        poller = select.poll()
        poller.register(self.channel.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stopping.is_set():
                try:
                    size = os.readv(self.channel.fd, [buffer])
                except BlockingIOError:
                    poller.poll()
                    continue
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        continue  # the request was interrupted before we read it
                    self.connection_lost = True
                    if exc.errno != errno.ENODEV:
                        log.error("fuse: reading /dev/fuse failed: %s", exc)
                    break
                if size == 0:  # not /dev/fuse's way, but end-of-file can only mean gone
                    self.connection_lost = True
                    break
                self._queue.put(bytes(view[:size]))
        finally:
            for _ in self._threads:
                self._queue.put(None)

    def _work(self) -> None:
        while (data := self._queue.get()) is not None:
            if not self._abandon.is_set():
                self._serve(data)

    def _serve(self, data: bytes) -> None:
        try:
            request = decode_request(data)
        except ProtocolError as exc:
            log.error("fuse: malformed request: %s", exc)
            unique = malformed_unique(data)
            if unique is not None:  # an unanswered request would hang its caller
                self._write(unique, encode_reply(unique, error=errno.EIO))
            return
        reply = self.dispatcher.handle(request)
        if reply is not None:
            self._write(request.header.unique, reply)

    def _write(self, unique: int, reply: list[bytes]) -> None:
        try:
            self.channel.write(reply)
        except OSError as exc:
            if exc.errno not in _GONE:
                log.error("fuse: writing the reply to request %#x failed: %s", unique, exc)
