"""The warm budget inside a real memory cgroup: a child of this test's own cgroup with a limit
(cgroup v1 or v2, whichever the machine runs), and a warm started in it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cacheagent.memory.cgroup import read_cgroup_memory
from cacheagent.memory.pagecache import drop
from tests.support import require, require_root

MIB = 1 << 20
LIMIT = 128 * MIB
FILE_BYTES = 256 * MIB

CHILD = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    Path(sys.argv[1], "cgroup.procs").write_text(str(os.getpid()))
    from cacheagent.memory.cgroup import memory_room
    from cacheagent.memory.prefetch import Prefetcher
    result = Prefetcher(memory_share=0.5).warm([Path(sys.argv[2])])
    print(json.dumps({"room": memory_room(), "budget": result.budget_bytes,
                      "warmed": result.bytes_warmed, "partial": result.partial,
                      "reason": result.reason}))
    """
)


@pytest.fixture
def limited_cgroup() -> Iterator[Path]:
    """A child memory cgroup limited to LIMIT bytes, removed afterwards."""
    require_root()
    own = read_cgroup_memory()
    require(own is not None, "no memory cgroup controller visible in /sys/fs/cgroup")
    assert own is not None
    child = own.path / f"cacheagent-test-{os.getpid()}"
    try:
        child.mkdir()
    except OSError as exc:
        require(False, f"cannot create a memory cgroup under {own.path}: {exc.strerror}")
    try:
        limit_files = [n for n in ("memory.max", "memory.limit_in_bytes") if (child / n).exists()]
        require(
            bool(limit_files), f"the memory controller is not enabled for {own.path}'s children"
        )
        (child / limit_files[0]).write_text(str(LIMIT))
        yield child
    finally:
        for _ in range(50):  # rmdir is EBUSY until the exited child is reaped from it
            with contextlib.suppress(FileNotFoundError):
                try:
                    child.rmdir()
                except OSError:
                    time.sleep(0.1)
                    continue
            break
        assert not child.exists(), f"could not remove test cgroup {child}"


@pytest.fixture
def big_file() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="cacheagent-test-", dir="/var/tmp"))
    path = directory / "weights.safetensors"
    try:
        with path.open("wb") as out:
            for _ in range(FILE_BYTES // (16 * MIB)):
                out.write(os.urandom(16 * MIB))
        drop([path])
        yield path
    finally:
        path.unlink()
        directory.rmdir()


def test_warm_budget_fits_the_agents_own_cgroup_limit(limited_cgroup: Path, big_file: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(limited_cgroup), str(big_file)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    result = json.loads(out)
    # The host has far more than LIMIT available; the cgroup's room is what bounds the warm.
    assert psutil.virtual_memory().available > 4 * LIMIT
    assert result["room"] is not None and 0 < result["room"] <= LIMIT
    assert 0 < result["budget"] <= LIMIT // 2
    assert result["partial"] is True
    assert result["reason"].startswith("memory budget")
    assert result["warmed"] <= result["budget"]
