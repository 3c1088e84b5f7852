"""Fixtures for end-to-end tests: a real registry holding pushed models, and a real agent
(with FUSE for lazy volumes), and a kubelet-shaped CSI client for it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cacheagent.cli.client import AgentClient
from tests.agent_process import LOOPBACK_HTTP, AgentProcess, stop_and_unmount
from tests.fault_server import FaultServer
from tests.kubelet import CSI_TIMEOUT_SECONDS, Kubelet
from tests.oci.layout_writer import write_synthetic_layout
from tests.oci.push import push_layout
from tests.registry_server import RegistryServer
from tests.support import require_fuse

MODEL_BYTES = 24 << 20
DRIVER = "model.cacheagent.io"  # the agent's default csi.driver_name
BACKOFF_SCALE = 0.02  # kubelet's 0.5 s .. 122 s backoff, scaled down to 10 ms .. 2.4 s
# Pods naming loopback URLs in lazy mode: each needs an explicit policy opt-in.
HTTP_LAZY = {
    **LOOPBACK_HTTP,
    "pod_http_hosts": ["127.0.0.1"],
    "lazy_sources": ["http"],
}
WRONG_SHA256 = hashlib.sha256(b"not these bytes").hexdigest()


@dataclass(frozen=True)
class PushedModel:
    ref: str
    digest: str
    layout: Path
    tag: str


@dataclass(frozen=True)
class Origin:
    registry: RegistryServer
    models: dict[str, PushedModel]


@pytest.fixture(scope="session")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    """One registry for the session with three small ModelPack models pushed to it."""
    work = tmp_path_factory.mktemp("origin")
    with RegistryServer(work / "registry") as registry:
        models = {}
        for seed, name in enumerate(("alpha", "beta", "gamma")):
            layout = work / f"layout-{name}"
            digest = write_synthetic_layout(layout, MODEL_BYTES, tag="v1", seed=seed, shards=2)
            asyncio.run(push_layout(layout, "v1", registry.url, f"models/{name}"))
            models[name] = PushedModel(f"{registry.host}/models/{name}:v1", digest, layout, "v1")
        yield Origin(registry, models)


@pytest.fixture
def agent(tmp_path: Path, origin: Origin) -> Iterator[AgentProcess]:
    with AgentProcess(tmp_path / "agent", insecure=(origin.registry.host,)) as running:
        yield running


@pytest.fixture
def lazy_agent(tmp_path: Path, origin: Origin) -> Iterator[AgentProcess]:
    """A real agent with FUSE on; mounts it leaves under its kubelet dir are forced off after."""
    require_fuse()
    agent = AgentProcess(tmp_path / "agent", insecure=(origin.registry.host,), fuse=True)
    try:
        yield agent.start()
    finally:
        stop_and_unmount(agent)


def kubelet(agent: AgentProcess, timeout: float = CSI_TIMEOUT_SECONDS) -> Kubelet:
    """A kubelet-shaped CSI client for ``agent``, its retry backoff scaled down."""
    return Kubelet(
        agent.csi_socket, agent.kubelet_dir, DRIVER, backoff_scale=BACKOFF_SCALE, timeout=timeout
    )


def wait_until_no_pulls(agent: AgentProcess, timeout: float = 60.0) -> None:
    """Wait until ``agent`` reports no pull in progress."""
    deadline = time.monotonic() + timeout
    with AgentClient(agent.socket) as client:
        while client.status().pulls:
            assert time.monotonic() < deadline, "the pull did not finish"
            time.sleep(0.1)


def serve_unverifiable(server: FaultServer) -> tuple[bytes, str]:
    """Serve 64 MiB of random bytes from ``server``; them, and an http ref whose sha256
    (``WRONG_SHA256``) they fail."""
    payload = os.urandom(64 << 20)
    server.add("weights.safetensors", payload)
    return payload, f"{server.url('weights.safetensors')}#sha256={WRONG_SHA256}"
