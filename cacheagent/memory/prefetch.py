"""Warm a model's files into the page cache before an engine loads them, and keep them there.

Decisions (measured by ``bench/prefetch.py``):

- Warming works in 8 MiB steps, the unit of the memory budget. The ``fadvise`` method asks the
  kernel for each step with ``POSIX_FADV_WILLNEED`` (split into calls of the device's readahead
  window, since the kernel silently caps one call at that window) and then waits, by polling
  ``mincore``, until the pages have arrived; the ``read`` method reads each step into a
  per-thread buffer that is reused. Both run in a small thread pool. On the development VM
  (2 GiB model, 2 vCPUs, virtio disk with read_ahead_kb 8192) fadvise warmed in 0.60-0.67x the
  time of ``cat files > /dev/null``, reads in 0.70x with 2 readers but 1.2-1.4x with one, so
  fadvise is the default and 2 readers (fadvise is within noise at 1, 2 or 4).
- Budget: pages already resident cost nothing; the pages still missing must fit in
  ``memory_share`` of the available memory: psutil's figure for the host, or less where the
  agent's own memory cgroup has room for less page cache (``memory.cgroup``: page cache is
  charged to the cgroup that faults it in, so under a container limit the kernel would evict
  the model being warmed). A model that does not fit is warmed from its
  first file on, up to the budget, and the result says it is partial. (fadvise reads exactly
  the budget; with plain reads the kernel's own readahead may run on past it by up to one
  readahead window per reader thread.) While warming, available memory is re-read every
  256 MiB: page cache counts as available, so our own warming does not move it, but if other
  processes take memory, warming stops before the kernel would have to reclaim the node's
  working set to make room for us.
- Honest results: the kernel may drop advised readahead or reclaim clean pages at any time
  (some VMs even run a DAMON "pageout" scheme on cold page cache), so steps fadvise asked for
  that never arrived are read, and the result is measured with ``mincore`` after the warm:
  ``partial`` with a reason whenever a page is missing.
- GPU locality: the reader threads of a warm pinned to a NUMA node allocate the page cache on
  that node (first touch), next to the GPUs that will load it. Affinity is per thread, so each
  warm gets its own short-lived pool and no shared executor thread is ever left pinned.
- Blocking work never runs on the event loop: :meth:`Prefetcher.warm_async` and
  :meth:`MemoryLocker.lock_async` hand the sync calls to a thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import partial
from pathlib import Path

import psutil

from cacheagent.memory.cgroup import memory_room
from cacheagent.memory.cpuset import format_cpulist
from cacheagent.memory.lock import MemoryLocker, MemoryLockError
from cacheagent.memory.pagecache import (
    Residency,
    drop,
    drop_all_caches,
    expand_files,
    readahead_window,
    residency,
    resident_bytes_per_step,
)
from cacheagent.memory.warmplan import WarmPlan, WarmStep, plan_warm

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_WORKERS",
    "STEP_BYTES",
    "MemoryLockError",
    "MemoryLocker",
    "Prefetcher",
    "Residency",
    "WarmMethod",
    "WarmPlan",
    "WarmResult",
    "WarmStep",
    "drop",
    "drop_all_caches",
    "plan_warm",
    "residency",
]

MIB = 1 << 20
STEP_BYTES = 8 * MIB
MEMORY_CHECK_BYTES = 256 * MIB
DEFAULT_WORKERS = 2
# How long the fadvise method waits for pages when none arrive, and the slowest disk it
# allows for (bytes/s) when bounding the whole wait.
SETTLE_SECONDS = 1.0
SLOWEST_DISK_BYTES_PER_SECOND = 20 * MIB

ProgressCallback = Callable[[int, int], None]
GpuCpuResolver = Callable[[Sequence[str]], Collection[int] | None]


class WarmMethod(StrEnum):
    FADVISE = "fadvise"
    READ = "read"


DEFAULT_METHOD = WarmMethod.FADVISE


@dataclass(frozen=True)
class WarmResult:
    """What a warm did. ``bytes_warmed`` is what it brought in (resident after - before)."""

    bytes_total: int
    bytes_warmed: int
    bytes_already_resident: int
    bytes_resident: int
    budget_bytes: int
    partial: bool
    reason: str | None
    seconds: float
    method: WarmMethod
    workers: int
    cpus: frozenset[int] | None
    locality: str | None


def agent_available_memory() -> int:
    """Memory a warm may fill: the host's available memory, capped by the page-cache room of
    the agent's own cgroup."""
    host = int(psutil.virtual_memory().available)
    room = memory_room()
    return host if room is None else min(host, room)


