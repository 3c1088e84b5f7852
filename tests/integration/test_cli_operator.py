"""Operator commands that need no agent: batch pull, stat --offline, config and config --check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cacheagent.config import load_config
from tests.hf_server import HfRepo, HfServer
from tests.oci.layout_writer import write_synthetic_layout
from tests.threaded import serve_in_thread


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    made = []
    for seed, size in enumerate((6 << 20, 3 << 20)):
        root = tmp_path_factory.mktemp(f"layout{seed}")
        digest = write_synthetic_layout(root, size, tag="v1", shards=2, seed=seed)
        made.append((f"oci-layout://{root}:v1", digest))
    return made


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cacheagent.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_batch_pull_times_each_model_and_goes_on_past_a_failure(
    tmp_path: Path, layouts: list[tuple[str, str]]
) -> None:
    (good1, digest1), (good2, digest2) = layouts
    missing = f"oci-layout://{tmp_path}/nowhere:v1"
    store = str(tmp_path / "store")
    result = cli("pull", good1, missing, good2, "--store-root", store, "--json")
    assert result.returncode == 1, result.stderr
    outcomes = json.loads(result.stdout)
    assert [o["ref"] for o in outcomes] == [good1, missing, good2]
    assert [o.get("digest") for o in outcomes] == [digest1, None, digest2]
    assert outcomes[1]["error"] and "nowhere" in outcomes[1]["error"]
    assert all(o["seconds"] > 0 for o in outcomes)
    listed = json.loads(cli("ls", "--offline", "--json", "--store-root", store).stdout)
    assert {m["manifest_digest"] for m in listed} == {digest1, digest2}

    text = cli("--store-root", store, "pull", missing, good1)
    assert text.returncode == 1
    assert f"{missing}: FAILED after" in text.stdout
    assert f"{good1}: {digest1}" in text.stdout
    assert "1 of 2 pulled, 1 failed" in text.stdout


def test_stat_offline_shows_the_model_from_the_store(
    tmp_path: Path, layouts: list[tuple[str, str]]
) -> None:
    ref, digest = layouts[0]
    store = tmp_path / "store"
    assert cli("--store-root", str(store), "pull", ref).returncode == 0
    result = cli("stat", ref, "--offline", "--json", "--store-root", str(store))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["manifest_digest"] == digest
    assert Path(info["path"]).is_dir()
    assert sum(f["size"] for f in info["files"]) == info["size_bytes"] >= 6 << 20
    assert info["leases"] == []
    text = cli("stat", digest[:19], "--offline", "--store-root", str(store))
    assert f"path: {info['path']}" in text.stdout
    missing = cli("stat", "sha256:" + "0" * 64, "--offline", "--store-root", str(store))
    assert missing.returncode == 1 and "no model" in missing.stderr


def test_config_prints_the_effective_config_with_sources(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("store:\n  root: /srv/cache\nagent:\n  socket_mode: 0600\n")
    result = cli(
        "config",
        "--config",
        str(path),
        "--set",
        "pull.retries=2",
        env={"CACHEAGENT_PREFETCH__WORKERS": "3"},
    )
    assert result.returncode == 0, result.stderr
    assert f"  root: /srv/cache  # file {path}" in result.stdout
    assert "  retries: 2  # --set pull.retries=2" in result.stdout
    assert "  workers: 3  # environment variable CACHEAGENT_PREFETCH__WORKERS" in result.stdout
    assert "  socket_mode: '0600'" in result.stdout
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(result.stdout)
    checked = cli("config", "--check", str(dumped))
    assert checked.returncode == 0 and checked.stdout.strip() == f"{dumped}: ok"
    assert load_config(dumped, {}, {}) == load_config(
        path, {"CACHEAGENT_PREFETCH__WORKERS": "3"}, {"pull.retries": "2"}
    )

    as_json = json.loads(cli("--json", "config", "--config", str(path)).stdout)
    assert as_json["sources"]["store.root"] == "file"
    assert as_json["sources"]["store.capacity"] == "default"
    assert yaml.safe_load(json.dumps(as_json["config"]))["agent"]["socket_mode"] == "0600"


def test_config_check_validates_a_file_alone_and_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("csi:\n  publish_wait_seconds: 3m\n")
    # The environment and a broken --config do not leak into --check.
    env = {"CACHEAGENT_PULL__RETRIES": "many"}
    result = cli("--config", "/nonexistent.yaml", "config", "--check", str(bad), env=env)
    assert result.returncode == 2
    assert "csi.publish_wait_seconds" in result.stderr
    assert "[0, 120)" in result.stderr
    assert str(bad) in result.stderr
    as_json = json.loads(cli("config", "--check", str(bad), "--json").stdout)
    assert as_json["ok"] is False and as_json["key"] == "csi.publish_wait_seconds"
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("pull:\n  max_blob_size: 1Gi\n")
    result = cli("config", "--check", str(unknown))
    assert result.returncode == 2 and "pull.max_blob_size: unknown key" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text("pull:\n  max_blob_bytes: 1Ti\n  hash_mode: final\n")
    assert cli("config", "--check", str(good), env=env).returncode == 0


def test_pull_max_blob_bytes_from_config_refuses_a_big_blob(
    tmp_path: Path, layouts: list[tuple[str, str]]
) -> None:
    ref, _ = layouts[0]
    store = str(tmp_path / "store")
    result = cli("pull", ref, "--store-root", store, "--set", "pull.max_blob_bytes=1Mi")
    assert result.returncode == 1
    assert "pull.max_blob_bytes" in result.stdout
    assert cli("pull", ref, "--store-root", store).returncode == 0


HF_TOKEN_VALUE = "hf_operator_test_token"


def test_hf_token_comes_from_hf_token_or_huggingface_hubs_token_file(tmp_path: Path) -> None:
    repo = HfRepo(
        repo_id="acme/tiny",
        commit="a" * 40,
        branches={"main": "a" * 40},
        files={"config.json": b'{"model_type": "tiny"}', "README.md": b"# tiny\n"},
    )
    hub = HfServer(token=HF_TOKEN_VALUE)
    hub.add(repo)
    with serve_in_thread(hub) as server:
        base = [
            "pull",
            "hf://acme/tiny@main",
            "--set",
            f"hf.endpoint={server.endpoint}",
            "--set",
            f"registries.insecure={server.host}",
        ]
        clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        nobody = {**clean, "HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": ""}

        def pull(store: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "cacheagent.cli.main", *base, "--store-root", store],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )

        anonymous = pull(str(tmp_path / "s1"), nobody)
        assert anonymous.returncode == 1 and "no hf token is configured" in anonymous.stdout
        from_env = pull(str(tmp_path / "s2"), {**nobody, "HF_TOKEN": HF_TOKEN_VALUE})
        assert from_env.returncode == 0, from_env.stdout + from_env.stderr
        token_file = tmp_path / "home" / ".cache" / "huggingface" / "token"
        token_file.parent.mkdir(parents=True)
        token_file.write_text(HF_TOKEN_VALUE + "\n")
        from_file = pull(str(tmp_path / "s3"), nobody)
        assert from_file.returncode == 0, from_file.stdout + from_file.stderr
        assert HF_TOKEN_VALUE not in from_file.stdout + from_file.stderr
