"""The operator's commands against a real agent over its socket: evict, gc --dry-run, status
with a pull in flight, preheat --lock-memory, and the API socket's group and mode."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from cacheagent.cli.client import AgentClient
from tests.agent_process import LOOPBACK_HTTP, AgentProcess
from tests.e2e.conftest import Origin
from tests.fault_server import Fault, FaultServer
from tests.support import require_binary, require_root
from tests.threaded import serve_in_thread

MiB = 1 << 20


def cli_json(agent: AgentProcess, *args: str, check: bool = True) -> Any:
    result = agent.cli(*args, "--json", check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def digests(agent: AgentProcess) -> list[str]:
    return [m["manifest_digest"] for m in cli_json(agent, "ls")]


def test_gc_dry_run_and_evict_follow_capacity_eviction_rules(
    tmp_path: Path, origin: Origin
) -> None:
    alpha, beta, gamma = (origin.models[n] for n in ("alpha", "beta", "gamma"))
    store = {"capacity": "1Gi", "high_watermark": 0.9, "low_watermark": 0.5}
    agent = AgentProcess(
        tmp_path / "agent", insecure=(origin.registry.host,), extra={"store": store}
    )
    with agent:
        for model in (alpha, beta, gamma):  # least recently used first
            assert agent.cli("preheat", model.ref).returncode == 0
        assert agent.cli("pin", beta.ref).returncode == 0
        calm = cli_json(agent, "gc", "--dry-run")
        assert calm["models"] == [] and "not past the high watermark" in calm["reason"]
        agent.stop()
        # The same store under a capacity it now exceeds (3 x 24 MiB in 60 MiB).
        store["capacity"] = "60Mi"
        agent.start()

        plan = cli_json(agent, "gc", "--dry-run")
        assert isinstance(plan, dict)
        assert plan["dry_run"] and "past the high watermark" in plan["reason"]
        planned = [m["manifest_digest"] for m in plan["models"]]
        assert planned[0] == alpha.digest and beta.digest not in planned
        assert {"manifest_digest": beta.digest, "reason": "pinned"}.items() <= next(
            k for k in plan["kept"] if k["manifest_digest"] == beta.digest
        ).items()
        assert int(plan["bytes_freed"]) >= int(plan["need_bytes"]) > 0
        assert sorted(digests(agent)) == sorted(m.digest for m in (alpha, beta, gamma))
        assert "would evict" in agent.cli("gc", "--dry-run").stdout

        freed = cli_json(agent, "evict", "--free", "1")
        assert [m["manifest_digest"] for m in freed["models"]] == [alpha.digest]
        assert int(freed["bytes_freed"]) > 0
        assert sorted(digests(agent)) == sorted((beta.digest, gamma.digest))
        assert not (agent.store_root / "models" / "sha256" / alpha.digest[7:]).exists()

        preview = agent.cli("evict", "--to", "0%", "--dry-run", "--json", check=False)
        assert preview.returncode == 1  # the pinned model keeps the target out of reach
        assert [m["manifest_digest"] for m in json.loads(preview.stdout)["models"]] == [
            gamma.digest
        ]
        assert sorted(digests(agent)) == sorted((beta.digest, gamma.digest))

        emptied = agent.cli("evict", "--to", "0%", "--json", check=False)
        assert emptied.returncode == 1, "a target the pins prevent must not look met"
        reply = json.loads(emptied.stdout)
        assert [m["manifest_digest"] for m in reply["models"]] == [gamma.digest]
        assert reply["satisfied"] is False
        assert digests(agent) == [beta.digest]
        assert "pinned" in agent.cli("evict", "--to", "0%", check=False).stdout

        bad = agent.cli("evict", "--to", "150%", check=False)
        assert bad.returncode == 2 and "--to" in bad.stderr


@dataclass
class PacedServer(FaultServer):
    """Sends every body at a steady trickle (64 KiB per ``pace_seconds`` per connection), so a
    pull stays in flight with a measurable rate for as long as the test needs."""

    pace_seconds: float = 0.1

    async def _write_body(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        name: str,
        body: bytes,
        fault: Fault | None,
    ) -> web.StreamResponse:
        for offset in range(0, len(body), 64 << 10):
            piece = body[offset : offset + (64 << 10)]
            await resp.write(piece)
            self.served[name] += len(piece)
            await asyncio.sleep(self.pace_seconds)
        await resp.write_eof()
        return resp


def test_status_shows_a_pull_in_flight_with_rate_and_eta(tmp_path: Path) -> None:
    payload = bytes(range(256)) * (256 * 1024)  # 64 MiB: about 25 s at the server's pace
    digest = hashlib.sha256(payload).hexdigest()
    with serve_in_thread(PacedServer()) as server:
        server.add("big.bin", payload)
        ref = f"{server.url('big.bin')}#sha256={digest}"
        loopback = {"policy": LOOPBACK_HTTP}
        with AgentProcess(tmp_path / "agent", insecure=(server.host,), extra=loopback) as agent:
            client = AgentClient(agent.socket)
            try:
                for event in client.preheat([ref]):
                    if event.bytes_done >= 2 * MiB:
                        break
            finally:
                client.close()
            status = cli_json(agent, "status")
            text = agent.cli("status").stdout
    (pull,) = status["pulls"]
    assert pull["ref"].startswith(server.url("big.bin"))
    assert pull["state"] == "downloading"
    assert int(pull["bytes_total"]) == len(payload)
    assert len(payload) > int(pull["bytes_done"]) >= 2 * MiB
    assert float(pull["bytes_per_second"]) > 0
    assert float(pull["eta_seconds"]) > 0
    assert "pull:" in text and "/s, ETA " in text and "ETA -" not in text


def test_preheat_lock_memory_shows_as_locked_in_status(tmp_path: Path, origin: Origin) -> None:
    model = origin.models["alpha"]
    agent = AgentProcess(
        tmp_path / "agent",
        insecure=(origin.registry.host,),
        extra={"prefetch": {"mlock_limit_bytes": "256Mi"}},
    )
    with agent:
        final = cli_json(agent, "preheat", model.ref, "--lock-memory")
        assert final[0]["phase"] == "DONE"
        status = cli_json(agent, "status")
        text = agent.cli("status").stdout
    assert isinstance(status, dict)
    size = sum(f["size"] for f in cli_json_files(agent, model.digest))
    assert int(status["memory_locked_bytes"]) >= size
    assert int(status["memory_lock_limit_bytes"]) == 256 * MiB
    (entry,) = (m for m in status["memory"] if m["manifest_digest"] == model.digest)
    assert int(entry["locked_bytes"]) >= size and int(entry["resident_bytes"]) >= size
    assert "locked (limit 256.0 MiB)" in text


def cli_json_files(agent: AgentProcess, digest: str) -> list[dict[str, int]]:
    """The model's files, read offline once the agent has stopped."""
    info = cli_json(agent, "stat", digest, "--offline")
    files: list[dict[str, int]] = info["files"]
    return files


