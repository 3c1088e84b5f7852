"""When to try an origin again, and how long to wait first: the one retry policy every origin
and the download pipeline use. Pure: no sleeping, no I/O (callers sleep).

Backoff is exponential with full jitter (a uniform draw in ``[0, min(max_delay, base * 2**n))``),
so that a hundred agents that all saw the same 503 do not come back in lockstep; our own backoff
stops once the waits would pass ``max_total_seconds``. A wait the server asks for wins over the
backoff: ``Retry-After`` (seconds or an HTTP date) or the rate-limit header the Hugging Face Hub
sends (``RateLimit: "resolvers";r=0;t=55``, the IETF draft's form; the older
``remaining=0, reset=55`` form too). We wait exactly that, since coming back sooner only earns
another 429, as long as it is at most ``max_server_wait`` (a rate-limit window is minutes long;
the config key is ``pull.rate_limit_max_wait_seconds``); a longer ask makes us give up and report
the origin unavailable: a pull that silently sleeps for an hour helps nobody. Either way at most
``max_attempts`` attempts are made.

``RetryBudget`` is the state of one operation's retries; a download that made progress renews it
(``MIN_PROGRESS_BYTES``), so scattered hiccups in a long download do not add up to failure.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

MIN_PROGRESS_BYTES = 16 << 10
"""What counts as progress on a response body: a body that delivers less than this within a
read timeout (a stalled or slowloris origin dripping a byte at a time) is timed out, and an
attempt that gained less does not renew the retry budget."""

_RATE_PARAM_RE = re.compile(r"(?:^|[;,\s])(r|t|remaining|reset)\s*=\s*(\d+)")


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts, how far apart, and how long in all (seconds)."""

    max_attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 30.0
    max_total_seconds: float = 300.0
    max_server_wait: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        delays = (self.base_delay, self.max_delay, self.max_total_seconds, self.max_server_wait)
        if min(delays) < 0:
            raise ValueError("retry delays must not be negative")

    def next_delay(
        self,
        attempt: int,
        retry_after: str | float | None = None,
        rng: random.Random | None = None,
        *,
        elapsed: float = 0.0,
        now: datetime | None = None,
    ) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up.

        ``attempt`` counts the attempts made so far (1 after the first failure); ``elapsed`` is
        the time spent since the first attempt began; ``retry_after`` is what the server asked
        for: a ``Retry-After`` value or seconds (``server_wait``).
        """
        if attempt >= self.max_attempts:
            return None
        if isinstance(retry_after, float | int):
            asked: float | None = max(0.0, float(retry_after))
        else:
            asked = parse_retry_after(retry_after, now=now)
        if asked is not None:
            return asked if asked <= self.max_server_wait else None
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(attempt - 1, 0))
        delay = (rng or random).uniform(0.0, ceiling)
        if elapsed + delay > self.max_total_seconds:
            return None
        return delay


@dataclass
class RetryBudget:
    """The retries of one operation under a policy. ``failed`` returns the wait before the next
    attempt, or None to give up; ``position`` (bytes held so far) renews the budget when the
    attempt gained at least MIN_PROGRESS_BYTES."""

    policy: RetryPolicy
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic
    position: int = 0
    failures: int = field(default=0, init=False)
    _since: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._since = self.clock()

    def failed(self, position: int = 0, asked: float | None = None) -> float | None:
        if position - self.position >= MIN_PROGRESS_BYTES:
            self.failures, self.position, self._since = 0, position, self.clock()
        self.failures += 1
        elapsed = self.clock() - self._since
        return self.policy.next_delay(self.failures, asked, self.rng, elapsed=elapsed)


def server_wait(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """Seconds the server asked us to wait (``Retry-After`` or an exhausted ``RateLimit``), the
    longer of the two when both are present; None when it asked nothing."""
    asks = [
        parse_retry_after(headers.get("Retry-After"), now=now),
        parse_rate_limit(headers.get("RateLimit"), headers.get("RateLimit-Reset")),
    ]
    found = [a for a in asks if a is not None]
    return max(found) if found else None


def parse_rate_limit(value: str | None, reset: str | None = None) -> float | None:
    """Seconds until an exhausted rate-limit window resets, from ``RateLimit`` (``r=0;t=N`` or
    ``remaining=0, reset=N``; a separate ``RateLimit-Reset`` also counts); None when the window
    is not exhausted or the header says nothing usable."""
    params = {k: int(v) for k, v in _RATE_PARAM_RE.findall(value or "")}
    remaining = params.get("r", params.get("remaining"))
    seconds = params.get("t", params.get("reset"))
    if seconds is None and reset is not None and reset.strip().isdigit():
        seconds = int(reset.strip())
    if remaining != 0 or seconds is None:
        return None
    return float(seconds)


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
