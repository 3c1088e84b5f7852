"""Pull engine benchmark: a ~2 GiB model from a real docker-registry on a loopback port.

    .venv/bin/python bench/pull.py [--size-mib 2048] [--workdir DIR]

One run prints one table:

* ``curl -o`` of the model's big blob to the same disk: plain, with an fsync after, and followed
  by a SHA-256 of the file and an fsync (what a script doing a verified, durable download does;
  the pull does both too). These are the baselines a pull is compared with;
* a cold pull (empty store), with each verification mode (``running``: hash the contiguous prefix
  while the rest downloads; ``final``: re-read the file once at the end);
* 100 concurrent pulls of the same model by one engine: origin bytes / model size and wall time;
* the pulling process's peak RSS (VmHWM) for a small and the large model.

Every pull runs in a child process (``--child``), so its peak RSS is its own and its page-cache
state is the same for every row. Rows are measured interleaved, best of ``--repeat``, so that a
machine busy with other work slows them alike. Origin bytes are counted in the child, at the
Source boundary (every byte the registry's HTTP responses delivered to the engine). Everything
the bench writes lives under one temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
from yarl import URL  # noqa: E402

from cacheagent.config import PullConfig  # noqa: E402
from cacheagent.pull.engine import PullEngine, PullTuning, SourceRegistry  # noqa: E402
from cacheagent.refs import ModelRef  # noqa: E402
from cacheagent.sources.base import BlobRef, ResolvedModel, Source  # noqa: E402
from cacheagent.sources.layout import blob_path  # noqa: E402
from cacheagent.sources.manifest import ANNOTATION_REF_NAME, OCI_MANIFEST  # noqa: E402
from cacheagent.sources.registry import RegistrySource  # noqa: E402
from cacheagent.sources.transport import Transport, TransportOptions  # noqa: E402
from cacheagent.store import Store  # noqa: E402
from tests.oci.layout_writer import synthetic_model, write_layout  # noqa: E402
from tests.registry_server import RegistryServer  # noqa: E402

MiB = 1 << 20
REPOSITORY = "bench/model"


# -- the child: one engine, N concurrent pulls, numbers as JSON --------------------------------


class CountingSource(Source):
    """Counts the bytes the wrapped source delivers (what the origin sent)."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.supports_ranges = inner.supports_ranges
        self.received: Counter[str] = Counter()

    async def resolve(self, ref: ModelRef) -> ResolvedModel:
        return await self.inner.resolve(ref)

    async def fetch(
        self, blob: BlobRef, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        async for chunk in self.inner.fetch(blob, start, end):
            self.received[blob.digest] += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()
        if isinstance(self.inner, RegistrySource):
            await self.inner.transport.aclose()


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def child(store_root: Path, ref: str, concurrency: int, hash_mode: str) -> dict[str, float]:
    baseline_kib = vm_kib("VmRSS")
    store = Store.open(store_root)
    transport = Transport(TransportOptions(insecure=frozenset({"127.0.0.1"})))
    source = CountingSource(RegistrySource(transport))
    engine = PullEngine(
        store,
        SourceRegistry([source]),
        PullConfig(),
        tuning=PullTuning(hash_mode=hash_mode),  # type: ignore[arg-type]
    )
    try:
        started = time.perf_counter()
        models = await asyncio.gather(*(engine.pull(ref) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    finally:
        await source.aclose()
        store.close()
    return {
        "seconds": seconds,
        "model_bytes": models[0].size,
        "origin_bytes": sum(source.received.values()),
        "peak_rss_kib": vm_kib("VmHWM"),
        "baseline_rss_kib": baseline_kib,
    }


# -- the parent: build, push, run the children, print the table --------------------------------


@dataclass
class Pushed:
    ref: str
    big_blob_url: str
    big_blob_size: int


async def push_layout(registry: RegistryServer, layout: Path, tag: str) -> Pushed:
    """Push a layout's tagged manifest and blobs, streaming each blob from its file."""
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"][ANNOTATION_REF_NAME] == tag)
    manifest_bytes = blob_path(layout, entry["digest"]).read_bytes()
    manifest = json.loads(manifest_bytes)
    base = URL(registry.url)
    async with aiohttp.ClientSession() as session:
        for desc in [manifest["config"], *manifest["layers"]]:
            async with session.post(base / "v2" / REPOSITORY / "blobs/uploads/") as resp:
                assert resp.status == 202, resp.status
                location = base.join(URL(resp.headers["Location"]))
            with open(blob_path(layout, desc["digest"]), "rb") as f:  # noqa: ASYNC230 - aiohttp reads it in a thread
                async with session.put(
                    location.update_query(digest=desc["digest"]),
                    data=f,
                    headers={"Content-Type": "application/octet-stream"},
                ) as resp:
                    assert resp.status == 201, await resp.text()
        url = base / "v2" / REPOSITORY / "manifests" / tag
        headers = {"Content-Type": OCI_MANIFEST}
        async with session.put(url, data=manifest_bytes, headers=headers) as resp:
            assert resp.status == 201, await resp.text()
    big = max(manifest["layers"], key=lambda d: d["size"])
    blob_url = str(base / "v2" / REPOSITORY / "blobs" / big["digest"])
    return Pushed(f"{registry.host}/{REPOSITORY}:{tag}", blob_url, big["size"])


def build_layout(work: Path, size: int, tag: str, seed: int) -> Path:
    """One big safetensors shard plus the small files (no code layer): a ``size`` model."""
    files = work / f"files-{tag}"
    entries = synthetic_model(files, size, shards=1, seed=seed, code_layer=False)
    layout = work / "layout"
    write_layout(layout, entries, tag=tag)
    shutil.rmtree(files)
    return layout


def run_child(work: Path, ref: str, concurrency: int, hash_mode: str) -> dict[str, float]:
    store = work / "store"
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(store), ref, str(concurrency), hash_mode],
            check=True,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        shutil.rmtree(store, ignore_errors=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def best(results: list[dict[str, float]]) -> dict[str, float]:
    """The fastest run; peak RSS is the worst seen over all runs."""
    fastest = dict(min(results, key=lambda r: r["seconds"]))
    fastest["peak_rss_kib"] = max(r["peak_rss_kib"] for r in results)
    return fastest


def curl(work: Path, url: str, *, fsync: bool = False, verify: bool = False) -> dict[str, float]:
    """``curl -o`` the blob; optionally then hash it (hashlib: the same SHA-256 code the engine
    uses) and fsync it, which is what a script doing a verified, durable download does."""
    target = work / "curl.bin"
    started = time.perf_counter()
    subprocess.run(["curl", "-sS", "-f", "-o", str(target), url], check=True, timeout=900)
    if verify:
        digest = hashlib.sha256()
        with open(target, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    if fsync:
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    seconds = time.perf_counter() - started
    target.unlink()
    return {"seconds": seconds, "peak_rss_kib": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--small-mib", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the best counts")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if shutil.which("curl") is None:
        sys.exit("bench/pull.py needs curl")
    work = Path(tempfile.mkdtemp(prefix="cacheagent-bench-pull-", dir=args.workdir))
    try:
        rows = asyncio.run(
            measure(work, args.size_mib * MiB, args.small_mib * MiB, args.concurrency, args.repeat)
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)


async def measure(
    work: Path, size: int, small_size: int, concurrency: int, repeat: int
) -> list[tuple[str, str]]:
    with RegistryServer(work / "registry") as registry:
        print(f"building and pushing a {size / MiB:.0f} MiB model ...", file=sys.stderr)
        layout = build_layout(work, size, "large", seed=1)
        large = await push_layout(registry, layout, "large")
        shutil.rmtree(layout)
        layout = build_layout(work, small_size, "small", seed=2)
        small = await push_layout(registry, layout, "small")
        shutil.rmtree(layout)

        print(f"measuring (best of {repeat}, interleaved) ...", file=sys.stderr)
        blob = large.big_blob_size
        url = large.big_blob_url
        curl(work, url)  # warm the registry's side
        runs: dict[str, list[dict[str, float]]] = defaultdict(list)
        for _ in range(repeat):  # interleaved, so that every row sees the same machine load
            runs["curl"].append(curl(work, url))
            runs["curl_fsync"].append(curl(work, url, fsync=True))
            runs["curl_verified"].append(curl(work, url, fsync=True, verify=True))
            runs["running"].append(run_child(work, large.ref, 1, "running"))
            runs["final"].append(run_child(work, large.ref, 1, "final"))
            runs["crowd"].append(run_child(work, large.ref, concurrency, "running"))
        small_run = run_child(work, small.ref, 1, "running")
    curl_plain, curl_synced, curl_verified = (
        best(runs[k])["seconds"] for k in ("curl", "curl_fsync", "curl_verified")
    )
    running, final, crowd = (best(runs[k]) for k in ("running", "final", "crowd"))

    def rate(seconds: float, nbytes: float) -> str:
        return f"{seconds:.2f} s, {nbytes / seconds / 1e6:.0f} MB/s"

    model = running["model_bytes"]
    quickest = min(running["seconds"], final["seconds"])
    return [
        ("model size", f"{model / MiB:.0f} MiB (big blob {blob / MiB:.0f} MiB)"),
        ("curl -o (big blob)", rate(curl_plain, blob)),
        ("curl -o + fsync (big blob)", rate(curl_synced, blob)),
        ("curl -o, then sha256 + fsync (big blob)", rate(curl_verified, blob)),
        ("cold pull, running hash", rate(running["seconds"], model)),
        ("cold pull, final re-read hash", rate(final["seconds"], model)),
        ("cold pull vs curl -o", f"{curl_plain / quickest:.2f}x curl's throughput"),
        ("cold pull vs curl -o + fsync", f"{curl_synced / quickest:.2f}x"),
        ("cold pull vs curl -o, then sha256 + fsync", f"{curl_verified / quickest:.2f}x"),
        (
            f"{concurrency} concurrent pulls: origin bytes / model",
            f"{crowd['origin_bytes'] / model:.3f}",
        ),
        (
            f"{concurrency} concurrent pulls: wall time vs one pull",
            f"{crowd['seconds']:.2f} s = {crowd['seconds'] / running['seconds']:.2f}x",
        ),
        ("one pull: origin bytes / model", f"{running['origin_bytes'] / model:.3f}"),
        (
            f"peak RSS, {small_run['model_bytes'] / MiB:.0f} MiB pull",
            f"{small_run['peak_rss_kib'] / 1024:.0f} MiB "
            f"(after imports: {small_run['baseline_rss_kib'] / 1024:.0f} MiB)",
        ),
        (
            f"peak RSS, {model / MiB:.0f} MiB pull",
            f"{running['peak_rss_kib'] / 1024:.0f} MiB "
            f"(after imports: {running['baseline_rss_kib'] / 1024:.0f} MiB)",
        ),
        (
            f"peak RSS, {concurrency} concurrent pulls",
            f"{crowd['peak_rss_kib'] / 1024:.0f} MiB",
        ),
    ]


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure':<{width}} | result |")
    print(f"| {'-' * width} | ------ |")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, root, ref, n, mode = sys.argv
        print(json.dumps(asyncio.run(child(Path(root), ref, int(n), mode))))
    else:
        main()
