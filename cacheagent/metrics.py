"""Prometheus metrics for the agent.

Counters and histograms are updated where things happen (pulls, API calls, CSI operations, FUSE
reads). Figures that already live somewhere else (store usage, page-cache residency, NVML) are
read at scrape time by collectors, from snapshots the daemon refreshes off the event loop, so a
scrape never blocks on SQLite, mincore or NVML. Label sets are bounded: no label per file or per
request; per-model gauges exist only for models in the store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from cacheagent import __version__
from cacheagent.digest import short_digest

# `_created` series double every counter's output and no dashboard here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_CSI_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 20, 60)


@dataclass(frozen=True)
class StoreFigures:
    capacity_bytes: int
    used_bytes: int
    models: int
    blobs: int


@dataclass(frozen=True)
class ModelFigures:
    digest: str
    name: str
    size_bytes: int
    resident_bytes: int | None


@dataclass(frozen=True)
class GpuFigures:
    index: int
    uuid: str
    name: str
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    utilization_ratio: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None


@dataclass
class Snapshot:
    """What the scrape-time collectors report; replaced whole by the daemon's refresh task."""

    store: StoreFigures | None = None
    models: list[ModelFigures] = field(default_factory=list)
    nvml_up: bool = False
    gpus: list[GpuFigures] = field(default_factory=list)
    volumes: dict[str, int] = field(default_factory=dict)


class FuseCounts(Protocol):
    """The FUSE filesystem's own counters (``fuse.stats.FuseStatsSnapshot`` has this shape)."""

    @property
    def reads(self) -> int: ...
    @property
    def read_bytes(self) -> int: ...
    @property
    def lazy_fetched_bytes(self) -> int: ...
    @property
    def errors(self) -> Mapping[str, int]: ...


