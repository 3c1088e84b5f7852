"""The soak loop shared by tests/faults/test_soak.py (100 cycles) and bench/soak.py (1,000).

Several small models, a store capacity that holds about three of four, and CSI volumes published
and unpublished in a rolling window (at most ``window`` published at once): every publish of a
model that was evicted pulls it again, and every pull beyond the high watermark evicts the least
recently used model that no volume holds. Each cycle publishes one volume (reading a file through
the mount) and unpublishes the oldest. Only UNAVAILABLE (still downloading: kubelet retries) is
an acceptable error; everything else is counted as a failure.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tests.agent_process import AgentProcess
from tests.faults.harness import (
    OK,
    LayoutModel,
    MiB,
    Rig,
    journal,
    leases,
    make_model,
    mounts,
    pid_of,
    publish,
    rss_bytes,
    target_path,
    unpublish,
)

MODEL_WEIGHT_BYTES = 1 * MiB
CAPACITY_BYTES = 3 * MiB + MiB // 2  # three models fit below the high watermark, four do not
MAX_RETRIES = 50


@dataclass
class SoakResult:
    cycles: int = 0
    publishes: int = 0
    unpublishes: int = 0
    retries: int = 0  # UNAVAILABLE answers, retried as kubelet would
    errors: Counter[str] = field(default_factory=Counter)  # any other code
    pulls: int = 0  # cache misses: first pulls and re-pulls after eviction
    rss_warm: int = 0
    rss_end: int = 0
    rss_peak: int = 0
    leaked_mounts: int = 0
    leaked_leases: int = 0
    journal_rows: int = 0
    seconds: float = 0.0
    publish_seconds: list[float] = field(default_factory=list)

    def percentile(self, p: float) -> float:
        ordered = sorted(self.publish_seconds)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def soak_models(work: Path, count: int = 4) -> list[LayoutModel]:
    return [
        make_model(work / f"model-{i}", seed=100 + i, weight_bytes=MODEL_WEIGHT_BYTES)
        for i in range(count)
    ]


def soak_agent(rig: Rig) -> AgentProcess:
    return rig.agent(extra={"store": {"capacity": CAPACITY_BYTES}}).start()


def cache_misses(agent: AgentProcess) -> int:
    _, text = agent.get("/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith("cacheagent_cache_misses_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def run_soak(
    agent: AgentProcess,
    models: Sequence[LayoutModel],
    cycles: int,
    *,
    window: int = 2,
    warmup: int = 20,
    seed: int = 0,
    on_cycle: Callable[[int, SoakResult], None] | None = None,
) -> SoakResult:
    rng = random.Random(seed)
    result = SoakResult()
    published: list[tuple[str, Path]] = []
    started = time.monotonic()
    for cycle in range(cycles):
        model = rng.choice(models)
        volume = f"vol-{cycle}"
        target = target_path(agent, f"model-{cycle}")
        if _publish(agent, result, volume, target, model):
            check_mount(target, model)
            published.append((volume, target))
        while len(published) >= window:
            _unpublish(agent, result, *published.pop(0))
        result.cycles = cycle + 1
        if cycle + 1 == warmup:
            result.rss_warm = rss_bytes(pid_of(agent))[0]
        if on_cycle is not None:
            on_cycle(cycle + 1, result)
    for volume, target in published:
        _unpublish(agent, result, volume, target)
    result.seconds = time.monotonic() - started
    result.rss_end, result.rss_peak = rss_bytes(pid_of(agent))
    result.pulls = cache_misses(agent)
    result.leaked_mounts = len(mounts(agent))
    result.leaked_leases = len(leases(agent))
    result.journal_rows = len(journal(agent))
    return result


def check_mount(target: Path, model: LayoutModel) -> None:
    assert (target / "config.json").read_bytes() == model.files["config.json"]


def _publish(
    agent: AgentProcess, result: SoakResult, volume: str, target: Path, model: LayoutModel
) -> bool:
    for _ in range(MAX_RETRIES):
        began = time.monotonic()
        code, message = publish(agent, volume, target, model.ref)
        if code == OK:
            result.publishes += 1
            result.publish_seconds.append(time.monotonic() - began)
            return True
        if code != grpc.StatusCode.UNAVAILABLE:
            result.errors[f"publish {code.name}: {message[:120]}"] += 1
            return False
        result.retries += 1
        time.sleep(0.05)
    result.errors["publish: still UNAVAILABLE after retries"] += 1
    return False


def _unpublish(agent: AgentProcess, result: SoakResult, volume: str, target: Path) -> None:
    for _ in range(MAX_RETRIES):
        code, message = unpublish(agent, volume, target)
        if code == OK:
            result.unpublishes += 1
            return
        if code != grpc.StatusCode.UNAVAILABLE:
            result.errors[f"unpublish {code.name}: {message[:120]}"] += 1
            return
        result.retries += 1
        time.sleep(0.05)
    result.errors["unpublish: still UNAVAILABLE after retries"] += 1
