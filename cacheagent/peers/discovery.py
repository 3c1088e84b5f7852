"""Who the peers are: a headless Service resolved through cluster DNS, and/or a static list.

Kubernetes gives a headless Service one A/AAAA record per ready pod, so resolving it every
``refresh_seconds`` is the whole membership protocol: no new infrastructure, and a pod that
is not ready (or gone) drops out of the answer. A failed lookup keeps the last answer (a DNS
blip must not turn the fleet into N independent origin pulls). A peer that failed a transfer
sits out ``cooldown_seconds``, so the rendezvous choice moves its blobs to the next node.

This node recognises itself by address (the peer listener's host, or the machine's interface
addresses when it listens on all of them): it takes part in the rendezvous choice, but is never
asked for bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver
import psutil

from cacheagent.errors import CacheAgentError
from cacheagent.peers import rendezvous

log = logging.getLogger(__name__)


class DiscoveryError(CacheAgentError):
    """The peer DNS name could not be resolved (the last known peers stay in use)."""


@dataclass(frozen=True, order=True)
class Peer:
    """One agent's peer listener."""

    host: str
    port: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.address

    @classmethod
    def parse(cls, text: str) -> Peer:
        """``host:port`` or ``[v6]:port``; ValueError naming the problem."""
        host, colon, port = text.strip().rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"expected host:port, got {text!r}")
        return cls(host, int(port))


class Resolver(Protocol):
    async def addresses(self, name: str) -> list[str]: ...


class DnsResolver:
    """A and AAAA records of a name, from the system's resolver configuration or one server."""

    def __init__(self, server: str | None = None, *, timeout: float = 5.0) -> None:
        if server is None:
            self._resolver = dns.asyncresolver.Resolver()
        else:
            peer = Peer.parse(server)
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [peer.host]
            self._resolver.port = peer.port
        self._resolver.lifetime = timeout

    async def addresses(self, name: str) -> list[str]:
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, rdtype, search=True)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                raise DiscoveryError(f"resolving peers {name!r} ({rdtype}): {exc}") from exc
            found += [record.to_text() for record in answer]
        return found


def local_addresses() -> frozenset[str]:
    """Every address of this machine's interfaces (who "self" is when listening on all)."""
    found: set[str] = set()
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            with contextlib.suppress(ValueError):
                found.add(str(ipaddress.ip_address(addr.address.split("%", 1)[0])))
    return frozenset(found)


class PeerDirectory:
    """The current peer set and the rendezvous choice over it."""

    def __init__(
        self,
        *,
        port: int,
        self_hosts: Iterable[str],
        static: Iterable[Peer] = (),
        dns_name: str | None = None,
        resolver: Resolver | None = None,
        cooldown_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if dns_name is not None and resolver is None:
            raise ValueError("a dns_name needs a resolver")
        self.port = port
        self.dns_name = dns_name
        self._self_hosts = frozenset(self_hosts)
        self._static = frozenset(static)
        self._resolver = resolver
        self._cooldown = cooldown_seconds
        self._clock = clock
        self._discovered: frozenset[Peer] = frozenset()
        self._failed: dict[Peer, float] = {}
        self.refreshes = 0
        self.refresh_failures = 0

    def is_self(self, peer: Peer) -> bool:
        return peer.port == self.port and peer.host in self._self_hosts

    def known(self) -> frozenset[Peer]:
        """Every node discovered or listed, this one included if it is among them."""
        return self._static | self._discovered

    def peers(self) -> tuple[Peer, ...]:
        """Known nodes other than this one."""
        return tuple(sorted(p for p in self.known() if not self.is_self(p)))

    def live(self) -> tuple[Peer, ...]:
        """Peers not sitting out a cooldown after a failure."""
        now = self._clock()
        return tuple(p for p in self.peers() if self._failed.get(p, 0.0) <= now)

    def owner(self, digest: str) -> Peer | None:
        """The live peer that fetches ``digest`` from the origin, or None when it is this node
        (or there are no live peers): then this node goes to the origin itself."""
        candidates = {p.address: p for p in self.live()}
        for node in self.known():
            if self.is_self(node):
                candidates[node.address] = node
        chosen = rendezvous.choose(digest, candidates)
        if chosen is None or self.is_self(candidates[chosen]):
            return None
        return candidates[chosen]

    def mark_failed(self, peer: Peer) -> None:
        self._failed[peer] = self._clock() + self._cooldown

    async def refresh(self) -> None:
        """Resolve the DNS name once; on failure keep the last answer and raise."""
        if self.dns_name is None or self._resolver is None:
            return
        try:
            hosts = await self._resolver.addresses(self.dns_name)
        except DiscoveryError:
            self.refresh_failures += 1
            raise
        found = frozenset(Peer(host, self.port) for host in hosts)
        if found != self._discovered:
            log.info("peers: %s now answers %s", self.dns_name, sorted(p.address for p in found))
        self._discovered = found
        self.refreshes += 1

    async def run(self, interval: float) -> None:
        """Refresh forever, every ``interval`` seconds (the daemon runs this as a task)."""
        while True:
            try:
                await self.refresh()
            except DiscoveryError as exc:
                log.warning("%s; keeping %d known peer(s)", exc, len(self.peers()))
            await asyncio.sleep(interval)
