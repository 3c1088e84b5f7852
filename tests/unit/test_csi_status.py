"""Error-to-code mapping, progress messages, the publish time budget and per-key locks."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from cacheagent.csi.mounts import MountBusyError, MountError
from cacheagent.csi.node import Budget
from cacheagent.csi.rpc import KeyedLocks
from cacheagent.csi.status import CsiFailure, status_for
from cacheagent.errors import (
    CacheFullError,
    DigestMismatchError,
    ModelInUseError,
    ModelNotFoundError,
    OriginUnavailableError,
    PolicyDeniedError,
    RefError,
    SourceError,
    StoreError,
    UnsafePathError,
)
from cacheagent.volumes import LazyModeUnavailableError, StillPulling

C = grpc.StatusCode
D = "sha256:" + "0" * 64


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (RefError("x", "tag", "bad"), C.INVALID_ARGUMENT),
        (PolicyDeniedError("no", "rule-1"), C.PERMISSION_DENIED),
        (ModelNotFoundError("gone"), C.NOT_FOUND),
        (OriginUnavailableError("down"), C.UNAVAILABLE),
        (CacheFullError(2, 1), C.RESOURCE_EXHAUSTED),
        (DigestMismatchError(D, D), C.UNAVAILABLE),
        (UnsafePathError("../x", "escapes"), C.FAILED_PRECONDITION),
        (SourceError("bad manifest"), C.FAILED_PRECONDITION),
        (ModelInUseError("pinned"), C.FAILED_PRECONDITION),
        (LazyModeUnavailableError("no fuse"), C.FAILED_PRECONDITION),
        (MountBusyError("/t"), C.FAILED_PRECONDITION),
        (MountError("mount", "/t", 1), C.INTERNAL),
        (StoreError("disk on fire"), C.INTERNAL),
        (KeyError("bug"), C.INTERNAL),
        (CsiFailure(C.ALREADY_EXISTS, "taken"), C.ALREADY_EXISTS),
    ],
)
def test_status_for(exc: BaseException, code: grpc.StatusCode) -> None:
    got, message = status_for(exc)
    assert got == code
    assert message  # never an empty explanation


def test_messages_name_the_problem() -> None:
    assert status_for(PolicyDeniedError("ns a may not", "namespaces.a"))[1].endswith(
        "(policy rule: namespaces.a)"
    )
    assert "busy" in status_for(MountBusyError("/t"))[1]
    assert status_for(KeyError("k"))[1].startswith("internal error: KeyError")


def test_progress_descriptions() -> None:
    assert StillPulling(3 << 20).describe() == "3.0 MiB so far"
    assert StillPulling(1 << 20, 4 << 20).describe() == "25% (1.0 MiB of 4.0 MiB)"
    assert (
        StillPulling(1 << 20, 4 << 20, bytes_per_second=1 << 20)
        .describe()
        .endswith("about 3 s left")
    )


def test_budget_caps_waits_by_the_deadline() -> None:
    assert Budget(None, 2.0).cap(20.0) == 20.0
    assert Budget(time.monotonic() - 1.0, 2.0).cap(20.0) == 0.0
    assert 7.0 < Budget(time.monotonic() + 10.0, 2.0).cap(20.0) <= 8.0
    assert Budget(time.monotonic() + 100.0, 2.0).cap(20.0) == 20.0


async def test_keyed_locks_serialise_one_key_and_forget_idle_keys() -> None:
    locks = KeyedLocks()
    order: list[str] = []

    async def worker(key: str, name: str, hold: float) -> None:
        async with locks.hold(key):
            order.append(f"{name}+")
            await asyncio.sleep(hold)
            order.append(f"{name}-")

    await asyncio.gather(worker("a", "1", 0.05), worker("a", "2", 0.0), worker("b", "3", 0.0))
    assert order.index("1-") < order.index("2+")  # same key: one at a time
    assert order.index("3+") < order.index("1-")  # other key: not blocked
    assert len(locks) == 0
