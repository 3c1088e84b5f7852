"""Fixtures shared by every test; the skip-or-fail rules live in tests/support.py."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator

import pytest

from tests.support import require_fuse, require_root

_SETTLE_ROUNDS = 3  # loop iterations a cancelled task gets to finish before it counts as leaked


@pytest.fixture
def root_required() -> None:
    require_root()


@pytest.fixture
def fuse_required() -> None:
    require_fuse()


@pytest.fixture(autouse=True)
def no_leaked_tasks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail an async test that leaves asyncio tasks running once it and its fixtures are done
    (a task nobody awaits hides its failures and outlives what it uses)."""
    marker = request.node.get_closest_marker("asyncio")
    scope = marker.kwargs.get("loop_scope", "function") if marker else "function"
    if not inspect.iscoroutinefunction(getattr(request.node, "function", None)) or (
        scope != "function"
    ):
        yield
        return
    runner = request.getfixturevalue("_function_scoped_runner")
    yield
    loop = runner.get_loop()
    if loop.is_closed():
        return
    leaked = _pending(loop)
    for _ in range(_SETTLE_ROUNDS):
        if not leaked:
            return
        loop.run_until_complete(asyncio.sleep(0))
        leaked = _pending(loop)
    if not leaked:
        return
    names = sorted(_describe(task) for task in leaked)
    for task in leaked:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*leaked, return_exceptions=True))
    pytest.fail(f"the test left {len(names)} asyncio task(s) running: {', '.join(names)}")


def _pending(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks(loop) if not task.done()]


def _describe(task: asyncio.Task[object]) -> str:
    coro = task.get_coro()
    name = getattr(coro, "__qualname__", None) or repr(coro)
    return f"{task.get_name()} ({name})"
