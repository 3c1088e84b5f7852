"""Pure parts of peer fetch: the rendezvous choice, Range parsing, the peer directory's
choice over a static list with cooldowns, and the ``peers`` config section."""

from __future__ import annotations

from collections import Counter

import pytest

from cacheagent.config import load_config
from cacheagent.errors import ConfigError
from cacheagent.peers import rendezvous
from cacheagent.peers.discovery import Peer, PeerDirectory
from cacheagent.peers.ranges import UnsatisfiableRangeError, parse_range

DIGESTS = [f"sha256:{i:064x}" for i in range(2000)]
NODES = [f"10.0.0.{i}:9465" for i in range(1, 9)]


def test_choice_is_deterministic_and_independent_of_order() -> None:
    for digest in DIGESTS[:50]:
        assert rendezvous.choose(digest, NODES) == rendezvous.choose(digest, reversed(NODES))
    assert rendezvous.choose(DIGESTS[0], []) is None
    assert rendezvous.ranking(DIGESTS[0], NODES)[0] == rendezvous.choose(DIGESTS[0], NODES)


def test_choice_spreads_blobs_evenly() -> None:
    owners = Counter(rendezvous.choose(d, NODES) for d in DIGESTS)
    assert set(owners) == set(NODES)
    share = len(DIGESTS) / len(NODES)
    assert all(0.75 * share <= n <= 1.25 * share for n in owners.values()), owners


def test_a_node_leaving_moves_only_its_own_blobs() -> None:
    before = {d: rendezvous.choose(d, NODES) for d in DIGESTS}
    gone = NODES[3]
    after = {d: rendezvous.choose(d, [n for n in NODES if n != gone]) for d in DIGESTS}
    moved = {d for d in DIGESTS if before[d] != after[d]}
    assert moved == {d for d in DIGESTS if before[d] == gone}
    # ... and each moves to its second choice
    assert all(after[d] == rendezvous.ranking(d, NODES)[1] for d in moved)


@pytest.mark.parametrize(
    ("header", "span"),
    [
        (None, None),
        ("bytes=0-99", (0, 100)),
        ("bytes=100-", (100, 1000)),
        ("bytes=-10", (990, 1000)),
        ("bytes=-5000", (0, 1000)),
        ("bytes=900-5000", (900, 1000)),
        ("bytes=0-1,5-6", None),  # several ranges: the whole blob
        ("items=0-1", None),
    ],
)
def test_range_header(header: str | None, span: tuple[int, int] | None) -> None:
    assert parse_range(header, 1000) == span


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5-4", "bytes=-0"])
def test_unsatisfiable_range(header: str) -> None:
    with pytest.raises(UnsatisfiableRangeError):
        parse_range(header, 1000)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_directory_choice_cooldown_and_self() -> None:
    peers = [Peer(f"10.0.0.{i}", 9465) for i in range(1, 5)]
    clock = Clock()
    directory = PeerDirectory(
        port=9465, self_hosts={"10.0.0.1"}, static=peers, cooldown_seconds=30, clock=clock
    )
    assert directory.peers() == tuple(peers[1:])
    for digest in DIGESTS[:200]:
        winner = rendezvous.choose(digest, [p.address for p in peers])
        owner = directory.owner(digest)
        # None means "this node fetches from the origin itself"
        assert (owner.address if owner else "10.0.0.1:9465") == winner
    digest = next(d for d in DIGESTS if directory.owner(d) == peers[2])
    directory.mark_failed(peers[2])
    assert peers[2] not in directory.live()
    second = rendezvous.ranking(digest, [p.address for p in peers])[1]
    assert (directory.owner(digest) or peers[0]).address == second
    clock.now += 31
    assert directory.owner(digest) == peers[2]  # back after its cooldown


def test_directory_without_self_in_the_list_always_asks_a_peer() -> None:
    directory = PeerDirectory(port=9465, self_hosts={"10.9.9.9"}, static=[Peer("10.0.0.2", 9465)])
    assert all(directory.owner(d) == Peer("10.0.0.2", 9465) for d in DIGESTS[:20])


def test_peer_parse() -> None:
    assert Peer.parse("10.0.0.1:9465") == Peer("10.0.0.1", 9465)
    assert Peer.parse("[fd00::1]:9465").address == "[fd00::1]:9465"
    for bad in ("10.0.0.1", ":9465", "host:0", "host:http"):
        with pytest.raises(ValueError, match="host:port"):
            Peer.parse(bad)


def test_peers_config_defaults_and_overrides() -> None:
    cfg = load_config(None, {}, {})
    assert not cfg.peers.enabled and cfg.peers.listen == "0.0.0.0:9465"
    cfg = load_config(
        None,
        {"CACHEAGENT_PEERS__DNS_NAME": "cacheagent-peers.cacheagent.svc.cluster.local"},
        {"peers.enabled": "true", "peers.stall_seconds": "2s", "peers.min_bytes_per_second": "4Mi"},
    )
    assert cfg.peers.enabled and cfg.peers.stall_seconds == 2.0
    assert cfg.peers.min_bytes_per_second == 4 << 20


@pytest.mark.parametrize(
    ("overrides", "key", "problem"),
    [
        ({"peers.enabled": "true"}, "peers.enabled", "peers.dns_name or peers.static"),
        ({"peers.static": ["10.0.0.1"]}, "peers.static[0]", "host:port"),
        ({"peers.static": [":9465"]}, "peers.static[0]", "host:port"),
        ({"peers.listen": "nope"}, "peers.listen", "host:port"),
        ({"peers.stall_seconds": "0"}, "peers.stall_seconds", "expected a value"),
        ({"peers.tls_cert": "/etc/c.pem"}, "peers.tls_cert", "peers.tls_key"),
        ({"peers.dns_server": "127.0.0.1"}, "peers.dns_server", "host:port"),
    ],
)
def test_peers_config_errors_name_the_key(
    overrides: dict[str, object], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem) as err:
        load_config(None, {}, overrides)
    assert err.value.key == key
