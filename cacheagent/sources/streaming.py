"""Stream bytes ``[start, end)`` of a blob from an HTTP origin, whatever the origin does wrong.

Shared by every HTTP-based source; the source supplies ``open_response`` (which knows the URL,
mirrors and auth), this module owns the rules:

* ``Range: bytes=start-(end-1)`` is sent whenever less than the whole blob is wanted. A ``206``
  must start where we asked and declare the blob's size. A ``200`` to a ranged request means the
  origin ignores ranges: the first ``start`` bytes are read and dropped (correct, wasteful) and
  ``on_range_ignored`` is told so the source can stop advertising range support.
* Nothing past ``end`` is ever yielded. A ``Content-Length``/``Content-Range`` that disagrees
  with the declared size is refused before the body is read; a body that runs past the declared
  size anyway (chunked encoding) is cut off with ``SizeMismatchError``.
* A dropped connection, a body that ends early, a timeout, 429 and 5xx are retried under the
  ``RetryPolicy``, resuming from the last byte yielded; the attempt budget restarts whenever
  ``MIN_PROGRESS_BYTES`` were gained, so a long download is not failed by scattered hiccups
  while an origin that drops every connection after a few bytes still runs out of attempts.
  A body that delivers less than that within a read timeout times out. When the budget is
  spent: ``OriginUnavailableError`` naming the origin, the blob and the last failure. A wait the
  server asked for (``Retry-After``, ``RateLimit``) is reported through ``on_wait`` while it
  lasts, so a pull's progress can say why it is not moving.
* 404 is ``ModelNotFoundError``. Other statuses are final ``SourceError``s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import aiohttp

from cacheagent.errors import (
    ModelNotFoundError,
    OriginUnavailableError,
    SizeMismatchError,
    SourceError,
)
from cacheagent.sources.base import BlobRef, Source
from cacheagent.sources.retry import (
    MIN_PROGRESS_BYTES,
    RetryBudget,
    RetryPolicy,
    is_retryable,
    server_wait,
)
from cacheagent.sources.transport import Transport, redact_url

log = logging.getLogger(__name__)

T = TypeVar("T")
OpenResponse = Callable[[Mapping[str, str]], Awaitable[aiohttp.ClientResponse]]

_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")

DEFAULT_STALL_SECONDS = 60.0
#: Waits at least this long are logged and reported (shorter ones are ordinary backoff).
REPORTED_WAIT_SECONDS = 1.0
OnWait = Callable[[str, float, str], Callable[[], None]]  # (origin, seconds, why) -> "it ended"


def stalled_error(seconds: float) -> TimeoutError:
    """The (retryable) error for a body that stopped making progress."""
    return TimeoutError(
        f"the origin sent less than {MIN_PROGRESS_BYTES} bytes in {seconds:g} s "
        "(stalled, or too slow to be useful)"
    )


@dataclass
class StreamSettings:
    """The knobs a source passes down; ``sleep``/``clock`` are here so tests need not wait."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    rng: random.Random = field(default_factory=random.Random)
    chunk_size: int = 1 << 20
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    clock: Callable[[], float] = time.monotonic
    on_wait: OnWait | None = None

    def budget(self, position: int = 0) -> RetryBudget:
        return RetryBudget(self.policy, self.rng, self.clock, position)

    async def pause(self, origin: str, seconds: float, why: str) -> None:
        """Sleep before the next attempt, reporting a long wait while it lasts."""
        if seconds < REPORTED_WAIT_SECONDS or self.on_wait is None:
            await self.sleep(seconds)
            return
        log.warning("origin %s: waiting %.0f s before retrying (%s)", origin, seconds, why)
        ended = self.on_wait(origin, seconds, why)
        try:
            await self.sleep(seconds)
        finally:
            ended()


