"""Store index benchmark: list and eviction planning on a large index.

Builds an index with 10,000 models and 100,000 blobs (index rows only: no blob bytes and no
model trees are written, so the store is opened read-only, ``lock=False``, which skips the
reconciliation that would otherwise drop rows whose files are missing). Each model has ten
files of its own plus one file whose blob it shares with another model; 1% of the models are
pinned and 1% leased. Then times ``list_models()`` and ``plan_eviction`` for a typical need
(the least-recently-used 1% of the bytes) and prints a table. Each time is the median of
several runs.

Usage: .venv/bin/python bench/store.py [--models N] [--blobs-per-model K] [--runs R]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cacheagent.store import ModelFile, Store
from cacheagent.store.index import Index, ModelRow
from cacheagent.store.paths import Layout

BLOB_SIZE = 100 << 20


def _digest(kind: str, n: int) -> str:
    return "sha256:" + hashlib.sha256(f"{kind}-{n}".encode()).hexdigest()


def _model_files(i: int, per_model: int, nblobs: int) -> Iterator[ModelFile]:
    for k in range(per_model):
        yield ModelFile(
            f"weights/part-{k:05d}.safetensors", _digest("b", i * per_model + k), BLOB_SIZE
        )
    shared = (i * 7919 + 1) % nblobs
    yield ModelFile("tokenizer.json", _digest("b", shared), BLOB_SIZE)


def populate(root: Path, nmodels: int, per_model: int) -> float:
    """Write the index rows; returns the seconds it took."""
    rng = random.Random(42)
    nblobs = nmodels * per_model
    start = time.perf_counter()
    index = Index.open(Layout(root).index_path)
    with index.transaction():
        for b in range(nblobs):
            index.insert_blob(_digest("b", b), BLOB_SIZE, 0.0)
        for i in range(nmodels):
            digest = _digest("m", i)
            files = list(_model_files(i, per_model, nblobs))
            row = ModelRow(digest, "ready", f"registry.example/m{i}:v1", "oci", b"{}", files, 0.0)
            index.insert_model(row)
            index.touch(digest, rng.uniform(1e9, 2e9))
            if i % 100 == 0:
                index.pin(digest, 0.0)
            if i % 100 == 1:
                index.add_lease(digest, f"vol-{i}", "csi", 0.0)
    index.close()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--blobs-per-model", type=int, default=10)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    rows: list[tuple[str, str, float, float | None]] = []
    with tempfile.TemporaryDirectory(prefix="cacheagent-bench-") as tmp:
        root = Path(tmp)
        nblobs = args.models * args.blobs_per_model
        rows.append(
            (
                "populate index",
                f"{args.models} models",
                populate(root, args.models, args.blobs_per_model),
                None,
            )
        )
        store = Store.open(root, lock=False)
        usage = store.usage()
        assert usage.models == args.models and usage.blobs == nblobs, usage
        typical = usage.used // 100
        listed = store.list_models()
        assert len(listed) == args.models
        plan = store.plan_eviction(typical)
        assert plan.satisfied and plan.models, plan
        rows += [
            (
                "list_models()",
                f"{args.models} models",
                median_seconds(store.list_models, args.runs),
                0.100,
            ),
            (
                "plan_eviction (1% of bytes)",
                f"{len(plan.models)} of {args.models} evicted",
                median_seconds(lambda: store.plan_eviction(typical), args.runs),
                0.010,
            ),
            ("usage()", f"{nblobs} blobs", median_seconds(store.usage, args.runs), None),
            (
                "list_models() + read every .files",
                f"{args.models * (args.blobs_per_model + 1)} files",
                median_seconds(
                    lambda: [len(m.files) for m in store.list_models()], max(args.runs // 2, 1)
                ),
                None,
            ),
            (
                "plan_eviction (more than all)",
                f"{args.models} scanned",
                median_seconds(lambda: store.plan_eviction(usage.used * 2), max(args.runs // 2, 1)),
                None,
            ),
        ]
        store.close()
    print_table(rows)


def print_table(rows: list[tuple[str, str, float, float | None]]) -> None:
    header = f"{'operation':<36} {'count':<24} {'time':>10} {'target':>10}  result"
    print(header)
    print("-" * len(header))
    for name, count, seconds, target in rows:
        target_text = "-" if target is None else f"{target * 1000:.0f} ms"
        result = "-" if target is None else ("pass" if seconds <= target else "FAIL")
        print(f"{name:<36} {count:<24} {seconds * 1000:>7.1f} ms {target_text:>10}  {result}")


if __name__ == "__main__":
    main()