def test_the_socket_group_lets_a_non_root_member_use_the_cli(tmp_path: Path) -> None:
    require_root()
    setpriv = require_binary("setpriv")
    agent = AgentProcess(tmp_path / "agent")
    os.chmod(agent.run_dir, 0o711)  # pytest's and mkdtemp's 0700 would stop anyone else
    socket = agent.run_dir / "api" / "agent.sock"
    agent.extra = {"agent": {"socket": str(socket), "socket_group": "4242"}}

    def as_nobody(group: int, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                setpriv,
                "--reuid=65534",
                "--regid=65534",
                f"--groups={group}",
                "--",
                sys.executable,
                "-m",
                "cacheagent.cli.main",
                "--socket",
                str(socket),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HOME": "/"},
        )

    with agent:
        info = socket.stat()
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == 4242
        parent = socket.parent.stat()
        assert stat.S_IMODE(parent.st_mode) == 0o750 and parent.st_gid == 4242
        member = as_nobody(4242, "status", "--json")
        assert member.returncode == 0, member.stderr
        assert json.loads(member.stdout)["store_root"] == str(agent.store_root)
        stranger = as_nobody(4243, "status")
        assert stranger.returncode == 1
        assert f"permission denied on {socket}" in stranger.stderr
        assert "agent.socket_group" in stranger.stderr and "Traceback" not in stranger.stderr
        agent.stop()
        agent.extra = {"agent": {**agent.extra["agent"], "socket_mode": "0600"}}
        agent.start()
        assert stat.S_IMODE(socket.stat().st_mode) == 0o600
        refused = as_nobody(4242, "status")
        assert refused.returncode == 1
        assert f"permission denied on {socket}" in refused.stderr
