"""The retry policy: backoff bounds, Retry-After, giving up, and what counts as transient."""

from __future__ import annotations

import random
import ssl
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from cacheagent.sources.retry import (
    MIN_PROGRESS_BYTES,
    RetryBudget,
    RetryPolicy,
    is_retryable,
    parse_rate_limit,
    parse_retry_after,
    server_wait,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
POLICY = RetryPolicy(
    max_attempts=6, base_delay=0.5, max_delay=4.0, max_total_seconds=20.0, max_server_wait=60.0
)


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0)],
)
def test_backoff_is_full_jitter_under_an_exponential_ceiling(attempt: int, ceiling: float) -> None:
    expected = random.Random(42).uniform(0.0, ceiling)
    assert POLICY.next_delay(attempt, None, random.Random(42)) == expected
    draws = [POLICY.next_delay(attempt, None, random.Random(seed)) for seed in range(200)]
    assert all(d is not None and 0.0 <= d <= ceiling for d in draws)
    # Full jitter spreads over the whole interval, not just its top.
    assert min(d for d in draws if d is not None) < ceiling * 0.1


@pytest.mark.parametrize(
    ("attempt", "retry_after", "elapsed", "expected"),
    [
        (6, None, 0.0, None),  # attempts exhausted
        (7, "1", 0.0, None),  # exhausted even when the server says when
        (1, "3", 0.0, 3.0),  # Retry-After seconds honoured exactly
        (1, "0", 0.0, 0.0),
        (1, "55", 0.0, 55.0),  # a server's ask may exceed our own max_delay...
        (1, "61", 0.0, None),  # ...but not max_server_wait: give up rather than sleep for long
        (2, "4", 17.0, 4.0),  # and is not held to the backoff's total budget
        (1, 30.0, 0.0, 30.0),  # already in seconds (server_wait)
        (1, (NOW + timedelta(seconds=2)).strftime("%a, %d %b %Y %H:%M:%S GMT"), 0.0, 2.0),
        (1, (NOW - timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT"), 0.0, 0.0),
    ],
)
def test_next_delay_table(
    attempt: int, retry_after: str | None, elapsed: float, expected: float | None
) -> None:
    got = POLICY.next_delay(attempt, retry_after, random.Random(7), elapsed=elapsed, now=NOW)
    assert got == expected


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"RateLimit": '"resolvers";r=0;t=55'}, 55.0),  # the Hub's form (IETF draft 9+)
        ({"RateLimit": '"api";r=12;t=55'}, None),  # window not exhausted: nothing asked
        ({"RateLimit": "limit=100, remaining=0, reset=7"}, 7.0),  # the older draft's form
        ({"RateLimit-Remaining": "0", "RateLimit": "remaining=0", "RateLimit-Reset": "9"}, 9.0),
        ({"RateLimit": '"resolvers";r=0;t=5', "Retry-After": "8"}, 8.0),  # the longer one
        ({"Retry-After": "3"}, 3.0),
        ({"RateLimit": "garbage"}, None),
        ({}, None),
    ],
)
def test_server_wait(headers: dict[str, str], seconds: float | None) -> None:
    assert server_wait(headers, now=NOW) == seconds


def test_parse_rate_limit_needs_remaining_zero() -> None:
    assert parse_rate_limit('"resolvers";t=55') is None
    assert parse_rate_limit(None, "5") is None


def test_budget_renews_on_progress_only() -> None:
    now = [0.0]
    budget = RetryBudget(
        RetryPolicy(max_attempts=2, base_delay=0.0), random.Random(1), lambda: now[0], 100
    )
    assert budget.failed(100) is not None  # attempt 1 failed
    assert budget.failed(100 + MIN_PROGRESS_BYTES - 1) is None  # a few bytes renew nothing
    assert budget.failed(100 + MIN_PROGRESS_BYTES) is not None  # real progress: a fresh budget
    assert budget.failures == 1


def test_garbled_retry_after_falls_back_to_backoff() -> None:
    got = POLICY.next_delay(1, "soon, please", random.Random(3), now=NOW)
    assert got == random.Random(3).uniform(0.0, 0.5)


def test_backoff_never_passes_the_total_budget() -> None:
    policy = RetryPolicy(max_attempts=100, base_delay=10.0, max_delay=10.0, max_total_seconds=1.0)
    rng = random.Random(1)
    outcomes = [policy.next_delay(3, None, rng, elapsed=0.5) for _ in range(100)]
    assert all(d is None or d <= 0.5 for d in outcomes)
    assert None in outcomes


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("  12 ", 12.0),
        ("-3", None),
        ("1.5", None),
        ("Fri, 02 Jan 2026 03:04:15 GMT", 10.0),
        ("not a date", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


def _cert_error() -> aiohttp.ClientConnectorCertificateError:
    key = aiohttp.client_reqrep.ConnectionKey("h", 443, True, True, None, None, None)
    return aiohttp.ClientConnectorCertificateError(key, ssl.SSLCertVerificationError("bad"))


@pytest.mark.parametrize(
    ("failure", "retryable"),
    [
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (408, True),
        (200, False),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (416, False),
        (501, False),
        (ConnectionResetError(), True),
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (aiohttp.ServerDisconnectedError(), True),
        (aiohttp.ServerTimeoutError("read"), True),
        (aiohttp.ClientPayloadError("cut short"), True),
        (_cert_error(), False),
        (ValueError("no"), False),
        (aiohttp.InvalidURL("x"), False),
    ],
)
def test_is_retryable(failure: int | BaseException, retryable: bool) -> None:
    assert is_retryable(failure) is retryable


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"base_delay": -1.0},
        {"max_delay": -0.1},
        {"max_total_seconds": -5},
        {"max_server_wait": -1},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
