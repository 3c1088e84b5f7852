"""FUSE benchmark: sequential reads through the mount vs the disk, then lazy reads.

    sudo .venv/bin/python bench/fuse.py [--dir /var/tmp/cacheagent-bench] [--size-mib 2048]
                                        [--read-ahead-kb 128,1024,8192,32768] [--runs 3]
                                        [--lazy-size-mib 512] [--lazy-rate-mib 128]
                                        [--random-reads 16] [--no-lazy]

Writes one random file of ``--size-mib`` under ``--dir`` (a real disk; deleted at the end), then
``dd bs=1M`` of the file directly and through a ``DirectoryProvider`` mount, cold (whole page
cache dropped first) and warm, once per ``read_ahead_kb`` value, ``--runs`` interleaved rounds
(medians); ``vs direct`` compares with the direct read at the same temperature.

The lazy rows come from ``bench/lazy.py``: the shipped path (a real agent, its StoreProvider,
the pull engine's on-demand ranges, a real registry behind a bandwidth cap), not a stand-in.

The table ends with the machine's figures: the numbers only mean something beside them.
"""

from __future__ import annotations

import argparse
import os
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


from bench.lazy import lazy_rows, print_rows  # noqa: E402
from bench.machine import machine as machine_facts  # noqa: E402
from cacheagent.fuse.directory import DirectoryProvider  # noqa: E402
from cacheagent.fuse.mount import FuseMount, MountOptions  # noqa: E402
from cacheagent.fuse.provider import ContentProvider  # noqa: E402
from cacheagent.fuse.stats import FuseStats  # noqa: E402
from cacheagent.memory.pagecache import drop_all_caches  # noqa: E402
from tests.files import fake_digest, write_random_file  # noqa: E402

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
    _NEGOTIATED.append(mount.state().proto_minor)
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


_NEGOTIATED: list[int] = []


def mount_minor() -> str:
    return str(_NEGOTIATED[-1]) if _NEGOTIATED else "?"


def machine(directory: Path) -> list[tuple[str, str]]:
    return [
        *machine_facts(directory),
        ("fuse", f"our own protocol loop (7.{mount_minor()}), no libfuse"),
    ]


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}\n")
    print(f"| {'what':40} | {'seconds':>8} | {'GB/s':>6} | {'vs direct':>9} | note")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 8}|{'-' * 11}|------")
    for what, seconds, rate, ratio, note in (row.cells() for row in rows):
        print(f"| {what:40} | {seconds:>8} | {rate:>6} | {ratio:>9} | {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/cacheagent-bench"))
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--read-ahead-kb", default="128,1024,8192,32768")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lazy-size-mib", type=int, default=512)
    parser.add_argument("--lazy-rate-mib", type=int, default=128)
    parser.add_argument("--random-reads", type=int, default=16)
    parser.add_argument("--no-lazy", action="store_true", help="only the sequential rows")
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
    finally:
        shutil.rmtree(base, ignore_errors=True)

    title = f"sequential dd bs=1M of a {args.size_mib} MiB file, median of {args.runs} runs"
    print_table(title, sequential)
    if not args.no_lazy:
        lazy = lazy_rows(args.lazy_size_mib, args.lazy_rate_mib, args.random_reads)
        print_rows(
            f"lazy reads through a real agent and registry ({args.lazy_size_mib} MiB model, "
            f"origin capped at {args.lazy_rate_mib} MiB/s; bench/lazy.py)",
            lazy,
        )
    print()
    for key, value in machine(Path("/var/tmp")):
        print(f"{key:>10}: {value}")


if __name__ == "__main__":
    main()
