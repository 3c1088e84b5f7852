"""Keep models' pages locked in RAM (mlock), within the configured and the kernel's limits."""

from __future__ import annotations

import asyncio
import resource
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cacheagent.errors import CacheAgentError
from cacheagent.memory.pagecache import (
    PAGE_SIZE,
    LockedRegion,
    expand_files,
    lock_file,
    locked_bytes_of_process,
    pages,
    unlock,
)

_CAP_IPC_LOCK = 14


class MemoryLockError(CacheAgentError):
    """A model cannot be locked in memory; ``problem`` names the limit that refused it."""

    def __init__(self, model_id: str, problem: str) -> None:
        self.model_id = model_id
        self.problem = problem
        super().__init__(f"cannot lock model {model_id!r} in memory: {problem}")


@dataclass
class _LockedModel:
    regions: list[LockedRegion]

    @property
    def nbytes(self) -> int:
        return sum(pages(region.length) * PAGE_SIZE for region in self.regions)


def _has_ipc_lock() -> bool:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    return False


def _rlimit_memlock() -> int | None:
    """The soft RLIMIT_MEMLOCK that applies to us, or None when it does not bind."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or _has_ipc_lock():
        return None
    return int(soft)


class MemoryLocker:
    """Keeps models' pages locked in RAM (mlock), up to ``limit_bytes`` in total.

    ``limit_bytes`` None means only RLIMIT_MEMLOCK applies (ignored with CAP_IPC_LOCK); 0
    disables locking. Keys are model ids (manifest digests): evict, unpin and a config change
    call :meth:`release`. Locking reads what is not resident, so it blocks; the reservation is
    taken first, so a concurrent lock cannot overshoot the limit and a release never waits.
    """

    def __init__(self, limit_bytes: int | None = None) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"limit_bytes {limit_bytes} is negative")
        self.limit_bytes = limit_bytes
        self._mutex = threading.Lock()
        self._models: dict[str, _LockedModel] = {}
        self._pending: dict[str, int] = {}
        self._released_while_pending: set[str] = set()

    @property
    def locked_bytes(self) -> int:
        with self._mutex:
            return sum(model.nbytes for model in self._models.values())

    def locked(self) -> dict[str, int]:
        """Locked bytes per model id."""
        with self._mutex:
            return {model_id: model.nbytes for model_id, model in self._models.items()}

    def lock(self, model_id: str, paths: Iterable[Path]) -> int:
        """Lock the model's files; returns its locked bytes (already locked: no-op)."""
        files = expand_files(paths)
        needed = sum(pages(path.stat().st_size) * PAGE_SIZE for path in files)
        with self._mutex:
            if model_id in self._models:
                return self._models[model_id].nbytes
            if model_id in self._pending:
                raise MemoryLockError(model_id, "it is already being locked")
            self._check_limits(model_id, needed)
            self._pending[model_id] = needed
        regions: list[LockedRegion] = []
        try:
            for path in files:
                region = lock_file(path)
                if region is not None:
                    regions.append(region)
        except OSError as exc:
            unlock(regions)
            raise MemoryLockError(model_id, f"{exc.filename}: {exc.strerror}") from exc
        finally:
            with self._mutex:
                del self._pending[model_id]
                released = model_id in self._released_while_pending
                self._released_while_pending.discard(model_id)
        if released:
            unlock(regions)
            return 0
        with self._mutex:
            self._models[model_id] = _LockedModel(regions)
        return sum(pages(region.length) * PAGE_SIZE for region in regions)

    async def lock_async(self, model_id: str, paths: Iterable[Path]) -> int:
        return await asyncio.to_thread(self.lock, model_id, list(paths))

    def release(self, model_id: str) -> int:
        """Unlock the model's pages (they stay cached, now reclaimable); returns bytes freed."""
        with self._mutex:
            model = self._models.pop(model_id, None)
            if model is None and model_id in self._pending:
                self._released_while_pending.add(model_id)
        if model is None:
            return 0
        unlock(model.regions)
        return model.nbytes

    def release_all(self) -> int:
        with self._mutex:
            ids = list(self._models)
        return sum(self.release(model_id) for model_id in ids)

    def _check_limits(self, model_id: str, needed: int) -> None:
        ours = sum(model.nbytes for model in self._models.values()) + sum(self._pending.values())
        if self.limit_bytes is not None and ours + needed > self.limit_bytes:
            raise MemoryLockError(
                model_id,
                f"needs {needed} bytes but prefetch.mlock_limit_bytes = {self.limit_bytes} "
                f"and {ours} bytes are already locked",
            )
        rlimit = _rlimit_memlock()
        if rlimit is None:
            return
        process = max(locked_bytes_of_process(), ours)
        if process + needed > rlimit:
            raise MemoryLockError(
                model_id,
                f"needs {needed} bytes but RLIMIT_MEMLOCK is {rlimit} bytes and this process "
                f"already locks {process} bytes (raise the limit or grant CAP_IPC_LOCK)",
            )
