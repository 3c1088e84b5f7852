"""What machine a benchmark ran on: printed beside every table, since the numbers mean
nothing without it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def filesystem_of(directory: Path) -> str:
    """``<fstype> on <device>`` of the filesystem holding ``directory``."""
    dev = directory.stat().st_dev
    for part in psutil.disk_partitions(all=True):
        mount = Path(part.mountpoint)
        if directory.is_relative_to(mount) and mount.stat().st_dev == dev:
            return f"{part.fstype} on {part.device}"
    return f"? ({os.major(dev)}:{os.minor(dev)})"


def machine(directory: Path) -> list[tuple[str, str]]:
    """CPU, memory, kernel, the disk under ``directory`` and Python, as (name, value) rows."""
    return [
        ("CPU", f"{cpu_model()} x {os.cpu_count()}"),
        ("RAM", f"{psutil.virtual_memory().total / (1 << 30):.1f} GiB"),
        ("kernel", platform.release()),
        ("disk", f"{filesystem_of(directory)} at {directory}"),
        ("python", platform.python_version()),
    ]
