"""The CLI's store-direct commands (no agent): pull, ls/pin/unpin/rm --offline, gc, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cacheagent.store import Store
from tests.agent_process import AgentProcess
from tests.oci.layout_writer import write_synthetic_layout


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("layout")
    digest = write_synthetic_layout(root, 4 << 20, tag="v1", shards=2)
    return f"oci-layout://{root}:v1", digest


def cli(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cacheagent.cli.main", "--store-root", str(store), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CACHEAGENT_AGENT__SOCKET": str(store.parent / "agent.sock")},
    )


def test_pull_then_list_pin_and_remove(tmp_path: Path, layout: tuple[str, str]) -> None:
    ref, digest = layout
    store = tmp_path / "store"
    pulled = cli(store, "pull", "--json", ref)
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)[0]["digest"] == digest

    listed = json.loads(cli(store, "ls", "--offline", "--json").stdout)
    assert [m["manifest_digest"] for m in listed] == [digest]
    assert "DIGEST" in cli(store, "ls", "--offline").stdout

    assert cli(store, "pin", "--offline", ref).returncode == 0
    refused = cli(store, "rm", "--offline", digest)
    assert refused.returncode == 1
    assert "pinned" in refused.stderr
    assert cli(store, "unpin", "--offline", digest[:19]).returncode == 0
    removed = cli(store, "rm", "--offline", "--json", digest)
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["bytes_freed"] >= 4 << 20
    assert json.loads(cli(store, "ls", "--offline", "--json").stdout) == []


def test_gc_fsck_rehash_drops_a_corrupt_blob(tmp_path: Path, layout: tuple[str, str]) -> None:
    ref, digest = layout
    store = tmp_path / "store"
    assert cli(store, "pull", ref).returncode == 0
    with Store.open(store, lock=False) as view:
        model = view.get_model(digest)
        assert model is not None
        blob = view.blob_path(model.files[0].blob)
    blob.chmod(0o644)
    blob.write_bytes(b"bit rot" + blob.read_bytes()[7:])
    report = cli(store, "gc", "--fsck", "--rehash", "--json")
    assert report.returncode == 0, report.stderr
    assert "corrupt" in report.stdout.lower()
    with Store.open(store, lock=False) as view:
        assert view.get_model(digest) is None, "a model with a corrupt blob must not stay ready"
    assert cli(store, "pull", ref).returncode == 0  # re-pulls what is missing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("pull", "oci-layout://relative/dir:v1"), "path"),
        (("pull", "registry.example.com/Models/x:v1"), "repository"),
        (("--set", "store.capacity=lots", "ls", "--offline"), "store.capacity"),
        (("--set", "nonsense", "ls", "--offline"), "KEY=VALUE"),
    ],
)
def test_usage_errors_exit_2_and_name_the_problem(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = cli(tmp_path / "store", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_offline_commands_refuse_while_an_agent_owns_the_store(tmp_path: Path) -> None:
    with AgentProcess(tmp_path / "agent") as agent:
        result = cli(agent.store_root, "ls", "--offline")
    assert result.returncode == 1
    assert "an agent is running" in result.stderr
