"""What the node's NVIDIA GPUs are doing, read through NVML (pynvml), and where they sit.

The agent runs on GPU nodes but must never fail because of NVML: no library, no driver, a
driver unloaded mid-run or a GPU fallen off the bus all give a snapshot with ``up`` False and
a reason, logged once per change of reason. Every read happens in the caller's thread (the
metrics scrape runs it in one); snapshots are cached for ``cache_seconds`` so scrapes do not
hammer NVML, and a failed init is retried at most every ``retry_seconds``.

A field a GPU does not support (NVML_ERROR_NOT_SUPPORTED, no permission...) is None in
:class:`GpuInfo`. Errors that mean NVML itself is gone drop the whole snapshot and shut NVML
down so the next attempt starts with a fresh init. A lost GPU (NVML_ERROR_GPU_IS_LOST) makes
``up`` False, names the GPU in ``reason`` and leaves it out of ``gpus``; the other GPUs are
still reported.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cacheagent.errors import CacheAgentError
from cacheagent.memory.cpuset import cpus_from_mask_words, parse_cpulist

log = logging.getLogger(__name__)

T = TypeVar("T")

_FieldReader = Callable[[str, Callable[[Any], Any]], Any]
_NOTHING_LOGGED = "\0nothing logged yet"

# NVML errors after which no call can succeed until NVML is initialised again.
_NVML_GONE = (
    "NVML_ERROR_UNINITIALIZED",
    "NVML_ERROR_DRIVER_NOT_LOADED",
    "NVML_ERROR_LIBRARY_NOT_FOUND",
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH",
    "NVML_ERROR_FUNCTION_NOT_FOUND",
)
_GPU_LOST = ("NVML_ERROR_GPU_IS_LOST", "NVML_ERROR_RESET_REQUIRED")


class UnknownGpuError(CacheAgentError, LookupError):
    """A GPU named by index or UUID is not on this node."""

    def __init__(self, gpu: str, known: Sequence[str]) -> None:
        self.gpu = gpu
        self.known = tuple(known)
        listed = ", ".join(known) or "none"
        super().__init__(f"unknown GPU {gpu!r}: this node has GPUs {listed}")


@dataclass(frozen=True)
class GpuInfo:
    """One GPU; a field is None when the GPU or driver cannot report it."""

    index: int
    uuid: str | None = None
    name: str | None = None
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    utilization_gpu_percent: int | None = None
    utilization_memory_percent: int | None = None
    temperature_celsius: int | None = None
    power_watts: float | None = None
    pcie_link_generation: int | None = None
    pcie_link_width: int | None = None
    pci_bus_id: str | None = None
    numa_node: int | None = None
    cpu_affinity: frozenset[int] | None = None


@dataclass(frozen=True)
class GpuSnapshot:
    up: bool
    reason: str | None
    driver_version: str | None
    gpus: tuple[GpuInfo, ...]


class _NvmlGoneError(Exception):
    """NVML stopped working; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _GpuLostError(Exception):
    pass


