"""FUSE benchmark: sequential reads through the mount vs the disk, readahead, and lazy reads.

    sudo .venv/bin/python bench/fuse.py [--dir /var/tmp/cacheagent-bench] [--size-mib 2048]
                                        [--read-ahead-kb 128,1024,8192,32768]
                                        [--lazy-rate-mib 256] [--random-reads 64] [--runs 3]

Writes one random file of ``--size-mib`` under ``--dir`` (a real disk; deleted at the end), then:

1. ``dd bs=1M`` of the file directly and through a ``DirectoryProvider`` mount, cold (whole
   page cache dropped first) and warm, once per ``read_ahead_kb`` value, ``--runs`` interleaved
   rounds (medians); ``vs direct`` compares with the direct read at the same temperature
   (target: at least 0.5x);
2. through ``LazyTestProvider`` (tests/fuse_support.py), whose background copy is throttled to
   ``--lazy-rate-mib`` MiB/s: a ``dd`` of the whole file while it downloads (per readahead
   value; the window picked is the one with the least cold + lazy time), then, with that window,
   the time to the first and to the last MiB of the uncached file beside the time the pull
   alone needs;
3. ``--random-reads`` reads of 4 MiB at random aligned offsets of an uncached model (each one a
   priority fetch), then the same pattern after the download finished (cold page cache).

The table ends with the machine's figures: the numbers only mean something beside them.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from bench.machine import machine as machine_facts  # noqa: E402
from cacheagent.fuse.directory import DirectoryProvider  # noqa: E402
from cacheagent.fuse.libfuse import mfusepy  # noqa: E402
from cacheagent.fuse.mount import FuseMount, MountOptions  # noqa: E402
from cacheagent.fuse.provider import ContentProvider  # noqa: E402
from cacheagent.fuse.stats import FuseStats  # noqa: E402
from cacheagent.memory.pagecache import drop_all_caches  # noqa: E402
from tests.fuse_support import LazyTestProvider, fake_digest, write_random_file  # noqa: E402

MiB = 1 << 20
DIGEST = fake_digest("bench-model")
FILE = "model.safetensors"
_DD_SECONDS = re.compile(r"copied, ([0-9.]+) s")


@dataclass
class Row:
    what: str
    seconds: float
    nbytes: int
    note: str = ""
    baseline: float | None = None  # seconds of the comparable direct read

    def cells(self) -> tuple[str, str, str, str, str]:
        rate = f"{self.nbytes / self.seconds / 1e9:.2f}" if self.nbytes else ""
        ratio = f"{self.baseline / self.seconds:.2f}x" if self.baseline else ""
        return self.what, f"{self.seconds:.3f}", rate, ratio, self.note


def dd(path: Path) -> float:
    """Seconds ``dd bs=1M`` takes to read ``path`` (dd's own figure, without process start)."""
    done = subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=1M"],
        capture_output=True,
        text=True,
        check=True,
    )
    match = _DD_SECONDS.search(done.stderr)
    if match is None:
        raise RuntimeError(f"unexpected dd output: {done.stderr!r}")
    return float(match.group(1))


def cold_dd(path: Path) -> float:
    drop_all_caches()
    return dd(path)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@contextmanager
def mounted(
    mountpoint: Path, provider: ContentProvider, stats: FuseStats, ra_kb: int
) -> Iterator[FuseMount]:
    mount = FuseMount(
        mountpoint,
        provider,
        stats=stats,
        options=MountOptions(read_ahead_kb=ra_kb),
    )
    mount.start()
    try:
        yield mount
    finally:
        mount.stop()


