"""An ``hf://`` model pulled from a Hub-shaped server into the Hugging Face cache layout, then
found by the real ``huggingface_hub`` offline by repo name, at ``main`` and at the named
revision the reference used (the mounted-volume test is tests/e2e/test_formats_agent.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cacheagent.pull.engine import PullEngine, SourceRegistry
from cacheagent.sources.hf import HfOptions, HfSource
from cacheagent.sources.retry import RetryPolicy
from cacheagent.sources.transport import Transport, TransportOptions
from cacheagent.store import Store
from tests.fault_server import FaultServer
from tests.hf_server import HfRepo, HfServer

COMMIT = "3f2a1b4c5d6e7f8091a2b3c4d5e6f708192a3b4c"
CONFIG = b'{"model_type": "llama", "hidden_size": 64}'
TOKENIZER = b'{"version": "1.0", "model": {"type": "BPE"}}'
WEIGHTS = b"\x00" * 4096 + b"weights"

LOADER = """
import json, sys
from huggingface_hub import hf_hub_download
repo, revision = sys.argv[1], sys.argv[2]
kwargs = {"revision": revision} if revision != "-" else {}
out = {name: open(hf_hub_download(repo, name, **kwargs), "rb").read().decode()
       for name in ("config.json", "tokenizer.json")}
out["path"] = hf_hub_download(repo, "config.json", **kwargs)
print(json.dumps(out))
"""


@pytest.fixture
async def hub() -> AsyncIterator[tuple[HfServer, str]]:
    """The Hub-shaped server, and the host of its LFS CDN."""
    async with FaultServer() as cdn:
        server = HfServer(cdn=cdn)
        server.add(
            HfRepo(
                repo_id="acme/tiny",
                commit=COMMIT,
                branches={"main": COMMIT, "v1.0": COMMIT},
                files={"config.json": CONFIG, "tokenizer.json": TOKENIZER},
                lfs_files={"model.safetensors": WEIGHTS},
            )
        )
        cdn.add(f"lfs/{hashlib.sha256(WEIGHTS).hexdigest()}", WEIGHTS)
        await server.start()
        try:
            yield server, cdn.host
        finally:
            await server.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


def load(cache: Path, repo: str, revision: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(cache.parent),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
    }
    out = subprocess.run(
        [sys.executable, "-c", LOADER, repo, revision],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, str] = json.loads(out.stdout)
    return result


async def test_hf_model_in_cache_layout_loads_offline(
    hub: tuple[HfServer, str], store: Store
) -> None:
    server, cdn_host = hub
    transport = Transport(TransportOptions(insecure=frozenset({server.host, cdn_host})))
    source = HfSource(
        transport,
        options=HfOptions(endpoint=server.endpoint, retry=RetryPolicy(max_attempts=2)),
    )
    engine = PullEngine(store, SourceRegistry([source]))
    try:
        model = await engine.pull("hf://acme/tiny@v1.0|hf-cache")
    finally:
        await engine.aclose()
        await transport.aclose()
    cache = store.model_path(model.digest)
    repo = cache / "models--acme--tiny"
    assert (repo / "refs" / "main").read_text() == COMMIT
    assert (repo / "refs" / "v1.0").read_text() == COMMIT
    assert {p.name for p in (repo / "snapshots" / COMMIT).iterdir()} == {
        "config.json",
        "tokenizer.json",
        "model.safetensors",
    }
    for revision in ("-", "v1.0", COMMIT):
        found = load(cache, "acme/tiny", revision)
        assert found["config.json"] == CONFIG.decode()
        assert found["tokenizer.json"] == TOKENIZER.decode()
        assert Path(found["path"]) == repo / "snapshots" / COMMIT / "config.json"
