"""CSI publish/unpublish latency of a cached model, through the real socket, with real mounts.

    sudo .venv/bin/python bench/csi.py [--cycles 1000] [--parallel 1] [--files 64]

Starts the node driver over a real store holding one model of ``--files`` files, then runs
``--cycles`` NodePublishVolume + NodeUnpublishVolume pairs the way kubelet does (a fresh target
directory per cycle, gRPC over the unix socket), ``--parallel`` cycles at a time. Prints
p50/p90/p99/max per RPC (target: p99 at most 50 ms each), then checks that nothing leaked: no
mount left under the kubelet directory, no journal row, no lease.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cacheagent._proto.csi.v1 import csi_pb2 as pb  # noqa: E402
from tests.csi_env import CsiEnv, mounts_under, publish_request  # noqa: E402

P99_TARGET_MS = 50.0


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def cycle(env: CsiEnv, index: int, publish: list[float], unpublish: list[float]) -> None:
    target = env.target()
    volume = f"bench-{index}"
    started = time.perf_counter()
    await env.node.NodePublishVolume(publish_request(volume, target))
    publish.append(time.perf_counter() - started)
    if not (target / "file-0000.bin").exists():
        raise AssertionError(f"cycle {index}: model not visible at {target}")
    started = time.perf_counter()
    await env.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=volume, target_path=str(target))
    )
    unpublish.append(time.perf_counter() - started)


async def run(cycles: int, parallel: int, files: int) -> int:
    env = CsiEnv.create()
    try:
        env.backend.add_model("m1", {f"file-{i:04d}.bin": os.urandom(4096) for i in range(files)})
        await env.start()
        publish: list[float] = []
        unpublish: list[float] = []
        started = time.perf_counter()
        for first in range(0, cycles, parallel):
            batch = range(first, min(first + parallel, cycles))
            await asyncio.gather(*(cycle(env, i, publish, unpublish) for i in batch))
        wall = time.perf_counter() - started
        leaked = mounts_under(env.root)
        with sqlite3.connect(env.root / "store" / "index.db") as db:
            rows = db.execute("SELECT COUNT(*) FROM publishes").fetchone()[0]
        leases = len(env.store.leases())
        report(cycles, parallel, files, publish, unpublish, wall, len(leaked), rows, leases)
        slow = max(percentile(publish, 99), percentile(unpublish, 99)) * 1000 > P99_TARGET_MS
        return 1 if (leaked or rows or leases or slow) else 0
    finally:
        await env.close()


def report(
    cycles: int,
    parallel: int,
    files: int,
    publish: list[float],
    unpublish: list[float],
    wall: float,
    leaked: int,
    rows: int,
    leases: int,
) -> None:
    print(f"CSI publish/unpublish: {cycles} cycles, {parallel} at a time, model of {files} files")
    print(f"{'rpc':<22}{'n':>6}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'mean ms':>9}")
    for name, samples in (("NodePublishVolume", publish), ("NodeUnpublishVolume", unpublish)):
        ms = [s * 1000 for s in samples]
        print(
            f"{name:<22}{len(ms):>6}{percentile(ms, 50):>9.2f}{percentile(ms, 90):>9.2f}"
            f"{percentile(ms, 99):>9.2f}{max(ms):>9.2f}{statistics.fmean(ms):>9.2f}"
        )
    print(f"cycles per second: {cycles / wall:.0f}  (wall {wall:.2f} s)")
    print(f"p99 target: <= {P99_TARGET_MS:.0f} ms per RPC")
    print(f"leaked mounts: {leaked}   journal rows left: {rows}   leases left: {leases}")
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"kernel {platform.release()}, Python {platform.python_version()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--files", type=int, default=64)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/csi.py needs root (it makes real bind mounts)", file=sys.stderr)
        return 2
    return asyncio.run(run(args.cycles, max(1, args.parallel), args.files))


if __name__ == "__main__":
    raise SystemExit(main())