def sequential_rows(source: Path, mountpoint: Path, ra_values: list[int], runs: int) -> list[Row]:
    """Median of ``runs`` interleaved rounds: direct, then each readahead value, cold and warm."""
    size = source.stat().st_size
    seconds: dict[str, list[float]] = {}
    notes: dict[str, str] = {}

    def add(what: str, value: float) -> None:
        seconds.setdefault(what, []).append(value)

    provider = DirectoryProvider(source.parent.parent)
    for _ in range(runs):
        add("direct, cold", cold_dd(source))
        add("direct, warm", dd(source))
        for ra_kb in ra_values:
            stats = FuseStats()
            with mounted(mountpoint, provider, stats, ra_kb) as mount:
                path = mountpoint / DIGEST / FILE
                add(f"fuse ra={ra_kb}, cold", cold_dd(path))
                snap = stats.snapshot()
                add(f"fuse ra={ra_kb}, warm", dd(path))
            mean_kib = snap.read_bytes // max(snap.reads, 1) // 1024
            notes[f"fuse ra={ra_kb}, cold"] = (
                f"bdi read_ahead_kb {mount.read_ahead_kb}, mean request {mean_kib} KiB"
            )
    medians = {what: statistics.median(values) for what, values in seconds.items()}
    rows = []
    for what, value in medians.items():
        temperature = what.rsplit(", ", 1)[1]
        baseline = None if what.startswith("direct") else medians[f"direct, {temperature}"]
        spread = f"min {min(seconds[what]):.3f} max {max(seconds[what]):.3f}"
        note = "; ".join(filter(None, [notes.get(what, ""), spread]))
        rows.append(Row(what, value, size, note, baseline))
    return rows


def lazy_first_bytes(
    source: Path, work: Path, mountpoint: Path, rate_mib: int, ra_kb: int
) -> list[Row]:
    """Time to the first and to the last MiB of an uncached file, beside the full pull time."""
    size = source.stat().st_size
    stats = FuseStats()
    provider = LazyTestProvider(work / "first", stats, rate=rate_mib * MiB, chunk=4 * MiB)
    provider.add_model(DIGEST, {FILE: source})
    drop_all_caches()
    try:
        with mounted(mountpoint, provider, stats, ra_kb):
            provider.start()
            began = time.perf_counter()
            fd = os.open(mountpoint / DIGEST / FILE, os.O_RDONLY)
            try:
                os.pread(fd, MiB, 0)
                first = time.perf_counter() - began
                last = timed(lambda: os.pread(fd, MiB, size - MiB))
            finally:
                os.close(fd)
    finally:
        provider.close()
        shutil.rmtree(work / "first")
    pull = size / (rate_mib * MiB)
    return [
        Row("lazy: first MiB (open + read)", first, 0, f"ra={ra_kb}, uncached model"),
        Row("lazy: last MiB", last, 0, "ahead of the background copy"),
        Row("lazy: full pull, no reader", pull, size, f"size / {rate_mib} MiB/s origin rate"),
    ]


def lazy_dd(source: Path, work: Path, mountpoint: Path, rate_mib: int, ra_kb: int) -> Row:
    """``dd`` of a whole file while it downloads: how far readers get ahead of the pull."""
    size = source.stat().st_size
    stats = FuseStats()
    provider = LazyTestProvider(work / f"dd-{ra_kb}", stats, rate=rate_mib * MiB, chunk=4 * MiB)
    provider.add_model(DIGEST, {FILE: source})
    drop_all_caches()
    try:
        with mounted(mountpoint, provider, stats, ra_kb):
            provider.start()
            seconds = dd(mountpoint / DIGEST / FILE)
    finally:
        provider.close()
        shutil.rmtree(work / f"dd-{ra_kb}")
    lazy_mib = stats.snapshot().lazy_fetched_bytes // MiB
    note = f"while downloading; {lazy_mib} MiB fetched for the reader"
    return Row(f"lazy ra={ra_kb}: dd whole file", seconds, size, note)


