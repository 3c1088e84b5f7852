"""How much page cache the agent's own memory cgroup lets it hold.

Page cache a process faults in is charged to that process's memory cgroup. Under a container
memory limit the kernel reclaims the cgroup's own page cache (the model just warmed) long before
the node runs short, so the warm budget must come from the cgroup as well as from the host.

The room for page cache is the cgroup's effective limit minus what it holds that is not page
cache (anonymous memory, kernel memory): cached files count as room, as they do in the host's
"available" figure. Both hierarchies are read:

- cgroup v2: ``0::<path>`` in ``/proc/self/cgroup``; the limit is the smallest ``memory.max`` or
  ``memory.high`` of the cgroup and its ancestors visible under the mount; usage is
  ``memory.current``, page cache the ``file`` line of ``memory.stat``.
- cgroup v1: the ``memory`` controller's path; ``memory.stat`` gives the effective limit
  (``hierarchical_memory_limit``) and page cache (``total_cache``); usage is
  ``memory.usage_in_bytes``.

In a container with its own cgroup namespace the path reads ``/`` and the mount is the
container's cgroup; where the path is not found under the mount, the mount's root is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned int64 (9223372036854771712).
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class CgroupMemory:
    """The agent's memory cgroup: effective ``limit`` (None: none), ``usage`` and the page
    cache (``file``) within it, all in bytes."""

    path: Path
    limit: int | None
    usage: int
    file: int

    @property
    def room(self) -> int | None:
        """Bytes of page cache the cgroup can hold; None when it has no limit."""
        if self.limit is None:
            return None
        return max(0, self.limit - max(0, self.usage - self.file))


@dataclass(frozen=True)
class CgroupPaths:
    """This process's cgroup paths from ``/proc/self/cgroup``."""

    unified: str | None
    memory_v1: str | None


def parse_proc_cgroup(text: str) -> CgroupPaths:
    unified = memory = None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            unified = path
        elif "memory" in controllers.split(","):
            memory = path
    return CgroupPaths(unified, memory)


def parse_limit(text: str) -> int | None:
    """A limit file's value: ``max`` (v2) or the v1 "unlimited" number is None."""
    value = text.strip()
    if value == "max":
        return None
    number = int(value)
    return None if number >= _V1_UNLIMITED else number


def parse_stat(text: str) -> dict[str, int]:
    stats = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stats[key] = int(value)
    return stats


def read_cgroup_memory(
    proc_self_cgroup: Path = PROC_SELF_CGROUP, root: Path = CGROUP_ROOT
) -> CgroupMemory | None:
    """The memory cgroup this process is in, or None where no memory controller is visible."""
    paths = parse_proc_cgroup(proc_self_cgroup.read_text())
    if paths.memory_v1 is not None and (root / "memory").is_dir():
        return _read_v1(_locate(root / "memory", paths.memory_v1))
    if paths.unified is not None and (root / "cgroup.controllers").exists():
        return _read_v2(root, _locate(root, paths.unified))
    return None


def memory_room() -> int | None:
    """Page-cache room in the agent's own cgroup; None when unlimited or unreadable (a warm
    then goes by the host's available memory alone, as before)."""
    try:
        found = read_cgroup_memory()
    except (OSError, ValueError) as exc:
        log.debug("cannot read the memory cgroup: %s", exc)
        return None
    return None if found is None else found.room


def _locate(mount: Path, path: str) -> Path:
    candidate = mount / path.lstrip("/")
    return candidate if candidate.is_dir() else mount


def _read_v1(directory: Path) -> CgroupMemory:
    stats = parse_stat((directory / "memory.stat").read_text())
    limit_text = str(stats.get("hierarchical_memory_limit", "max"))
    own = parse_limit((directory / "memory.limit_in_bytes").read_text())
    limits = [x for x in (parse_limit(limit_text), own) if x is not None]
    return CgroupMemory(
        path=directory,
        limit=min(limits, default=None),
        usage=int((directory / "memory.usage_in_bytes").read_text()),
        file=stats.get("total_cache", stats.get("cache", 0)),
    )


def _read_v2(mount: Path, directory: Path) -> CgroupMemory:
    limits = []
    for level in (directory, *directory.parents):
        for name in ("memory.max", "memory.high"):
            path = level / name
            if path.exists():
                value = parse_limit(path.read_text())
                if value is not None:
                    limits.append(value)
        if level == mount:
            break
    current = directory / "memory.current"
    stat = directory / "memory.stat"
    return CgroupMemory(
        path=directory,
        limit=min(limits, default=None),
        usage=int(current.read_text()) if current.exists() else 0,
        file=parse_stat(stat.read_text()).get("file", 0) if stat.exists() else 0,
    )
