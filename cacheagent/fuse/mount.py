"""Mounting and unmounting the filesystem: ``FuseMount``.

mfusepy's ``FUSE(...)`` call runs libfuse's multi-threaded loop until the mount goes away, so it
runs in a background thread; ``start()`` returns once the kernel's INIT has been answered and the
mount is in /proc/self/mountinfo. Two process-wide side effects of libfuse 3 to know about:

* ``fuse_main`` does ``chdir("/")`` before its loop (what daemons do): ``start()`` puts the
  working directory back, but use absolute paths anyway;
* it installs SIGTERM/SIGHUP/SIGINT handlers that unmount, but only where the handler is still
  the default. The daemon should install its own SIGTERM handler (and call ``stop()`` from it);
  either order works, since a handler installed later simply replaces libfuse's.

``stop()`` unmounts; if files are still open it aborts the FUSE connection (``umount -f``: readers
get ENOTCONN, which is what they would get once the agent exits anyway) and detaches the mount.
With ``auto_unmount`` (the default) libfuse's helper, fusermount3, unmounts when the agent dies
without calling ``stop()``; a mount left behind anyway (SIGKILL without auto_unmount, a crashed
helper) answers ENOTCONN and is detached by the next ``start()``.

The FUSE callbacks run Python code, so this process must never touch the mount while holding the
GIL: ``read()``/``stat()`` release it and are fine, but a page fault on an ``mmap`` of a file in
the mount would wait for a callback that waits for the GIL (a deadlock). Readers live in other
processes (pods); tests that mmap do it in a subprocess.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from cacheagent.errors import CacheAgentError
from cacheagent.fuse.fs import CacheFilesystem
from cacheagent.fuse.libfuse import FUSE
from cacheagent.fuse.provider import ContentProvider
from cacheagent.fuse.stats import FuseStats
from cacheagent.mountinfo import MountInfo, find_mount

log = logging.getLogger(__name__)

FS_NAME = "cacheagent"
FS_TYPE = f"fuse.{FS_NAME}"
BDI_ROOT = Path("/sys/class/bdi")
_POLL_S = 0.01
_UNMOUNT_TIMEOUT_S = 10.0
_MAX_STACKED = 8  # stale mounts detached at one start (one per crash without auto_unmount)


class MountError(CacheAgentError):
    """The FUSE filesystem could not be mounted or unmounted; the message names the mount point."""


@dataclass(frozen=True)
class MountOptions:
    """How the filesystem is mounted. The defaults are what the benchmarks support."""

    read_ahead_kb: int = 8192  # the mount's readahead window; the kernel starts FUSE at 128 KiB
    allow_other: bool = True  # pods (other users) read through bind mounts of this mount
    auto_unmount: bool = True  # fusermount3 unmounts if the agent dies without unmounting
    max_threads: int = 64  # libfuse worker threads (fuse.max_threads; see fuse/waits.py)
    clone_fd: bool = True  # one /dev/fuse descriptor per worker thread
    start_timeout_s: float = 15.0
    stop_timeout_s: float = 15.0

    def fuse_kwargs(self) -> dict[str, object]:
        """Keyword arguments for mfusepy's ``FUSE``; ``False`` options are left out by mfusepy.

        ``max_read`` is left unset (unlimited): libfuse 3 then offers the kernel 1 MiB requests
        (max_pages 256). No ``direct_io``: it makes ``mmap(MAP_SHARED)`` fail with ENODEV.
        """
        return {
            "foreground": True,
            "nothreads": False,
            "ro": True,
            "kernel_cache": True,
            "default_permissions": True,
            "allow_other": self.allow_other,
            "auto_unmount": self.auto_unmount,
            "fsname": FS_NAME,
            "subtype": FS_NAME,
            "max_threads": self.max_threads,
            "max_idle_threads": self.max_threads,  # keep them: no thread churn under load
            "clone_fd": self.clone_fd,
        }


class FuseMount:
    """One mount of ``CacheFilesystem`` at ``mountpoint`` (an absolute path)."""

    def __init__(
        self,
        mountpoint: Path,
        provider: ContentProvider,
        *,
        stats: FuseStats | None = None,
        options: MountOptions | None = None,
    ) -> None:
        if not mountpoint.is_absolute():
            raise ValueError(f"FUSE mount point must be an absolute path: {mountpoint}")
        self.mountpoint = mountpoint.parent.resolve() / mountpoint.name
        self.options = options if options is not None else MountOptions()
        self._ready = threading.Event()
        self.fs = CacheFilesystem(
            provider, stats, on_init=self._ready.set, max_background=self.options.max_threads
        )
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.read_ahead_kb: int | None = None  # what the mount's bdi reports after start()

    @property
    def stats(self) -> FuseStats:
        return self.fs.stats

    def start(self) -> None:
        """Mount (clearing a stale mount first) and wait until the filesystem answers."""
        if self._thread is not None and self._thread.is_alive():
            raise MountError(f"FUSE mount at {self.mountpoint} is already running")
        clear_stale_mount(self.mountpoint)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        cwd = _getcwd()
        self._ready.clear()
        self._failure = None
        self._thread = threading.Thread(target=self._serve, name="cacheagent-fuse", daemon=True)
        self._thread.start()
        try:
            entry = self._wait_mounted()
        except BaseException:
            self._teardown()
            raise
        finally:
            if cwd is not None:
                os.chdir(cwd)
        self.read_ahead_kb = set_read_ahead(entry, self.options.read_ahead_kb)
        log.info(
            "fuse: mounted at %s (bdi %s, read_ahead_kb %s)",
            self.mountpoint,
            entry.device,
            self.read_ahead_kb,
        )

    def stop(self) -> None:
        """Unmount and wait for the FUSE thread; open files are cut off (ENOTCONN)."""
        if self._thread is None:
            return
        self._teardown()
        self._thread = None
        log.info("fuse: unmounted %s", self.mountpoint)

    def healthy(self) -> bool:
        """The FUSE loop is running and the mount is in place (for /readyz)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or not self._ready.is_set():
            return False
        entry = find_mount(self.mountpoint)
        return entry is not None and entry.fs_type == FS_TYPE

    def __enter__(self) -> FuseMount:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self) -> None:
        try:
            FUSE(self.fs, str(self.mountpoint), **self.options.fuse_kwargs())
        except Exception as exc:  # noqa: BLE001  # start() reports it; the thread must not die loud
            self._failure = exc
            log.error("fuse: the FUSE loop for %s ended with an error: %s", self.mountpoint, exc)

    def _wait_mounted(self) -> MountInfo:
        assert self._thread is not None
        deadline = time.monotonic() + self.options.start_timeout_s
        while time.monotonic() < deadline:
            if self._ready.is_set():
                entry = find_mount(self.mountpoint)
                if entry is not None and entry.fs_type == FS_TYPE:
                    return entry
            if not self._thread.is_alive():
                raise MountError(f"mounting FUSE at {self.mountpoint} failed: {self._failure}")
            time.sleep(_POLL_S)
        raise MountError(
            f"FUSE mount at {self.mountpoint} not ready after {self.options.start_timeout_s}s"
        )

    def _teardown(self) -> None:
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive():
            unmount(self.mountpoint)
        thread.join(self.options.stop_timeout_s)
        _end_unmount_helper(self.mountpoint)
        if thread.is_alive():
            raise MountError(
                f"FUSE loop for {self.mountpoint} still running {self.options.stop_timeout_s}s "
                "after unmount"
            )


