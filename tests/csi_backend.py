"""A CsiBackend for tests and the CSI benchmark: the real Store, with "pulls" the test controls.

Models are committed into a real ``cacheagent.store.Store`` (real blobs, real hard-link trees,
real leases in the real index.db); tag resolution uses the store's tag table. What is simulated
is only the origin: ``start_pull`` registers a model whose download finishes when the test says
so, and ``ensure_model`` joins that one pull however many publishes ask.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cacheagent.csi import (
    LazyModeUnavailableError,
    ModelStats,
    ReadyModel,
    StillPulling,
)
from cacheagent.digest import sha256_digest
from cacheagent.errors import PolicyDeniedError
from cacheagent.refs import ModelRef, parse_ref
from cacheagent.store import ModelFile, Store

TAG_TTL = 3600.0


def model_ref(name: str) -> str:
    return f"oci-layout:///srv/models/{name}:v1"


@dataclass
class _Pull:
    files: Mapping[str, bytes]
    release: asyncio.Event
    task: asyncio.Task[ReadyModel] | None = None


@dataclass
class StoreBackend:
    store: Store
    lazy_root: Path | None = None
    denied_namespaces: dict[str, str] = field(default_factory=dict)  # namespace -> rule
    failures: dict[str, Exception] = field(default_factory=dict)  # canonical ref -> error
    pulls: dict[str, _Pull] = field(default_factory=dict)
    pulls_started: int = 0
    waiting: int = 0  # publishes inside ensure_model's wait right now
    prefetched: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    prefetch_delay: float = 0.0
    lazy_delay: float = 0.0  # how long lazy_model_dir takes (an origin slow to resolve)
    ready: bool = True

    # ---------------------------------------------------------------- test controls

    def add_model(self, name: str, files: Mapping[str, bytes]) -> str:
        """Commit a model into the store under ``model_ref(name)``; returns its digest."""
        ref = parse_ref(model_ref(name)).canonical
        manifest = json.dumps(
            {"name": name, "files": {p: sha256_digest(b) for p, b in sorted(files.items())}},
            sort_keys=True,
        ).encode()
        digest = sha256_digest(manifest)
        entries = [
            ModelFile(path, self.store.add_blob_bytes(data), len(data))
            for path, data in files.items()
        ]
        self.store.put_model(digest, entries, ref=ref, source_kind="oci-layout", manifest=manifest)
        self.store.set_tag(ref, digest, TAG_TTL)
        return digest

    def start_pull(self, name: str, files: Mapping[str, bytes]) -> asyncio.Event:
        """Make ``name`` a model whose download completes when the returned event is set."""
        release = asyncio.Event()
        self.pulls[parse_ref(model_ref(name)).canonical] = _Pull(files, release)
        return release

    # ---------------------------------------------------------------- CsiBackend

    def store_ready(self) -> bool:
        return self.ready

    def check_mount_policy(self, namespace: str | None, ref: ModelRef) -> None:
        if namespace is not None and namespace in self.denied_namespaces:
            raise PolicyDeniedError(
                f"namespace {namespace!r} may not mount {ref}", self.denied_namespaces[namespace]
            )

    async def ensure_model(
        self, ref: ModelRef, *, wait_seconds: float
    ) -> ReadyModel | StillPulling:
        key = ref.canonical
        if key in self.failures:
            raise self.failures[key]
        digest = await asyncio.to_thread(self.store.resolve_tag, key)
        if digest is not None:
            return ReadyModel(digest, self.store.model_path(digest))
        pull = self.pulls.get(key)
        if pull is None:
            raise LookupError(f"test backend knows no model {key}")
        if pull.task is None:
            self.pulls_started += 1
            pull.task = asyncio.ensure_future(self._pull(key, pull))
        self.waiting += 1
        try:
            done, _ = await asyncio.wait({pull.task}, timeout=wait_seconds)
        finally:
            self.waiting -= 1
        if done:
            return pull.task.result()
        return StillPulling(bytes_done=1 << 20, bytes_total=4 << 20)

    async def aclose(self) -> None:
        """Cancel the simulated downloads a test left unfinished (no task outlives a test)."""
        tasks = [p.task for p in self.pulls.values() if p.task is not None and not p.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pull(self, key: str, pull: _Pull) -> ReadyModel:
        await pull.release.wait()
        name = key.rsplit("/", 1)[1].split(":", 1)[0]
        digest = await asyncio.to_thread(self.add_model, name, pull.files)
        return ReadyModel(digest, self.store.model_path(digest))

    async def lazy_model_dir(self, ref: ModelRef) -> ReadyModel:
        if self.lazy_root is None:
            raise LazyModeUnavailableError("lazy mode needs the FUSE mount, which is not serving")
        await asyncio.sleep(self.lazy_delay)
        digest = await asyncio.to_thread(self.store.resolve_tag, ref.canonical)
        if digest is None:
            raise LookupError(f"test backend knows no model {ref}")
        return ReadyModel(digest, self.lazy_root / digest.split(":", 1)[1])

    def add_lease(self, digest: str, holder: str, kind: str) -> None:
        self.store.add_lease(digest, holder, kind)

    def release_lease(self, holder: str) -> None:
        self.store.release_lease(holder)

    async def prefetch(self, digest: str, gpus: Sequence[str]) -> None:
        await asyncio.sleep(self.prefetch_delay)
        self.prefetched.append((digest, tuple(gpus)))

    def model_stats(self, digest: str) -> ModelStats:
        model = self.store.get_model(digest)
        if model is None:
            pending = self.store.get_pending(digest)
            if pending is not None:
                return ModelStats(pending.size, len(pending.files), True, "downloading", True)
            return ModelStats(0, 0, healthy=False, message=f"model {digest} is not in the store")
        root = self.store.model_path(digest)
        missing = [f.path for f in model.files if not _has_size(root / f.path, f.size)]
        dirs = sum(1 for _ in os.walk(root))
        return ModelStats(
            bytes=model.size,
            inodes=len(model.files) + dirs,
            healthy=not missing,
            message=f"missing or damaged: {', '.join(missing)}" if missing else "",
        )


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False
