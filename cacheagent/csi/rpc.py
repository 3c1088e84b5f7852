"""What every CSI handler shares: error-to-status mapping, request ids, timing, per-key locks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeAlias, TypeVar

import grpc
from grpc import aio

from cacheagent.logs import request_context

from .status import status_for

log = logging.getLogger(__name__)

T = TypeVar("T")

Context: TypeAlias = "aio.ServicerContext[Any, Any]"

OperationObserver = Callable[[str, str, float], None]
"""``on_operation(method, code, seconds)``: the composition root feeds it to Prometheus."""

MAX_MESSAGE_CHARS = 2048
"""An answer's message is cut here: it travels in a gRPC trailer, and a trailer over the
client's header-list limit (8 KiB by default) turns the answer into RESOURCE_EXHAUSTED."""

_QUIET_CODES = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE}
)


class RpcRunner:
    """Runs one handler: answers errors with the mapped status and reports every outcome."""

    def __init__(self, observer: OperationObserver | None = None) -> None:
        self._observer = observer

    async def run(self, method: str, context: Context, call: Callable[[], Awaitable[T]]) -> T:
        start = time.perf_counter()
        with request_context():
            try:
                result = await call()
            except asyncio.CancelledError:
                self._observe(method, "CANCELLED", time.perf_counter() - start)
                raise
            except Exception as exc:
                status, message = status_for(exc)
                message = _bounded(message)
                self._log(method, status, message, exc)
                # Observed before answering, so whoever sees the answer also sees the count.
                self._observe(method, status.name, time.perf_counter() - start)
                await context.abort(status, message)
                raise  # abort() raises; this line only satisfies the type checker
            self._observe(method, "OK", time.perf_counter() - start)
            return result

    @staticmethod
    def _log(method: str, status: grpc.StatusCode, message: str, exc: Exception) -> None:
        if status is grpc.StatusCode.INTERNAL:
            log.error("%s failed: %s", method, message, exc_info=exc)
        elif status in _QUIET_CODES:
            log.info("%s: %s: %s", method, status.name, message)
        else:
            log.warning("%s: %s: %s", method, status.name, message)

    def _observe(self, method: str, code: str, seconds: float) -> None:
        if self._observer is None:
            return
        try:
            self._observer(method, code, seconds)
        except Exception:
            log.exception("CSI operation observer failed (ignored)")


def _bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... ({len(message)} characters, truncated)"


class KeyedLocks:
    """One asyncio.Lock per key (volume id, target path), dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
