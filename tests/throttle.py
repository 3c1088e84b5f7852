"""A TCP proxy on 127.0.0.1 that caps the bandwidth from a loopback origin to its clients.

Loopback moves gigabytes a second, so a lazy read would always find its bytes already pulled.
Put this in front of a real registry (or any HTTP origin) and point the agent at the proxy's
``host``: every byte the origin sends shares one token bucket of ``rate`` bytes per second,
across all connections, the way a node's link to a remote registry would. Requests to the
origin are not slowed. Run it with ``tests.threaded.serve_in_thread`` from blocking tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

CHUNK = 64 << 10


@dataclass
class _Bucket:
    rate: float
    burst: float
    tokens: float = 0.0
    stamp: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def take(self, count: int) -> None:
        async with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= count
            if self.tokens < 0:
                await asyncio.sleep(-self.tokens / self.rate)


@dataclass
class ThrottleProxy:
    upstream_host: str
    upstream_port: int
    rate: float  # bytes per second, origin to clients, all connections together
    port: int = 0
    sent: int = 0
    _server: asyncio.Server | None = None
    _bucket: _Bucket | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> ThrottleProxy:
        self._bucket = _Bucket(self.rate, burst=max(CHUNK, self.rate / 20))
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
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

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, throttled=False),
                self._pipe(up_reader, writer, throttled=True),
            )
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, throttled: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(CHUNK):
                if throttled:
                    assert self._bucket is not None
                    await self._bucket.take(len(data))
                    self.sent += len(data)
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
