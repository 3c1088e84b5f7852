"""The FUSE keeper's messages: encode, decode and validate them (pure; no sockets).

One message is one SOCK_SEQPACKET datagram holding a JSON object of at most ``MAX_MESSAGE``
bytes and at most one file descriptor (SCM_RIGHTS). The agent sends requests, the keeper
answers each with one reply:

- ``{"v": 1, "op": "take", "key": K}``: claim the mount ``K`` for this connection and get
  the descriptor the keeper holds for it (reply ``fd: true`` with the descriptor attached and
  the ``state`` stored with it), or ``fd: false`` when it holds none.
- ``{"v": 1, "op": "hold", "key": K, "state": {...}, "handover_seconds": S}`` + descriptor:
  keep a copy of it; if this connection ends without ``release``, keep it ``S`` seconds more
  for the next agent, then close it.
- ``{"v": 1, "op": "release", "key": K}``: the mount is gone; close the copy, forget ``K``.

Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error": "what was wrong"}``. Anything else
is a ``WireError`` naming the problem; the keeper answers it and keeps serving.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from cacheagent.errors import CacheAgentError

VERSION = 1
MAX_MESSAGE = 64 * 1024
MAX_KEY_BYTES = 4096
MAX_HANDOVER_SECONDS = 3600.0


class KeeperError(CacheAgentError):
    """Talking to the FUSE keeper failed; the message names the socket and what failed."""


class KeeperRefusedError(KeeperError):
    """The keeper answered and said no (the mount is another live agent's, a bad request...)."""


class WireError(ValueError):
    """A message is malformed; the text says which part (it is sent back to the peer)."""


@dataclass(frozen=True)
class Take:
    key: str


@dataclass(frozen=True)
class Hold:
    key: str
    state: dict[str, object]
    handover_seconds: float


@dataclass(frozen=True)
class Release:
    key: str


Request = Take | Hold | Release


@dataclass(frozen=True)
class Reply:
    ok: bool
    error: str = ""
    fd: bool = False
    state: dict[str, object] = field(default_factory=dict)


def encode_request(request: Request) -> bytes:
    """The datagram for ``request`` (a ``Hold`` travels with its descriptor)."""
    body: dict[str, object] = {"v": VERSION, "key": request.key}
    if isinstance(request, Take):
        body["op"] = "take"
    elif isinstance(request, Hold):
        body.update(op="hold", state=request.state, handover_seconds=request.handover_seconds)
    else:
        body["op"] = "release"
    return _dump(body)


def decode_request(data: bytes, *, fds: int) -> Request:
    """The request in ``data``, which arrived with ``fds`` descriptors; WireError if bad."""
    body = _load(data)
    if body.get("v") != VERSION:
        raise WireError(f"unsupported protocol version {body.get('v')!r} (this keeper: {VERSION})")
    op = body.get("op")
    key = check_key(body.get("key"))
    wants_fd = op == "hold"
    if op not in ("take", "hold", "release"):
        raise WireError(f"unknown op {op!r} (take, hold or release)")
    if fds != int(wants_fd):
        raise WireError(f"{op} takes {int(wants_fd)} file descriptor(s), got {fds}")
    if op == "take":
        return Take(key)
    if op == "release":
        return Release(key)
    return Hold(key, check_state(body.get("state")), check_handover(body.get("handover_seconds")))


def encode_reply(reply: Reply) -> bytes:
    if not reply.ok:
        return _dump({"ok": False, "error": reply.error})
    return _dump({"ok": True, "fd": reply.fd, "state": reply.state})


def decode_reply(data: bytes, *, fds: int) -> Reply:
    """The keeper's reply in ``data`` (with ``fds`` descriptors); WireError if malformed."""
    body = _load(data)
    if body.get("ok") is False:
        error = body.get("error")
        if not isinstance(error, str):
            raise WireError("a refusal without an error text")
        return Reply(ok=False, error=error)
    if body.get("ok") is not True:
        raise WireError(f"reply field ok must be true or false, got {body.get('ok')!r}")
    has_fd = body.get("fd")
    if not isinstance(has_fd, bool) or fds != int(has_fd):
        raise WireError(f"reply says fd={has_fd!r} but carried {fds} descriptor(s)")
    return Reply(ok=True, fd=has_fd, state=check_state(body.get("state")))


def check_key(key: object) -> str:
    """A key names one mount: a non-empty string of at most ``MAX_KEY_BYTES`` bytes."""
    if not isinstance(key, str) or not key:
        raise WireError(f"key must be a non-empty string, got {key!r}")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise WireError(f"key is longer than {MAX_KEY_BYTES} bytes")
    return key


def check_state(state: object) -> dict[str, object]:
    if not isinstance(state, dict):
        raise WireError(f"state must be a JSON object, got {type(state).__name__}")
    return state


def check_handover(seconds: object) -> float:
    """The hand-over window: a number of seconds in (0, ``MAX_HANDOVER_SECONDS``]."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise WireError(f"handover_seconds must be a number, got {seconds!r}")
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_HANDOVER_SECONDS):
        raise WireError(f"handover_seconds must be in (0, {MAX_HANDOVER_SECONDS:g}], got {seconds}")
    return float(seconds)


def _dump(body: dict[str, object]) -> bytes:
    try:
        data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise WireError(f"not JSON-serialisable: {err}") from None
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes is over the {MAX_MESSAGE}-byte limit")
    return data


def _load(data: bytes) -> dict[str, object]:
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes is over the {MAX_MESSAGE}-byte limit")
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError) as err:
        raise WireError(f"not a JSON message: {err}") from None
    if not isinstance(body, dict):
        raise WireError(f"a message must be a JSON object, got {type(body).__name__}")
    return body
