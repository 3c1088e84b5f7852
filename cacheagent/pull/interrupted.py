"""Pulls a previous agent left unfinished: found once at start, each resumed at most once.

After a hand-over the lazy volumes of a pull that was running are still mounted, and their
readers wait for its bytes, so the new agent resumes those pulls: every model the store lists
as pending when the agent starts (no pull of this process can have recorded one yet). The
reference is pinned to the recorded manifest digest, so a tag moved meanwhile does not change
the content. A model is resumed at most once: a pull that fails again (its pending record stays
while volumes hold leases on it) is not restarted by every read of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from cacheagent.pull.engine import PullEngine
from cacheagent.refs import ModelRef, parse_ref, pin_digest
from cacheagent.store import Model, Store

log = logging.getLogger(__name__)


class InterruptedPulls:
    def __init__(
        self, store: Store, engine: PullEngine, run: Callable[[ModelRef], Awaitable[Model]]
    ) -> None:
        self._store = store
        self._engine = engine
        self._run = run
        self._left: set[str] = set()  # pending at start, not resumed yet
        self._resuming: dict[str, asyncio.Future[None]] = {}

    def find(self) -> int:
        """Note the models pending now (call before anything can start a pull). Blocking."""
        self._left = {d for d in self._store.model_digests() if self._store.get_pending(d)}
        return len(self._left)

    async def resume(self, digest: str) -> bool:
        """Resume this model's pull if it is one of those found, or wait for the resumption in
        progress, until the pull has its job (its ranges can be fetched from then on). False
        when there is nothing (any more) to resume for it."""
        task = self._resuming.get(digest)
        if task is None:
            if digest not in self._left:
                return False
            self._left.discard(digest)
            task = asyncio.ensure_future(self._start(digest))
            self._resuming[digest] = task
            task.add_done_callback(lambda _: self._resuming.pop(digest, None))
        await asyncio.shield(task)
        return True

    async def resume_all(self) -> int:
        """Resume every model found; returns how many were started. Each waits for its
        manifest to resolve: run it as a task, not in the start-up path."""
        started = 0
        for digest in sorted(self._left):
            try:
                started += await self.resume(digest)
            except Exception as exc:  # noqa: BLE001  # one bad pull must not stop the others
                log.warning("cannot resume the pull of %s: %s", digest, exc)
        if started:
            log.info("resumed %d pulls a previous agent left unfinished", started)
        return started

    async def _start(self, digest: str) -> None:
        pending = await asyncio.to_thread(self._store.get_pending, digest)
        if pending is None or pending.ref is None or self._engine.progress(digest) is not None:
            return
        ref = pin_digest(parse_ref(pending.ref), digest)
        log.info("resuming the interrupted pull of %s (%s)", digest, ref)
        await self._engine.start_background(ref, run=self._run)
