"""Agent API latency: Stat and List with 1,000 models in the store, and a cache-hit Preheat.

Builds a store of 1,000 small models (3 files each, real blobs and hard-link trees), starts a
real `cacheagent serve` on it, and times each call from a client over the unix socket. The
machine's own figure beside it: a gRPC round trip of the cheapest call (Status).

    sudo .venv/bin/python bench/api.py [--models 1000] [--calls 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cacheagent.cli.client import AgentClient  # noqa: E402
from cacheagent.digest import sha256_digest  # noqa: E402
from cacheagent.store import ModelFile, Store  # noqa: E402
from tests.agent_process import AgentProcess  # noqa: E402
from tests.oci.layout_writer import write_synthetic_layout  # noqa: E402


def build_store(root: Path, count: int) -> None:
    with Store.open(root) as store:
        for i in range(count):
            files = []
            for name in ("config.json", "model.safetensors", "tokenizer.json"):
                data = f"{name}:{i}".encode() * 64
                files.append(ModelFile(name, store.add_blob_bytes(data), len(data)))
            manifest = json.dumps({"schemaVersion": 2, "bench": i}).encode()
            store.put_model(
                sha256_digest(manifest),
                files,
                ref=f"bench.local/models/m{i}:v1",
                source_kind="oci",
                manifest=manifest,
            )


def timed(calls: int, fn: Callable[[], object]) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def row(name: str, samples: list[float], target: float | None) -> str:
    samples = sorted(samples)
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    verdict = "" if target is None else ("pass" if p99 <= target else "FAIL")
    goal = "" if target is None else f"p99 <= {target:.0f}"
    return f"| {name} | {len(samples)} | {p50:.2f} | {p99:.2f} | {goal} | {verdict} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cacheagent-bench-api-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        build_store(work / "agent" / "store", args.models)
        layout = work / "layout"
        write_synthetic_layout(layout, 8 << 20, tag="v1", shards=1, code_layer=False)
        ref = f"oci-layout://{layout}:v1"
        print(f"built {args.models} models in {time.perf_counter() - started:.1f}s")
        with AgentProcess(work / "agent") as agent, AgentClient(agent.socket) as client:
            list(client.preheat([ref]))
            rows = [
                row("Status (machine: gRPC round trip)", timed(args.calls, client.status), None),
                row("Stat", timed(args.calls, lambda: client.stat("bench.local/models/m7:v1")), 50),
                row("List", timed(max(args.calls // 10, 10), client.list), 1000),
                row("Preheat (hit)", timed(args.calls, lambda: list(client.preheat([ref]))), 50),
            ]
            models = len(client.list().models)
    print(f"\nAgent API latency, {models} models in the store (ms)\n")
    print("| call | calls | p50 ms | p99 ms | target | |")
    print("| --- | --- | --- | --- | --- | --- |")
    for line in rows:
        print(line)
    return 0 if all("FAIL" not in line for line in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
