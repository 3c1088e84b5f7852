"""A pull killed with SIGKILL at each of its crash points resumes from the ranges it recorded.

The pull runs in a child process against a real HTTP origin in this process; the child kills
itself at the named step (``CACHEAGENT_CRASH_AT``). A fresh engine on the same store then
finishes the pull, and the origin's byte counters show that exactly the bytes not recorded as
held were fetched again, and the model is whole and verified.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from pathlib import Path

import pytest

from cacheagent.pull.engine import PullEngine, SourceRegistry
from cacheagent.pull.partial_file import sidecar_path
from cacheagent.pull.ranges import load_sidecar
from cacheagent.store import Store
from tests.fault_server import Fault, FaultServer
from tests.integration.pull_child import CONFIG, TUNING
from tests.integration.pull_origin import registry_source, serve_layout
from tests.oci.layout_writer import LayoutEntry, write_layout

MiB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("crash-model")
    weights = os.urandom(8 * MiB)
    entries = [
        LayoutEntry("model.safetensors", weights, "raw"),
        LayoutEntry("config.json", b'{"hidden_size": 8}', "raw", "weight.config"),
    ]
    write_layout(work / "layout", entries, tag="v1")
    return work / "layout"


async def run_child(root: Path, ref: str, crash_at: str | None) -> int:
    env = dict(os.environ)
    env.pop("CACHEAGENT_CRASH_AT", None)
    if crash_at is not None:
        env["CACHEAGENT_CRASH_AT"] = crash_at
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.pull_child", str(root), ref,
        cwd=REPO_ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    if crash_at is None:
        assert proc.returncode == 0, err.decode()
    return proc.returncode


def held_bytes(store: Store, digest: str, size: int) -> int:
    if store.has_blob(digest):
        return size
    side = sidecar_path(store.partial_path(digest))
    return load_sidecar(side.read_text(), digest, size).total() if side.exists() else 0


@pytest.mark.parametrize(
    "step", ["pull.range_written", "pull.ranges_recorded", "pull.before_commit"]
)
async def test_a_killed_pull_resumes_from_what_it_recorded(
    tmp_path: Path, layout: Path, step: str
) -> None:
    root = tmp_path / "store"
    async with FaultServer(stall_seconds=3.0) as server:
        served = serve_layout(server, layout, "models/crash")
        # One range of the big blob stalls halfway, so the child is surely mid-download when
        # its first ranges record is written, however loaded the machine is.
        big = max(served.blob_sizes, key=served.blob_sizes.__getitem__)
        server.inject(served.blob_paths[big], Fault("stall"))
        code = await run_child(root, served.ref, step)
        assert code == -signal.SIGKILL, f"the child did not reach {step}"

        store = Store.open(root)
        source = registry_source()
        try:
            held = {d: held_bytes(store, d, s) for d, s in served.blob_sizes.items()}
            if step == "pull.ranges_recorded":
                assert sum(held.values()) > 0
            else:  # died before the first commit
                assert not any(store.has_blob(d) for d in held)
            if step == "pull.range_written":
                assert sum(held.values()) == 0  # written, never recorded: not trusted
            engine = PullEngine(store, SourceRegistry([source]), CONFIG, tuning=TUNING)
            model = await engine.pull(served.ref)
            # Counted by this client: the server may count bytes for the killed child's
            # connections after the kill, so its figure is not fixed.
            refetched = {d: source.received[d] for d in served.blob_sizes}
            assert refetched == {d: s - held[d] for d, s in served.blob_sizes.items()}
            assert model.digest == served.manifest_digest
            for f in model.files:
                data = (store.model_path(model.digest) / f.path).read_bytes()
                assert "sha256:" + hashlib.sha256(data).hexdigest() == f.blob
            assert sorted((root / "partial").iterdir()) == []
        finally:
            await source.aclose()
            store.close()


async def test_a_completed_child_pull_is_a_cache_hit_afterwards(
    tmp_path: Path, layout: Path
) -> None:
    root = tmp_path / "store"
    async with FaultServer() as server:
        served = serve_layout(server, layout, "models/crash")
        assert await run_child(root, served.ref, None) == 0
        before = dict(server.served)
        store = Store.open(root)
        source = registry_source()
        try:
            engine = PullEngine(store, SourceRegistry([source]), CONFIG, tuning=TUNING)
            model = await engine.pull(served.ref)
        finally:
            await source.aclose()
            store.close()
        assert model.digest == served.manifest_digest
        assert dict(server.served) == before
