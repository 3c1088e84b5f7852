"""Run an asyncio test server (FaultServer and friends) on its own loop in a daemon thread.

Tests that drive the agent subprocess with the blocking CLI or gRPC client cannot serve an
origin from their own event loop; this keeps the origin answering while they block.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
TIMEOUT_SECONDS = 30.0


class AsyncServer(Protocol):
    @property
    def host(self) -> str: ...
    async def start(self) -> object: ...
    async def stop(self) -> None: ...


S = TypeVar("S", bound=AsyncServer)


class ThreadedServer(Generic[S]):
    def __init__(self, server: S) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT_SECONDS) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> ThreadedServer[S]:
        self._thread.start()
        try:
            self.run(self.server.start())
        except BaseException:
            self._close_loop()
            raise
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.run(self.server.stop())
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(TIMEOUT_SECONDS)
        self._loop.close()

    @property
    def host(self) -> str:
        return self.server.host


@contextmanager
def serve_in_thread(server: S) -> Iterator[S]:
    threaded = ThreadedServer(server).start()
    try:
        yield server
    finally:
        threaded.stop()
