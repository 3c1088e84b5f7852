"""In-process fleet nodes for the peer tests: each node a real store, pull engine, peer
listener on its own loopback address, and a PeerSource in front of a real registry source."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cacheagent.config import PullConfig
from cacheagent.peers import rendezvous
from cacheagent.peers.client import ClientSettings, PeerClient
from cacheagent.peers.discovery import Peer, PeerDirectory, Resolver
from cacheagent.peers.server import PeerServer
from cacheagent.peers.source import PeerSource
from cacheagent.peers.stats import PeerStats
from cacheagent.pull.engine import PullEngine, PullTuning, SourceRegistry
from cacheagent.sources.base import Source
from cacheagent.store import Store
from tests.integration.pull_origin import registry_source
from tests.support import require_binary

KiB, MiB = 1 << 10, 1 << 20
# Ranged downloads (many 128 KiB pieces) for a few-MiB model, fast retries.
PULL = PullConfig(range_threshold_bytes=512 * KiB, range_chunk_bytes=128 * KiB, retries=2)
TUNING = PullTuning(batch_bytes=64 * KiB, record_interval_seconds=0.05)
SERVICE = "cacheagent-peers.cacheagent.svc.cluster.local"


@dataclass
class Node:
    peer: Peer
    store: Store
    engine: PullEngine
    stats: PeerStats
    directory: PeerDirectory
    client: PeerClient
    origin: Source
    server: PeerServer | None

    async def stop_serving(self) -> None:
        """The node dies: its pulls stop and its listener closes (open transfers are cut)."""
        await self.engine.aclose()
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def close(self) -> None:
        await self.stop_serving()
        await self.client.aclose()
        await self.origin.aclose()
        self.store.close()


async def start_node(
    work: Path,
    host: str,
    port: int,
    *,
    static: tuple[Peer, ...] = (),
    resolver: Resolver | None = None,
    stall_seconds: float = 5.0,
    min_bytes_per_second: int = 64 * KiB,
    miss_wait_seconds: float = 2.0,
    serve: bool = True,
    pull: PullConfig = PULL,
) -> Node:
    store = Store.open(work / host / "store")
    stats = PeerStats()
    directory = PeerDirectory(
        port=port,
        self_hosts={host},
        static=static,
        dns_name=SERVICE if resolver is not None else None,
        resolver=resolver,
        cooldown_seconds=60.0,
    )
    client = PeerClient(
        ClientSettings(stall_seconds=stall_seconds, min_bytes_per_second=min_bytes_per_second)
    )
    origin = registry_source()
    source = PeerSource(origin, directory, client, stats)
    engine = PullEngine(store, SourceRegistry([source]), pull, tuning=TUNING)
    server = None
    if serve:
        server = PeerServer(store, engine, stats, miss_wait_seconds=miss_wait_seconds)
        await server.start(host, port)
    return Node(Peer(host, port), store, engine, stats, directory, client, origin, server)


def files_of(root: Path) -> dict[str, str]:
    """path -> sha256 of every file under a model tree."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def hosts_owning(digests: list[str], port: int) -> list[str]:
    """One loopback host per digest such that, among exactly these hosts, each owns its
    digest by the rendezvous choice."""
    hosts = [f"127.0.0.{i}" for i in range(2, 40)]
    for first in hosts:
        for second in hosts:
            pair = [Peer(first, port).address, Peer(second, port).address]
            if first != second and [rendezvous.choose(d, pair) for d in digests] == pair:
                return [first, second]
    raise AssertionError("no pair of loopback hosts splits these digests")


def hosts_where_first_wins(digest: str, port: int, count: int = 2) -> list[str]:
    """``count`` loopback hosts, ranked for ``digest`` the way rendezvous ranks them (the
    first wins), so a test can decide which node owns a blob."""
    hosts = [f"127.0.0.{i}" for i in range(2, 12)]
    ranked = rendezvous.ranking(digest, [Peer(h, port).address for h in hosts])
    return [Peer.parse(a).host for a in ranked[:count]]


@dataclass(frozen=True)
class FleetPki:
    ca: Path
    cert: Path  # one agent certificate, for serving and as a client (serverAuth + clientAuth)
    key: Path


def fleet_pki(directory: Path) -> FleetPki:
    """A fleet CA and an agent certificate it signed, usable on both ends of a peer transfer."""
    openssl = require_binary("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ext").write_text(
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    steps = (
        "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=fleet-CA -keyout ca.key -out ca.pem",
        "req -newkey rsa:2048 -nodes -subj /CN=agent -keyout agent.key -out agent.csr",
        "x509 -req -in agent.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2"
        " -out agent.pem -extfile ext",
    )
    for step in steps:
        subprocess.run(
            [openssl, *step.split()], cwd=directory, check=True, capture_output=True, timeout=60
        )
    return FleetPki(directory / "ca.pem", directory / "agent.pem", directory / "agent.key")
