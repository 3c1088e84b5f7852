"""SIGKILL the agent at every crash point of pull, materialize, publish, unpublish and evict.

Each case starts a real agent with ``CACHEAGENT_CRASH_AT=<point>``, drives it (preheat, CSI
publish or unpublish, evict, or a pull that must evict) until it kills itself at that point,
then checks what an operator would: the store offline (``cacheagent gc --fsck --rehash`` with
the agent stopped), then a restarted agent (store reconcile plus the CSI journal reconcile),
then the interrupted operation retried to completion. Nothing may be lost, corrupt or half
visible: no blob fails its re-hash, no ready model is broken, every mount has a journal row,
nothing leaks (mounts under the kubelet directory, leases), and a re-pull fetches from the
origin exactly the bytes that were not yet held.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from cacheagent.mountinfo import mounts_at, read_mountinfo
from cacheagent.store import Store
from cacheagent.store.crashpoints import (
    BLOB_STEPS,
    ENV_VAR,
    PUBLISH_STEPS,
    PULL_STEPS,
    REMOVE_STEPS,
    TREE_STEPS,
    UNPUBLISH_STEPS,
)
from tests.agent_process import AgentProcess
from tests.fault_server import Fault, FaultServer
from tests.faults.harness import (
    FAST_PULL,
    OK,
    LayoutModel,
    MiB,
    Rig,
    evict,
    fsck,
    fsck_fixes,
    held_bytes,
    journal,
    leases,
    make_model,
    mounts,
    open_view,
    preheat,
    preheat_ok,
    publish,
    target_path,
    unpublish,
    verify_models,
)
from tests.integration.pull_origin import ServedModel, serve_layout
from tests.threaded import ThreadedServer

pytestmark = pytest.mark.root

CAPACITY = 5 * MiB  # one model fits, two pass the high watermark: pulling B evicts A


@dataclass(frozen=True)
class Case:
    point: str
    scenario: str  # pull | publish | unpublish | evict | evict-capacity
    stall: bool = False  # hold one range open so the periodic ranges record gets written

    def __str__(self) -> str:
        return f"{self.scenario}:{self.point}"


CASES = [
    *(Case(p, "pull", stall=p == "pull.ranges_recorded") for p in PULL_STEPS),
    *(Case(p, "pull") for p in BLOB_STEPS + TREE_STEPS),
    *(Case(p, "publish") for p in PUBLISH_STEPS),
    *(Case(p, "unpublish") for p in UNPUBLISH_STEPS),
    *(Case(p, "evict") for p in REMOVE_STEPS),
    *(Case(p, "evict-capacity") for p in REMOVE_STEPS),
]


@dataclass(frozen=True)
class Models:
    a: LayoutModel
    b: LayoutModel


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    work = tmp_path_factory.mktemp("crash-models")
    return Models(make_model(work / "a", seed=1), make_model(work / "b", seed=2))


@dataclass
class World:
    """One case: the origin serving both models and the agent under test."""

    case: Case
    origin: ThreadedServer[FaultServer]
    agent: AgentProcess
    a: ServedModel
    b: ServedModel
    target: Path | None = None

    def served(self) -> dict[str, int]:
        return {**self.a.served(self.origin.server), **self.b.served(self.origin.server)}

    def sizes(self) -> dict[str, int]:
        return {**self.a.blob_sizes, **self.b.blob_sizes}


@pytest.fixture
def world(rig: Rig, models: Models, request: pytest.FixtureRequest) -> World:
    case: Case = request.param
    origin = rig.serve(FaultServer(stall_seconds=3.0))
    a = serve_layout(origin.server, models.a.path, "models/a")
    b = serve_layout(origin.server, models.b.path, "models/b")
    if case.stall:
        big = max(a.blob_sizes, key=a.blob_sizes.__getitem__)
        origin.server.inject(a.blob_paths[big], Fault("stall"))
    extra: dict[str, dict[str, Any]] = {"pull": FAST_PULL}
    if case.scenario == "evict-capacity":
        extra["store"] = {"capacity": CAPACITY}
    agent = rig.agent(insecure=(origin.host,), extra=extra, env={ENV_VAR: case.point})
    return World(case, origin, agent, a, b)


# --------------------------------------------------------------------------- the first run


def crash_pull(w: World) -> None:
    preheat(w.agent, w.a.ref)


def crash_publish(w: World) -> None:
    w.target = target_path(w.agent)
    publish(w.agent, "vol-1", w.target, w.a.ref)


def crash_unpublish(w: World) -> None:
    w.target = target_path(w.agent)
    assert publish(w.agent, "vol-1", w.target, w.a.ref) == (OK, "")
    unpublish(w.agent, "vol-1", w.target)


def crash_evict(w: World) -> None:
    preheat_ok(w.agent, w.a.ref)
    evict(w.agent, w.a.manifest_digest)


def crash_evict_capacity(w: World) -> None:
    preheat_ok(w.agent, w.a.ref)
    preheat(w.agent, w.b.ref)


FIRST_RUN: dict[str, Callable[[World], None]] = {
    "pull": crash_pull,
    "publish": crash_publish,
    "unpublish": crash_unpublish,
    "evict": crash_evict,
    "evict-capacity": crash_evict_capacity,
}


def run_until_crash(w: World, case: Case) -> None:
    point = case.point
    w.agent.start()
    with contextlib.suppress(grpc.RpcError):  # the agent died under the call (UNAVAILABLE)
        FIRST_RUN[case.scenario](w)
    proc = w.agent.proc
    assert proc is not None
    try:
        code = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the agent never reached crash point {point}:\n{w.agent.log_text()[-3000:]}")
    w.agent.stop()
    assert code == -signal.SIGKILL, f"agent exited with {code} instead of dying at {point}"


# --------------------------------------------------------------------------- checks


def csi_lease_holders(agent: AgentProcess) -> set[str]:
    return {lease.holder for lease in leases(agent) if lease.kind == "csi"}


def check_write_ahead(agent: AgentProcess) -> None:
    """A crash leaves at worst a journal row without a mount, never a mount without a row."""
    rows = journal(agent)
    for point in mounts(agent):
        assert point in rows, f"mount {point} has no journal row after the crash"


def check_offline_repair(agent: AgentProcess) -> set[str]:
    """Open the store as the next start would, then gc --fsck --rehash: nothing corrupt."""
    with Store.open(agent.store_root) as store:
        repair = store.last_reconcile
        ready = {m.digest for m in store.list_models()}
    assert repair.corrupt_blobs_removed == 0, repair.actions
    assert repair.models_reset == 0, repair.actions
    report = fsck(agent)
    assert report["corrupt_blobs_removed"] == 0, report["actions"]
    assert report["models_reset"] == 0, report["actions"]
    assert fsck_fixes(report) == 0, report["actions"]
    return ready


def check_reconciled(agent: AgentProcess) -> None:
    rows = journal(agent)
    assert set(mounts(agent)) == set(rows), "journal and mounts disagree after reconcile"
    assert csi_lease_holders(agent) == {f"csi:{v}:{t}" for t, v in rows.items()}


def check_final(agent: AgentProcess) -> None:
    report = fsck(agent)
    assert fsck_fixes(report) == 0, report["actions"]
    assert report["models_checked"] >= 1
    verify_models(agent)
    assert mounts(agent) == []
    assert leases(agent) == []
    assert journal(agent) == {}


def check_refetch(
    w: World, model: ServedModel, held: dict[str, int], at_crash: dict[str, int], was_ready: bool
) -> None:
    """The retry fetched exactly what was not held (nothing at all for a model already whole)."""
    after = w.served()
    for digest, size in model.blob_sizes.items():
        expected = 0 if was_ready else size - held[digest]
        assert after[digest] - at_crash[digest] == expected, f"blob {digest} re-fetched wrongly"


# --------------------------------------------------------------------------- the retry


def finish_pull(w: World) -> ServedModel:
    preheat_ok(w.agent, w.a.ref)
    return w.a


def finish_publish(w: World) -> ServedModel:
    assert w.target is not None
    assert publish(w.agent, "vol-1", w.target, w.a.ref) == (OK, "")
    with open_view(w.agent) as store:
        model = store.get_model(w.a.manifest_digest)
        assert model is not None
        for f in model.files:
            assert (w.target / f.path).read_bytes() == (
                store.model_path(model.digest) / f.path
            ).read_bytes()
    stacked = mounts_at(w.target, read_mountinfo())
    assert stacked and all(m.read_only for m in stacked), "the retried publish is not read-only"
    assert unpublish(w.agent, "vol-1", w.target) == (OK, "")
    return w.a


def finish_unpublish(w: World) -> ServedModel:
    assert w.target is not None
    assert unpublish(w.agent, "vol-1", w.target) == (OK, "")
    assert not w.target.exists()
    return w.a


def finish_evict(w: World) -> ServedModel:
    code, detail = evict(w.agent, w.a.manifest_digest)
    assert code in (OK, grpc.StatusCode.NOT_FOUND), detail
    with open_view(w.agent) as store:
        assert store.get_model(w.a.manifest_digest) is None
    preheat_ok(w.agent, w.a.ref)
    return w.a


def finish_evict_capacity(w: World) -> ServedModel:
    preheat_ok(w.agent, w.b.ref)
    return w.b


FINISH: dict[str, Callable[[World], ServedModel]] = {
    "pull": finish_pull,
    "publish": finish_publish,
    "unpublish": finish_unpublish,
    "evict": finish_evict,
    "evict-capacity": finish_evict_capacity,
}


@pytest.mark.parametrize("world", CASES, ids=str, indirect=True)
def test_crash_point(world: World) -> None:
    case = world.case
    run_until_crash(world, case)
    check_write_ahead(world.agent)
    held = {d: held_bytes(world.agent, d, s) for d, s in world.sizes().items()}
    ready = check_offline_repair(world.agent)
    at_crash = world.served()

    world.agent.env = {}
    world.agent.start()
    check_reconciled(world.agent)
    model = FINISH[case.scenario](world)
    check_refetch(world, model, held, at_crash, model.manifest_digest in ready)
    world.agent.stop()
    check_final(world.agent)
