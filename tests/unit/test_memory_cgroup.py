"""The agent's memory cgroup read from cgroupfs-shaped directories (v2, v1, namespaced)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cacheagent.memory.cgroup import (
    CgroupMemory,
    parse_limit,
    parse_proc_cgroup,
    read_cgroup_memory,
)

MiB = 1 << 20
V1_UNLIMITED = "9223372036854771712"


def _write(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text + "\n")


def _proc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


def _v2(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    _write(root, {"cgroup.controllers": "cpu memory", "memory.stat": "file 1"})
    return root


def test_v2_limit_usage_and_page_cache(tmp_path: Path) -> None:
    root = _v2(tmp_path)
    pod = root / "kubepods" / "pod1" / "agent"
    _write(
        pod,
        {
            "memory.max": str(1024 * MiB),
            "memory.high": "max",
            "memory.current": str(700 * MiB),
            "memory.stat": f"anon {200 * MiB}\nfile {500 * MiB}\nkernel 0",
        },
    )
    found = read_cgroup_memory(_proc(tmp_path, "0::/kubepods/pod1/agent\n"), root)
    assert found == CgroupMemory(pod, 1024 * MiB, 700 * MiB, 500 * MiB)
    # Cached files are room, as in the host's "available": 1024 - (700 - 500).
    assert found.room == 824 * MiB


def test_v2_smallest_limit_of_the_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    root = _v2(tmp_path)
    _write(root / "kubepods", {"memory.max": str(4096 * MiB)})
    _write(root / "kubepods" / "pod1", {"memory.max": "max", "memory.high": str(2048 * MiB)})
    agent = root / "kubepods" / "pod1" / "agent"
    _write(agent, {"memory.max": "max", "memory.current": "0", "memory.stat": "file 0"})
    found = read_cgroup_memory(_proc(tmp_path, "0::/kubepods/pod1/agent\n"), root)
    assert found is not None and found.limit == 2048 * MiB


def test_v2_unlimited_is_no_limit(tmp_path: Path) -> None:
    root = _v2(tmp_path)
    _write(root / "a", {"memory.max": "max", "memory.current": "5", "memory.stat": "file 1"})
    found = read_cgroup_memory(_proc(tmp_path, "0::/a\n"), root)
    assert found is not None and found.limit is None and found.room is None


def test_v2_namespaced_path_reads_the_mount_root(tmp_path: Path) -> None:
    # With a private cgroup namespace /proc/self/cgroup says "/" (or a path the mount lacks).
    root = _v2(tmp_path)
    _write(root, {"memory.max": str(512 * MiB), "memory.current": str(100 * MiB)})
    for text in ("0::/\n", "0::/kubepods/not-here\n"):
        found = read_cgroup_memory(_proc(tmp_path, text), root)
        assert found is not None and found.path == root and found.limit == 512 * MiB


def test_v1_hierarchical_limit_and_cache(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    agent = root / "memory" / "kubepods" / "agent"
    _write(
        agent,
        {
            "memory.limit_in_bytes": V1_UNLIMITED,
            "memory.usage_in_bytes": str(300 * MiB),
            "memory.stat": f"cache 1\nhierarchical_memory_limit {1024 * MiB}\n"
            f"total_cache {250 * MiB}",
        },
    )
    text = "4:memory:/kubepods/agent\n3:cpu,cpuacct:/kubepods/agent\n0::/\n"
    found = read_cgroup_memory(_proc(tmp_path, text), root)
    assert found == CgroupMemory(agent, 1024 * MiB, 300 * MiB, 250 * MiB)
    assert found.room == 974 * MiB


def test_v1_unlimited_and_hybrid_hierarchy(tmp_path: Path) -> None:
    # Hybrid: v1 memory controller plus an empty unified hierarchy; v1 is the one to read.
    root = tmp_path / "cgroup"
    _write(
        root / "memory",
        {
            "memory.limit_in_bytes": V1_UNLIMITED,
            "memory.usage_in_bytes": "10",
            "memory.stat": f"hierarchical_memory_limit {V1_UNLIMITED}\ntotal_cache 0",
        },
    )
    _write(root / "unified", {"cgroup.controllers": ""})
    found = read_cgroup_memory(_proc(tmp_path, "1:memory:/\n0::/\n"), root)
    assert found is not None and found.limit is None


def test_no_memory_controller_is_none(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    assert read_cgroup_memory(_proc(tmp_path, "1:cpu:/\n"), root) is None


def test_parsers() -> None:
    assert parse_limit("max\n") is None
    assert parse_limit(V1_UNLIMITED) is None
    assert parse_limit("1073741824") == 1 << 30
    with pytest.raises(ValueError):
        parse_limit("lots")
    paths = parse_proc_cgroup("12:memory:/a\n5:cpu,cpuacct:/b\n0::/c\n")
    assert (paths.memory_v1, paths.unified) == ("/a", "/c")
