"""Run an asyncio test server (FaultServer, HfServer...) on its own loop in a thread.

Tests that drive the agent subprocess with the blocking CLI or gRPC client cannot serve an
origin from their own event loop; this keeps the origin answering while they block.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar


class AsyncServer(Protocol):
    async def start(self) -> object: ...
    async def stop(self) -> None: ...


S = TypeVar("S", bound=AsyncServer)

TIMEOUT_SECONDS = 15.0


@contextmanager
def serve_in_thread(server: S) -> Iterator[S]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-origin", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(TIMEOUT_SECONDS)
        try:
            yield server
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(TIMEOUT_SECONDS)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT_SECONDS)
        loop.close()
