"""Small asyncio helpers shared by the engines: change signals, all-or-nothing gathers, and
thread work that is never abandoned half way."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import Executor
from typing import Any, ParamSpec, TypeVar

_P = ParamSpec("_P")
_T = TypeVar("_T")


class Signal:
    """Wakes every waiter each time something changed; waiters re-check their own condition."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    @property
    def next(self) -> asyncio.Event:
        """The event the next ``fire`` sets (take it before checking, so no change is missed)."""
        return self._event

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while True:
            event = self._event
            if predicate():
                return
            await event.wait()


async def all_or_nothing(aws: Iterable[Awaitable[_T]]) -> list[_T]:
    """Await all; on the first failure cancel the rest, wait for them, and re-raise it."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@contextlib.asynccontextmanager
async def closing_stream(stream: AsyncIterator[bytes]) -> AsyncIterator[AsyncIterator[bytes]]:
    """Close an abandoned fetch at once (its connection or file), not whenever GC gets to it."""
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def see_through(fut: asyncio.Future[_T]) -> _T:
    """Await thread work; if cancelled meanwhile, still wait for it, then re-raise."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return fut.result()


class ThreadWork:
    """Blocking work started in threads by one owner, tracked so that the owner can wait for
    all of it before it frees what the threads use (a file descriptor, buffers)."""

    def __init__(self) -> None:
        self._running: set[asyncio.Future[Any]] = set()

    def submit(
        self,
        lane: Executor | None,
        fn: Callable[_P, _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> asyncio.Future[_T]:
        """Start ``fn`` in a thread (``lane``, else the loop's default executor)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_T] = loop.run_in_executor(lane, functools.partial(fn, *args, **kwargs))
        self._running.add(fut)
        fut.add_done_callback(self._done)
        return fut

    async def run(
        self,
        lane: Executor | None,
        fn: Callable[_P, _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run ``fn`` in a thread and see it through even if we are cancelled."""
        return await see_through(self.submit(lane, fn, *args, **kwargs))

    async def drain(self) -> bool:
        """Wait until no thread runs our work; True if we were cancelled meanwhile (the
        caller re-raises once it has cleaned up)."""
        cancelled = False
        while self._running:
            try:
                await asyncio.wait(set(self._running))
            except asyncio.CancelledError:
                cancelled = True
        return cancelled

    def _done(self, fut: asyncio.Future[Any]) -> None:
        self._running.discard(fut)
        # Mark a failure seen: whoever awaits the future still gets it, but work that a
        # cancelled caller no longer awaits must not log "exception was never retrieved".
        if not fut.cancelled():
            fut.exception()
