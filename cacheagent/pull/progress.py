"""Pull progress: the snapshot the CLI draws and the gRPC API streams; rate and ETA math. Pure."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

PullState = Literal["resolving", "downloading", "committing", "done", "failed"]


@dataclass(frozen=True)
class BlobProgress:
    digest: str
    done_bytes: int
    total_bytes: int
    rate: float = 0.0
    eta_seconds: float | None = None

    @property
    def complete(self) -> bool:
        return self.done_bytes >= self.total_bytes


@dataclass(frozen=True)
class PullProgress:
    """One immutable snapshot of a model pull; ``rate`` is bytes/s over the last few seconds."""

    ref: str
    manifest_digest: str
    state: PullState
    done_bytes: int
    total_bytes: int
    rate: float = 0.0
    eta_seconds: float | None = None
    blobs: tuple[BlobProgress, ...] = ()
    error: str | None = None
    waiting: str = ""  # why the download is paused (an origin's rate limit), while it is

    @property
    def fraction(self) -> float:
        return 1.0 if self.total_bytes == 0 else min(self.done_bytes / self.total_bytes, 1.0)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")


@dataclass
class RateMeter:
    """Bytes/s over a sliding window of (time, cumulative bytes) samples.

    A window (rather than total/elapsed) makes the rate follow the current speed, and counting
    differences (rather than absolute values) keeps resumed bytes out of the rate.
    """

    window_seconds: float = 5.0
    _samples: deque[tuple[float, int]] = field(default_factory=deque)

    def sample(self, now: float, cumulative_bytes: int) -> float:
        self._samples.append((now, cumulative_bytes))
        while len(self._samples) > 2 and self._samples[0][0] < now - self.window_seconds:
            self._samples.popleft()
        return self.rate()

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return 0.0
        return max(b1 - b0, 0) / (t1 - t0)


def eta_seconds(remaining_bytes: int, rate: float) -> float | None:
    """Seconds left at ``rate``; None while the rate is unknown (nothing measured yet)."""
    if remaining_bytes <= 0:
        return 0.0
    if rate <= 0:
        return None
    return remaining_bytes / rate
