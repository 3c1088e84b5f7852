"""Fixtures for end-to-end tests: a real registry holding pushed models, and a real agent."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agent_process import AgentProcess
from tests.oci.layout_writer import write_synthetic_layout
from tests.oci.push import push_layout
from tests.registry_server import RegistryServer

MODEL_BYTES = 24 << 20


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
