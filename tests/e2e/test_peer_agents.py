"""Two real agents (``cacheagent serve``) with peer fetch on, configured as the DaemonSet's
ConfigMap does it, finding each other through DNS (dnsmasq) on distinct loopback addresses."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from cacheagent.peers.discovery import Peer
from cacheagent.sources.layout import blob_path
from tests.agent_process import AgentProcess
from tests.dns_server import DnsServer
from tests.e2e.conftest import Origin
from tests.e2e.test_agent_api import metric
from tests.registry_server import free_port
from tests.support import require_binary
from tests.threaded import serve_in_thread
from tests.throttle_proxy import ThrottleProxy

MiB = 1 << 20

CONFIGMAP = Path(__file__).resolve().parents[2] / "deploy" / "daemonset" / "configmap.yaml"


def shipped_peers_config() -> dict[str, Any]:
    config = yaml.safe_load(yaml.safe_load(CONFIGMAP.read_text())["data"]["config.yaml"])
    peers: dict[str, Any] = config["peers"]
    return peers


def wait_for_metric(agent: AgentProcess, name: str, value: float) -> None:
    for _ in range(200):
        if metric(agent, name) == value:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached {value}: {agent.log_text()}")


def layer_sizes(layout: Path, manifest_digest: str, *, tar: bool) -> dict[str, int]:
    """digest -> size of the raw (or the tar) layer blobs of a model in an OCI layout."""
    manifest = json.loads(blob_path(layout, manifest_digest).read_text())
    return {
        layer["digest"]: layer["size"]
        for layer in manifest["layers"]
        if (".tar" in layer["mediaType"]) == tar
    }


def blob_sizes(agent: AgentProcess) -> dict[str, int]:
    blobs = agent.store_root / "blobs" / "sha256"
    return {f"sha256:{p.name}": p.stat().st_size for p in blobs.glob("*/*")}


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[DnsServer]:
    peers = shipped_peers_config()
    server = DnsServer(tmp_path / "dns").start(peers["dns_name"], [])
    try:
        yield server
    finally:
        server.stop()


def start_agent(work: Path, host: str, port: int, dns: DnsServer, origin: Origin) -> AgentProcess:
    peers = shipped_peers_config()
    peers.update(
        enabled=True, listen=f"{host}:{port}", dns_server=dns.address, refresh_seconds="0.2s"
    )
    # "127.0.0.1": the registry's port and that of a bandwidth cap in front of it
    agent = AgentProcess(work, insecure=("127.0.0.1",), extra={"peers": peers})
    return agent.start()


def test_second_agent_takes_the_model_from_its_peer(
    tmp_path: Path, origin: Origin, dns: DnsServer
) -> None:
    name = shipped_peers_config()["dns_name"]
    model = origin.models["beta"]
    port = free_port()
    a = start_agent(tmp_path / "a", "127.0.0.2", port, dns, origin)
    b: AgentProcess | None = None
    try:
        a.cli("preheat", model.ref)
        raw = layer_sizes(model.layout, model.digest, tar=False)
        tar = layer_sizes(model.layout, model.digest, tar=True)
        # B is a node joining the fleet: its pod is not ready yet, so the Service names A only
        # and B's rendezvous choice is A for every blob.
        dns.set_hosts(name, ["127.0.0.2"])
        b = start_agent(tmp_path / "b", "127.0.0.3", port, dns, origin)
        wait_for_metric(b, "cacheagent_peers", 1)
        b.cli("preheat", model.ref)
        assert blob_sizes(b) == blob_sizes(a)
        # Raw layers come from A; a tar layer is unpacked on arrival and not kept as a blob,
        # so A answers 404 for it and B takes it from the origin.
        peer = Peer("127.0.0.2", port).address
        from_peer = metric(b, "cacheagent_fleet_bytes_total", **{"from": "peer", "peer": peer})
        from_origin = metric(b, "cacheagent_fleet_bytes_total", **{"from": "origin", "peer": ""})
        assert tar and (from_peer, from_origin) == (sum(raw.values()), sum(tar.values()))
        assert metric(a, "cacheagent_peer_served_bytes_total") == from_peer
        assert metric(a, "cacheagent_peer_requests_total", code="206") >= len(raw)  # ranged
        assert metric(a, "cacheagent_peer_requests_total", code="404") == len(tar)
        assert metric(b, "cacheagent_peers") == 1  # a 404 is no reason for a cooldown
        text = b.get("/metrics")[1]
        check = subprocess.run(
            [require_binary("promtool"), "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        if b is not None:
            b.stop()
            b.cleanup()
        a.stop()
        a.cleanup()


def test_peer_killed_mid_transfer_the_other_agent_finishes(
    tmp_path: Path, origin: Origin, dns: DnsServer
) -> None:
    """A real agent SIGKILLed while it streams a model to another one (origin capped at
    8 MiB/s so the transfer is still going): the other finishes from the origin."""
    name = shipped_peers_config()["dns_name"]
    model = origin.models["gamma"]
    dns.set_hosts(name, ["127.0.0.2"])  # B is joining: only A is ready
    port = free_port()
    with serve_in_thread(ThrottleProxy(origin.registry.port, rate=8 * MiB)) as capped:
        ref = model.ref.replace(origin.registry.host, capped.address)
        a = start_agent(tmp_path / "a", "127.0.0.2", port, dns, origin)
        b: AgentProcess | None = None
        try:
            b = start_agent(tmp_path / "b", "127.0.0.3", port, dns, origin)
            wait_for_metric(b, "cacheagent_peers", 1)
            peer = Peer("127.0.0.2", port).address
            via_peer = {"from": "peer", "peer": peer}
            with ThreadPoolExecutor(2) as pool:
                a_preheat = pool.submit(a.cli, "preheat", ref, check=False)
                b_preheat = pool.submit(b.cli, "preheat", ref, check=False)
                for _ in range(600):
                    if metric(b, "cacheagent_fleet_bytes_total", **via_peer) >= MiB:
                        break
                    if b_preheat.done():
                        break
                    time.sleep(0.05)
                a.kill()
                assert a_preheat.result(timeout=60).returncode != 0
                done = b_preheat.result(timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
            assert b.cli("stat", ref).returncode == 0
            from_peer = metric(b, "cacheagent_fleet_bytes_total", **via_peer)
            from_origin = metric(
                b, "cacheagent_fleet_bytes_total", **{"from": "origin", "peer": ""}
            )
            assert from_peer >= MiB and from_origin > 0
            failures = metric(b, "cacheagent_peer_failures_total", peer=peer, reason="error")
            assert failures >= 1
        finally:
            if b is not None:
                b.stop()
                b.cleanup()
            a.kill()
            a.cleanup()
