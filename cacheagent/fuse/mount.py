"""Mounting, serving, handing over and unmounting the filesystem: ``FuseMount``.

We speak the FUSE protocol ourselves (``protocol``, ``dispatch``, ``session``) instead of
through libfuse, so a live connection can change hands: ``detach`` stops serving without
unmounting, and ``resume`` in another process (given the ``/dev/fuse`` descriptor, kept alive
meanwhile by someone holding a duplicate, and the ``SessionState``) serves it again. Node ids
and file handles mean the same in every process (see ``nodes`` and ``fs``), and
FUSE_NOTIFY_RESEND (Linux 6.9+) makes the kernel send again what the old process had read
but not answered.

``stop()`` unmounts; if files are still open it aborts the connection (``umount -f``: readers
get ENOTCONN) and detaches the mount. There is no auto-unmount helper: a mount left by an agent
killed while nobody else held its descriptor is dead (ENOTCONN) and the next ``start()``
detaches it.

The request handlers run Python code, so this process must never touch the mount while holding
the GIL: ``read()``/``stat()`` release it and are fine, but a page fault on an ``mmap`` of a
file in the mount would wait for a handler that waits for the GIL (a deadlock). Readers live in
other processes (pods); tests that mmap do it in a subprocess.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import select
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cacheagent.fuse.dispatch import MAX_PAGES, MAX_WRITE, READ_BUFFER, Dispatcher, negotiate
from cacheagent.fuse.fs import CacheFilesystem
from cacheagent.fuse.mountops import (
    FS_NAME,
    FS_TYPE,
    MountError,
    clear_stale_mount,
    mount_fuse,
    set_read_ahead,
    unmount,
)
from cacheagent.fuse.protocol import (
    MAX_MINOR,
    MIN_MINOR,
    Notify,
    Opcode,
    ProtocolError,
    decode_init,
    decode_request,
    encode_init_out,
    encode_notify,
    encode_reply,
)
from cacheagent.fuse.provider import ContentProvider
from cacheagent.fuse.session import DeviceChannel, Session
from cacheagent.fuse.stats import FuseStats
from cacheagent.mountinfo import MountInfo, find_mount

__all__ = [
    "FS_NAME",
    "FS_TYPE",
    "FuseMount",
    "MountError",
    "MountOptions",
    "SessionState",
    "clear_stale_mount",
    "set_read_ahead",
    "unmount",
]

log = logging.getLogger(__name__)

_FUSE_MINOR = 229  # /dev/fuse is character device 10:229 (a misc device)
_DEVICE_RE = re.compile(r"^[0-9]+:[0-9]+$")


@dataclass(frozen=True)
class MountOptions:
    """How the filesystem is mounted. The defaults are what the benchmarks support."""

    read_ahead_kb: int = 8192  # the mount's readahead window; the kernel starts FUSE at 128 KiB
    allow_other: bool = True  # pods (other users) read through bind mounts of this mount
    max_threads: int = 64  # worker threads (fuse.max_threads; see fuse/waits.py)
    start_timeout_s: float = 15.0
    stop_timeout_s: float = 15.0


@dataclass(frozen=True)
class SessionState:
    """What a new process needs to resume serving a live FUSE connection (JSON-able)."""

    device: str  # "major:minor" of the mount in /proc/self/mountinfo: identifies the connection
    proto_minor: int  # the negotiated protocol minor
    max_pages: int = MAX_PAGES
    max_write: int = MAX_WRITE

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> SessionState:
        """Parse ``to_json``'s output; ValueError names the missing or bad field."""
        device = data.get("device")
        if not isinstance(device, str) or not _DEVICE_RE.match(device):
            raise ValueError(f"SessionState.device must be 'major:minor', not {device!r}")
        minor = _int_field(data, "proto_minor", MIN_MINOR, MAX_MINOR)
        pages = _int_field(data, "max_pages", 1, 0xFFFF)
        write = _int_field(data, "max_write", 4096, READ_BUFFER - 4096)
        return cls(device=device, proto_minor=minor, max_pages=pages, max_write=write)


def _check_fuse_device(fd: int) -> None:
    try:
        info = os.fstat(fd)
    except OSError as exc:
        raise MountError(f"cannot resume FUSE from fd {fd}: {exc}") from exc
    if (
        not stat.S_ISCHR(info.st_mode)
        or os.major(info.st_rdev) != 10
        or (os.minor(info.st_rdev) != _FUSE_MINOR)
    ):
        raise MountError(f"cannot resume FUSE from fd {fd}: it is not /dev/fuse")


