"""The agent daemon end to end: a real `cacheagent serve`, real gRPC on its unix socket, a real
registry, the real CLI."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import threading
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cacheagent._proto.cacheagent.v1 import agent_pb2 as pb
from cacheagent.cli.client import AgentCallError, AgentClient
from cacheagent.memory.pagecache import drop
from tests.agent_process import LOOPBACK_HTTP, AgentProcess
from tests.e2e.conftest import Origin
from tests.fault_server import Fault, FaultServer
from tests.support import require_binary
from tests.threaded import serve_in_thread

PHASE_ORDER = [
    pb.PreheatEvent.RESOLVING,
    pb.PreheatEvent.DOWNLOADING,
    pb.PreheatEvent.MATERIALIZING,
]


def metric(agent: AgentProcess, name: str, **labels: str) -> float:
    """The value of one sample in the agent's /metrics (0 when absent)."""
    status, text = agent.get("/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_preheat_streams_progress_in_order_then_the_digest(
    agent: AgentProcess, origin: Origin
) -> None:
    model = origin.models["alpha"]
    with AgentClient(agent.socket) as client:
        events = list(client.preheat([model.ref]))
    assert events[-1].phase == pb.PreheatEvent.DONE
    assert events[-1].manifest_digest == model.digest
    assert not events[-1].cache_hit
    phases = [e.phase for e in events[:-1]]
    ranks = [PHASE_ORDER.index(p) for p in phases if p in PHASE_ORDER]
    assert ranks == sorted(ranks), f"phases out of order: {phases}"
    done = [e.bytes_done for e in events if e.phase == pb.PreheatEvent.DOWNLOADING]
    assert done == sorted(done)
    assert events[-1].bytes_done == events[-1].bytes_total > 0

    with AgentClient(agent.socket) as client:
        again = list(client.preheat([model.ref]))
    assert again[-1].cache_hit
    assert again[-1].manifest_digest == model.digest


def test_files_in_the_store_match_the_origin(agent: AgentProcess, origin: Origin) -> None:
    model = origin.models["beta"]
    with AgentClient(agent.socket) as client:
        list(client.preheat([model.ref]))
        info = client.stat(model.ref)
    root = Path(info.path)
    assert info.manifest_digest == model.digest
    assert info.state == "ready"
    for f in info.files:
        data = (root / f.path).read_bytes()
        assert len(data) == f.size
        if not f.path.startswith("code/"):
            assert "sha256:" + hashlib.sha256(data).hexdigest() == f.blob
        assert stat.S_IMODE((root / f.path).stat().st_mode) == 0o444


