"""CLI operations on the store itself, for when no agent is running.

They take the store's lock like the agent does, so while an agent owns the store they fail with
a StoreLockedError that says so, instead of racing it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cacheagent.config import Config
from cacheagent.errors import CacheAgentError, ModelNotFoundError, StoreLockedError
from cacheagent.memory.pagecache import residency
from cacheagent.pull.engine import PullEngine, SourceRegistry
from cacheagent.pull.progress import PullProgress
from cacheagent.pull.tuning import tuning_from_config
from cacheagent.sources.factory import build_sources
from cacheagent.store import FsckReport, Model, Store
from cacheagent.store.lookup import find_model


@contextmanager
def open_store(config: Config) -> Iterator[Store]:
    try:
        store = Store.open_configured(config.store)
    except StoreLockedError as err:
        raise StoreLockedError(
            f"{err}; an agent is running: use the agent commands (without --offline)"
        ) from None
    try:
        yield store
    finally:
        store.close()


def _find(store: Store, text: str) -> Model:
    model = find_model(store, text)
    if model is None:
        raise ModelNotFoundError(f"no model {text!r} in the store at {store.root}")
    return model


def model_dict(model: Model) -> dict[str, Any]:
    return {
        "manifest_digest": model.digest,
        "ref": model.ref or "",
        "refs": list(model.refs),
        "size_bytes": model.size,
        "files": [{"path": f.path, "size": f.size, "blob": f.blob} for f in model.files],
        "pinned": model.pinned,
        "last_used_unix": model.last_used,
        "created_unix": model.created,
        "source_kind": model.source_kind,
    }


def offline_models(config: Config) -> list[dict[str, Any]]:
    with open_store(config) as store:
        return [model_dict(m) for m in store.list_models()]


def stat_offline(config: Config, text: str) -> dict[str, Any]:
    """What ``stat`` shows, from the store itself: the model, its path, leases and residency."""
    with open_store(config) as store:
        model = _find(store, text)
        root = store.model_path(model.digest)
        leases = store.leases(model.digest)
    resident = residency(root / f.path for f in model.files)
    return {
        **model_dict(model),
        "state": "ready",
        "path": str(root),
        "resident_bytes": resident.bytes_resident,
        "leases": [{"holder": x.holder, "kind": x.kind, "created_unix": x.created} for x in leases],
    }


def remove(config: Config, text: str, *, force: bool) -> dict[str, Any]:
    with open_store(config) as store:
        model = _find(store, text)
        freed = store.remove_model(model.digest, force=force)
    return {"manifest_digest": model.digest, "bytes_freed": freed}


def set_pinned(config: Config, text: str, pinned: bool) -> dict[str, Any]:
    with open_store(config) as store:
        model = _find(store, text)
        (store.pin if pinned else store.unpin)(model.digest)
        return model_dict(_find(store, model.digest))


def gc(config: Config, *, fsck: bool, rehash: bool) -> FsckReport:
    with open_store(config) as store:
        return store.fsck(rehash=rehash) if fsck else store.last_reconcile


@dataclass(frozen=True)
class PullOutcome:
    """One model of a batch pull: its own time, and the model or the error."""

    ref: str
    seconds: float
    model: Model | None = None
    error: CacheAgentError | None = None

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"ref": self.ref, "seconds": round(self.seconds, 3)}
        if self.model is not None:
            result |= {"digest": self.model.digest, "size": self.model.size, "error": None}
        if self.error is not None:
            result |= {"error": str(self.error), "error_type": type(self.error).__name__}
        return result


async def pull_offline(
    config: Config, refs: Sequence[str], progress: Callable[[PullProgress], None] | None = None
) -> list[PullOutcome]:
    """Pull ``refs`` into the store with the same engine the agent uses, all at once; a failed
    model does not stop the others."""
    store = await asyncio.to_thread(Store.open_configured, config.store)
    origins = build_sources(config)
    engine = PullEngine(
        store,
        SourceRegistry(origins.sources),
        config.pull,
        tuning=tuning_from_config(config.pull, tag_ttl_seconds=config.store.tag_ttl_seconds),
    )

    async def one(ref: str) -> PullOutcome:
        started = time.monotonic()
        try:
            model = await engine.pull(ref, progress=progress)
        except CacheAgentError as err:
            return PullOutcome(ref, time.monotonic() - started, error=err)
        return PullOutcome(ref, time.monotonic() - started, model=model)

    try:
        return list(await asyncio.gather(*(one(r) for r in refs)))
    finally:
        await engine.aclose()
        await origins.aclose()
        await asyncio.to_thread(store.close)
