"""Peer fetch for the daemon, built from the ``peers`` config section.

``Fleet(config)`` is made before the pull engine (``wrap`` puts ``PeerSource`` in front of
every origin) and started after it (the listener serves what the engine holds and pulls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from prometheus_client import CollectorRegistry

from cacheagent.config import PeersConfig
from cacheagent.peers.client import ClientSettings, PeerClient
from cacheagent.peers.discovery import DnsResolver, Peer, PeerDirectory, local_addresses
from cacheagent.peers.server import PeerServer
from cacheagent.peers.source import PeerSource
from cacheagent.peers.stats import PeerCollector, PeerStats
from cacheagent.pull.engine import PullEngine
from cacheagent.sources.base import Source
from cacheagent.store import Store

log = logging.getLogger(__name__)

_ALL_HOSTS = frozenset({"", "0.0.0.0", "::"})


def listen_parts(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def self_hosts(config: PeersConfig) -> frozenset[str]:
    """The addresses under which peers (DNS, the static list) name this node."""
    host, _ = listen_parts(config.listen)
    hosts = local_addresses() if host in _ALL_HOSTS else frozenset({host})
    if config.advertise_address:
        hosts |= {config.advertise_address}
    return hosts


class Fleet:
    """Peer fetch for one agent. The constructor does blocking reads (the resolver's
    configuration, the interface addresses): daemons build it in a thread."""

    def __init__(self, config: PeersConfig) -> None:
        self.config = config
        self.stats = PeerStats()
        host, port = listen_parts(config.listen)
        self.host, self.port = host or "0.0.0.0", port
        self.directory = PeerDirectory(
            port=port,
            self_hosts=self_hosts(config),
            static=[Peer.parse(entry) for entry in config.static],
            dns_name=config.dns_name,
            resolver=DnsResolver(config.dns_server) if config.dns_name else None,
            cooldown_seconds=config.cooldown_seconds,
        )
        self.client = PeerClient(
            ClientSettings(
                stall_seconds=config.stall_seconds,
                min_bytes_per_second=config.min_bytes_per_second,
                answer_seconds=config.stall_seconds + config.miss_wait_seconds,
                tls=config.tls_cert is not None,
                tls_ca=config.tls_ca,
                tls_cert=config.tls_cert,
                tls_key=config.tls_key,
            )
        )
        self._server: PeerServer | None = None
        self._refresh: asyncio.Task[None] | None = None

    def wrap(self, sources: list[Source]) -> list[Source]:
        """Every origin with peer fetch in front of its blob reads."""
        return [PeerSource(s, self.directory, self.client, self.stats) for s in sources]

    async def start(self, store: Store, engine: PullEngine, registry: CollectorRegistry) -> None:
        registry.register(PeerCollector(self.stats, lambda: len(self.directory.live())))
        server = PeerServer(
            store, engine, self.stats, miss_wait_seconds=self.config.miss_wait_seconds
        )
        await server.start(self.host, self.port, await asyncio.to_thread(self._tls))
        self._server = server
        self._refresh = asyncio.create_task(self.directory.run(self.config.refresh_seconds))
        log.info(
            "peer fetch on %s:%d (%s)",
            self.host,
            self.port,
            self.config.dns_name or ", ".join(self.config.static),
        )

    def _tls(self) -> ssl.SSLContext | None:
        """The listener's TLS; with ``tls_ca`` peers must present a certificate it signed
        (every agent has one: its own ``tls_cert``), so only the fleet can read blobs."""
        cfg = self.config
        if cfg.tls_cert is None or cfg.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        if cfg.tls_ca is not None:
            context.load_verify_locations(cafile=str(cfg.tls_ca))
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    async def stop(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        if self._server is not None:
            await self._server.stop()
        await self.client.aclose()
