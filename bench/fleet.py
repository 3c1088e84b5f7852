"""Fleet benchmark: N agents preheating the same model at once, one bandwidth-capped origin.

    .venv/bin/python bench/fleet.py [--size-mib 256] [--origin-mib-per-s 64] [--agents 2,4,8]

Real parts only: Debian's ``docker-registry`` on loopback behind a TCP relay that caps its
bandwidth and counts the bytes it sends (``tests/throttle_proxy.py``), dnsmasq answering the
agents' headless-Service name with 127.0.0.2, 127.0.0.3, ... (``tests/dns_server.py``), and N
``cacheagent serve`` processes with separate stores, each with its peer listener on its own
loopback address and one shared port, finding each other through that DNS name. Every agent
gets ``cacheagent preheat`` at the same moment; the agents verify every blob by digest.

Rows: one agent alone (the baseline); for each N, all N at once (origin bytes / model size,
wall time / the baseline); then the model is removed everywhere and preheated again while the
agent that owns the biggest blob (by the rendezvous choice) is SIGKILLed once the origin has
sent a quarter of the model: every other agent must still finish.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cacheagent._proto.cacheagent.v1 import agent_pb2 as pb  # noqa: E402
from cacheagent.cli.client import AgentClient  # noqa: E402
from cacheagent.errors import CacheAgentError  # noqa: E402
from cacheagent.peers import rendezvous  # noqa: E402
from tests.agent_process import AgentProcess  # noqa: E402
from tests.dns_server import DnsServer  # noqa: E402
from tests.oci_push import OciPusher, modelpack_artifact, sha256  # noqa: E402
from tests.registry_server import RegistryServer, free_port  # noqa: E402
from tests.throttle_proxy import ThrottleProxy  # noqa: E402

MiB = 1 << 20
SERVICE = "cacheagent-peers.cacheagent.svc.cluster.local"
SHARDS = 2


@dataclass
class Row:
    what: str
    agents: int
    ok: int
    survivors: int
    origin_ratio: float
    seconds: float
    vs_alone: float | None
    failures: Counter[str] = field(default_factory=Counter)
    cpu_seconds: float = 0.0

    def cells(self) -> tuple[str, ...]:
        vs = "" if self.vs_alone is None else f"{self.vs_alone:.2f}x"
        return (
            self.what,
            str(self.agents),
            f"{self.ok}/{self.survivors}",
            f"{self.origin_ratio:.3f}",
            f"{self.seconds:.2f}",
            vs,
            f"{self.cpu_seconds:.1f}",
            ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items())) or "0",
        )


@dataclass
class Fleet:
    agents: list[AgentProcess]
    hosts: list[str]
    peer_port: int

    def stop(self) -> None:
        for agent in self.agents:
            if agent.proc is not None:
                agent.stop()
            agent.cleanup()


def start_fleet(work: Path, n: int, dns: DnsServer, origin: ThrottleProxy) -> Fleet:
    hosts = [f"127.0.0.{i + 2}" for i in range(n)]
    peer_port = free_port()
    dns.set_hosts(SERVICE, hosts)
    agents = [
        AgentProcess(
            work / f"n{n}-{i}",
            insecure=(origin.address,),
            extra={
                "peers": {
                    "enabled": True,
                    "listen": f"{host}:{peer_port}",
                    "dns_name": SERVICE,
                    "dns_server": dns.address,
                    "refresh_seconds": "1s",
                    "miss_wait_seconds": "5s",
                },
                "agent": {"log_level": "warning"},
            },
        )
        for i, host in enumerate(hosts)
    ]
    fleet = Fleet(agents, hosts, peer_port)
    try:
        _start_all(agents)
        for agent in agents:
            _wait_for_peers(agent, n - 1)
    except BaseException:
        fleet.stop()
        raise
    return fleet


def _start_all(agents: list[AgentProcess]) -> None:
    """Start every agent, then wait for each (their start-ups overlap)."""
    for agent in agents:
        agent.start(wait=False)
    for agent in agents:
        agent.wait_ready()


def _metric(agent: AgentProcess, name: str) -> float:
    with urllib.request.urlopen(f"{agent.http}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def peer_failures(agent: AgentProcess) -> Counter[str]:
    """The agent's peer failures by reason (from its /metrics)."""
    total: Counter[str] = Counter()
    with urllib.request.urlopen(f"{agent.http}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("cacheagent_peer_failures_total{"):
                reason = line.split('reason="', 1)[1].split('"', 1)[0]
                total[reason] += int(float(line.rsplit(" ", 1)[1]))
    return total


def _wait_for_peers(agent: AgentProcess, n: int) -> None:
    for _ in range(300):
        if _metric(agent, "cacheagent_peers") >= n:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{agent.work.name} never saw {n} peers:\n{agent.log_text()}")


def _preheat_blocking(agent: AgentProcess, ref: str) -> int:
    with AgentClient(agent.socket, timeout=600) as client:
        last = None
        try:
            for event in client.preheat([ref]):
                last = event
        except CacheAgentError as exc:
            if agent.proc is not None:
                print(f"  {agent.work.name}: preheat failed: {exc}", file=sys.stderr)
            return 1
    return 0 if last is not None and last.phase == pb.PreheatEvent.DONE else 1


async def preheat(agent: AgentProcess, ref: str, pool: ThreadPoolExecutor) -> int:
    """Preheat over the agent API (from this process: no CLI start-up in the timings), on a
    thread of its own: the loop's default pool has fewer threads than 8 agents on 2 cores."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(pool, _preheat_blocking, agent, ref)


async def run_all(
    fleet: Fleet, ref: str, origin: ThrottleProxy, kill: str | None, size: int
) -> Row:
    """Preheat on every agent at once; the row's ``what`` and ratios are the caller's."""
    before = {agent.work.name: peer_failures(agent) for agent in fleet.agents}
    procs = {a.work.name: psutil.Process(a.proc.pid) for a in fleet.agents if a.proc is not None}
    cpu_before = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
    sent = origin.sent
    started = time.monotonic()
    pool = ThreadPoolExecutor(len(fleet.agents), thread_name_prefix="preheat")
    tasks = [asyncio.create_task(preheat(a, ref, pool)) for a in fleet.agents]
    victim: AgentProcess | None = None
    if kill is not None:
        victim = fleet.agents[fleet.hosts.index(kill)]
        cpu_before.pop(victim.work.name)
        for _ in range(100_000):
            if origin.sent - sent >= size // 4 or all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.005)
        victim.kill()
    codes = await asyncio.gather(*tasks)
    pool.shutdown()
    seconds = time.monotonic() - started
    ok = sum(
        1
        for agent, code in zip(fleet.agents, codes, strict=True)
        if code == 0 and agent is not victim
    )
    failed: Counter[str] = Counter()
    for agent in fleet.agents:
        if agent.proc is not None:
            failed += peer_failures(agent) - before[agent.work.name]
    cpu = sum(sum(procs[name].cpu_times()[:2]) - t for name, t in cpu_before.items())
    n = len(fleet.agents)
    survivors = n - (victim is not None)
    return Row("", n, ok, survivors, (origin.sent - sent) / size, seconds, None, failed, cpu)


def remove_everywhere(fleet: Fleet, ref: str) -> None:
    for agent in fleet.agents:
        agent.cli("rm", "--force", ref)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--origin-mib-per-s", type=float, default=64.0)
    parser.add_argument("--agents", default="2,4,8")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the agents' logs and stores")
    args = parser.parse_args()
    counts = [int(n) for n in args.agents.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-", dir=args.workdir))
    shard = args.size_mib * MiB // SHARDS
    files = {f"model-{i:05d}-of-{SHARDS:05d}.safetensors": os.urandom(shard) for i in range(SHARDS)}
    files["config.json"] = b'{"architectures": ["Bench"]}'
    size = sum(len(d) for d in files.values())
    biggest = sha256(max(files.values(), key=len))
    rows: list[Row] = []
    registry = RegistryServer(work / "registry").start()
    dns = DnsServer(work / "dns").start(SERVICE, ["127.0.0.2"])
    try:
        async with OciPusher(registry.url) as pusher:
            await pusher.push("bench/fleet", modelpack_artifact(files), "v1")
        del files
        async with ThrottleProxy(registry.port, args.origin_mib_per_s * MiB) as origin:
            ref = f"{origin.address}/bench/fleet:v1"
            alone = start_fleet(work, 1, dns, origin)
            try:
                base = await run_all(alone, ref, origin, None, size)
            finally:
                alone.stop()
            rows.append(replace(base, what="one agent alone", vs_alone=1.0))
            for n in counts:
                fleet = start_fleet(work, n, dns, origin)
                try:
                    row = await run_all(fleet, ref, origin, None, size)
                    vs = row.seconds / base.seconds
                    rows.append(replace(row, what="all at once", vs_alone=vs))
                    remove_everywhere(fleet, ref)
                    owners = [f"{h}:{fleet.peer_port}" for h in fleet.hosts]
                    owner = rendezvous.choose(biggest, owners)
                    assert owner is not None
                    row = await run_all(fleet, ref, origin, owner.rsplit(":", 1)[0], size)
                    what = "owner killed mid-transfer"
                    rows.append(replace(row, what=what, vs_alone=row.seconds / base.seconds))
                finally:
                    fleet.stop()
    finally:
        dns.stop()
        registry.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nmodel {size / MiB:.0f} MiB ({SHARDS} shards), origin capped at "
        f"{args.origin_mib_per_s:g} MiB/s; ok: surviving agents whose preheat succeeded\n"
    )
    header = ["run", "agents", "ok", "origin bytes / model", "seconds", "vs alone"]
    header += ["agents' CPU-s", "peer failures"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")


if __name__ == "__main__":
    asyncio.run(main())
