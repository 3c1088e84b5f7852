"""Rate and ETA math behind the progress bar."""

from __future__ import annotations

import pytest

from cacheagent.pull.progress import PullProgress, RateMeter, eta_seconds


def test_rate_follows_the_recent_window_not_the_total() -> None:
    meter = RateMeter(window_seconds=2.0)
    assert meter.sample(0.0, 0) == 0.0
    meter.sample(1.0, 100)
    assert meter.rate() == pytest.approx(100.0)
    # after a stall longer than the window, old fast samples no longer count
    meter.sample(2.0, 1000)
    meter.sample(5.0, 1000)
    meter.sample(6.0, 1010)
    assert meter.rate() == pytest.approx(10.0)


def test_resumed_bytes_do_not_inflate_the_rate() -> None:
    meter = RateMeter()
    meter.sample(0.0, 5_000_000)  # a resumed pull starts with bytes already held
    assert meter.sample(2.0, 5_000_200) == pytest.approx(100.0)


def test_eta() -> None:
    assert eta_seconds(1000, 100.0) == pytest.approx(10.0)
    assert eta_seconds(0, 0.0) == 0.0
    assert eta_seconds(10, 0.0) is None


def test_fraction_and_finished() -> None:
    snap = PullProgress("r", "d", "downloading", 25, 100)
    assert snap.fraction == 0.25
    assert not snap.finished
    assert PullProgress("r", "d", "done", 0, 0).fraction == 1.0
    assert PullProgress("r", "d", "failed", 1, 2, error="boom").finished
