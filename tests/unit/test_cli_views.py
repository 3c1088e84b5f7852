"""The CLI's text views of agent replies (pure): status, eviction plans, batch pulls."""

from __future__ import annotations

from cacheagent.cli.views import pull_summary, reclaim_text, status_text

BASE = {"version": "1", "node_id": "n1", "store_root": "/s", "capacity_bytes": "1000"}


def test_status_memory_line_tells_off_from_unlimited() -> None:
    off = status_text({**BASE, "memory_lock_limit_bytes": "0"})
    assert "locking off (prefetch.mlock_limit_bytes is 0)" in off
    rlimit = status_text({**BASE, "memory_locked_bytes": "2048"})
    assert "2.0 KiB locked (no limit but RLIMIT_MEMLOCK)" in rlimit
    limited = status_text(
        {**BASE, "memory_lock_limit_bytes": str(1 << 30), "memory_resident_bytes": "1024"}
    )
    assert "limit 1.0 GiB" in limited and "1.0 KiB of models in page cache" in limited


def test_status_pull_line_shows_rate_and_eta_or_a_dash() -> None:
    pull = {"ref": "r", "state": "downloading", "bytes_done": "512", "bytes_total": "1024"}
    known = status_text({**BASE, "pulls": [{**pull, "bytes_per_second": 256, "eta_seconds": 2}]})
    assert "pull:    r downloading 512 B / 1.0 KiB 50%, 256 B/s, ETA 2s" in known
    assert "ETA -" in status_text({**BASE, "pulls": [pull]})
    assert "pulls:   none in flight" in status_text(BASE)


def test_reclaim_text_says_would_for_a_dry_run_and_why() -> None:
    model = {"manifest_digest": "sha256:" + "a" * 64, "ref": "r", "size_bytes": "10"}
    reply = {"dry_run": True, "reason": "past it", "models": [{**model, "reason": "lru #1"}]}
    text = reclaim_text({**reply, "bytes_freed": "10", "need_bytes": "5", "satisfied": True})
    assert "why:     past it" in text and "would evict" in text and "would free 10 B" in text
    short = reclaim_text(
        {
            "reason": "asked",
            "need_bytes": "50",
            "satisfied": False,
            "kept": [{**model, "reason": "pinned"}],
        }
    )
    assert "nothing to evict" in short and "cannot free the 50 B" in short
    assert "(pinned)" in short


def test_pull_summary_counts_failures() -> None:
    text = pull_summary(
        [
            {"ref": "a", "seconds": 1.5, "digest": "sha256:x", "size": 10},
            {"ref": "b", "seconds": 0.5, "error": "boom"},
        ]
    )
    assert "a: sha256:x 10 B in 1.5s" in text
    assert "b: FAILED after 0.5s: boom" in text
    assert text.endswith("1 of 2 pulled, 1 failed")


def test_status_lists_models_in_memory_and_says_locked_only_when_locked() -> None:
    entry = {"manifest_digest": "sha256:" + "b" * 64, "ref": "r", "resident_bytes": "2048"}
    text = status_text({**BASE, "memory": [entry, {**entry, "ref": "s", "locked_bytes": "1024"}]})
    assert "  bbbbbbbbbbbb r: 2.0 KiB in RAM\n" in text
    assert "  bbbbbbbbbbbb s: 2.0 KiB in RAM, 1.0 KiB locked" in text
