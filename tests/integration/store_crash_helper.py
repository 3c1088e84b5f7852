"""Runs one store operation in a child process so a test can SIGKILL it mid-way.

``python -m tests.integration.store_crash_helper OP ROOT`` with ``CACHEAGENT_CRASH_AT`` set to a
crash point (see cacheagent/store/crashpoints.py): the process kills itself at that step.
Exit status 0 means the operation finished without reaching the crash point.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cacheagent.digest import sha256_digest
from cacheagent.store import ModelFile, Store

BLOB = b"blob bytes " * 1000
MODEL_FILES = {
    "config.json": b'{"arch": "test"}',
    "weights/model.safetensors": b"W" * 50_000,
    "tokenizer/vocab.txt": b"shared vocab",
}
OTHER_FILES = {"vocab.txt": b"shared vocab"}


def manifest(name: str) -> tuple[bytes, str]:
    data = json.dumps({"name": name}).encode()
    return data, sha256_digest(data)


def add_model(store: Store, name: str, files: dict[str, bytes]) -> str:
    records = [ModelFile(p, store.add_blob_bytes(b), len(b)) for p, b in files.items()]
    data, digest = manifest(name)
    store.put_model(digest, records, ref=f"test/{name}:v1", source_kind="oci", manifest=data)
    return digest


def commit_blob(store: Store) -> None:
    digest = sha256_digest(BLOB)
    partial = store.partial_path(digest)
    partial.write_bytes(BLOB)
    store.commit_blob(digest, len(BLOB), partial)


def main(op: str, root: Path) -> None:
    with Store.open(root) as store:
        if op == "blob":
            commit_blob(store)
        elif op == "tree":
            add_model(store, "model", MODEL_FILES)
        elif op == "remove":
            store.remove_model(manifest("model")[1])
        else:
            raise SystemExit(f"unknown operation {op!r}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
