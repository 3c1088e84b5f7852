"""Fleet counters and their Prometheus collector (registered on the agent's registry).

Label sets are bounded by the fleet: ``peer`` is a peer's address (one per node), ``reason``
and ``from`` are fixed sets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Why a peer transfer was given up: the peer does not have the blob, failed (connection, HTTP
# error), was too slow, answered something else than asked, or sent bytes that did not verify.
FailureReason = Literal["missing", "error", "slow", "wrong_answer", "unverified"]


@dataclass
class PeerStats:
    """Counters updated on the event loop; read at scrape time."""

    peer_bytes: Counter[str] = field(default_factory=Counter)
    origin_bytes: int = 0
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    served_bytes: int = 0
    served: Counter[str] = field(default_factory=Counter)

    def failed(self, peer: str, reason: FailureReason) -> None:
        self.failures[(peer, reason)] += 1


class PeerCollector(Collector):
    """Exports ``PeerStats`` and the live peer count."""

    def __init__(self, stats: PeerStats, live_peers: Callable[[], int]) -> None:
        self._stats = stats
        self._live = live_peers

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        fleet = CounterMetricFamily(
            "cacheagent_fleet_bytes",
            "Blob bytes received, from peers (per peer) or from the origin.",
            labels=["from", "peer"],
        )
        fleet.add_metric(["origin", ""], s.origin_bytes)
        for peer, n in sorted(s.peer_bytes.items()):
            fleet.add_metric(["peer", peer], n)
        yield fleet
        failures = CounterMetricFamily(
            "cacheagent_peer_failures", "Peer transfers given up.", labels=["peer", "reason"]
        )
        for (peer, reason), n in sorted(s.failures.items()):
            failures.add_metric([peer, reason], n)
        yield failures
        fallbacks = CounterMetricFamily(
            "cacheagent_peer_fallbacks",
            "Transfers that went to the origin after a peer failed.",
            labels=["reason"],
        )
        for reason, n in sorted(s.fallbacks.items()):
            fallbacks.add_metric([reason], n)
        yield fallbacks
        yield CounterMetricFamily(
            "cacheagent_peer_served_bytes", "Blob bytes served to peers.", value=s.served_bytes
        )
        served = CounterMetricFamily(
            "cacheagent_peer_requests", "Blob requests from peers.", labels=["code"]
        )
        for code, n in sorted(s.served.items()):
            served.add_metric([code], n)
        yield served
        yield GaugeMetricFamily("cacheagent_peers", "Live peers known.", value=self._live())
