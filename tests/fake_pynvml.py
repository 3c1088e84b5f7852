"""A stand-in for the ``pynvml`` module, for the one thing tests cannot have: an NVIDIA GPU.

It mirrors the real module at its boundary: the same function names and parameters (a test
compares them with ``inspect``), pynvml's own NVMLError classes and constants, and return
values built from pynvml's own ctypes structures. Importing pynvml loads no library, so this
works on machines without a driver.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from dataclasses import dataclass, field

import pynvml

GIB = 1 << 30


@dataclass
class FakeGpu:
    """One GPU; functions named in ``unsupported`` answer NVML_ERROR_NOT_SUPPORTED."""

    uuid: str
    bus_id: str
    name: str = "NVIDIA H100 80GB HBM3"
    memory_total: int = 80 * GIB
    memory_used: int = 3 * GIB
    utilization_gpu: int = 37
    utilization_memory: int = 12
    temperature: int = 41
    power_mw: int = 123_456
    pcie_generation: int = 5
    pcie_width: int = 16
    numa_node: int = 0
    cpu_affinity: frozenset[int] = frozenset()
    unsupported: frozenset[str] = frozenset()
    lost: bool = False


@dataclass(frozen=True)
class _Handle:
    index: int


@dataclass
class FakeNvml:
    """Module-like: pass an instance as ``GpuInventory(nvml_module=...)``."""

    gpus: list[FakeGpu] = field(default_factory=list)
    driver_version: str = "550.54.15"
    init_error: int | None = None
    failure: int | None = None
    initialized: bool = False
    calls: Counter[str] = field(default_factory=Counter)

    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
    NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_ERROR_UNINITIALIZED = pynvml.NVML_ERROR_UNINITIALIZED
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
    NVML_ERROR_FUNCTION_NOT_FOUND = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_RESET_REQUIRED = pynvml.NVML_ERROR_RESET_REQUIRED

    # scenario controls

    def fail_with(self, code: int | None) -> None:
        """From now on every call (nvmlInit too) raises NVMLError(code); None heals."""
        self.failure = code

    @staticmethod
    def functions() -> list[str]:
        return sorted(name for name in dir(FakeNvml) if name.startswith("nvml"))

    # pynvml functions

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        for code in (self.init_error, self.failure):
            if code is not None:
                raise pynvml.NVMLError(code)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._check("nvmlShutdown")
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(index)

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return self._gpu(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: int | None = None) -> object:
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        free = gpu.memory_total - gpu.memory_used
        return pynvml.c_nvmlMemory_t(total=gpu.memory_total, free=free, used=gpu.memory_used)

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> object:
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        return pynvml.c_nvmlUtilization_t(gpu=gpu.utilization_gpu, memory=gpu.utilization_memory)

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTemperature")
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        return self._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: _Handle) -> int:
        return self._gpu(handle, "nvmlDeviceGetCurrPcieLinkGeneration").pcie_generation

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: _Handle) -> int:
        return self._gpu(handle, "nvmlDeviceGetCurrPcieLinkWidth").pcie_width

    def nvmlDeviceGetPciInfo(self, handle: _Handle) -> object:
        gpu = self._gpu(handle, "nvmlDeviceGetPciInfo")
        info = pynvml.nvmlPciInfo_t()
        info.busId = gpu.bus_id.encode()  # bytes, as the real structure holds it
        info.busIdLegacy = gpu.bus_id.encode()
        return info

    def nvmlDeviceGetNumaNodeId(self, handle: _Handle) -> int:
        return self._gpu(handle, "nvmlDeviceGetNumaNodeId").numa_node

    def nvmlDeviceGetCpuAffinity(self, handle: _Handle, cpuSetSize: int) -> object:  # noqa: N803
        gpu = self._gpu(handle, "nvmlDeviceGetCpuAffinity")
        words = (ctypes.c_ulonglong * cpuSetSize)()
        for cpu in gpu.cpu_affinity:
            if cpu < 64 * cpuSetSize:
                words[cpu // 64] |= 1 << (cpu % 64)
        return words

    # helpers

    def _check(self, name: str) -> None:
        self.calls[name] += 1
        if not self.initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if self.failure is not None:
            raise pynvml.NVMLError(self.failure)

    def _gpu(self, handle: _Handle, name: str) -> FakeGpu:
        self._check(name)
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if name in gpu.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu


def two_gpus_on_two_nodes() -> FakeNvml:
    """The common scenario: GPU 0 on NUMA node 0, GPU 1 on node 1."""
    return FakeNvml(
        gpus=[
            FakeGpu(
                uuid="GPU-0f4b2c1e-0000-4000-8000-000000000000",
                bus_id="00000000:19:00.0",
                numa_node=0,
                cpu_affinity=frozenset({0}),
            ),
            FakeGpu(
                uuid="GPU-9a7d3e55-1111-4111-8111-111111111111",
                bus_id="00000000:BA:00.0",
                numa_node=1,
                cpu_affinity=frozenset({1}),
            ),
        ]
    )
