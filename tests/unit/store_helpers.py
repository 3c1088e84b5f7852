"""Small builders shared by the store tests (real files, real SQLite)."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

from cacheagent.digest import sha256_digest
from cacheagent.store import Model, ModelFile, Store


def manifest_for(name: str) -> tuple[bytes, str]:
    data = json.dumps({"schemaVersion": 2, "name": name}).encode()
    return data, sha256_digest(data)


def add_model(store: Store, name: str, files: dict[str, bytes], *, ref: str | None = None) -> Model:
    """Commit each file's bytes as a blob, then materialise the model."""
    records = [
        ModelFile(path, store.add_blob_bytes(data), len(data)) for path, data in files.items()
    ]
    manifest, digest = manifest_for(name)
    return store.put_model(digest, records, ref=ref, source_kind="oci", manifest=manifest)


def write_partial(store: Store, data: bytes) -> tuple[str, Path]:
    digest = sha256_digest(data)
    path = store.partial_path(digest)
    path.write_bytes(data)
    return digest, path


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def set_blob_created(root: Path, digest: str, created: float) -> None:
    """Age a blob row (the store must be closed): there is no clock to inject."""
    conn = sqlite3.connect(root / "index.db")
    with conn:
        conn.execute("UPDATE blobs SET created = ? WHERE digest = ?", (created, digest))
    conn.close()


def set_last_used(root: Path, digest: str, last_used: float) -> None:
    """Set a model's last access (the store must be closed)."""
    conn = sqlite3.connect(root / "index.db")
    with conn:
        conn.execute("UPDATE models SET last_used = ? WHERE digest = ?", (last_used, digest))
    conn.close()


def visible_blobs(root: Path) -> dict[str, Path]:
    """Every file under blobs/, by the digest its name claims."""
    return {f"sha256:{p.name}": p for p in (root / "blobs" / "sha256").glob("*/*") if p.is_file()}
