"""Lazy volumes on the shipped path: a real agent, a real registry, a bandwidth-capped origin.

    sudo .venv/bin/python bench/lazy.py [--size-mib 512] [--rate-mib 128] [--random-reads 16]

Pushes one synthetic ModelPack model of ``--size-mib`` (2 weight shards) to a ``docker-registry``
on loopback, puts ``tests/throttle_proxy.ThrottleProxy`` in front of it (one shared budget of
``--rate-mib`` MiB/s for everything the registry sends: the node's link), and runs one fresh
``cacheagent serve`` (FUSE on, empty store) per row, publishing through its CSI socket the way
kubelet does (``mode: lazy``). Rows:

* first MiB: NodePublishVolume (resolve, pending record, bind of the FUSE view), then open and
  read the first MiB of the model's biggest shard, while nothing else is on disk;
* last MiB of the model (the end of the last shard): ahead of the background pull's order;
* ``--random-reads`` reads of 4 MiB at random aligned offsets of the shards while downloading;
* the full pull alone (Preheat over the agent API), and the full pull while one reader reads
  every file from start to end through the mount (the target: at most 1.1x the pull alone).

The issue asks for a 2 GiB model; the default here is 512 MiB because the machine is shared
(two cores for several engineers); ``--size-mib 2048`` runs the full size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import machine as machine_facts  # noqa: E402
from cacheagent.cli.client import AgentCallError, AgentClient  # noqa: E402
from tests.agent_process import AgentProcess, stop_and_unmount  # noqa: E402
from tests.kubelet import InlineVolume, Kubelet, Pod  # noqa: E402
from tests.oci.layout_writer import write_synthetic_layout  # noqa: E402
from tests.oci.push import push_layout  # noqa: E402
from tests.registry_server import RegistryServer  # noqa: E402
from tests.threaded import serve_in_thread  # noqa: E402
from tests.throttle_proxy import ThrottleProxy  # noqa: E402

MiB = 1 << 20
DRIVER = "model.cacheagent.io"
READ = 4 * MiB


@dataclass
class Row:
    what: str
    seconds: float
    note: str = ""


@dataclass(frozen=True)
class Origin:
    ref: str
    digest: str


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@contextmanager
def agent_on(work: Path, origin_host: str) -> Iterator[AgentProcess]:
    agent = AgentProcess(work, insecure=(origin_host,), fuse=True)
    agent.start()
    try:
        yield agent
    finally:
        stop_and_unmount(agent)
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def lazy_volume(agent: AgentProcess, ref: str, name: str) -> Iterator[tuple[Path, float]]:
    """Publish ``ref`` lazily into a new pod; the target and how long the publish took."""
    pod, volume = Pod(name), InlineVolume("model", {"model": ref, "mode": "lazy"}, True)
    with Kubelet(agent.csi_socket, agent.kubelet_dir, DRIVER) as kubelet:
        started = time.perf_counter()
        outcome = kubelet.set_up(pod, volume)
        published = time.perf_counter() - started
        if not outcome.ok:
            raise RuntimeError(f"lazy publish failed: {outcome}")
        try:
            yield kubelet.target(pod, volume), published
        finally:
            kubelet.tear_down(pod, volume)


def shards(target: Path) -> list[Path]:
    return sorted(p for p in target.iterdir() if p.suffix == ".safetensors")


def read_at(path: Path, offset: int, size: int) -> float:
    started = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        data = os.pread(f.fileno(), size, offset)
    if len(data) != size:
        raise RuntimeError(f"short read of {path} at {offset}: {len(data)} of {size}")
    return time.perf_counter() - started


def is_ready(client: AgentClient, digest: str) -> bool:
    try:
        return client.stat(digest).state == "ready"
    except AgentCallError:
        return False  # not listed yet


def wait_pulled(agent: AgentProcess, digest: str, timeout: float = 900.0) -> None:
    """Block until the model is complete in the agent's store."""
    deadline = time.perf_counter() + timeout
    with AgentClient(agent.socket) as client:
        while time.perf_counter() < deadline:
            if is_ready(client, digest):
                return
            time.sleep(0.02)
    raise RuntimeError(f"the pull of {digest} did not finish in {timeout:.0f} s")


def first_and_last(work: Path, host: str, origin: Origin) -> list[Row]:
    with agent_on(work, host) as agent, lazy_volume(agent, origin.ref, "first") as (target, pub):
        files = shards(target)
        first = read_at(files[0], 0, MiB)
        last = files[-1]
        tail = read_at(last, last.stat().st_size - MiB, MiB)
        wait_pulled(agent, origin.digest)
    return [
        Row("lazy publish (NodePublishVolume, uncached)", pub, "resolve + pending + bind"),
        Row("lazy first MiB after publish", first, "open + read, nothing else on disk"),
        Row("lazy last MiB of the model", tail, "ahead of the background pull"),
    ]


