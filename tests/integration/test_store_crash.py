"""Crash consistency: SIGKILL a real process at each step of adding a blob, building a tree
and removing a model, then check that reopening the store repairs everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cacheagent.digest import sha256_digest
from cacheagent.store import Store
from cacheagent.store.crashpoints import BLOB_STEPS, ENV_VAR, REMOVE_STEPS, TREE_STEPS
from tests.integration.store_crash_helper import (
    BLOB,
    MODEL_FILES,
    OTHER_FILES,
    add_model,
    commit_blob,
    manifest,
)

REPO = Path(__file__).resolve().parents[2]
MODEL = manifest("model")[1]
OTHER = manifest("other")[1]


def run_until_crash(op: str, root: Path, step: str) -> None:
    env = {**os.environ, ENV_VAR: step}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.store_crash_helper", op, str(root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, (
        f"{op} did not die at {step}: rc={proc.returncode}\n{proc.stderr}"
    )


def assert_consistent(store: Store, expected: dict[str, dict[str, bytes]]) -> None:
    """Nothing half-done is visible; ``expected`` maps each model that may exist to its files."""
    report = store.fsck(rehash=True)
    assert report.clean, f"reopen left work for fsck:\n{report}"
    models_dir = store.root / "models" / "sha256"
    assert not [p for p in models_dir.iterdir() if p.name.startswith(".tmp-")]
    ready = {m.digest for m in store.list_models()}
    assert {f"sha256:{p.name}" for p in models_dir.iterdir()} == ready
    for digest in ready:
        root = store.model_path(digest)
        files = expected[digest]
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == sorted(
            files
        )
        for path, data in files.items():
            assert (root / path).read_bytes() == data
    blobs = [p for p in (store.root / "blobs" / "sha256").glob("*/*")]
    assert store.usage().used == sum(p.stat().st_size for p in blobs)
    assert store.usage().blobs == len(blobs)


@pytest.mark.parametrize("step", BLOB_STEPS)
def test_crash_while_committing_a_blob(tmp_path: Path, step: str) -> None:
    run_until_crash("blob", tmp_path, step)
    digest = sha256_digest(BLOB)
    with Store.open(tmp_path) as store:
        assert_consistent(store, {})
        blob = store.blob_path(digest)
        if store.has_blob(digest):
            assert step in ("blob.after_rename", "blob.after_dir_fsync", "blob.after_index")
            assert blob.read_bytes() == BLOB
        else:
            assert not blob.exists()
            partial = store.partial_path(digest)
            assert partial.exists()  # kept for resume, writable again
            assert os.access(partial, os.W_OK) and partial.stat().st_mode & 0o200
        commit_blob(store)
        assert store.blob_path(digest).read_bytes() == BLOB
        assert not store.partial_path(digest).exists()
        assert_consistent(store, {})


@pytest.mark.parametrize("step", TREE_STEPS)
def test_crash_while_building_a_tree(tmp_path: Path, step: str) -> None:
    run_until_crash("tree", tmp_path, step)
    with Store.open(tmp_path) as store:
        assert_consistent(store, {MODEL: MODEL_FILES})
        model = store.get_model(MODEL)
        if step == "tree.after_index":
            assert model is not None
        else:
            assert model is None
            assert not store.model_path(MODEL).exists()
        assert add_model(store, "model", MODEL_FILES) == MODEL
        assert store.get_model(MODEL) is not None
        assert_consistent(store, {MODEL: MODEL_FILES})


@pytest.mark.parametrize("step", REMOVE_STEPS)
def test_crash_while_removing_a_model(tmp_path: Path, step: str) -> None:
    with Store.open(tmp_path) as store:
        add_model(store, "model", MODEL_FILES)
        add_model(store, "other", OTHER_FILES)  # shares the vocab blob
    run_until_crash("remove", tmp_path, step)
    expected = {MODEL: MODEL_FILES, OTHER: OTHER_FILES}
    with Store.open(tmp_path) as store:
        assert_consistent(store, expected)
        assert store.get_model(MODEL) is None
        assert not store.model_path(MODEL).exists()
        assert store.get_model(OTHER) is not None
        assert store.has_blob(sha256_digest(b"shared vocab"))
        assert add_model(store, "model", MODEL_FILES) == MODEL
        assert_consistent(store, expected)


def test_helper_without_a_crash_point_finishes(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.store_crash_helper", "tree", str(tmp_path)],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != ENV_VAR},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    with Store.open(tmp_path) as store:
        assert store.get_model(MODEL) is not None
        assert_consistent(store, {MODEL: MODEL_FILES})
