"""The keeper's table: who owns which mount, hand-over windows, what gets closed when."""

from __future__ import annotations

import pytest

from cacheagent.fuse.keeper_table import KeeperTable, RefusedError

A, B = 1, 2  # connection ids


def test_an_orphan_is_kept_for_its_window_then_expires() -> None:
    table = KeeperTable()
    assert table.hold(A, "/m", 10, {"g": 1}, 30.0) == []
    (orphan,) = table.disconnect(A, now=100.0)
    assert orphan.deadline == 130.0 and table.next_deadline() == 130.0
    assert table.expire(now=129.9) == []
    (expired,) = table.expire(now=130.0)
    assert expired.fd == 10 and table.get("/m") is None and len(table) == 0


def test_a_take_within_the_window_owns_it_again_and_stops_the_clock() -> None:
    table = KeeperTable()
    table.hold(A, "/m", 10, {"g": 1}, 30.0)
    table.disconnect(A, now=0.0)
    entry = table.take(B, "/m", handover_seconds=120.0)
    assert (entry.fd, entry.state, entry.owner, entry.deadline) == (10, {"g": 1}, B, None)
    assert table.expire(now=1e9) == []
    with pytest.raises(RefusedError):
        table.take(A, "/m", handover_seconds=120.0)


def test_a_live_owner_keeps_its_key_from_everyone_else() -> None:
    table = KeeperTable()
    table.hold(A, "/m", 10, {}, 30.0)
    with pytest.raises(RefusedError):
        table.take(B, "/m", handover_seconds=1.0)
    with pytest.raises(RefusedError):
        table.hold(B, "/m", 11, {}, 30.0)
    with pytest.raises(RefusedError):
        table.release(B, "/m")
    entry = table.get("/m")
    assert entry is not None and (entry.fd, entry.owner) == (10, A)


def test_holding_again_returns_the_replaced_descriptor() -> None:
    table = KeeperTable()
    table.hold(A, "/m", 10, {"g": 1}, 30.0)
    assert table.hold(A, "/m", 10, {"g": 2}, 30.0) == []
    assert table.hold(A, "/m", 12, {"g": 3}, 60.0) == [10]
    entry = table.get("/m")
    assert entry is not None and (entry.fd, entry.state, entry.handover_seconds) == (
        12,
        {"g": 3},
        60.0,
    )


def test_a_claim_without_a_descriptor_vanishes_with_its_connection() -> None:
    table = KeeperTable()
    assert table.take(A, "/m", handover_seconds=120.0).fd is None
    assert table.disconnect(A, now=0.0) == []
    assert table.get("/m") is None


def test_release_forgets_and_is_idempotent() -> None:
    table = KeeperTable()
    table.hold(A, "/m", 10, {}, 30.0)
    assert table.release(A, "/m") == [10]
    assert table.release(A, "/m") == []
    table.hold(A, "/n", 11, {}, 30.0)
    table.disconnect(A, now=0.0)
    assert table.release(B, "/n") == [11], "an orphan may be released by anyone"


def test_drop_and_clear_hand_back_every_descriptor() -> None:
    table = KeeperTable()
    table.hold(A, "/m", 10, {}, 30.0)
    table.hold(B, "/n", 11, {}, 30.0)
    table.take(B, "/o", handover_seconds=5.0)
    assert sorted(table.held()) == [("/m", 10), ("/n", 11)]
    dropped = table.drop("/m")
    assert dropped is not None and dropped.fd == 10
    assert table.clear() == [11] and len(table) == 0