def sysfs_bus_id(nvml_bus_id: str) -> str:
    """NVML's ``00000000:3B:00.0`` as sysfs spells it: ``0000:3b:00.0``."""
    domain, sep, rest = nvml_bus_id.strip().partition(":")
    if not sep:
        raise ValueError(f"bad PCI bus id {nvml_bus_id!r}")
    return f"{int(domain, 16):04x}:{rest.lower()}"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GpuInventory:
    """Reads GPU figures and topology through an NVML module (``pynvml`` unless injected)."""

    def __init__(
        self,
        nvml_module: Any | None = None,
        *,
        cache_seconds: float = 2.0,
        retry_seconds: float = 60.0,
        sys_root: Path = Path("/sys"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nvml: Any = nvml_module  # None until the lazy import
        self._cache_seconds = cache_seconds
        self._retry_seconds = retry_seconds
        self._sys_root = sys_root
        self._clock = clock
        self._mutex = threading.Lock()
        self._initialized = False
        self._last_init: float | None = None
        self._cached: GpuSnapshot | None = None
        self._cached_at = 0.0
        self._logged_reason: str | None = _NOTHING_LOGGED

    def snapshot(self) -> GpuSnapshot:
        """The current figures; never raises."""
        with self._mutex:
            now = self._clock()
            if self._cached is not None and now - self._cached_at < self._cache_seconds:
                return self._cached
            try:
                snapshot = self._take(now)
            except Exception as exc:  # noqa: BLE001 - the agent must never fail over NVML
                self._shutdown_quietly()
                snapshot = GpuSnapshot(False, f"NVML read failed: {exc!r}", None, ())
            self._cached, self._cached_at = snapshot, now
            self._log(snapshot)
            return snapshot

    def numa_cpus_for(self, gpus: Sequence[str]) -> set[int] | None:
        """CPUs of the NUMA nodes of ``gpus`` (indexes or UUIDs), for pinning readers.

        None when NVML is down or the GPUs' NUMA node and CPU affinity are both unknown;
        UnknownGpuError when NVML works and a name matches no GPU.
        """
        snapshot = self.snapshot()
        if not snapshot.up and not snapshot.gpus:
            return None
        cpus: set[int] = set()
        for name in gpus:
            found = self._cpus_of(self._find(snapshot, name))
            if found is None:
                return None
            cpus |= found
        return cpus

    def close(self) -> None:
        with self._mutex:
            self._shutdown()

    def _find(self, snapshot: GpuSnapshot, name: str) -> GpuInfo:
        wanted = name.strip()
        for gpu in snapshot.gpus:
            if wanted == str(gpu.index) or (gpu.uuid and wanted.lower() == gpu.uuid.lower()):
                return gpu
        known = [f"{gpu.index} ({gpu.uuid})" for gpu in snapshot.gpus]
        raise UnknownGpuError(name, known)

    def _cpus_of(self, gpu: GpuInfo) -> set[int] | None:
        if gpu.numa_node is not None:
            path = self._sys_root / f"devices/system/node/node{gpu.numa_node}/cpulist"
            try:
                return set(parse_cpulist(path.read_text()))
            except (OSError, ValueError) as exc:
                log.debug("no CPU list for NUMA node %d: %s", gpu.numa_node, exc)
        return None if gpu.cpu_affinity is None else set(gpu.cpu_affinity)

    def _take(self, now: float) -> GpuSnapshot:
        if not self._initialized:
            if self._cached is not None and not self._due_for_init(now):
                return self._cached
            reason = self._init(now)
            if reason is not None:
                return GpuSnapshot(False, reason, None, ())
        try:
            return self._read()
        except _NvmlGoneError as gone:
            self._shutdown()
            return GpuSnapshot(False, gone.reason, None, ())

    def _due_for_init(self, now: float) -> bool:
        return self._last_init is None or now - self._last_init >= self._retry_seconds

    def _init(self, now: float) -> str | None:
        self._last_init = now
        try:
            if self._nvml is None:
                self._nvml = importlib.import_module("pynvml")
            self._nvml.nvmlInit()
        except ImportError as exc:
            return f"pynvml is not installed: {exc}"
        except Exception as exc:
            if not self._is_nvml_error(exc):
                raise
            return f"NVML init failed: {exc}"
        self._initialized = True
        return None

    def _shutdown(self) -> None:
        if not self._initialized:
            return
        self._initialized = False
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            if not self._is_nvml_error(exc):
                raise

    def _shutdown_quietly(self) -> None:
        try:
            self._shutdown()
        except Exception as exc:  # noqa: BLE001 - already reporting a failure
            log.debug("NVML shutdown failed: %r", exc)
        self._initialized = False

    def _is_nvml_error(self, exc: BaseException) -> bool:
        error_type = getattr(self._nvml, "NVMLError", None)
        return isinstance(error_type, type) and isinstance(exc, error_type)

    def _codes(self, names: Sequence[str]) -> set[int]:
        return {getattr(self._nvml, name) for name in names if hasattr(self._nvml, name)}

    def _call(self, fn: Callable[[], T], what: str) -> T | None:
        """One NVML read; None when unsupported, _NvmlGoneError / _GpuLostError when fatal."""
        try:
            return fn()
        except Exception as exc:
            if not self._is_nvml_error(exc):
                raise
            code = getattr(exc, "value", None)
            if code in self._codes(_NVML_GONE):
                raise _NvmlGoneError(f"NVML stopped working ({what}): {exc}") from exc
            if code in self._codes(_GPU_LOST):
                raise _GpuLostError(f"{what}: {exc}") from exc
            log.debug("NVML %s not available: %s", what, exc)
            return None

    def _read(self) -> GpuSnapshot:
        nvml = self._nvml
        count = self._call(nvml.nvmlDeviceGetCount, "device count")
        if count is None:
            raise _NvmlGoneError("NVML cannot count the GPUs")
        version = self._call(nvml.nvmlSystemGetDriverVersion, "driver version")
        gpus: list[GpuInfo] = []
        lost: list[str] = []
        for index in range(int(count)):
            try:
                gpus.append(self._read_gpu(index))
            except _GpuLostError as exc:
                lost.append(str(exc))
        reason = "; ".join(lost) or None
        return GpuSnapshot(not lost, reason, _optional(version, _text), tuple(gpus))

    def _read_gpu(self, index: int) -> GpuInfo:
        nvml = self._nvml
        handle = self._call(lambda: nvml.nvmlDeviceGetHandleByIndex(index), f"GPU {index}")
        if handle is None:
            raise _GpuLostError(f"GPU {index}: NVML gives no handle")

        def read(what: str, fn: Callable[[Any], T]) -> T | None:
            return self._call(lambda: fn(handle), f"GPU {index} {what}")

        memory = read("memory", nvml.nvmlDeviceGetMemoryInfo)
        utilization = read("utilization", nvml.nvmlDeviceGetUtilizationRates)
        power_mw = read("power", nvml.nvmlDeviceGetPowerUsage)
        pci = read("PCI info", nvml.nvmlDeviceGetPciInfo)
        bus_id = None if pci is None else _text(pci.busId)
        return GpuInfo(
            index=index,
            uuid=_optional(read("UUID", nvml.nvmlDeviceGetUUID), _text),
            name=_optional(read("name", nvml.nvmlDeviceGetName), _text),
            memory_total_bytes=None if memory is None else int(memory.total),
            memory_used_bytes=None if memory is None else int(memory.used),
            utilization_gpu_percent=None if utilization is None else int(utilization.gpu),
            utilization_memory_percent=None if utilization is None else int(utilization.memory),
            temperature_celsius=_optional(read("temperature", self._temperature), int),
            power_watts=None if power_mw is None else int(power_mw) / 1000.0,
            pcie_link_generation=_optional(
                read("PCIe generation", nvml.nvmlDeviceGetCurrPcieLinkGeneration), int
            ),
            pcie_link_width=_optional(read("PCIe width", nvml.nvmlDeviceGetCurrPcieLinkWidth), int),
            pci_bus_id=bus_id,
            numa_node=self._numa_node(read, bus_id),
            cpu_affinity=self._cpu_affinity(read),
        )

    def _temperature(self, handle: Any) -> Any:
        return self._nvml.nvmlDeviceGetTemperature(handle, self._nvml.NVML_TEMPERATURE_GPU)

    def _numa_node(self, read: _FieldReader, bus_id: str | None) -> int | None:
        node = None
        if hasattr(self._nvml, "nvmlDeviceGetNumaNodeId"):
            node = read("NUMA node", self._nvml.nvmlDeviceGetNumaNodeId)
        if node is None and bus_id is not None:
            node = self._sysfs_numa_node(bus_id)
        return None if node is None or int(node) < 0 else int(node)

    def _sysfs_numa_node(self, bus_id: str) -> int | None:
        try:
            path = self._sys_root / "bus/pci/devices" / sysfs_bus_id(bus_id) / "numa_node"
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _cpu_affinity(self, read: _FieldReader) -> frozenset[int] | None:
        words = -(-(os.cpu_count() or 1) // 64)
        mask = read("CPU affinity", lambda h: self._nvml.nvmlDeviceGetCpuAffinity(h, words))
        if mask is None:
            return None
        cpus = cpus_from_mask_words(int(word) for word in mask)
        return cpus or None

    def _log(self, snapshot: GpuSnapshot) -> None:
        if snapshot.reason == self._logged_reason:
            return
        if snapshot.reason is not None:
            log.warning("GPU figures unavailable: %s", snapshot.reason)
        else:
            log.info("NVML up: %d GPUs, driver %s", len(snapshot.gpus), snapshot.driver_version)
        self._logged_reason = snapshot.reason


def _optional(value: object | None, convert: Callable[[Any], T]) -> T | None:
    return None if value is None else convert(value)