def random_reads(path: Path, size: int, count: int) -> tuple[float, list[float]]:
    rng = random.Random(7)
    offsets = [rng.randrange(size // (4 * MiB)) * 4 * MiB for _ in range(count)]
    latencies = []
    fd = os.open(path, os.O_RDONLY)
    try:
        began = time.perf_counter()
        for offset in offsets:
            started = time.perf_counter()
            os.pread(fd, 4 * MiB, offset)
            latencies.append(time.perf_counter() - started)
        total = time.perf_counter() - began
    finally:
        os.close(fd)
    return total, latencies


def random_rows(source: Path, work: Path, mountpoint: Path, count: int, ra_kb: int) -> list[Row]:
    size = source.stat().st_size
    stats = FuseStats()
    provider = LazyTestProvider(work / "random", stats, rate=64 * MiB, chunk=4 * MiB)
    provider.add_model(DIGEST, {FILE: source})
    blob = provider.blob(DIGEST, FILE)
    rows: list[Row] = []

    def row(what: str, total: float, latencies: list[float]) -> Row:
        p50 = statistics.median(latencies) * 1000
        p99 = statistics.quantiles(latencies, n=100)[98] * 1000
        return Row(what, total, count * 4 * MiB, f"p50 {p50:.1f} ms, p99 {p99:.1f} ms per read")

    drop_all_caches()
    try:
        with mounted(mountpoint, provider, stats, ra_kb):
            path = mountpoint / DIGEST / FILE
            provider.start()
            total, latencies = random_reads(path, size, count)
            lazy_mib = stats.snapshot().lazy_fetched_bytes // MiB
            rows.append(row(f"random 4 MiB x{count}, uncached", total, latencies))
            rows[-1].note += f", {lazy_mib} MiB lazy-fetched"
        blob.rate = 1 << 40  # let the rest of the download finish now
        if not blob.done.wait(600):
            raise RuntimeError("the background copy did not finish")
        with mounted(mountpoint, provider, stats, ra_kb):
            drop_all_caches()
            total, latencies = random_reads(mountpoint / DIGEST / FILE, size, count)
            rows.append(row(f"random 4 MiB x{count}, downloaded", total, latencies))
    finally:
        provider.close()
    return rows


def machine(directory: Path) -> list[tuple[str, str]]:
    return [
        *machine_facts(directory),
        ("libfuse", f"{mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor} via mfusepy"),
    ]


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}\n")
    print(f"| {'what':40} | {'seconds':>8} | {'GB/s':>6} | {'vs direct':>9} | note")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 8}|{'-' * 11}|------")
    for what, seconds, rate, ratio, note in (row.cells() for row in rows):
        print(f"| {what:40} | {seconds:>8} | {rate:>6} | {ratio:>9} | {note}")


def pick_read_ahead(sequential: list[Row], lazy: list[Row], ra_values: list[int]) -> int:
    """The window with the least cold-read plus read-while-downloading time."""

    def seconds(rows: list[Row], what: str) -> float:
        return next(row.seconds for row in rows if row.what == what)

    return min(
        ra_values,
        key=lambda ra: (
            seconds(sequential, f"fuse ra={ra}, cold")
            + seconds(lazy, f"lazy ra={ra}: dd whole file")
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/cacheagent-bench"))
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--read-ahead-kb", default="128,1024,8192,32768")
    parser.add_argument("--lazy-rate-mib", type=int, default=256)
    parser.add_argument("--random-reads", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: FUSE mounts and drop_caches")
    ra_values = [int(v) for v in args.read_ahead_kb.split(",")]
    base: Path = args.dir.resolve()
    mountpoint = base / "mnt"
    source = base / "models" / DIGEST / FILE
    try:
        print(f"writing {source} ({args.size_mib} MiB)", file=sys.stderr)
        write_random_file(source, args.size_mib * MiB, seed=1)
        os.sync()
        sequential = sequential_rows(source, mountpoint, ra_values, args.runs)
        work = base / "work"
        lazy = [lazy_dd(source, work, mountpoint, args.lazy_rate_mib, ra) for ra in ra_values]
        chosen = pick_read_ahead(sequential, lazy, ra_values)
        lazy += lazy_first_bytes(source, work, mountpoint, args.lazy_rate_mib, chosen)
        lazy += random_rows(source, work, mountpoint, args.random_reads, chosen)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    title = f"sequential dd bs=1M of a {args.size_mib} MiB file, median of {args.runs} runs"
    print_table(title, sequential)
    print_table(
        f"lazy reads (LazyTestProvider, pull throttled to {args.lazy_rate_mib} MiB/s)", lazy
    )
    print(f"\nread_ahead_kb picked: {chosen} (least cold read + read-while-downloading time)")
    print()
    for key, value in machine(Path("/var/tmp")):
        print(f"{key:>10}: {value}")


if __name__ == "__main__":
    main()
