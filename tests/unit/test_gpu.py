"""GpuInventory against the fake NVML (no GPU here) and against the real pynvml (no driver)."""

from __future__ import annotations

import inspect
import logging
import re
import sys
from pathlib import Path

import pynvml
import pytest

import cacheagent.memory.gpu
from cacheagent.memory.gpu import GpuInventory, UnknownGpuError, sysfs_bus_id
from tests.fake_pynvml import FakeGpu, FakeNvml, two_gpus_on_two_nodes

UUID0 = "GPU-0f4b2c1e-0000-4000-8000-000000000000"
UUID1 = "GPU-9a7d3e55-1111-4111-8111-111111111111"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sys_root(tmp_path: Path) -> Path:
    """A sysfs with two NUMA nodes: node0 has CPUs 0-3, node1 has 4-7."""
    for node, cpus in ((0, "0-3"), (1, "4-7")):
        node_dir = tmp_path / f"sys/devices/system/node/node{node}"
        node_dir.mkdir(parents=True)
        (node_dir / "cpulist").write_text(cpus + "\n")
    return tmp_path / "sys"


def inventory(fake: FakeNvml, sys_root: Path, clock: Clock) -> GpuInventory:
    return GpuInventory(fake, cache_seconds=2.0, retry_seconds=30.0, sys_root=sys_root, clock=clock)


def _shape(fn: object) -> list[tuple[str, object, object]]:
    signature = inspect.signature(fn)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def test_fake_functions_have_the_real_pynvml_signatures() -> None:
    fake = FakeNvml()
    for name in FakeNvml.functions():
        assert hasattr(pynvml, name), f"pynvml has no {name}"
        assert _shape(getattr(fake, name)) == _shape(getattr(pynvml, name)), name


def test_every_nvml_name_gpu_module_uses_exists_in_fake_and_real_pynvml() -> None:
    source = Path(cacheagent.memory.gpu.__file__).read_text()
    used = set(re.findall(r"\b(nvml[A-Z]\w+|NVML_\w+|NVMLError\w*)\b", source))
    assert "nvmlDeviceGetMemoryInfo" in used
    for name in used:
        assert hasattr(pynvml, name), f"gpu.py uses {name}, which pynvml lacks"
        assert hasattr(FakeNvml, name), f"gpu.py uses {name}, which the fake lacks"


def test_fake_errors_are_pynvml_subclasses_by_code() -> None:
    error = FakeNvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
    assert type(error) is pynvml.NVMLError_NotSupported
    assert str(error) == "Not Supported"


def test_two_gpus_report_every_field(sys_root: Path, clock: Clock) -> None:
    snapshot = inventory(two_gpus_on_two_nodes(), sys_root, clock).snapshot()
    assert snapshot.up and snapshot.reason is None
    assert snapshot.driver_version == "550.54.15"
    assert [gpu.index for gpu in snapshot.gpus] == [0, 1]
    gpu = snapshot.gpus[1]
    assert gpu.uuid == UUID1
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.memory_total_bytes == 80 << 30
    assert gpu.memory_used_bytes == 3 << 30
    assert (gpu.utilization_gpu_percent, gpu.utilization_memory_percent) == (37, 12)
    assert gpu.temperature_celsius == 41
    assert gpu.power_watts == pytest.approx(123.456)
    assert (gpu.pcie_link_generation, gpu.pcie_link_width) == (5, 16)
    assert gpu.pci_bus_id == "00000000:BA:00.0"
    assert gpu.numa_node == 1
    assert gpu.cpu_affinity == frozenset({1})


def test_numa_cpus_by_index_uuid_and_union(sys_root: Path, clock: Clock) -> None:
    gpus = inventory(two_gpus_on_two_nodes(), sys_root, clock)
    assert gpus.numa_cpus_for(["0"]) == {0, 1, 2, 3}
    assert gpus.numa_cpus_for([UUID1.lower()]) == {4, 5, 6, 7}
    assert gpus.numa_cpus_for(["0", UUID1]) == set(range(8))


