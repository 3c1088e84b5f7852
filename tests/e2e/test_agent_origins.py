"""The origin settings as an operator sets them, proven on a running `cacheagent serve`: proxies
from the node's environment, a mounted docker config Secret that rotates under the agent, and a
rate limit's wait shown to the preheat client (``PreheatEvent.waiting``)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
from pathlib import Path

from cacheagent._proto.cacheagent.v1 import agent_pb2 as pb
from cacheagent.cli.client import AgentClient
from tests.agent_process import AgentProcess
from tests.fault_server import Fault, FaultServer
from tests.integration.pull_origin import serve_layout
from tests.oci.layout_writer import write_synthetic_layout
from tests.oci_push import Artifact, OciPusher, modelpack_artifact
from tests.proxy_server import TinyProxy
from tests.registry_server import BasicAuth, RegistryServer
from tests.threaded import serve_in_thread

PASSWORD = "e2e-Registry-Secret-0451"
MODEL_BYTES = 2 << 20


def kubelet_secret(directory: Path, generation: int, host: str, password: str) -> Path:
    """Write ``.dockerconfigjson`` as the kubelet updates a mounted Secret (atomic ``..data``
    symlink swap); returns the path the agent is configured with."""
    directory.mkdir(exist_ok=True)
    version = directory / f"..gen{generation}"
    version.mkdir()
    auth = base64.b64encode(f"alice:{password}".encode()).decode()
    (version / ".dockerconfigjson").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    staged = directory / "..data_tmp"
    staged.symlink_to(version.name)
    os.replace(staged, directory / "..data")
    link = directory / ".dockerconfigjson"
    if not link.is_symlink():
        link.symlink_to("..data/.dockerconfigjson")
    return link


async def push_private(registry: RegistryServer, artifact: Artifact) -> str:
    async with OciPusher(registry.url, username="alice", password=PASSWORD) as pusher:
        return await pusher.push("models/private", artifact, "v1")


def test_rotated_secret_and_environment_proxy(tmp_path: Path) -> None:
    artifact = modelpack_artifact({"model.safetensors": random.Random(7).randbytes(MODEL_BYTES)})
    with (
        RegistryServer(tmp_path / "registry", basic=BasicAuth("alice", PASSWORD)) as registry,
        TinyProxy(tmp_path / "proxy") as proxy,
    ):
        digest = asyncio.run(push_private(registry, artifact))
        secret = kubelet_secret(tmp_path / "secret", 1, registry.host, "expired-" + PASSWORD)
        agent = AgentProcess(
            tmp_path / "agent",
            insecure=(registry.host,),
            extra={"registries": {"docker_config": str(secret)}},
            env={"HTTP_PROXY": proxy.url, "NO_PROXY": "example.invalid"},
        )
        ref = f"{registry.host}/models/private:v1"
        with agent, AgentClient(agent.socket) as client:
            refused = list(client.preheat([ref]))[-1]
            assert refused.phase == pb.PreheatEvent.FAILED, refused
            assert "rejected" in refused.error and PASSWORD not in refused.error
            kubelet_secret(tmp_path / "secret", 2, registry.host, PASSWORD)
            events = list(client.preheat([ref]))
        assert events[-1].phase == pb.PreheatEvent.DONE
        assert events[-1].manifest_digest == digest
        assert f"GET http://{registry.host}/v2/models/private/" in proxy.log_text()
        assert PASSWORD not in agent.log_text()


def test_a_rate_limit_wait_reaches_the_preheat_client(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_synthetic_layout(layout, MODEL_BYTES, tag="v1", seed=8, shards=1)
    with serve_in_thread(FaultServer()) as registry:
        served = serve_layout(registry, layout, "models/limited")
        big = max(served.blob_sizes, key=lambda d: served.blob_sizes[d])
        registry.inject(served.blob_paths[big], Fault("status", status=429, retry_after="2"))
        agent = AgentProcess(
            tmp_path / "agent",
            insecure=(registry.host,),
            extra={"pull": {"rate_limit_max_wait_seconds": 10}},
        )
        with agent, AgentClient(agent.socket) as client:
            events = list(client.preheat([served.ref]))
    assert events[-1].phase == pb.PreheatEvent.DONE
    waits = [e.waiting for e in events if e.waiting]
    assert waits, [pb.PreheatEvent.Phase.Name(e.phase) for e in events]
    assert registry.host in waits[0] and "HTTP 429" in waits[0] and "asked us to wait" in waits[0]
