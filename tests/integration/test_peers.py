"""Peer fetch between in-process agents on distinct loopback addresses: a real registry behind a
bandwidth cap as the origin, real peer listeners, real DNS (dnsmasq) for discovery."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from cacheagent.config import PeersConfig
from cacheagent.peers.client import PEER_REPOSITORY
from cacheagent.peers.discovery import DiscoveryError, DnsResolver, Peer, PeerDirectory
from cacheagent.peers.fleet import Fleet
from cacheagent.peers.ranges import parse_range
from cacheagent.pull.engine import PullEngine, SourceRegistry
from cacheagent.refs import parse_ref
from cacheagent.store import Store
from tests.dns_server import DnsServer
from tests.fault_server import Fault, FaultKind, FaultServer
from tests.fleet_support import (
    PULL,
    SERVICE,
    TUNING,
    MiB,
    Node,
    files_of,
    fleet_pki,
    hosts_owning,
    hosts_where_first_wins,
    start_node,
)
from tests.integration.pull_origin import registry_source
from tests.loopback import start_loopback
from tests.oci_push import OciPusher, modelpack_artifact, sha256
from tests.registry_server import RegistryServer, free_port
from tests.throttle_proxy import ThrottleProxy

WEIGHTS = os.urandom(4 * MiB)
FILES = {"model.safetensors": WEIGHTS, "config.json": b'{"layers": 2}', "tokenizer.json": b"{}"}
BIG = sha256(WEIGHTS)
MODEL_BYTES = sum(len(d) for d in FILES.values())


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture
async def origin(registry: RegistryServer) -> AsyncIterator[ThrottleProxy]:
    """The registry behind a 4 MiB/s cap: a 4 MiB model takes about a second to pull."""
    async with OciPusher(registry.url) as pusher:
        await pusher.push("models/fleet", modelpack_artifact(FILES), "v1")
    async with ThrottleProxy(registry.port, rate=4 * MiB) as proxy:
        yield proxy


@pytest.fixture
async def fleet() -> AsyncIterator[list[Node]]:
    """Nodes a test starts; closed (pulls cancelled, listeners stopped) at the end."""
    started: list[Node] = []
    yield started
    for node in started:
        await node.close()


def ref(proxy: ThrottleProxy) -> str:
    return f"{proxy.address}/models/fleet:v1"


async def pull(node: Node, proxy: ThrottleProxy) -> dict[str, str]:
    model = await node.engine.pull(ref(proxy))
    return files_of(node.store.root / "models" / model.digest.replace(":", "/"))


def expected() -> dict[str, str]:
    return {path: sha256(data).split(":")[1] for path, data in FILES.items()}


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll an in-process condition (bounded: 20 s)."""
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- the listener ----------------------------------------------------------------------------


