"""When to try an origin again, and how long to wait first. Pure: no sleeping, no I/O.

Backoff is exponential with full jitter (a uniform draw in ``[0, min(max_delay, base * 2**n))``),
so that a hundred agents that all saw the same 503 do not come back in lockstep. A server's
``Retry-After`` (seconds or an HTTP date) wins over the backoff: we wait exactly what it asked
for, since coming back sooner only earns another 429. If it asks for more than ``max_delay``, or
the wait would pass ``max_total_seconds``, we give up instead and let the caller report the
origin as unavailable: a pull that silently sleeps for an hour helps nobody.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts, how far apart, and how long in all (seconds)."""

    max_attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 30.0
    max_total_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_total_seconds < 0:
            raise ValueError("retry delays must not be negative")

    def next_delay(
        self,
        attempt: int,
        retry_after: str | None = None,
        rng: random.Random | None = None,
        *,
        elapsed: float = 0.0,
        now: datetime | None = None,
    ) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up.

        ``attempt`` counts the attempts made so far (1 after the first failure); ``elapsed`` is
        the time spent since the first attempt began.
        """
        if attempt >= self.max_attempts:
            return None
        asked = parse_retry_after(retry_after, now=now)
        if asked is not None:
            delay = asked
            if delay > self.max_delay:
                return None
        else:
            ceiling = min(self.max_delay, self.base_delay * 2 ** max(attempt - 1, 0))
            delay = (rng or random).uniform(0.0, ceiling)
        if elapsed + delay > self.max_total_seconds:
            return None
        return delay


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (never negative), or None if absent/garbled."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now or datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


def is_retryable(failure: int | BaseException) -> bool:
    """True for answers and failures that a later attempt may not see again.

    Statuses: 408, 429, 500, 502, 503, 504. Exceptions: connection refused/reset/dropped,
    a body cut short, timeouts. Anything else (4xx, TLS verification, bad URLs) is final.
    """
    if isinstance(failure, int):
        return failure in RETRYABLE_STATUSES
    if isinstance(failure, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return False
    if isinstance(failure, aiohttp.ClientResponseError):
        return failure.status in RETRYABLE_STATUSES
    return isinstance(
        failure,
        aiohttp.ClientConnectionError
        | aiohttp.ClientPayloadError
        | ConnectionError
        | TimeoutError
        | asyncio.IncompleteReadError,
    )