def _int_field(data: Mapping[str, object], name: str, low: int, high: int) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(
            f"SessionState.{name} must be an integer in [{low}, {high}], not {value!r}"
        )
    return value


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
        self.fs = CacheFilesystem(provider, stats)
        self._dispatcher = Dispatcher(self.fs)
        self._session: Session | None = None
        self._state: SessionState | None = None
        self.read_ahead_kb: int | None = None  # what the mount's bdi reports after start()

    @property
    def stats(self) -> FuseStats:
        return self.fs.stats

    def start(self) -> None:
        """Mount (clearing a stale mount first) and answer the kernel's INIT; MountError.

        Not over a mount whose connection someone still holds with no server (a keeper between
        agents): the probe for a stale mount would wait for an answer; ``resume()`` that one.
        """
        self._refuse_running()
        clear_stale_mount(self.mountpoint)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise MountError(f"cannot open /dev/fuse for {self.mountpoint}: {exc}") from exc
        try:
            mount_fuse(fd, self.mountpoint, allow_other=self.options.allow_other)
            try:
                state, entry = self._answer_init(fd)
            except BaseException:
                unmount(self.mountpoint)
                raise
        except BaseException:
            os.close(fd)
            raise
        self._serve(fd, state)
        self.read_ahead_kb = set_read_ahead(entry, self.options.read_ahead_kb)
        log.info(
            "fuse: mounted at %s (bdi %s, protocol 7.%d, read_ahead_kb %s)",
            self.mountpoint,
            entry.device,
            state.proto_minor,
            self.read_ahead_kb,
        )

    def resume(self, fd: int, state: SessionState) -> None:
        """Serve a live connection whose INIT another (now dead or detached) process answered.

        Checks that /proc/self/mountinfo shows our mount at ``mountpoint`` on ``state.device``
        and raises MountError otherwise; on that error ``fd`` is still the caller's to close.
        On success this mount owns ``fd``. Requests the previous process had read but not
        answered are asked for again (FUSE_NOTIFY_RESEND); the mount point is not touched
        before the workers run (nobody would answer).
        """
        self._refuse_running()
        _check_fuse_device(fd)
        entry = find_mount(self.mountpoint)
        if entry is None or entry.fs_type != FS_TYPE or entry.device != state.device:
            found = "nothing" if entry is None else f"{entry.fs_type} on {entry.device}"
            raise MountError(
                f"cannot resume FUSE at {self.mountpoint}: expected {FS_TYPE} on "
                f"{state.device}, mountinfo shows {found}"
            )
        self._serve(fd, state)
        self._ask_resend()
        self.read_ahead_kb = set_read_ahead(entry, self.options.read_ahead_kb)
        log.info("fuse: resumed the session at %s (bdi %s)", self.mountpoint, entry.device)

    def state(self) -> SessionState:
        if self._state is None:
            raise MountError(f"FUSE at {self.mountpoint} is not being served")
        return self._state

    @property
    def device_fd(self) -> int:
        """The ``/dev/fuse`` descriptor (hand a duplicate to whoever keeps the session alive)."""
        if self._session is None:
            raise MountError(f"FUSE at {self.mountpoint} is not being served")
        return self._session.channel.fd

    def stop(self) -> None:
        """Unmount and stop serving; open files are cut off (ENOTCONN)."""
        session = self._session
        if session is None:
            return
        try:
            unmount(self.mountpoint)
        finally:
            self._end(session, self.options.stop_timeout_s)
        log.info("fuse: unmounted %s", self.mountpoint)

    def detach(self, timeout: float) -> None:
        """Hand-over: stop reading requests, answer those read for up to ``timeout`` seconds,
        close our descriptor; the mount stays. The kernel queues new requests until another
        process ``resume()``s (or aborts the connection when the last descriptor closes)."""
        session = self._session
        if session is None:
            return
        self._end(session, timeout)
        log.info("fuse: detached from %s (the mount stays)", self.mountpoint)

    def healthy(self) -> bool:
        """Serving requests and the mount is in place (for /readyz, /healthz)."""
        session = self._session
        if session is None or not session.running():
            return False
        entry = find_mount(self.mountpoint)
        return entry is not None and entry.fs_type == FS_TYPE

    def __enter__(self) -> FuseMount:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _refuse_running(self) -> None:
        if self._session is not None:
            raise MountError(f"FUSE mount at {self.mountpoint} is already being served")

    def _serve(self, fd: int, state: SessionState) -> None:
        channel = DeviceChannel(fd)
        session = Session(channel, self._dispatcher, workers=self.options.max_threads)
        session.start()
        self.fs.notifier = channel.write
        self._session = session
        self._state = state

    def _end(self, session: Session, timeout: float) -> None:
        self.fs.notifier = None
        session.stop_reading()
        session.drain(timeout)
        self.fs.release_all()
        session.channel.close(timeout)
        self._session = None
        self._state = None

    def _ask_resend(self) -> None:
        assert self._session is not None
        try:
            self._session.channel.write(encode_notify(Notify.RESEND))
        except OSError as exc:
            log.warning(
                "fuse: the kernel refused FUSE_NOTIFY_RESEND (%s; it needs Linux 6.9+): reads "
                "the previous agent had taken but not answered hang, unkillable, until the "
                "connection is aborted (unmount, or umount -f)",
                exc,
            )

    def _answer_init(self, fd: int) -> tuple[SessionState, MountInfo]:
        """Read the kernel's INIT (it comes right after mount(2)) and answer it."""
        deadline = time.monotonic() + self.options.start_timeout_s
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            if time.monotonic() >= deadline:
                raise MountError(
                    f"no FUSE INIT for {self.mountpoint} in {self.options.start_timeout_s}s"
                )
        try:
            request = decode_request(os.read(fd, READ_BUFFER))
            if request.header.opcode != Opcode.INIT:
                raise ProtocolError(f"first request is opcode {request.header.opcode}, not INIT")
            init = negotiate(decode_init(request.body), self.options.max_threads)
            os.writev(fd, encode_reply(request.header.unique, encode_init_out(init)))
        except (OSError, ProtocolError) as exc:
            raise MountError(f"FUSE INIT at {self.mountpoint} failed: {exc}") from exc
        entry = find_mount(self.mountpoint)
        if entry is None or entry.fs_type != FS_TYPE:
            raise MountError(f"mount(2) succeeded but {self.mountpoint} is not in mountinfo")
        state = SessionState(entry.device, init.minor, init.max_pages, init.max_write)
        return state, entry