@dataclass(frozen=True)
class _Survey:
    sizes: list[int]
    resident: list[list[int]]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def resident_total(self) -> int:
        return sum(map(sum, self.resident))


def _survey(files: Sequence[Path]) -> _Survey:
    sizes: list[int] = []
    resident: list[list[int]] = []
    for path in files:
        size, per_step = resident_bytes_per_step(path, STEP_BYTES)
        sizes.append(size)
        resident.append(per_step)
    return _Survey(sizes, resident)


class _Run:
    """The state reader threads share: the step queue, counters and the reason to stop."""

    def __init__(
        self,
        plan: WarmPlan,
        available: Callable[[], int],
        floor: int,
        check_every: int,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> None:
        self._steps = iter(plan.steps)
        self._planned = plan.bytes_planned
        self._available = available
        self._floor = floor
        self._check_every = check_every
        self._progress = progress
        self._cancel = cancel
        self._mutex = threading.Lock()
        self._since_check = 0
        self.done = 0
        self.stop_reason: str | None = None

    def next_step(self) -> WarmStep | None:
        with self._mutex:
            if self._cancel is not None and self._cancel.is_set():
                self.stop_reason = self.stop_reason or "cancelled"
            if self.stop_reason is not None:
                return None
            return next(self._steps, None)

    def requeue(self, steps: Iterable[WarmStep]) -> None:
        """Queue steps again; their bytes were already counted as done."""
        with self._mutex:
            self._steps = iter([replace(step, missing=0) for step in steps])

    def stop(self, reason: str) -> None:
        with self._mutex:
            self.stop_reason = self.stop_reason or reason

    def finished(self, step: WarmStep) -> None:
        with self._mutex:
            self.done += step.missing
            self._since_check += step.length
            if self._since_check >= self._check_every:
                self._since_check = 0
                available = self._available()
                if available < self._floor:
                    self.stop_reason = self.stop_reason or (
                        f"available memory fell to {available} bytes, below the "
                        f"{self._floor} bytes kept for the node's working set"
                    )
            if self._progress is not None:
                self._progress(self.done, self._planned)


class _Reader:
    """One reader thread's file handle and buffer, reused from step to step."""

    def __init__(self, files: Sequence[Path], method: WarmMethod, windows: Sequence[int]) -> None:
        self._files = files
        self._method = method
        self._windows = windows
        self._buffer = memoryview(bytearray(STEP_BYTES)) if method is WarmMethod.READ else None
        self._fd = -1
        self._file = -1

    def warm(self, step: WarmStep) -> None:
        if step.file != self._file:
            self.close()
            self._fd = os.open(self._files[step.file], os.O_RDONLY | os.O_CLOEXEC)
            self._file = step.file
        if self._buffer is None:
            self._advise(step)
        else:
            self._read(step, self._buffer)

    def _advise(self, step: WarmStep) -> None:
        window = self._windows[step.file]
        end = step.offset + step.length
        for offset in range(step.offset, end, window):
            os.posix_fadvise(self._fd, offset, min(window, end - offset), os.POSIX_FADV_WILLNEED)

    def _read(self, step: WarmStep, buffer: memoryview) -> None:
        offset, end = step.offset, step.offset + step.length
        while offset < end:
            got = os.preadv(self._fd, [buffer[: end - offset]], offset)
            if got <= 0:
                return
            offset += got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = self._file = -1


def _read_steps(run: _Run, reader: _Reader) -> None:
    try:
        while (step := run.next_step()) is not None:
            reader.warm(step)
            run.finished(step)
    except BaseException:
        run.stop("a reader failed")
        raise
    finally:
        reader.close()


def _pin(cpus: frozenset[int]) -> None:
    os.sched_setaffinity(0, cpus)


class Prefetcher:
    """Warms file sets into the page cache within a memory budget.

    ``available_memory`` (bytes) and ``gpu_cpus`` (GPU names -> CPUs, usually
    ``GpuInventory.numa_cpus_for``) are injected so the server wires NVML in and tests can
    make the budget deterministic.
    """

    def __init__(
        self,
        *,
        memory_share: float = 0.5,
        method: WarmMethod = DEFAULT_METHOD,
        workers: int = DEFAULT_WORKERS,
        available_memory: Callable[[], int] = agent_available_memory,
        gpu_cpus: GpuCpuResolver | None = None,
        memory_check_bytes: int = MEMORY_CHECK_BYTES,
    ) -> None:
        if not 0.0 < memory_share <= 1.0:
            raise ValueError(f"memory_share {memory_share} is not in (0, 1]")
        if workers < 1:
            raise ValueError(f"workers {workers} is not a positive count")
        self.memory_share = memory_share
        self.method = method
        self.workers = workers
        self._available = available_memory
        self._gpu_cpus = gpu_cpus
        self._memory_check_bytes = memory_check_bytes

    def warm(
        self,
        paths: Iterable[Path],
        *,
        gpus: Sequence[str] = (),
        cpus: Collection[int] | None = None,
        method: WarmMethod | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> WarmResult:
        """Warm ``paths`` (files or model directories); blocks, so call it from a thread.

        ``gpus`` (indexes or UUIDs) pins the readers to those GPUs' NUMA CPUs; ``cpus`` pins
        them to an explicit CPU set instead. ``progress(done, planned)`` is called from the
        reader threads after every step. Setting ``cancel`` stops the warm between steps.
        """
        started = time.monotonic()
        method = method or self.method
        pinned, locality = self._choose_cpus(gpus, cpus)
        files = expand_files(paths)
        before = _survey(files)
        available = self._available()
        budget = int(available * self.memory_share)
        plan = plan_warm(before.sizes, before.resident, STEP_BYTES, budget)
        floor = available - budget
        run = _Run(plan, self._available, floor, self._memory_check_bytes, progress, cancel)
        workers = min(self.workers, len(plan.steps))
        if workers:
            windows = [readahead_window(path) for path in files]
            self._run(run, workers, pinned, lambda: _Reader(files, method, windows))
            late = self._late_steps(files, plan, method, run, cancel)
            if late:
                run.requeue(late)
                readers = min(workers, len(late))
                self._run(run, readers, pinned, lambda: _Reader(files, WarmMethod.READ, windows))
        after = _survey(files)
        return WarmResult(
            bytes_total=before.total,
            bytes_warmed=max(0, after.resident_total - before.resident_total),
            bytes_already_resident=before.resident_total,
            bytes_resident=after.resident_total,
            budget_bytes=budget,
            partial=after.resident_total < after.total,
            reason=_reason(run, plan, budget, available, after),
            seconds=time.monotonic() - started,
            method=method,
            workers=workers,
            cpus=pinned,
            locality=locality,
        )

    async def warm_async(
        self,
        paths: Iterable[Path],
        *,
        gpus: Sequence[str] = (),
        cpus: Collection[int] | None = None,
        method: WarmMethod | None = None,
        progress: ProgressCallback | None = None,
    ) -> WarmResult:
        """:meth:`warm` in a thread; cancelling the awaiting task stops the readers."""
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(
                self.warm,
                list(paths),
                gpus=gpus,
                cpus=cpus,
                method=method,
                progress=progress,
                cancel=cancel,
            )
        finally:
            cancel.set()

    @staticmethod
    def _late_steps(
        files: Sequence[Path],
        plan: WarmPlan,
        method: WarmMethod,
        run: _Run,
        cancel: threading.Event | None,
    ) -> list[WarmStep]:
        """Steps fadvise asked for that never arrived: the kernel may drop advised readahead
        (it allocates those pages without retrying), so they get read instead."""
        if method is not WarmMethod.FADVISE or run.stop_reason is not None:
            return []
        late = _await_resident(files, plan, cancel)
        if cancel is not None and cancel.is_set():
            run.stop("cancelled")
        return late

    @staticmethod
    def _run(
        run: _Run, workers: int, pinned: frozenset[int] | None, reader: Callable[[], _Reader]
    ) -> None:
        pool = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="cacheagent-warm",
            initializer=None if pinned is None else partial(_pin, pinned),
        )
        with pool:
            futures = [pool.submit(_read_steps, run, reader()) for _ in range(workers)]
        for future in futures:
            future.result()

    def _choose_cpus(
        self, gpus: Sequence[str], cpus: Collection[int] | None
    ) -> tuple[frozenset[int] | None, str | None]:
        origin = "requested"
        if cpus is None and gpus:
            names = ",".join(gpus)
            found = None if self._gpu_cpus is None else self._gpu_cpus(gpus)
            if found is None:
                return None, f"no NUMA or CPU affinity information for GPUs {names}; not pinned"
            cpus, origin = found, f"near GPUs {names}"
        if cpus is None:
            return None, None
        allowed = os.sched_getaffinity(0)
        usable = frozenset(cpus) & allowed
        if not usable:
            return None, (
                f"CPUs {format_cpulist(cpus)} ({origin}) are outside this process's CPUs "
                f"{format_cpulist(allowed)}; not pinned"
            )
        return usable, f"pinned to CPUs {format_cpulist(usable)} ({origin})"


def _reason(run: _Run, plan: WarmPlan, budget: int, available: int, after: _Survey) -> str | None:
    if run.stop_reason is not None:
        return run.stop_reason
    if plan.limited:
        return (
            f"memory budget: {plan.bytes_missing} bytes were not resident but the budget is "
            f"{budget} bytes (memory_share of {available} bytes available to the agent: "
            "host available memory, capped by its memory cgroup's room for page cache)"
        )
    if after.resident_total < after.total:
        return "some pages were evicted again while warming (memory pressure)"
    return None


def _await_resident(
    files: Sequence[Path], plan: WarmPlan, cancel: threading.Event | None
) -> list[WarmStep]:
    """Wait for the pages fadvise asked for; returns the steps still missing pages once
    nothing has arrived for SETTLE_SECONDS (or the whole wait ran out)."""
    pending: dict[int, list[WarmStep]] = {}
    for step in plan.steps:
        pending.setdefault(step.file, []).append(step)
    started = last_change = time.monotonic()
    deadline = started + SETTLE_SECONDS + plan.bytes_planned / SLOWEST_DISK_BYTES_PER_SECOND
    delay = 0.002
    seen = -1
    while pending and time.monotonic() < deadline:
        if cancel is not None and cancel.is_set():
            return []
        arrived = 0
        for index in list(pending):
            _, resident = resident_bytes_per_step(files[index], STEP_BYTES)
            waiting = [s for s in pending[index] if resident[s.offset // STEP_BYTES] < s.length]
            arrived += sum(resident)
            if waiting:
                pending[index] = waiting
            else:
                del pending[index]
        now = time.monotonic()
        if arrived != seen:
            seen, last_change = arrived, now
        elif now - last_change > SETTLE_SECONDS:
            break
        if pending:
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
    return [step for steps in pending.values() for step in steps]