def unmount(mountpoint: Path) -> None:
    """Unmount a FUSE mount; when it is busy, abort its connection and detach it."""
    if find_mount(mountpoint) is None:
        return
    if _run_umount(mountpoint):
        return
    _run_umount(mountpoint, "-f")  # aborts the FUSE connection even when busy
    if find_mount(mountpoint) is not None and not _run_umount(mountpoint, "-l"):
        raise MountError(f"cannot unmount {mountpoint}")


def clear_stale_mount(mountpoint: Path) -> None:
    """Detach dead FUSE mounts left at ``mountpoint`` by crashes; refuse a live one."""
    for _ in range(_MAX_STACKED):
        entry = find_mount(mountpoint)
        if entry is None:
            return
        try:
            mountpoint.stat()
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
            log.warning("fuse: detaching stale mount at %s left by a previous agent", mountpoint)
            if not (_run_umount(mountpoint, "-l") or _run_fusermount(mountpoint)):
                raise MountError(f"cannot detach the stale mount at {mountpoint}") from exc
            continue
        raise MountError(
            f"{mountpoint} is already a live {entry.fs_type} mount (is another agent running?)"
        )
    raise MountError(f"more than {_MAX_STACKED} stale mounts stacked at {mountpoint}")


def set_read_ahead(entry: MountInfo, read_ahead_kb: int) -> int | None:
    """Set the mount's readahead window; returns what the kernel reports (None if unknown).

    The kernel gives a FUSE mount a 128 KiB window whatever libfuse asks for, and a sequential
    reader (a model loader) is only as fast as the window lets the kernel read ahead.
    """
    knob = BDI_ROOT / entry.device / "read_ahead_kb"
    try:
        knob.write_text(f"{read_ahead_kb}\n")
        return int(knob.read_text())
    except (OSError, ValueError) as exc:
        log.warning("fuse: cannot set %s to %d: %s", knob, read_ahead_kb, exc)
        try:
            return int(knob.read_text())
        except (OSError, ValueError):
            return None


def _end_unmount_helper(mountpoint: Path) -> None:
    """End the fusermount3 that libfuse started for ``auto_unmount`` once we have unmounted.

    libfuse keeps that helper (a child of this process) waiting until the process exits, so each
    start/stop cycle would leave one behind; the mount is gone, so it has nothing left to do.
    """
    for child in psutil.Process().children():
        try:
            if child.name() != "fusermount3" or child.cmdline()[-1:] != [str(mountpoint)]:
                continue
            child.kill()  # it ignores SIGTERM
            child.wait(_UNMOUNT_TIMEOUT_S)
        except psutil.Error as exc:
            log.warning("fuse: cannot end the fusermount3 helper of %s: %s", mountpoint, exc)


def _run_umount(mountpoint: Path, *flags: str) -> bool:
    binary = shutil.which("umount") or "/usr/bin/umount"
    done = subprocess.run(
        [binary, *flags, str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=_UNMOUNT_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        log.info("fuse: umount %s %s: %s", " ".join(flags), mountpoint, done.stderr.strip())
    return done.returncode == 0


def _run_fusermount(mountpoint: Path) -> bool:
    binary = shutil.which("fusermount3")
    if binary is None:
        return False
    done = subprocess.run(
        [binary, "-u", "-z", str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=_UNMOUNT_TIMEOUT_S,
        check=False,
    )
    return done.returncode == 0


def _getcwd() -> Path | None:
    try:
        return Path.cwd()
    except FileNotFoundError:
        return None
