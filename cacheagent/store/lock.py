"""One agent per store: an exclusive flock on ``<root>/.lock`` held for the agent's lifetime.

flock belongs to the open file description, so the kernel drops it when the process dies (even
by SIGKILL): a crashed agent never leaves a stale lock. The holder writes its PID into the file
so the next one can say who has it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from cacheagent.errors import StoreLockedError


class StoreLock:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, path: Path, store_root: Path) -> StoreLock:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StoreLockedError(
                f"store {store_root} is already in use by another cacheagent (pid {holder})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the description drops the flock
        self._fd = -1


def _read_pid(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "unknown"
