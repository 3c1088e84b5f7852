"""A helper server's child process: wait until it answers (failing fast if it exits), and stop
it by PID (SIGTERM, then SIGKILL if it overstays)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable


def stop_child(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` and wait up to ``timeout`` seconds, then SIGKILL it; a process that
    is missing or already gone is left alone."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def wait_ready(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    log: Callable[[], str],
) -> None:
    """Poll ``ready`` every 50 ms until it is true; RuntimeError (with ``log``) if ``proc``
    exits first, RuntimeError if ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start: {log()}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready in {timeout}s")
