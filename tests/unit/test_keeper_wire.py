"""The keeper's messages, without sockets: what travels, and what is refused with which words."""

from __future__ import annotations

import json

import pytest

from cacheagent.fuse import keeper_wire as wire


@pytest.mark.parametrize(
    "request_",
    [
        wire.Take("/run/cacheagent/fuse"),
        wire.Release("/run/cacheagent/fuse"),
        wire.Hold("/run/cacheagent/fuse", {"nodes": {"a": 2}, "generation": 3}, 120.0),
    ],
)
def test_requests_round_trip(request_: wire.Request) -> None:
    fds = 1 if isinstance(request_, wire.Hold) else 0
    assert wire.decode_request(wire.encode_request(request_), fds=fds) == request_


def test_replies_round_trip() -> None:
    for reply, fds in (
        (wire.Reply(ok=True, fd=True, state={"x": [1, 2]}), 1),
        (wire.Reply(ok=True), 0),
        (wire.Reply(ok=False, error="mount /m is held by another live agent"), 0),
    ):
        assert wire.decode_reply(wire.encode_reply(reply), fds=fds) == reply


def _body(**fields: object) -> bytes:
    return json.dumps({"v": 1, **fields}).encode()


@pytest.mark.parametrize(
    ("data", "fds", "problem"),
    [
        (b"\xff\xfe", 0, "not a JSON message"),
        (b"{", 0, "not a JSON message"),
        (b"[1, 2]", 0, "must be a JSON object, got list"),
        (json.dumps({"op": "take", "key": "/m"}).encode(), 0, "unsupported protocol version"),
        (_body(op="grab", key="/m"), 0, "unknown op 'grab'"),
        (_body(op="take"), 0, "key must be a non-empty string"),
        (_body(op="take", key=""), 0, "key must be a non-empty string"),
        (_body(op="take", key="/" + "k" * 5000), 0, "longer than 4096 bytes"),
        (_body(op="take", key="/m"), 1, "take takes 0 file descriptor(s), got 1"),
        (_body(op="hold", key="/m", state={}, handover_seconds=5), 0, "takes 1 file"),
        (_body(op="hold", key="/m", state=[], handover_seconds=5), 1, "state must be a JSON obj"),
        (_body(op="hold", key="/m", state={}, handover_seconds=0), 1, "in (0, 3600], got 0"),
        (_body(op="hold", key="/m", state={}, handover_seconds=3601), 1, "in (0, 3600]"),
        (_body(op="hold", key="/m", state={}, handover_seconds=True), 1, "must be a number"),
        (_body(op="hold", key="/m", state={}, handover_seconds="9"), 1, "must be a number"),
        (b'{"v":1,"op":"hold","key":"/m","state":{},"handover_seconds":NaN}', 1, "(0, 3600]"),
        (b" " * (wire.MAX_MESSAGE + 1), 0, "over the 65536-byte limit"),
    ],
)
def test_bad_requests_name_the_problem(data: bytes, fds: int, problem: str) -> None:
    with pytest.raises(wire.WireError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        wire.decode_request(data, fds=fds)


def test_a_state_too_large_to_travel_is_refused_before_sending() -> None:
    hold = wire.Hold("/m", {"blob": "x" * wire.MAX_MESSAGE}, 10.0)
    with pytest.raises(wire.WireError, match="over the 65536-byte limit"):
        wire.encode_request(hold)


def test_a_state_that_is_not_json_is_refused() -> None:
    with pytest.raises(wire.WireError, match="not JSON-serialisable"):
        wire.encode_request(wire.Hold("/m", {"when": object()}, 10.0))


@pytest.mark.parametrize(
    ("data", "fds", "problem"),
    [
        (b'{"ok": true, "fd": true, "state": {}}', 0, "fd=True but carried 0"),
        (b'{"ok": true, "fd": false, "state": {}}', 1, "fd=False but carried 1"),
        (b'{"ok": "yes"}', 0, "ok must be true or false"),
        (b'{"ok": false}', 0, "without an error text"),
        (b'{"ok": true, "fd": false, "state": 3}', 0, "state must be a JSON object"),
    ],
)
def test_bad_replies_are_refused(data: bytes, fds: int, problem: str) -> None:
    with pytest.raises(wire.WireError, match=problem):
        wire.decode_reply(data, fds=fds)