async def test_listener_serves_verified_blobs_and_nothing_else(
    tmp_path: Path, origin: ThrottleProxy, fleet: list[Node]
) -> None:
    port = free_port()
    a = await start_node(tmp_path, "127.0.0.2", port, miss_wait_seconds=0.1)
    fleet.append(a)
    assert await pull(a, origin) == expected()
    base = f"http://127.0.0.2:{port}/v2"
    blob = f"{base}/{PEER_REPOSITORY}/blobs/{BIG}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/") as r:
            assert r.status == 200
        async with http.head(blob) as r:
            assert r.status == 200 and r.content_length == len(WEIGHTS)
            assert r.headers["Docker-Content-Digest"] == BIG
        async with http.get(blob, headers={"Range": "bytes=1000-1999"}) as r:
            assert r.status == 206 and await r.read() == WEIGHTS[1000:2000]
        async with http.get(blob, headers={"Range": "bytes=-10"}) as r:
            assert r.status == 206 and await r.read() == WEIGHTS[-10:]
        async with http.get(f"{base}/any/other-name/blobs/{BIG}") as r:
            assert r.status == 200 and await r.read() == WEIGHTS  # content-addressed
        unknown = "sha256:" + "0" * 64
        async with http.get(f"{base}/{PEER_REPOSITORY}/blobs/{unknown}") as r:
            assert r.status == 404
            assert (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
        async with http.get(f"{base}/{PEER_REPOSITORY}/blobs/sha256:..%2F..%2Findex.db") as r:
            assert r.status == 400
        async with http.get(f"{base}/UPPER/blobs/{BIG}") as r:
            assert r.status == 400
        model = parse_ref(ref(origin))
        async with http.get(f"{base}/{model.repository}/manifests/v1") as r:  # type: ignore[union-attr]
            assert r.status == 404  # no manifests, no tags: peers resolve at the origin
        async with http.put(blob, data=b"x") as r:
            assert r.status == 405
    assert a.stats.served["200"] >= 2 and a.stats.served["404"] == 1


# -- one origin fetch across the fleet ---------------------------------------------------------


async def owner_and_follower(tmp_path: Path, fleet: list[Node]) -> tuple[Node, Node]:
    """Node A serving on 127.0.0.2 and node B on 127.0.0.3 (A its static peer, not serving)."""
    port = free_port()
    a = await start_node(tmp_path, "127.0.0.2", port)
    b = await start_node(tmp_path, "127.0.0.3", port, static=(a.peer,), serve=False)
    fleet += [a, b]
    return a, b


async def test_second_node_streams_from_the_owner_while_it_downloads(
    tmp_path: Path, origin: ThrottleProxy, fleet: list[Node]
) -> None:
    a, b = await owner_and_follower(tmp_path, fleet)
    first, second = await asyncio.gather(pull(a, origin), pull(b, origin))
    assert first == second == expected()
    assert b.stats.origin_bytes == 0
    assert b.stats.peer_bytes[a.peer.address] == MODEL_BYTES
    assert a.stats.origin_bytes == MODEL_BYTES
    # The origin saw each blob byte once (plus two manifests and the headers of the answers).
    assert MODEL_BYTES <= origin.sent <= MODEL_BYTES * 1.05


async def test_two_owners_pulling_each_others_blobs_do_not_starve(
    tmp_path: Path, registry: RegistryServer, fleet: list[Node]
) -> None:
    """A owns shard 0 and B shard 1, both pull both with 2 connections per origin: fetches
    waiting on the other node must not hold the slots its own origin fetches need."""
    shards = {"a.safetensors": os.urandom(2 * MiB), "b.safetensors": os.urandom(2 * MiB)}
    async with OciPusher(registry.url) as pusher:
        await pusher.push("models/split", modelpack_artifact(shards), "v1")
    port = free_port()
    host_a, host_b = hosts_owning([sha256(d) for d in shards.values()], port)
    pull_config = dataclasses.replace(PULL, max_connections_per_origin=2)
    peers = (Peer(host_a, port), Peer(host_b, port))
    a = await start_node(tmp_path, host_a, port, static=peers, pull=pull_config)
    b = await start_node(tmp_path, host_b, port, static=peers, pull=pull_config)
    fleet += [a, b]
    async with ThrottleProxy(registry.port, rate=4 * MiB) as proxy:
        ref = f"{proxy.address}/models/split:v1"
        await asyncio.gather(a.engine.pull(ref), b.engine.pull(ref))
        sent = proxy.sent
    assert not a.stats.failures and not b.stats.failures
    assert a.stats.peer_bytes[b.peer.address] == b.stats.peer_bytes[a.peer.address] == 2 * MiB
    assert 4 * MiB <= sent <= 4.2 * MiB


def faulty_peer(server: FaultServer, kind: FaultKind) -> Peer:
    """Serve every blob of the model from ``server`` as a peer would, each one misbehaving
    with ``kind`` on every request; the peer to name."""
    for data in FILES.values():
        name = f"v2/{PEER_REPOSITORY}/blobs/{sha256(data)}"
        server.add(name, data)
        server.inject(name, Fault(kind, times=1000))
    return Peer("127.0.0.1", server.port)


async def test_lying_peer_is_discarded_and_the_origin_used(
    tmp_path: Path, origin: ThrottleProxy, fleet: list[Node]
) -> None:
    async with FaultServer() as liar:
        liar_peer = faulty_peer(liar, "wrong")  # right length, wrong bytes
        b = await start_node(tmp_path, "127.0.0.3", free_port(), static=(liar_peer,), serve=False)
        fleet.append(b)
        assert await pull(b, origin) == expected()
    # One failure per blob it had sent bytes of before its first lie was caught.
    lies = b.stats.failures[(liar_peer.address, "unverified")]
    assert 1 <= lies <= len(FILES) and b.stats.fallbacks["unverified"] == lies
    assert b.stats.peer_bytes[liar_peer.address] > 0
    # The liar is sitting out its cooldown: every blob came (again) from the origin.
    assert b.stats.origin_bytes >= MODEL_BYTES
    assert not b.directory.live()
    assert list((b.store.root / "partial").iterdir()) == []


async def test_peer_answering_another_range_is_not_used(
    tmp_path: Path, origin: ThrottleProxy, fleet: list[Node]
) -> None:
    """A peer that ignores Range (200 with the whole blob) for every request."""
    async with FaultServer() as confused:
        peer = faulty_peer(confused, "ignore_range")
        b = await start_node(tmp_path, "127.0.0.3", free_port(), static=(peer,), serve=False)
        fleet.append(b)
        assert await pull(b, origin) == expected()
    assert b.stats.failures[(peer.address, "wrong_answer")] >= 1
    # A whole small blob asked for whole is a right answer; no byte of a wrong one was used.
    assert b.stats.peer_bytes[peer.address] + b.stats.origin_bytes == MODEL_BYTES
    assert b.stats.peer_bytes[peer.address] < len(WEIGHTS)


async def test_slow_peer_is_given_up_for_the_origin(
    tmp_path: Path, origin: ThrottleProxy, fleet: list[Node]
) -> None:
    async with FaultServer(stall_seconds=30.0) as slow:
        name = f"v2/{PEER_REPOSITORY}/blobs/{BIG}"
        slow.add(name, WEIGHTS)
        slow.inject(name, Fault("stall", times=1000, cut_at=0.5))
        slow_peer = Peer("127.0.0.1", slow.port)
        b = await start_node(
            tmp_path, "127.0.0.3", free_port(), static=(slow_peer,), stall_seconds=0.5, serve=False
        )
        fleet.append(b)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await pull(b, origin) == expected()
        elapsed = loop.time() - started
    # Each range asked of it in parallel before the first stall was noticed gave it up once.
    assert 1 <= b.stats.failures[(slow_peer.address, "slow")] <= 8
    assert not b.directory.live()
    assert b.stats.peer_bytes[slow_peer.address] > 0  # half a range before it stalled
    assert b.stats.peer_bytes[slow_peer.address] + b.stats.origin_bytes == MODEL_BYTES
    assert elapsed < 10.0  # nowhere near the 30 s stall


async def test_peer_death_mid_transfer_falls_back_to_the_origin(
    tmp_path: Path, origin: ThrottleProxy, fleet: list[Node]
) -> None:
    a, b = await owner_and_follower(tmp_path, fleet)
    a_pull = asyncio.create_task(pull(a, origin))
    b_pull = asyncio.create_task(pull(b, origin))
    await wait_until(lambda: b.stats.peer_bytes[a.peer.address] >= 256 * 1024, "peer bytes")
    await a.stop_serving()
    with pytest.raises(BaseException):  # noqa: B017 - A's pull was cancelled by its death
        await a_pull
    assert await b_pull == expected()
    assert b.stats.failures[(a.peer.address, "error")] >= 1
    assert 0 < b.stats.peer_bytes[a.peer.address] < MODEL_BYTES
    assert b.stats.origin_bytes > 0


# -- discovery ---------------------------------------------------------------------------------


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[DnsServer]:
    server = DnsServer(tmp_path / "dns").start(SERVICE, ["127.0.0.2", "127.0.0.3"])
    try:
        yield server
    finally:
        server.stop()


async def test_discovery_follows_the_headless_service(dns: DnsServer) -> None:
    directory = PeerDirectory(
        port=9465,
        self_hosts={"127.0.0.2"},
        dns_name=SERVICE,
        resolver=DnsResolver(dns.address, timeout=0.5),
    )
    await directory.refresh()
    assert directory.peers() == (Peer("127.0.0.3", 9465),)
    await asyncio.to_thread(dns.set_hosts, SERVICE, ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    await directory.refresh()
    assert directory.peers() == (Peer("127.0.0.3", 9465), Peer("127.0.0.4", 9465))
    # the others are not ready any more
    await asyncio.to_thread(dns.set_hosts, SERVICE, ["127.0.0.2"])
    await directory.refresh()
    assert directory.peers() == ()
    await asyncio.to_thread(dns.set_hosts, SERVICE, ["127.0.0.5"])
    await directory.refresh()
    await asyncio.to_thread(dns.stop)
    with pytest.raises(DiscoveryError, match=SERVICE):
        await directory.refresh()
    assert directory.peers() == (Peer("127.0.0.5", 9465),)  # a DNS blip keeps the last answer


async def test_discovery_change_during_a_pull_moves_the_rest_to_the_peer(
    tmp_path: Path, origin: ThrottleProxy, dns: DnsServer, fleet: list[Node]
) -> None:
    port = free_port()
    owner_host, node_host = hosts_where_first_wins(BIG, port)
    a = await start_node(tmp_path, owner_host, port)
    fleet.append(a)
    assert await pull(a, origin) == expected()  # A holds the model
    sent_before = origin.sent
    await asyncio.to_thread(dns.set_hosts, SERVICE, [node_host])  # B's view: alone
    b = await start_node(
        tmp_path, node_host, port, resolver=DnsResolver(dns.address, timeout=0.5), serve=False
    )
    fleet.append(b)
    refresher = asyncio.create_task(b.directory.run(0.05))
    try:
        b_pull = asyncio.create_task(pull(b, origin))
        await wait_until(lambda: b.stats.origin_bytes >= 512 * 1024, "origin bytes")
        await asyncio.to_thread(dns.set_hosts, SERVICE, [node_host, owner_host])  # A became ready
        assert await b_pull == expected()
    finally:
        refresher.cancel()
    assert b.stats.peer_bytes[a.peer.address] > 0
    assert b.stats.origin_bytes < MODEL_BYTES
    assert b.stats.origin_bytes + b.stats.peer_bytes[a.peer.address] == MODEL_BYTES
    assert origin.sent - sent_before < MODEL_BYTES


async def test_dripping_peer_under_the_throughput_floor_is_given_up(
    tmp_path: Path, origin: ThrottleProxy, fleet: list[Node]
) -> None:
    """A peer that keeps sending, but 1 KiB every 20 ms (50 KiB/s, under a 256 KiB/s floor)."""

    blobs = {sha256(data): data for data in FILES.values()}

    async def drip(request: web.Request) -> web.StreamResponse:
        data = blobs[request.match_info["digest"]]
        start, end = parse_range(request.headers.get("Range"), len(data)) or (0, len(data))
        response = web.StreamResponse(status=206)
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        response.content_length = end - start
        await response.prepare(request)
        for offset in range(start, end, 1024):
            await response.write(data[offset : min(end, offset + 1024)])
            await asyncio.sleep(0.02)
        return response

    app = web.Application()
    app.router.add_get(f"/v2/{PEER_REPOSITORY}/blobs/{{digest}}", drip)
    runner, port = await start_loopback(app, shutdown_timeout=0.5)
    try:
        dripper = Peer("127.0.0.1", port)
        b = await start_node(
            tmp_path,
            "127.0.0.3",
            free_port(),
            static=(dripper,),
            stall_seconds=0.5,
            min_bytes_per_second=256 * 1024,
            serve=False,
        )
        fleet.append(b)
        assert await pull(b, origin) == expected()
    finally:
        await runner.cleanup()
    assert b.stats.failures[(dripper.address, "slow")] >= 1
    assert b.stats.fallbacks["slow"] >= 1


async def test_fleet_from_config_with_mutual_tls(
    tmp_path: Path, origin: ThrottleProxy, registry: RegistryServer
) -> None:
    """Two nodes built by ``Fleet`` from the ``peers`` config: the listener speaks TLS only and
    serves only clients with a certificate from the fleet's CA."""
    pki = fleet_pki(tmp_path / "pki")
    port = free_port()
    nodes: list[tuple[Fleet, PullEngine, Store]] = []
    origins = [registry_source(), registry_source()]
    for host, origin_source in zip(("127.0.0.1", "127.0.0.3"), origins, strict=True):
        config = PeersConfig(
            enabled=True,
            listen=f"{host}:{port}",
            static=(f"127.0.0.1:{port}",),
            tls_cert=pki.cert,
            tls_key=pki.key,
            tls_ca=pki.ca,
        )
        fleet = Fleet(config)
        store = Store.open(tmp_path / host)
        engine = PullEngine(store, SourceRegistry(fleet.wrap([origin_source])), PULL, tuning=TUNING)
        await fleet.start(store, engine, CollectorRegistry())
        nodes.append((fleet, engine, store))
    (a, a_engine, _), (b, b_engine, _) = nodes
    try:
        await a_engine.pull(ref(origin))
        assert a.stats.origin_bytes == MODEL_BYTES  # the owner of everything: itself
        await b_engine.pull(ref(origin))
        assert b.stats.peer_bytes[f"127.0.0.1:{port}"] == MODEL_BYTES
        assert b.stats.origin_bytes == 0
        url = f"127.0.0.1:{port}/v2/"
        trusting = ssl.create_default_context(cafile=str(pki.ca))
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):  # no plain HTTP
                await http.get(f"http://{url}")
            with pytest.raises(aiohttp.ClientError):  # no client certificate: no answer
                async with http.get(f"https://{url}", ssl=trusting) as r:
                    await r.read()
            trusting.load_cert_chain(pki.cert, pki.key)
            async with http.get(f"https://{url}", ssl=trusting) as r:
                assert r.status == 200
    finally:
        for fleet, engine, store in nodes:
            await engine.aclose()
            await fleet.stop()
            store.close()
        for origin_source in origins:
            await origin_source.aclose()
