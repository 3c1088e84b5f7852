"""The agent's HTTP port: ``GET`` of a few fixed paths (metrics and health), nothing else.

The port is reachable from the pod network, so it must not be a lever on the node. A general
web framework keeps a connection whose request head never completes open indefinitely, and
logs a traceback for malformed input; this listener is small enough to bound every step:

- a request head must arrive whole within ``header_timeout`` seconds and fit in
  ``max_head_bytes``, or the connection is dropped (one log line, no traceback; an oversized
  head is answered 431 and the rest of its input read and dropped, at most 4 MiB, so the
  client sees the answer rather than a reset);
- at most ``max_connections`` connections at once; more are closed on arrival;
- one request per connection (``Connection: close``), the answer written within
  ``write_timeout`` seconds;
- only ``GET`` and ``HEAD`` of the configured paths (404/405 otherwise, 400 for a malformed
  request line), the query string ignored.

The port is kept off the CSI driver's path: ``ThreadedListener`` serves it from an event
loop in a thread of its own (handlers must only read state the agent's loop publishes, never
await its objects), and ``Coalesced`` renders expensive answers (the ``/metrics`` exposition)
in one thread of their own, at most one render per ``min_interval`` shared by every caller
waiting, so a flood of scrapes costs a bounded number of renders whatever its size, never
queues behind or in front of the agent's worker threads, and no answer predates its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus

log = logging.getLogger(__name__)

TEXT = "text/plain; charset=utf-8"
LINGER_BYTES = 4 << 20


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT


Handler = Callable[[], Awaitable[Response]]


@dataclass(frozen=True)
class ListenerLimits:
    header_timeout: float = 5.0
    write_timeout: float = 10.0
    max_head_bytes: int = 8192
    max_connections: int = 256


class HttpListener:
    """Serves ``routes`` (path -> handler) on one TCP address."""

    def __init__(self, routes: Mapping[str, Handler], limits: ListenerLimits | None = None):
        self.routes = dict(routes)
        self.limits = limits or ListenerLimits()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._accept, host, port, limit=self.limits.max_head_bytes
        )

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.limits.max_connections:
            log.warning(
                "http: %s refused: %d connections open already",
                _peer(writer),
                len(self._connections),
            )
            writer.close()
            return
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError) as err:
            log.info("http: %s dropped while answering: %s", _peer(writer), type(err).__name__)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), self.limits.write_timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limits = self.limits
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), limits.header_timeout)
        except TimeoutError:
            log.info(
                "http: %s dropped: no complete request head within %gs",
                _peer(writer),
                limits.header_timeout,
            )
            return
        except asyncio.LimitOverrunError:
            log.warning(
                "http: %s refused: request head over %d bytes", _peer(writer), limits.max_head_bytes
            )
            await self._answer(writer, Response(431, b"request head too large\n"), head=False)
            await self._linger(reader, writer)
            return
        except asyncio.IncompleteReadError:
            return  # the client went away before finishing its request: nothing to answer
        method, path, problem = parse_request_line(head)
        if problem is not None:
            log.warning("http: %s bad request: %s", _peer(writer), problem)
            await self._answer(writer, Response(400, f"bad request: {problem}\n".encode()), False)
            return
        handler = self.routes.get(path)
        if handler is None:
            response = Response(404, b"not found\n")
        elif method not in ("GET", "HEAD"):
            response = Response(405, b"method not allowed\n")
        else:
            response = await _run(handler, path)
        await self._answer(writer, response, head=method == "HEAD")

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read and drop what the client is still sending (bounded), so that closing with
        unread input does not reset the connection before the client has read the answer."""
        if writer.can_write_eof():
            writer.write_eof()
        budget = LINGER_BYTES

        async def drain_input() -> None:
            nonlocal budget
            while budget > 0 and (chunk := await reader.read(min(budget, 65536))):
                budget -= len(chunk)

        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(drain_input(), self.limits.header_timeout)

    async def _answer(self, writer: asyncio.StreamWriter, response: Response, head: bool) -> None:
        reason = HTTPStatus(response.status).phrase
        lines = (
            f"HTTP/1.1 {response.status} {reason}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(lines.encode("latin-1"))
        if not head:
            writer.write(response.body)
        await asyncio.wait_for(writer.drain(), self.limits.write_timeout)


def parse_request_line(head: bytes) -> tuple[str, str, str | None]:
    """``(method, path, problem)`` from a request head; ``problem`` says what is malformed."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return "", "", f"malformed request line ({len(line)} bytes)"
    method, target = parts[0], parts[1]
    if not method.isalpha() or not method.isupper() or not target.startswith(b"/"):
        return "", "", "malformed method or target"
    path = target.split(b"?", 1)[0]
    return method.decode("ascii"), path.decode("latin-1"), None


class ThreadedListener:
    """An ``HttpListener`` on its own event loop, in its own daemon thread."""

    def __init__(self, listener: HttpListener) -> None:
        self.listener = listener
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="http-listener", daemon=True
        )

    @property
    def port(self) -> int:
        return self.listener.port

    async def start(self, host: str, port: int) -> None:
        """Bind and serve; raises here (OSError) if the address cannot be bound."""
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self.listener.start(host, port), self._loop)
        try:
            await asyncio.wrap_future(started)
        except BaseException:
            await self._close_loop()
            raise

    async def stop(self) -> None:
        if not self._thread.is_alive():
            return
        stopped = asyncio.run_coroutine_threadsafe(self.listener.stop(), self._loop)
        try:
            await asyncio.wrap_future(stopped)
        finally:
            await self._close_loop()

    async def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join)
        self._loop.close()


async def _run(handler: Handler, path: str) -> Response:
    try:
        return await handler()
    except Exception:
        log.exception("http: answering %s failed", path)  # our bug, not the client's input
        return Response(500, b"internal error\n")


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "client"


class Coalesced:
    """``render()`` in a thread of its own, at most once per ``min_interval`` seconds, its
    result shared by every caller waiting for it.

    Each caller gets a render that started after it asked, so an answer is never older than
    its request; callers that arrive faster than ``min_interval`` wait and share the next one.
    """

    def __init__(self, render: Callable[[], bytes], *, min_interval: float = 0.1) -> None:
        self._render = render
        self._min_interval = min_interval
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scrape")
        self._next: asyncio.Future[bytes] | None = None  # the render callers now wait for
        self._running: asyncio.Future[bytes] | None = None
        self._last_start = -math.inf

    async def get(self) -> bytes:
        if self._next is None:
            self._next = asyncio.ensure_future(self._render_next())
        return await asyncio.shield(self._next)

    async def _render_next(self) -> bytes:
        delay = self._last_start + self._min_interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # rate limit, not synchronisation
        if self._running is not None:
            await asyncio.wait([self._running])
        self._next = None  # from here on, a caller needs a later render
        self._last_start = time.monotonic()
        self._running = asyncio.get_running_loop().run_in_executor(self._executor, self._render)
        return await self._running

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