class _LiveCounters(Collector):
    """Counters that live in other threads' hands (pull engine, FUSE), read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        pulled = CounterMetricFamily(
            "cacheagent_pull_bytes", "Bytes fetched from origins.", labels=["source"]
        )
        for source, value in sorted(self._metrics.pulled_bytes().items()):
            pulled.add_metric([source], value)
        yield pulled
        models, nbytes = self._metrics.removals()
        yield CounterMetricFamily(
            "cacheagent_evictions", "Models removed from the cache (rm or eviction).", value=models
        )
        yield CounterMetricFamily(
            "cacheagent_evicted_bytes", "Bytes freed by removing models.", value=nbytes
        )
        counts = self._metrics.fuse_counts()
        if counts is None:
            return
        for name, doc, value in (
            ("cacheagent_fuse_reads", "FUSE read calls.", counts.reads),
            ("cacheagent_fuse_read_bytes", "Bytes answered by FUSE reads.", counts.read_bytes),
            (
                "cacheagent_fuse_lazy_fetched_bytes",
                "Bytes fetched on demand for FUSE reads ahead of the background pull.",
                counts.lazy_fetched_bytes,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        errors = CounterMetricFamily(
            "cacheagent_fuse_errors", "FUSE errors returned.", labels=["kind"]
        )
        for kind, value in sorted(counts.errors.items()):
            errors.add_metric([kind], value)
        yield errors


class _SnapshotCollector(Collector):
    def __init__(self, get: Callable[[], Snapshot]) -> None:
        self._get = get

    def collect(self) -> Iterator[Metric]:
        snap = self._get()
        yield from _store_metrics(snap.store)
        yield from _model_metrics(snap.models)
        yield from _gpu_metrics(snap.nvml_up, snap.gpus)
        volumes = GaugeMetricFamily(
            "cacheagent_csi_volumes", "Volumes published through CSI.", labels=["mode"]
        )
        for mode in ("bind", "lazy"):
            volumes.add_metric([mode], snap.volumes.get(mode, 0))
        yield volumes


def _store_metrics(store: StoreFigures | None) -> Iterator[Metric]:
    if store is None:
        return
    for name, doc, value in (
        ("cacheagent_cache_capacity_bytes", "Capacity of the model cache.", store.capacity_bytes),
        ("cacheagent_cache_used_bytes", "Bytes used by blobs in the cache.", store.used_bytes),
        ("cacheagent_cache_models", "Models in the cache.", store.models),
        ("cacheagent_cache_blobs", "Blobs in the cache.", store.blobs),
    ):
        yield GaugeMetricFamily(name, doc, value=value)


def _model_metrics(models: Iterable[ModelFigures]) -> Iterator[Metric]:
    size = GaugeMetricFamily(
        "cacheagent_model_size_bytes", "Size of a cached model.", labels=["digest", "name"]
    )
    resident = GaugeMetricFamily(
        "cacheagent_model_resident_bytes",
        "Bytes of a cached model resident in the page cache (mincore).",
        labels=["digest", "name"],
    )
    for model in models:
        labels = [short_digest(model.digest), model.name]
        size.add_metric(labels, model.size_bytes)
        if model.resident_bytes is not None:
            resident.add_metric(labels, model.resident_bytes)
    yield size
    yield resident


_GPU_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("memory_total_bytes", "cacheagent_gpu_memory_total_bytes", "GPU memory in total."),
    ("memory_used_bytes", "cacheagent_gpu_memory_used_bytes", "GPU memory in use."),
    ("utilization_ratio", "cacheagent_gpu_utilization_ratio", "GPU utilisation, 0 to 1."),
    ("temperature_celsius", "cacheagent_gpu_temperature_celsius", "GPU temperature."),
    ("power_watts", "cacheagent_gpu_power_watts", "GPU power draw."),
)


def _gpu_metrics(up: bool, gpus: Iterable[GpuFigures]) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "cacheagent_nvml_up", "1 when NVML answers, 0 without a GPU or driver.", value=int(up)
    )
    families = {
        attr: GaugeMetricFamily(name, doc, labels=["gpu", "uuid", "name"])
        for attr, name, doc in _GPU_FIELDS
    }
    for gpu in gpus:
        labels = [str(gpu.index), gpu.uuid, gpu.name]
        for attr, family in families.items():
            value = getattr(gpu, attr)
            if value is not None:
                family.add_metric(labels, value)
    yield from families.values()


class Metrics:
    """Every metric the agent exports, on its own registry (so tests can make several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.snapshot = Snapshot()
        reg = self.registry
        Info("cacheagent_build", "Build information.", registry=reg).info({"version": __version__})
        self.cache_hits = Counter(
            "cacheagent_cache_hits", "Requests served from the cache.", ["source"], registry=reg
        )
        self.cache_misses = Counter(
            "cacheagent_cache_misses", "Requests that needed a pull.", ["source"], registry=reg
        )
        self.pull_duration = Histogram(
            "cacheagent_pull_duration_seconds",
            "Duration of model pulls.",
            ["source", "result"],
            buckets=_DURATION_BUCKETS,
            registry=reg,
        )
        self.pulls_in_flight = Gauge(
            "cacheagent_pulls_in_flight", "Model pulls in progress.", registry=reg
        )
        self.scrubbed_bytes = Counter(
            "cacheagent_scrub_bytes", "Blob bytes re-hashed by the background scrub.", registry=reg
        )
        self.scrub_failures = Counter(
            "cacheagent_scrub_failures",
            "Blobs the scrub found corrupt (quarantined and fetched again).",
            registry=reg,
        )
        self.api_requests = Counter(
            "cacheagent_api_requests", "Agent API calls.", ["method", "code"], registry=reg
        )
        self.csi_operations = Counter(
            "cacheagent_csi_operations", "CSI calls.", ["method", "code"], registry=reg
        )
        self.csi_duration = Histogram(
            "cacheagent_csi_operation_duration_seconds",
            "Duration of CSI calls.",
            ["method"],
            buckets=_CSI_BUCKETS,
            registry=reg,
        )
        # Counters kept by the pull engine and the FUSE threads, read at scrape time.
        self.pulled_bytes: Callable[[], Mapping[str, int]] = dict
        self.removals: Callable[[], tuple[int, int]] = lambda: (0, 0)
        self.fuse_counts: Callable[[], FuseCounts | None] = lambda: None
        reg.register(_SnapshotCollector(lambda: self.snapshot))
        reg.register(_LiveCounters(self))

    def observe_csi(self, method: str, code: str, seconds: float) -> None:
        self.csi_operations.labels(method, code).inc()
        self.csi_duration.labels(method).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
