"""Prefetch on real files and the real page cache: warm, budget, pinning, mlock, residency.

Files live under /var/tmp, not tmp_path: /tmp may be a tmpfs, whose pages are never "not
resident", and the tests need a filesystem that honours POSIX_FADV_DONTNEED.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheagent.memory.gpu import GpuInventory, UnknownGpuError
from cacheagent.memory.pagecache import (
    PAGE_SIZE,
    locked_bytes_of_process,
    pages,
    resident_bytes_per_step,
)
from cacheagent.memory.prefetch import (
    STEP_BYTES,
    MemoryLocker,
    MemoryLockError,
    Prefetcher,
    WarmMethod,
    WarmResult,
    drop,
    drop_all_caches,
    residency,
)
from tests import support
from tests.fake_pynvml import FakeNvml, two_gpus_on_two_nodes
from tests.support import require_binary, require_root

MIB = 1 << 20
BIG = 24 * MIB
SMALL = 5000


@pytest.fixture(scope="module")
def model_files() -> Iterator[Path]:
    """A model directory: three 24 MiB files, a small one and an empty one."""
    root = Path(tempfile.mkdtemp(prefix="cacheagent-test-", dir="/var/tmp"))
    try:
        (root / "sub").mkdir()
        for name in ("a.safetensors", "b.safetensors", "sub/c.safetensors"):
            (root / name).write_bytes(os.urandom(BIG))
        (root / "config.json").write_bytes(b"{" + b" " * (SMALL - 2) + b"}")
        (root / "empty").write_bytes(b"")
        yield root
    finally:
        shutil.rmtree(root)


@pytest.fixture
def model(model_files: Path) -> Path:
    """The model, none of it in the page cache."""
    for _ in range(10):  # readahead a previous test started may still be landing
        drop([model_files])
        if residency([model_files]).bytes_resident == 0:
            return model_files
        time.sleep(0.05)
    support.require(
        residency([model_files]).fraction <= 0.05,
        f"{model_files}'s filesystem ignores POSIX_FADV_DONTNEED",
    )
    return model_files


def total_size(model: Path) -> int:
    return 3 * BIG + SMALL


# The kernel may reclaim clean page cache at any moment; the VMs these tests run on even run a
# DAMON "pageout" scheme that evicts page cache it considers cold. A warm reports that honestly
# (partial, with the eviction reason), so a full warm is one that is complete, or short by a
# few pages that were evicted again.
EVICTION_SLACK = 2 * MIB
EVICTED = "some pages were evicted again while warming (memory pressure)"


def assert_fully_warmed(result: WarmResult, model: Path) -> None:
    total = total_size(model)
    assert result.bytes_total == total
    assert result.bytes_warmed == result.bytes_resident - result.bytes_already_resident
    if result.partial:
        assert result.reason == EVICTED
        assert result.bytes_resident >= total - EVICTION_SLACK
    else:
        assert result.reason is None
        assert result.bytes_resident == total
    assert residency([model]).bytes_resident >= result.bytes_resident - EVICTION_SLACK


def big_available() -> int:
    return 1 << 40


def test_residency_counts_pages_and_clamps_to_the_file_size(model: Path) -> None:
    assert residency([model]).bytes_total == total_size(model)
    assert residency([model]).bytes_resident == 0
    (model / "config.json").read_bytes()
    small = residency([model / "config.json"])
    assert small.bytes_total == small.bytes_resident == SMALL
    with open(model / "a.safetensors", "rb") as f:
        f.readinto(bytearray(3 * PAGE_SIZE))
    part = residency([model / "a.safetensors"])
    assert 3 * PAGE_SIZE <= part.bytes_resident < BIG
    empty = residency([model / "empty"])
    assert (empty.bytes_total, empty.bytes_resident, empty.fraction) == (0, 0, 1.0)


def test_residency_per_step(model: Path) -> None:
    with open(model / "b.safetensors", "rb") as f:
        f.seek(STEP_BYTES)
        f.readinto(bytearray(PAGE_SIZE))
    size, per_step = resident_bytes_per_step(model / "b.safetensors", STEP_BYTES)
    assert size == BIG and len(per_step) == BIG // STEP_BYTES
    assert per_step[0] == 0 and per_step[1] >= PAGE_SIZE
    for bad in (0, PAGE_SIZE + 1, 3 * PAGE_SIZE):
        with pytest.raises(ValueError, match="page multiple"):
            resident_bytes_per_step(model / "b.safetensors", bad)


@pytest.mark.parametrize("method", list(WarmMethod))
def test_warm_brings_the_whole_model_into_ram(model: Path, method: WarmMethod) -> None:
    result = Prefetcher(method=method, available_memory=big_available).warm([model])
    assert_fully_warmed(result, model)
    assert result.bytes_already_resident == 0
    assert result.method is method
    assert result.cpus is None and result.locality is None
    assert result.seconds > 0


def test_what_is_resident_is_counted_and_not_warmed_again(model: Path) -> None:
    (model / "b.safetensors").read_bytes()
    progress: list[tuple[int, int]] = []
    result = Prefetcher(available_memory=big_available).warm(
        [model], progress=lambda done, planned: progress.append((done, planned))
    )
    assert result.bytes_already_resident >= BIG
    assert_fully_warmed(result, model)
    planned = progress[-1][1]
    assert planned == total_size(model) - result.bytes_already_resident
    assert progress[-1][0] == planned
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)


@pytest.mark.parametrize("method", list(WarmMethod))
def test_budget_stops_a_warm_that_would_pass_it(model: Path, method: WarmMethod) -> None:
    prefetcher = Prefetcher(method=method, memory_share=0.5, available_memory=lambda: 20 * MIB)
    result = prefetcher.warm([model])
    assert result.budget_bytes == 10 * MIB
    assert result.partial
    assert result.reason is not None and result.reason.startswith("memory budget")
    # fadvise reads exactly what it asks for; a plain read lets the kernel's readahead run on
    # past the budget, asynchronously, by up to a readahead window per reader.
    slack = 0 if method is WarmMethod.FADVISE else 2 * STEP_BYTES
    assert 10 * MIB <= result.bytes_warmed <= 10 * MIB + slack
    assert result.bytes_resident <= residency([model]).bytes_resident <= 10 * MIB + slack
    # files are warmed in order: the first one got the budget, the last one nothing.
    assert residency([model / "a.safetensors"]).bytes_resident >= 10 * MIB
    assert residency([model / "sub/c.safetensors"]).bytes_resident == 0


def test_warm_stops_when_available_memory_falls(model: Path) -> None:
    readings = iter([1 << 40] + [0] * 100)
    prefetcher = Prefetcher(
        method=WarmMethod.READ,
        workers=1,
        available_memory=lambda: next(readings),
        memory_check_bytes=STEP_BYTES,
    )
    result = prefetcher.warm([model])
    assert result.partial
    assert result.reason is not None and result.reason.startswith("available memory fell to 0")
    assert STEP_BYTES <= result.bytes_warmed < total_size(model)


def test_cancel_stops_between_steps(model: Path) -> None:
    cancel = threading.Event()
    prefetcher = Prefetcher(method=WarmMethod.READ, workers=1, available_memory=big_available)
    result = prefetcher.warm([model], cancel=cancel, progress=lambda done, planned: cancel.set())
    assert result.partial and result.reason == "cancelled"
    assert result.bytes_warmed <= 2 * STEP_BYTES


async def test_warm_async_runs_off_the_event_loop(model: Path) -> None:
    loop_thread = threading.get_ident()
    threads: set[int] = set()
    prefetcher = Prefetcher(available_memory=big_available)
    result = await prefetcher.warm_async(
        [model], progress=lambda done, planned: threads.add(threading.get_ident())
    )
    assert_fully_warmed(result, model)
    assert threads and loop_thread not in threads


async def test_cancelling_warm_async_stops_the_readers(model: Path) -> None:
    started = threading.Event()
    release = threading.Event()
    steps: list[int] = []

    def progress(done: int, planned: int) -> None:
        steps.append(done)
        started.set()
        release.wait(5)

    prefetcher = Prefetcher(method=WarmMethod.READ, workers=1, available_memory=big_available)
    task = asyncio.create_task(prefetcher.warm_async([model], progress=progress))
    assert await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    for _ in range(100):  # the reader finishes its current step and sees the cancel
        if residency([model]).bytes_resident == len(steps) * STEP_BYTES:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    assert len(steps) == 1
    assert residency([model]).bytes_resident < total_size(model)


def test_readers_run_only_on_the_chosen_cpus(model: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    seen: list[set[int]] = []
    result = Prefetcher(workers=2, available_memory=big_available).warm(
        [model], cpus={cpu}, progress=lambda d, p: seen.append(os.sched_getaffinity(0))
    )
    assert seen and all(cpus == {cpu} for cpus in seen)
    assert result.cpus == frozenset({cpu})
    assert result.locality == f"pinned to CPUs {cpu} (requested)"
    assert os.sched_getaffinity(0) == before  # the caller's thread is never pinned


def test_cpus_outside_the_process_set_warm_unpinned(model: Path) -> None:
    outside = max(os.sched_getaffinity(0)) + 1000
    result = Prefetcher(available_memory=big_available).warm([model], cpus={outside})
    assert result.cpus is None
    assert result.locality is not None and "outside this process's CPUs" in result.locality
    assert_fully_warmed(result, model)


@pytest.fixture
def numa_sys(tmp_path: Path) -> Path:
    """A sysfs where GPU 1's NUMA node holds only this machine's last CPU."""
    cpu = max(os.sched_getaffinity(0))
    for node, cpus in ((0, "0"), (1, str(cpu))):
        node_dir = tmp_path / f"devices/system/node/node{node}"
        node_dir.mkdir(parents=True)
        (node_dir / "cpulist").write_text(cpus + "\n")
    return tmp_path


def test_gpus_pin_readers_to_their_numa_cpus(model: Path, numa_sys: Path) -> None:
    fake = two_gpus_on_two_nodes()
    gpus = GpuInventory(fake, sys_root=numa_sys)
    cpu = max(os.sched_getaffinity(0))
    seen: list[set[int]] = []
    result = Prefetcher(available_memory=big_available, gpu_cpus=gpus.numa_cpus_for).warm(
        [model],
        gpus=[fake.gpus[1].uuid],
        progress=lambda d, p: seen.append(os.sched_getaffinity(0)),
    )
    assert seen and all(cpus == {cpu} for cpus in seen)
    assert result.cpus == frozenset({cpu})
    assert result.locality == f"pinned to CPUs {cpu} (near GPUs {fake.gpus[1].uuid})"
    assert_fully_warmed(result, model)


def test_unknown_gpu_is_refused_before_warming(model: Path, numa_sys: Path) -> None:
    gpus = GpuInventory(two_gpus_on_two_nodes(), sys_root=numa_sys)
    with pytest.raises(UnknownGpuError, match="unknown GPU '5'"):
        Prefetcher(available_memory=big_available, gpu_cpus=gpus.numa_cpus_for).warm(
            [model], gpus=["5"]
        )
    assert residency([model]).bytes_resident == 0


def test_without_nvml_a_gpu_warm_runs_unpinned_and_says_so(model: Path) -> None:
    gpus = GpuInventory(FakeNvml(init_error=FakeNvml.NVML_ERROR_DRIVER_NOT_LOADED))
    result = Prefetcher(available_memory=big_available, gpu_cpus=gpus.numa_cpus_for).warm(
        [model], gpus=["0"]
    )
    assert result.cpus is None
    assert result.locality == "no NUMA or CPU affinity information for GPUs 0; not pinned"
    assert_fully_warmed(result, model)


def test_drop_all_caches_empties_the_page_cache(model: Path) -> None:
    require_root()
    (model / "a.safetensors").read_bytes()
    assert residency([model / "a.safetensors"]).bytes_resident == BIG
    drop_all_caches()
    assert residency([model]).bytes_resident == 0


def locked_size(model: Path) -> int:
    return 3 * BIG + pages(SMALL) * PAGE_SIZE


def test_mlock_holds_pages_and_release_frees_them(model: Path) -> None:
    locker = MemoryLocker()
    before = locked_bytes_of_process()
    assert locker.lock("sha256:m1", [model]) == locked_size(model)
    assert locked_bytes_of_process() - before == locked_size(model)
    assert residency([model]).bytes_resident == total_size(model)
    assert locker.locked() == {"sha256:m1": locked_size(model)}
    assert locker.lock("sha256:m1", [model]) == locked_size(model)  # idempotent
    assert locked_bytes_of_process() - before == locked_size(model)
    drop([model])  # locked pages cannot be dropped
    assert residency([model]).bytes_resident == total_size(model)
    assert locker.release("sha256:m1") == locked_size(model)
    assert locked_bytes_of_process() == before
    assert locker.locked() == {}
    assert locker.release("sha256:m1") == 0
    drop([model])
    assert residency([model]).bytes_resident == 0


def test_mlock_limit_refuses_and_locks_nothing(model: Path) -> None:
    locker = MemoryLocker(limit_bytes=BIG + BIG // 2)
    before = locked_bytes_of_process()
    assert locker.lock("one", [model / "a.safetensors"]) == BIG
    with pytest.raises(MemoryLockError, match=r"'two'.*prefetch.mlock_limit_bytes") as info:
        locker.lock("two", [model / "b.safetensors"])
    assert info.value.model_id == "two"
    assert locked_bytes_of_process() - before == BIG
    assert locker.release_all() == BIG
    assert locked_bytes_of_process() == before


def test_mlock_disabled_by_a_zero_limit(model: Path) -> None:
    with pytest.raises(MemoryLockError, match="mlock_limit_bytes = 0"):
        MemoryLocker(limit_bytes=0).lock("m", [model / "config.json"])


def test_rlimit_memlock_refuses_without_cap_ipc_lock(model: Path) -> None:
    require_root()
    setpriv = require_binary("setpriv")
    child = textwrap.dedent(
        """
        import resource, sys
        from pathlib import Path
        from cacheagent.memory.prefetch import MemoryLocker, MemoryLockError
        hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, hard))
        locker = MemoryLocker()
        try:
            locker.lock("big", [Path(sys.argv[1])])
        except MemoryLockError as exc:
            print("refused:", exc)
        print("small:", locker.lock("small", [Path(sys.argv[2])]))
        """
    )
    out = subprocess.run(
        [
            *(setpriv, "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "--"),
            *(
                sys.executable,
                "-c",
                child,
                str(model / "a.safetensors"),
                str(model / "config.json"),
            ),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "refused: cannot lock model 'big' in memory" in out
    assert "RLIMIT_MEMLOCK is 1048576 bytes" in out
    assert f"small: {PAGE_SIZE * pages(SMALL)}" in out
