"""Page-cache warming benchmark: fadvise vs reads vs ``cat``, and what a warm buys the loader.

    sudo .venv/bin/python bench/prefetch.py [--dir /var/tmp/cacheagent-bench] [--size-mib 2048]
                                            [--files 4] [--workers 1,2,4] [--runs 3]

Writes a model of ``--files`` random files (``--size-mib`` in all) once under ``--dir`` (kept and
reused by later runs), then, with the whole page cache dropped before every timed row (root:
``/proc/sys/vm/drop_caches``), times:

* ``cat files > /dev/null``: the baseline a warm should match (target: at most 1.1x its time);
* ``Prefetcher.warm`` with each method and reader count, until every page is resident;
* one sequential read of the model (8 MiB buffer, one thread) cold, and right after a warm:
  what a model loader sees.

Rows run interleaved, ``--runs`` times; each figure is the median. The table ends with the
machine's figures (CPU, RAM, kernel, the disk's readahead), since the numbers only mean
something beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from bench.machine import machine as machine_facts  # noqa: E402
from cacheagent.memory.pagecache import readahead_window  # noqa: E402
from cacheagent.memory.prefetch import (  # noqa: E402
    Prefetcher,
    WarmMethod,
    drop_all_caches,
    residency,
)

MiB = 1 << 20
READ_BUFFER = 8 * MiB


@dataclass
class Row:
    name: str
    seconds: list[float]
    nbytes: int
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        return self.nbytes / self.median / MiB


def write_model(directory: Path, total_mib: int, files: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    size = total_mib * MiB // files
    paths = [directory / f"model-{i:05d}-of-{files:05d}.safetensors" for i in range(files)]
    for path in paths:
        if path.exists() and path.stat().st_size == size:
            continue
        print(f"writing {path} ({size // MiB} MiB)", file=sys.stderr)
        with open(path, "wb") as out:
            for _ in range(size // MiB):
                out.write(os.urandom(MiB))
            out.flush()
            os.fsync(out.fileno())
    return paths


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def cat(paths: list[Path]) -> None:
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)


def sequential_read(paths: list[Path]) -> None:
    view = memoryview(bytearray(READ_BUFFER))
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def warm(paths: list[Path], method: WarmMethod, workers: int) -> None:
    result = Prefetcher(method=method, workers=workers, memory_share=0.9).warm(paths)
    if result.partial:
        print(f"  note: {method.value} x{workers} was partial: {result.reason}", file=sys.stderr)


def cold(fn: Callable[[], object]) -> float:
    drop_all_caches()
    return timed(fn)


def machine(directory: Path) -> list[tuple[str, str]]:
    window = readahead_window(directory) // 1024
    return [*machine_facts(directory), ("fadvise window", f"{window} KiB per WILLNEED call")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/cacheagent-bench"))
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: every row starts from an empty page cache (drop_caches)")

    paths = write_model(args.dir, args.size_mib, args.files)
    nbytes = sum(path.stat().st_size for path in paths)
    workers = [int(w) for w in args.workers.split(",")]
    rows: dict[str, Row] = {}

    def add(name: str, seconds: float, note: str = "") -> None:
        rows.setdefault(name, Row(name, [], nbytes, note)).seconds.append(seconds)

    for _ in range(args.runs):
        add("cat files > /dev/null (cold)", cold(lambda: cat(paths)))
        for method in WarmMethod:
            for count in workers:
                name = f"warm {method.value}, {count} reader(s)"
                add(name, cold(partial(warm, paths, method, count)))
        add("sequential read, cold", cold(lambda: sequential_read(paths)), "8 MiB buffer")
        drop_all_caches()
        warm(paths, WarmMethod.FADVISE, 2)
        add("sequential read, after a warm", timed(lambda: sequential_read(paths)), "8 MiB buffer")
        add("residency (mincore), warm", timed(lambda: residency(paths)), "whole model")

    baseline = rows["cat files > /dev/null (cold)"].median
    print(
        f"\nprefetch benchmark: {len(paths)} files, {nbytes / MiB:.0f} MiB, "
        f"median of {args.runs} runs, page cache dropped before each cold row\n"
    )
    print(f"| {'what':38} | {'seconds':>8} | {'MiB/s':>8} | {'vs cat':>6} | note")
    print(f"|{'-' * 40}|{'-' * 10}|{'-' * 10}|{'-' * 8}|------")
    for row in rows.values():
        ratio = f"{row.median / baseline:.2f}x" if row.name.startswith(("warm", "cat")) else ""
        print(f"| {row.name:38} | {row.median:8.3f} | {row.rate:8.0f} | {ratio:>6} | {row.note}")
    print()
    for key, value in machine(args.dir):
        print(f"{key:>15}: {value}")


if __name__ == "__main__":
    main()
