"""A TCP relay on loopback that caps the bandwidth of a real origin and counts its bytes.

Put it in front of the real ``docker-registry`` and name the relay's port in refs: every
connection's downstream bytes draw on one shared budget of ``rate`` bytes per second (a
virtual clock: each chunk is released when the link would have finished sending the ones
before it), so N clients share the cap the way N nodes share an origin's uplink. ``sent``
counts the bytes relayed to clients: the origin bytes of a benchmark or a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

_CHUNK = 64 << 10


class ThrottleProxy:
    def __init__(self, upstream_port: int, rate: float, *, host: str = "127.0.0.1") -> None:
        self.upstream_port = upstream_port
        self.rate = rate
        self.host = host
        self.port = 0
        self.sent = 0
        self._release_at = 0.0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> ThrottleProxy:
        self._server = await asyncio.start_server(self._connection, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ThrottleProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, throttle=False),
                self._pipe(up_reader, writer, throttle=True),
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a client or the origin hung up, or the proxy is stopping
        finally:
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, throttle: bool
    ) -> None:
        try:
            while data := await reader.read(_CHUNK):
                if throttle:
                    await self._take(len(data))
                    self.sent += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(OSError):
                if writer.can_write_eof():
                    writer.write_eof()

    async def _take(self, n: int) -> None:
        now = time.monotonic()
        self._release_at = max(self._release_at, now) + n / self.rate
        delay = self._release_at - now
        if delay > 0:
            await asyncio.sleep(delay)
