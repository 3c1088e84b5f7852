"""Live progress bars for pulls and preheats (rich), one bar per model reference.

rich draws bytes, rate and ETA, and falls back to plain lines when stderr is not a terminal
(CI logs, `kubectl exec` without a tty), so the same code serves people and log files.
"""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from cacheagent.digest import short_digest
from cacheagent.pull.progress import PullProgress


class PullBars:
    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        # Off a terminal (logs, CI) rich would wrap at 80 columns; references are long.
        self._console = Console(file=sys.stderr, width=None if sys.stderr.isatty() else 140)
        self._progress = Progress(
            TextColumn("{task.description}", justify="left"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[phase]}"),
            console=self._console,
            disable=not enabled,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> PullBars:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def _task(self, ref: str) -> TaskID:
        task = self._tasks.get(ref)
        if task is None:
            task = self._progress.add_task(ref, total=None, phase="resolving")
            self._tasks[ref] = task
        return task

    def update(self, ref: str, *, done: int, total: int, phase: str) -> None:
        self._progress.update(self._task(ref), completed=done, total=total or None, phase=phase)

    def __call__(self, snap: PullProgress) -> None:
        """Use as a pull-engine progress callback."""
        self.update(snap.ref, done=snap.done_bytes, total=snap.total_bytes, phase=snap.state)

    def finish(self, ref: str, digest: str, cache_hit: bool) -> None:
        task = self._task(ref)
        total = self._progress.tasks[task].total or 0
        label = "cached" if cache_hit else "pulled"
        self._progress.update(
            task, completed=total, total=total, phase=f"{label} {short_digest(digest)}"
        )

    def fail(self, ref: str, message: str) -> None:
        self._progress.update(self._task(ref), phase="failed")
        if self.enabled:
            self._console.print(f"[red]{ref}: {message}[/red]")
