"""The bounds on FUSE reads that wait for an origin (pure logic, threads only)."""

from __future__ import annotations

import errno

import pytest

from cacheagent.config import FuseConfig
from cacheagent.errors import ConfigError
from cacheagent.fuse.errmap import ErrorKind, classify
from cacheagent.fuse.waits import (
    RESERVED_WORKERS,
    LazyReadTimeoutError,
    OriginBusyError,
    OriginWaits,
    origin_wait_limit,
)


def test_one_model_cannot_take_every_slot() -> None:
    waits = OriginWaits(total=5, per_model=3)
    with waits.admit("a"), waits.admit("a"), waits.admit("a"):
        with pytest.raises(OriginBusyError, match="origin_waits_per_model"), waits.admit("a"):
            pass
        with waits.admit("b"), waits.admit("b"):
            assert waits.waiting() == 5
            with pytest.raises(OriginBusyError, match="max_threads"), waits.admit("c"):
                pass
    assert waits.waiting() == 0


def test_a_slot_is_given_back_when_the_wait_fails() -> None:
    waits = OriginWaits(total=1, per_model=1)
    with pytest.raises(LazyReadTimeoutError), waits.admit("a"):
        raise LazyReadTimeoutError("origin silent")
    with waits.admit("a"):
        assert waits.waiting() == 1


def test_workers_are_kept_for_cached_reads() -> None:
    assert origin_wait_limit(64) == 64 - RESERVED_WORKERS
    assert origin_wait_limit(RESERVED_WORKERS + 1) == 1


def test_timeouts_and_refusals_have_their_own_errno_and_kind() -> None:
    timeout = classify(LazyReadTimeoutError("x"))
    assert (timeout.kind, timeout.errno) == (ErrorKind.TIMEOUT, errno.ETIMEDOUT)
    busy = classify(OriginBusyError("x"))
    assert (busy.kind, busy.errno) == (ErrorKind.BUSY, errno.EIO)


def test_config_keeps_the_reserved_workers() -> None:
    assert FuseConfig(max_threads=16, origin_waits_per_model=16 - RESERVED_WORKERS)
    with pytest.raises(ConfigError, match=r"fuse\.origin_waits_per_model"):
        FuseConfig(max_threads=16, origin_waits_per_model=16 - RESERVED_WORKERS + 1)
    with pytest.raises(ConfigError, match=r"fuse\.max_threads"):
        FuseConfig(max_threads=RESERVED_WORKERS)