def test_two_clients_preheating_at_once_share_one_pull(tmp_path: Path) -> None:
    payload = bytes(range(256)) * (96 * 1024)  # 24 MiB
    digest = hashlib.sha256(payload).hexdigest()
    with serve_in_thread(FaultServer()) as server:
        server.add("weights.bin", payload)
        ref = f"{server.url('weights.bin')}#sha256={digest}"
        loopback = {"policy": LOOPBACK_HTTP}
        with AgentProcess(tmp_path / "agent", insecure=(server.host,), extra=loopback) as agent:
            results: list[list[pb.PreheatEvent]] = []

            def preheat() -> None:
                with AgentClient(agent.socket) as client:
                    results.append(list(client.preheat([ref])))

            threads = [threading.Thread(target=preheat) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        served = server.served["weights.bin"]
    assert len(results) == 2
    assert {r[-1].phase for r in results} == {pb.PreheatEvent.DONE}
    assert len({r[-1].manifest_digest for r in results}) == 1
    assert served == len(payload), f"origin served {served} bytes for a {len(payload)}-byte blob"


def test_list_stat_pin_and_evict(agent: AgentProcess, origin: Origin) -> None:
    alpha, beta = origin.models["alpha"], origin.models["beta"]
    with AgentClient(agent.socket) as client:
        list(client.preheat([alpha.ref, beta.ref]))
        listed = {m.manifest_digest for m in client.list().models}
        assert listed == {alpha.digest, beta.digest}

        pinned = client.pin(alpha.ref)
        assert pinned.pinned
        with pytest.raises(AgentCallError) as refused:
            client.evict(alpha.digest)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "pinned" in str(refused.value)

        assert not client.unpin(alpha.digest).pinned
        freed = client.evict(alpha.digest)
        assert freed.bytes_freed > 0
        assert metric(agent, "cacheagent_evictions_total") == 1
        assert metric(agent, "cacheagent_evicted_bytes_total") == freed.bytes_freed
        assert {m.manifest_digest for m in client.list().models} == {beta.digest}
        with pytest.raises(AgentCallError) as missing:
            client.stat(alpha.digest)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND


def test_bad_and_unknown_references_get_precise_codes(agent: AgentProcess, origin: Origin) -> None:
    with AgentClient(agent.socket) as client:
        bad = list(client.preheat(["registry.example.com/Models/UPPER:v1"]))
        unknown = list(client.preheat([f"{origin.registry.host}/models/nope:v1"]))
    assert bad[-1].phase == pb.PreheatEvent.FAILED
    assert bad[-1].error_code == "INVALID_ARGUMENT"
    assert "repository" in bad[-1].error
    assert unknown[-1].error_code == "NOT_FOUND"


def test_metrics_follow_a_miss_then_a_hit_and_pass_promtool(
    agent: AgentProcess, origin: Origin
) -> None:
    model = origin.models["gamma"]
    assert metric(agent, "cacheagent_cache_misses_total", source="oci") == 0
    agent.cli("preheat", model.ref)
    assert metric(agent, "cacheagent_cache_misses_total", source="oci") == 1
    assert metric(agent, "cacheagent_cache_hits_total", source="oci") == 0
    pulled = metric(agent, "cacheagent_pull_bytes_total", source="oci")
    assert 24 << 20 <= pulled < 26 << 20
    agent.cli("preheat", model.ref)
    assert metric(agent, "cacheagent_cache_hits_total", source="oci") == 1
    assert metric(agent, "cacheagent_pull_bytes_total", source="oci") == pulled
    assert metric(agent, "cacheagent_cache_models") == 1
    assert metric(agent, "cacheagent_cache_used_bytes") >= 24 << 20
    assert metric(agent, "cacheagent_api_requests_total", method="Preheat", code="OK") == 2

    promtool = require_binary("promtool")
    text = agent.get("/metrics")[1]
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_cli_json_and_tables(agent: AgentProcess, origin: Origin) -> None:
    model = origin.models["alpha"]
    agent.cli("preheat", model.ref)
    listed = json.loads(agent.cli("ls", "--json").stdout)
    assert [m["manifest_digest"] for m in listed] == [model.digest]
    status = json.loads(agent.cli("status", "--json").stdout)
    assert status["models"] == 1
    assert status["store_root"] == str(agent.store_root)
    if not status["nvml_up"]:
        assert status["nvml_reason"], "without NVML the status must say why"
    table = agent.cli("ls").stdout
    assert model.digest.split(":")[1][:12] in table
    assert "DIGEST" in table


def test_cli_without_an_agent_names_the_socket(tmp_path: Path) -> None:
    missing = AgentProcess(tmp_path / "none")
    missing.cleanup()  # no agent: not even its socket directory
    missing.config_path.parent.mkdir(parents=True)
    missing.config_path.write_text(json.dumps(missing.config()))
    result = missing.cli("status", check=False)
    assert result.returncode == 1
    assert str(missing.socket) in result.stderr
    assert "cacheagent serve" in result.stderr


def test_sigterm_mid_pull_then_restart_resumes(tmp_path: Path) -> None:
    payload = bytes(range(256)) * (512 * 1024)  # 128 MiB: downloaded as parallel ranges
    digest = hashlib.sha256(payload).hexdigest()
    # Stalled handlers sleep past the end of the test (the server cancels them when it stops),
    # so nothing the first agent asked for is sent once it is gone.
    with serve_in_thread(FaultServer(stall_seconds=3600)) as server:
        server.add("big.bin", payload)
        ref = f"{server.url('big.bin')}#sha256={digest}"
        # Every ranged GET stalls after sending half its bytes, so the pull is mid-way for sure.
        server.inject("big.bin", Fault("stall", times=64, cut_at=0.5))
        loopback = {"policy": LOOPBACK_HTTP}
        agent = AgentProcess(tmp_path / "agent", insecure=(server.host,), extra=loopback)
        agent.start()
        try:
            progress = _preheat_until(agent, ref, min_bytes=len(payload) // 8)
            assert agent.stop() == 0, agent.log_text()[-2000:]
            server.faults.clear()
            agent.start()
            with AgentClient(agent.socket) as client:
                final = list(client.preheat([ref]))[-1]
            # What the restarted agent itself received (its counters start at zero), not what
            # the server counted as sent: bytes in flight to the stopped agent never arrived.
            refetched = sum_of(agent, "cacheagent_pull_bytes_total")
        finally:
            agent.stop()
            agent.cleanup()
    assert progress >= len(payload) // 8
    assert final.phase == pb.PreheatEvent.DONE, final.error
    assert 0 < refetched < len(payload), "the restarted pull re-fetched the whole blob"


def sum_of(agent: AgentProcess, name: str) -> float:
    """The sum of every sample of ``name`` in the agent's /metrics, whatever its labels."""
    status, text = agent.get("/metrics")
    assert status == 200
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def _preheat_until(agent: AgentProcess, ref: str, *, min_bytes: int) -> int:
    """Preheat in a background stream until ``min_bytes`` are down, then leave it running."""
    client = AgentClient(agent.socket)
    stream = client.preheat([ref])
    try:
        for event in stream:
            if event.bytes_done >= min_bytes:
                return event.bytes_done
    finally:
        client.close()
    raise AssertionError("preheat finished before the stall")


def test_preheat_with_warm_memory_brings_the_model_into_ram(
    agent: AgentProcess, origin: Origin
) -> None:
    model = origin.models["gamma"]
    with AgentClient(agent.socket) as client:
        list(client.preheat([model.ref]))
        drop([Path(client.stat(model.ref).path)])
        cold = client.stat(model.ref)
        final = list(client.preheat([model.ref], warm_memory=True))[-1]
        warm = client.stat(model.ref)
    assert final.phase == pb.PreheatEvent.DONE and final.cache_hit
    assert cold.resident_bytes < cold.size_bytes // 4
    assert final.bytes_warmed > cold.size_bytes // 2
    assert warm.resident_bytes > warm.size_bytes * 0.9
    listed = json.loads(agent.cli("ls", "--json").stdout)
    assert int(listed[0]["resident_bytes"]) == pytest.approx(warm.resident_bytes, rel=0.1)