def random_reads(work: Path, host: str, origin: Origin, count: int) -> list[Row]:
    rng = random.Random(7)
    latencies: list[float] = []
    with agent_on(work, host) as agent, lazy_volume(agent, origin.ref, "random") as (target, _):
        files = shards(target)
        started = time.perf_counter()
        for _ in range(count):
            path = rng.choice(files)
            offset = rng.randrange(0, max(1, path.stat().st_size - READ)) // READ * READ
            latencies.append(read_at(path, offset, READ))
        total = time.perf_counter() - started
        with AgentClient(agent.socket) as client:
            still = not is_ready(client, origin.digest)
        wait_pulled(agent, origin.digest)
    ms = [s * 1000 for s in latencies]
    note = (
        f"p50 {percentile(ms, 50):.0f} ms, p99 {percentile(ms, 99):.0f} ms"
        f"{', pull still running after the last' if still else ''}"
    )
    return [Row(f"lazy random 4 MiB reads x{count} while downloading", total, note)]


def pull_alone(work: Path, host: str, origin: Origin) -> float:
    with agent_on(work, host) as agent, AgentClient(agent.socket) as client:
        started = time.perf_counter()
        for update in client.preheat([origin.ref]):
            if update.error:
                raise RuntimeError(update.error)
        return time.perf_counter() - started


def pull_with_reader(work: Path, host: str, origin: Origin) -> tuple[float, float]:
    """(seconds from the publish until the pull is done, seconds the reader took)."""
    with agent_on(work, host) as agent:
        started = time.perf_counter()
        with lazy_volume(agent, origin.ref, "reader") as (target, _):
            done: list[float] = []
            reader = threading.Thread(target=lambda: done.append(read_all(target)))
            reader.start()
            wait_pulled(agent, origin.digest)
            pull = time.perf_counter() - started
            reader.join(900)
    return pull, done[0] if done else float("nan")


def read_all(target: Path) -> float:
    started = time.perf_counter()
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        with path.open("rb", buffering=0) as f:
            while f.read(MiB):
                pass
    return time.perf_counter() - started


def lazy_rows(size_mib: int, rate_mib: int, random_count: int) -> list[Row]:
    base = Path(tempfile.mkdtemp(prefix="cacheagent-lazy-bench-", dir="/var/tmp"))
    try:
        with RegistryServer(base / "registry") as registry:
            layout = base / "layout"
            digest = write_synthetic_layout(layout, size_mib * MiB, tag="v1", shards=2)
            asyncio.run(push_layout(layout, "v1", registry.url, "models/bench"))
            with serve_in_thread(ThrottleProxy(registry.port, rate_mib * MiB)) as proxy:
                origin = Origin(f"{proxy.address}/models/bench:v1", digest)
                rows = first_and_last(base / "a1", proxy.address, origin)
                rows += random_reads(base / "a2", proxy.address, origin, random_count)
                alone = pull_alone(base / "a3", proxy.address, origin)
                with_reader, reader = pull_with_reader(base / "a4", proxy.address, origin)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    link = size_mib / rate_mib
    rows += [
        Row(
            "full pull alone (Preheat)", alone, f"{size_mib} MiB / {rate_mib} MiB/s = {link:.1f} s"
        ),
        Row(
            "full pull with a sequential reader",
            with_reader,
            f"{with_reader / alone:.2f}x the pull alone (target <= 1.1x); reader {reader:.1f} s",
        ),
    ]
    return rows


def print_rows(title: str, rows: list[Row]) -> None:
    print(f"\n{title}\n")
    print(f"| {'what':52} | {'seconds':>8} | note")
    print(f"|{'-' * 54}|{'-' * 10}|------")
    for row in rows:
        print(f"| {row.what:52} | {row.seconds:>8.3f} | {row.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rate-mib", type=int, default=128)
    parser.add_argument("--random-reads", type=int, default=16)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: FUSE and bind mounts")
    rows = lazy_rows(args.size_mib, args.rate_mib, args.random_reads)
    title = (
        f"lazy volumes through a real agent: {args.size_mib} MiB model, registry on loopback "
        f"behind a {args.rate_mib} MiB/s cap"
    )
    print_rows(title, rows)
    print()
    for key, value in machine_facts(Path("/var/tmp")):
        print(f"{key:>10}: {value}")


if __name__ == "__main__":
    main()