def test_unknown_gpu_is_a_clear_error(sys_root: Path, clock: Clock) -> None:
    gpus = inventory(two_gpus_on_two_nodes(), sys_root, clock)
    with pytest.raises(UnknownGpuError, match=r"unknown GPU '7'.*0 \(GPU-0f4b") as info:
        gpus.numa_cpus_for(["7"])
    assert info.value.gpu == "7"


def test_zero_gpus(sys_root: Path, clock: Clock) -> None:
    gpus = inventory(FakeNvml(), sys_root, clock)
    snapshot = gpus.snapshot()
    assert snapshot.up and snapshot.gpus == ()
    with pytest.raises(UnknownGpuError, match="this node has GPUs none"):
        gpus.numa_cpus_for(["0"])


def test_unsupported_fields_are_none_and_the_rest_is_read(sys_root: Path, clock: Clock) -> None:
    fake = two_gpus_on_two_nodes()
    fake.gpus[1].unsupported = frozenset(
        {"nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetMemoryInfo"}
    )
    snapshot = inventory(fake, sys_root, clock).snapshot()
    assert snapshot.up
    gpu = snapshot.gpus[1]
    assert gpu.temperature_celsius is None
    assert gpu.power_watts is None
    assert gpu.memory_total_bytes is None and gpu.memory_used_bytes is None
    assert gpu.uuid == UUID1 and gpu.pcie_link_width == 16
    assert snapshot.gpus[0].temperature_celsius == 41


def test_numa_node_falls_back_to_sysfs_pci_device(sys_root: Path, clock: Clock) -> None:
    fake = two_gpus_on_two_nodes()
    fake.gpus[1].unsupported = frozenset({"nvmlDeviceGetNumaNodeId"})
    device = sys_root / "bus/pci/devices/0000:ba:00.0"
    device.mkdir(parents=True)
    (device / "numa_node").write_text("1\n")
    gpus = inventory(fake, sys_root, clock)
    assert gpus.snapshot().gpus[1].numa_node == 1
    assert gpus.numa_cpus_for(["1"]) == {4, 5, 6, 7}


def test_cpu_affinity_is_used_without_numa_information(tmp_path: Path, clock: Clock) -> None:
    fake = two_gpus_on_two_nodes()
    fake.gpus[1].unsupported = frozenset({"nvmlDeviceGetNumaNodeId"})
    gpus = inventory(fake, tmp_path / "empty-sys", clock)
    assert gpus.snapshot().gpus[1].numa_node is None
    assert gpus.numa_cpus_for(["1"]) == {1}


def test_no_cpu_information_at_all_gives_none(tmp_path: Path, clock: Clock) -> None:
    fake = two_gpus_on_two_nodes()
    fake.gpus[0].unsupported = frozenset({"nvmlDeviceGetNumaNodeId", "nvmlDeviceGetCpuAffinity"})
    assert inventory(fake, tmp_path, clock).numa_cpus_for(["0"]) is None