class TransientError(Exception):
    """A failure worth another attempt; ``detail`` is what the final error will quote and
    ``wait`` the seconds the server asked for (``retry.server_wait``), if it did."""

    def __init__(self, detail: str, wait: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.wait = wait

    @classmethod
    def from_status(
        cls, status: int, headers: Mapping[str, str], detail: str = ""
    ) -> TransientError:
        wait = server_wait(headers)
        asked = f", asked to wait {wait:g} s" if wait is not None else ""
        extra = f": {detail}" if detail else ""
        return cls(f"HTTP {status}{asked}{extra}", wait)


def resolve_span(blob: BlobRef, start: int, end: int | None) -> int:
    """Check ``[start, end)`` lies within the blob and return the concrete ``end``."""
    stop = blob.size if end is None else end
    if not 0 <= start <= stop <= blob.size:
        raise ValueError(
            f"blob {blob.digest}: range [{start}, {stop}) is outside its {blob.size} bytes"
        )
    return stop


def describe_failure(exc: BaseException) -> str:
    """A one-line description of a transport failure that cannot carry a secret."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__} {exc.status} from {redact_url(exc.request_info.real_url)}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def stream_blob(
    open_response: OpenResponse,
    blob: BlobRef,
    start: int,
    end: int | None,
    *,
    origin: str,
    settings: StreamSettings,
    on_range_ignored: Callable[[], None] | None = None,
) -> AsyncGenerator[bytes, None]:
    """Yield bytes ``[start, end)`` of ``blob`` (see the module docstring for the rules)."""
    stop = resolve_span(blob, start, end)
    position = start
    budget = settings.budget(position)
    while position < stop:
        try:
            attempt = _one_attempt(
                open_response, blob, position, stop, origin, settings, on_range_ignored
            )
            async with contextlib.aclosing(attempt) as chunks:
                async for chunk in chunks:
                    position += len(chunk)
                    yield chunk
            if position < stop:
                raise TransientError(f"body ended at byte {position}, wanted up to byte {stop}")
        except TransientError as failure:
            detail, asked = failure.detail, failure.wait
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            if not is_retryable(exc):
                raise SourceError(
                    f"{origin}: blob {blob.digest}: {describe_failure(exc)}"
                ) from None
            detail, asked = describe_failure(exc), None
        else:
            return
        delay = budget.failed(position, asked)
        if delay is None:
            raise OriginUnavailableError(
                f"origin {origin}: blob {blob.digest}: giving up after {budget.failures} "
                f"attempt(s) at byte {position} of {blob.size}; last: {detail}"
                + _over_bound(asked, settings.policy)
            )
        await settings.pause(origin, delay, detail)


async def _one_attempt(
    open_response: OpenResponse,
    blob: BlobRef,
    position: int,
    stop: int,
    origin: str,
    settings: StreamSettings,
    on_range_ignored: Callable[[], None] | None,
) -> AsyncGenerator[bytes, None]:
    ranged = position > 0 or stop < blob.size
    headers: dict[str, str] = {}  # Accept-Encoding: identity is the transport's default
    if ranged:
        headers["Range"] = f"bytes={position}-{stop - 1}"
    resp = await open_response(headers)
    try:
        skip = _body_offset(resp, blob, position, origin)
        if skip and on_range_ignored is not None:
            on_range_ignored()
        reaches_end = stop == blob.size
        pieces = _cut(resp, blob, skip, stop - position, reaches_end, settings.chunk_size)
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                yield piece
    finally:
        resp.close()


def _body_offset(resp: aiohttp.ClientResponse, blob: BlobRef, position: int, origin: str) -> int:
    """How many leading body bytes to drop; raises for any status we cannot stream from."""
    status = resp.status
    if status == 206:
        _check_content_range(resp.headers.get("Content-Range"), blob, position, origin)
        return 0
    if status == 200:
        length = resp.content_length
        if length is not None and length != blob.size:
            raise SizeMismatchError(blob.digest, blob.size, length)
        return position
    if status == 404:
        raise ModelNotFoundError(f"blob {blob.digest} not found at {origin} (404)")
    if is_retryable(status):
        raise TransientError.from_status(status, resp.headers)
    if status == 416:
        raise SourceError(
            f"{origin}: blob {blob.digest}: range not satisfiable (416): the origin holds fewer "
            f"than the declared {blob.size} bytes"
        )
    raise SourceError(f"{origin}: blob {blob.digest}: unexpected HTTP {status}")


def _check_content_range(header: str | None, blob: BlobRef, position: int, origin: str) -> None:
    match = _CONTENT_RANGE_RE.match(header or "")
    if match is None:
        raise SourceError(f"{origin}: blob {blob.digest}: 206 with bad Content-Range {header!r}")
    first, total = int(match.group(1)), match.group(3)
    if first != position:
        raise SourceError(
            f"{origin}: blob {blob.digest}: asked for bytes from {position}, got from {first}"
        )
    if total != "*" and int(total) != blob.size:
        raise SizeMismatchError(blob.digest, blob.size, int(total))


async def _cut(
    resp: aiohttp.ClientResponse,
    blob: BlobRef,
    skip: int,
    wanted: int,
    reaches_end: bool,
    chunk_size: int,
) -> AsyncGenerator[bytes, None]:
    """The body minus ``skip`` leading bytes, at most ``wanted`` bytes. When the span reaches
    the blob's end, any byte after it means the origin serves more than declared: an error.

    Pieces are the buffers aiohttp received, handed on as they are (cut only when longer than
    ``chunk_size``): ``iter_chunked`` would join and re-split them, copying every byte."""
    served = 0
    async for raw, _ in resp.content.iter_chunks():
        for piece in _at_most(raw, chunk_size):
            chunk = piece
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk, skip = chunk[skip:], 0
            room = wanted - served
            if len(chunk) > room:
                if room:
                    yield chunk[:room]
                if reaches_end:
                    raise SizeMismatchError(blob.digest, blob.size, blob.size + len(chunk) - room)
                return
            served += len(chunk)
            yield chunk
            if served == wanted and not reaches_end:
                return


def _at_most(data: bytes, size: int) -> Sequence[bytes]:
    if len(data) <= size:
        return (data,) if data else ()
    return [data[i : i + size] for i in range(0, len(data), size)]


async def with_retries(
    attempt: Callable[[], Awaitable[T]], *, what: str, origin: str, settings: StreamSettings
) -> T:
    """Run ``attempt`` until it succeeds, retrying transient failures under the policy.

    For small documents (manifests, API answers) where there is nothing to resume.
    """
    budget = settings.budget()
    while True:
        try:
            return await attempt()
        except TransientError as failure:
            detail, asked = failure.detail, failure.wait
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            if not is_retryable(exc):
                raise SourceError(f"{origin}: {what}: {describe_failure(exc)}") from None
            detail, asked = describe_failure(exc), None
        delay = budget.failed(0, asked)
        if delay is None:
            raise OriginUnavailableError(
                f"origin {origin}: {what}: giving up after {budget.failures} attempt(s); "
                f"last: {detail}" + _over_bound(asked, settings.policy)
            )
        await settings.pause(origin, delay, detail)


def _over_bound(asked: float | None, policy: RetryPolicy) -> str:
    if asked is None or asked <= policy.max_server_wait:
        return ""
    return f" (over the {policy.max_server_wait:g} s pull.rate_limit_max_wait_seconds allows)"


def raise_for_status(
    status: int, headers: Mapping[str, str], *, what: str, origin: str, detail: str = ""
) -> None:
    """Map a non-success status of a small document GET to our errors (2xx passes); ``detail``
    is what the origin said about it (an error body or header), quoted in the error."""
    if 200 <= status < 300:
        return
    said = f": {detail}" if detail else ""
    if status == 404:
        raise ModelNotFoundError(f"{what} not found at {origin} (404){said}")
    if is_retryable(status):
        raise TransientError.from_status(status, headers, detail)
    raise SourceError(f"{origin}: {what}: unexpected HTTP {status}{said}")


async def read_bounded(
    resp: aiohttp.ClientResponse,
    limit: int,
    *,
    what: str,
    stall_seconds: float = DEFAULT_STALL_SECONDS,
) -> bytes:
    """Read a whole body of at most ``limit`` bytes; refuse a bigger one without reading it all,
    and time out (TimeoutError, retryable) one that delivers under MIN_PROGRESS_BYTES within
    ``stall_seconds``."""
    declared = resp.content_length
    if declared is not None and declared > limit:
        raise SourceError(f"{what} is {declared} bytes, over the {limit}-byte limit")
    parts: list[bytes] = []
    total = progress = 0
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(stall_seconds) as timer:
            async for chunk in resp.content.iter_chunked(64 << 10):
                total += len(chunk)
                if total > limit:
                    raise SourceError(f"{what} is over the {limit}-byte limit")
                parts.append(chunk)
                progress += len(chunk)
                if progress >= MIN_PROGRESS_BYTES:
                    timer.reschedule(loop.time() + stall_seconds)
                    progress = 0
    except TimeoutError as exc:
        if timer.expired():
            raise stalled_error(stall_seconds) from exc
        raise
    return b"".join(parts)


_V = TypeVar("_V")


class BlobHomes(Generic[_V]):
    """Where each blob of a resolved model can be fetched from, bounded (oldest forgotten)."""

    def __init__(self, limit: int = 1 << 17) -> None:
        self._limit = limit
        self._homes: OrderedDict[str, _V] = OrderedDict()

    def remember(self, digest: str, home: _V) -> None:
        self._homes[digest] = home
        self._homes.move_to_end(digest)
        while len(self._homes) > self._limit:
            self._homes.popitem(last=False)

    def find(self, blob: BlobRef, source: str) -> _V:
        home = self._homes.get(blob.digest)
        if home is None:
            raise SourceError(
                f"blob {blob.digest}: not part of a model this {source} source resolved "
                "(resolve the model first)"
            )
        return home


class StreamingSource(Source):
    """What the HTTP-based sources share: the transport, retry settings, the range flag."""

    def __init__(
        self,
        transport: Transport | None,
        *,
        retry: RetryPolicy,
        chunk_bytes: int,
        rng: random.Random | None,
    ) -> None:
        self._owns_transport = transport is None
        self.transport = transport or Transport()
        self.settings = StreamSettings(
            policy=retry,
            rng=rng or random.Random(),  # noqa: S311 - backoff jitter, not crypto
            chunk_size=chunk_bytes,
            on_wait=self._note_wait,
        )
        self._waits: dict[object, tuple[str, float, str]] = {}  # one per wait: origin, until, why
        self.supports_ranges = True
        #: Origins seen answering 200 to a Range request (ranged fetches re-read from byte 0).
        self.ranges_ignored_by: set[str] = set()

    def _stream(
        self,
        open_response: OpenResponse,
        blob: BlobRef,
        start: int,
        end: int | None,
        origin: str,
    ) -> AsyncGenerator[bytes, None]:
        return stream_blob(
            open_response,
            blob,
            start,
            end,
            origin=origin,
            settings=self.settings,
            on_range_ignored=lambda: self._range_ignored(origin),
        )

    def _note_wait(self, origin: str, seconds: float, why: str) -> Callable[[], None]:
        key = object()
        self._waits[key] = (origin, self.settings.clock() + seconds, why)

        def ended() -> None:
            self._waits.pop(key, None)

        return ended

    def waiting(self) -> str:
        """The longest wait per origin, while any lasts."""
        now = self.settings.clock()
        longest: dict[str, tuple[float, str]] = {}
        for origin, until, why in self._waits.values():
            if until > longest.get(origin, (0.0, ""))[0]:
                longest[origin] = (until, why)
        return "; ".join(
            f"{origin} asked us to wait: {max(until - now, 0.0):.0f} s left ({why})"
            for origin, (until, why) in sorted(longest.items())
        )

    def _range_ignored(self, origin: str) -> None:
        if origin not in self.ranges_ignored_by:
            log.warning("origin %s ignores Range requests; ranged fetches re-read from 0", origin)
        self.ranges_ignored_by.add(origin)
        self.supports_ranges = False

    async def _retrying(self, attempt: Callable[[], Awaitable[T]], *, what: str, origin: str) -> T:
        return await with_retries(attempt, what=what, origin=origin, settings=self.settings)

    async def aclose(self) -> None:
        if self._owns_transport:
            await self.transport.aclose()