def test_library_not_found_is_down_logged_once_and_retried_slowly(
    sys_root: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    gpus = inventory(fake, sys_root, clock)
    with caplog.at_level(logging.INFO, logger="cacheagent.memory.gpu"):
        for _ in range(20):
            snapshot = gpus.snapshot()
            clock.now += 5
    assert not snapshot.up
    assert snapshot.reason == "NVML init failed: NVML Shared Library Not Found"
    assert gpus.numa_cpus_for(["0"]) is None
    # 100 s of scrapes every 5 s, retrying at most every 30 s: 4 attempts, one warning.
    assert fake.calls["nvmlInit"] == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Shared Library Not Found" in warnings[0].getMessage()


def test_snapshots_are_cached(sys_root: Path, clock: Clock) -> None:
    fake = two_gpus_on_two_nodes()
    gpus = inventory(fake, sys_root, clock)
    first = gpus.snapshot()
    clock.now += 1.5
    assert gpus.snapshot() is first
    assert fake.calls["nvmlDeviceGetCount"] == 1
    clock.now += 1.0
    fake.gpus[0].temperature = 77
    assert gpus.snapshot().gpus[0].temperature_celsius == 77
    assert fake.calls["nvmlDeviceGetCount"] == 2


@pytest.mark.parametrize(
    "code", [pynvml.NVML_ERROR_DRIVER_NOT_LOADED, pynvml.NVML_ERROR_UNINITIALIZED]
)
def test_driver_vanishing_mid_run_then_coming_back(
    sys_root: Path, clock: Clock, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    fake = two_gpus_on_two_nodes()
    gpus = inventory(fake, sys_root, clock)
    assert gpus.snapshot().up
    fake.fail_with(code)
    with caplog.at_level(logging.INFO, logger="cacheagent.memory.gpu"):
        clock.now = 1003
        down = gpus.snapshot()
        assert not down.up and down.gpus == ()
        assert down.reason is not None and str(pynvml.NVMLError(code)) in down.reason
        assert fake.calls["nvmlShutdown"] == 1
        for now in (1006, 1020, 1029):  # within 30 s of the last init: no attempt
            clock.now = now
            assert gpus.snapshot() is down
        assert fake.calls["nvmlInit"] == 1
        clock.now = 1031  # retry while the driver is still gone
        retried = gpus.snapshot()
        assert retried.reason is not None and retried.reason.startswith("NVML init failed")
        assert fake.calls["nvmlInit"] == 2
        fake.fail_with(None)
        clock.now = 1062
        back = gpus.snapshot()
    assert back.up and len(back.gpus) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in messages) == 2  # vanished, then init failed
    assert messages[-1].startswith("NVML up: 2 GPUs")


def test_lost_gpu_is_reported_and_the_others_still_are(sys_root: Path, clock: Clock) -> None:
    fake = two_gpus_on_two_nodes()
    fake.gpus[1].lost = True
    gpus = inventory(fake, sys_root, clock)
    snapshot = gpus.snapshot()
    assert not snapshot.up
    assert snapshot.reason is not None and "GPU 1" in snapshot.reason
    assert "GPU is lost" in snapshot.reason
    assert [gpu.index for gpu in snapshot.gpus] == [0]
    assert gpus.numa_cpus_for(["0"]) == {0, 1, 2, 3}


def test_an_unexpected_exception_never_escapes(sys_root: Path, clock: Clock) -> None:
    class Broken(FakeNvml):
        def nvmlDeviceGetCount(self) -> int:
            raise RuntimeError("boom")

    snapshot = inventory(Broken(gpus=[FakeGpu("GPU-x", "00000000:01:00.0")]), sys_root, clock)
    assert snapshot.snapshot().reason == "NVML read failed: RuntimeError('boom')"


def test_real_pynvml_reports_the_machine_as_it_is() -> None:
    """Without a driver (CI): down with the reason; on a GPU machine: up with its GPUs."""
    gpus = GpuInventory()
    snapshot = gpus.snapshot()
    try:
        if snapshot.up:
            assert snapshot.gpus and snapshot.reason is None
            assert all(gpu.uuid and gpu.name for gpu in snapshot.gpus)
        else:
            assert snapshot.gpus == ()
            assert snapshot.reason is not None
            assert snapshot.reason.startswith("NVML init failed")
            assert gpus.numa_cpus_for(["0"]) is None
    finally:
        gpus.close()


def test_missing_pynvml_package_reports_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    snapshot = GpuInventory().snapshot()
    assert not snapshot.up
    assert snapshot.reason is not None and snapshot.reason.startswith("pynvml is not installed")


def test_close_shuts_nvml_down(sys_root: Path, clock: Clock) -> None:
    fake = two_gpus_on_two_nodes()
    gpus = inventory(fake, sys_root, clock)
    gpus.snapshot()
    assert fake.initialized
    gpus.close()
    assert not fake.initialized


@pytest.mark.parametrize(
    ("nvml", "sysfs"),
    [("00000000:3B:00.0", "0000:3b:00.0"), ("0001:AF:10.1", "0001:af:10.1")],
)
def test_sysfs_bus_id(nvml: str, sysfs: str) -> None:
    assert sysfs_bus_id(nvml) == sysfs


def test_sysfs_bus_id_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="bad PCI bus id"):
        sysfs_bus_id("nonsense")
