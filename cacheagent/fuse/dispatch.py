"""From one decoded FUSE request to the bytes of its reply: the opcode table. No file I/O.

``negotiate`` answers INIT (only a fresh mount sees one); ``Dispatcher.handle`` answers
everything else by calling ``CacheFilesystem``. Opcodes not listed answer ENOSYS, which the
kernel remembers for ACCESS, FLUSH, FSYNC, POLL, LSEEK and STATX (it stops asking and does
the generic thing); write-type opcodes answer EROFS and are counted.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from cacheagent.fuse.errmap import ErrorKind
from cacheagent.fuse.fs import CacheFilesystem, FuseError
from cacheagent.fuse.protocol import (
    FOPEN_KEEP_CACHE,
    KERNEL_MAJOR,
    MAX_MINOR,
    MIN_MINOR,
    NO_REPLY_OPS,
    WRITE_OPS,
    Header,
    InitFlag,
    InitIn,
    InitOut,
    Opcode,
    ProtocolError,
    Request,
    decode_getxattr_size,
    decode_name,
    decode_open,
    decode_read,
    decode_release,
    encode_attr_out,
    encode_dirents,
    encode_entry,
    encode_open,
    encode_reply,
    encode_statfs,
    encode_xattr_size,
)

log = logging.getLogger(__name__)

MAX_PAGES = 256  # 1 MiB requests
MAX_WRITE = 4096  # nothing is written; the kernel's minimum
READ_BUFFER = 128 * 1024 + 4096  # > header + write_in + MAX_WRITE, and any name or xattr request
WANTED_FLAGS = InitFlag.ASYNC_READ | InitFlag.MAX_PAGES | InitFlag.PARALLEL_DIROPS

Payload = tuple[bytes, ...]


def negotiate(init: InitIn, max_threads: int) -> InitOut:
    """The INIT answer: protocol 7.x with x the lower of the kernel's and ours.

    ``max_background`` (the kernel's asynchronous requests, readahead, in flight) follows the
    worker count; at the kernel's default of 12, readahead of reads waiting for a stalled origin
    fills it and readahead of cached files queues behind them. No READDIRPLUS, no
    AUTO_INVAL_DATA (models are immutable), no direct_io: ``mmap(MAP_SHARED)`` must work.
    """
    if init.major != KERNEL_MAJOR or init.minor < MIN_MINOR:
        raise ProtocolError(
            f"kernel FUSE protocol {init.major}.{init.minor} is not supported "
            f"(need {KERNEL_MAJOR}.{MIN_MINOR} or newer: Linux 5.4+)"
        )
    background = max(1, min(max_threads, 0xFFFF))
    return InitOut(
        minor=min(init.minor, MAX_MINOR),
        max_readahead=init.max_readahead,
        flags=init.flags & WANTED_FLAGS,
        max_background=background,
        congestion_threshold=max(1, background * 3 // 4),
        max_write=MAX_WRITE,
        max_pages=MAX_PAGES,
    )


class Dispatcher:
    """Answers requests with ``fs``; thread-safe as ``fs`` is."""

    def __init__(self, fs: CacheFilesystem) -> None:
        self.fs = fs
        self._table: dict[int, Callable[[Header, bytes], Payload]] = {
            Opcode.LOOKUP: self._lookup,
            Opcode.GETATTR: self._getattr,
            Opcode.OPEN: self._open,
            Opcode.READ: self._read,
            Opcode.RELEASE: self._release,
            Opcode.OPENDIR: self._opendir,
            Opcode.READDIR: self._readdir,
            Opcode.RELEASEDIR: _empty,
            Opcode.STATFS: self._statfs,
            Opcode.GETXATTR: _no_xattr,
            Opcode.LISTXATTR: _listxattr,
            Opcode.DESTROY: _empty,
            Opcode.INIT: _init_again,
        }

    def handle(self, request: Request) -> list[bytes] | None:
        """The reply to write, or None for requests that take none (FORGET, INTERRUPT)."""
        header = request.header
        if header.opcode in NO_REPLY_OPS:
            return None
        try:
            if header.opcode in WRITE_OPS:
                self.fs.refuse()
            handler = self._table.get(header.opcode)
            if handler is None:
                raise FuseError(errno.ENOSYS)
            return encode_reply(header.unique, *handler(header, request.body))
        except FuseError as exc:
            return encode_reply(header.unique, error=exc.errno or errno.EIO)
        except ProtocolError as exc:
            log.error("fuse: malformed request (opcode %d): %s", header.opcode, exc)
            self.fs.stats.record_error(ErrorKind.INTERNAL)
        except Exception:  # a bug must cost one request, not the worker
            log.exception("fuse: request (opcode %d) failed", header.opcode)
            self.fs.stats.record_error(ErrorKind.INTERNAL)
        return encode_reply(header.unique, error=errno.EIO)

    def _lookup(self, header: Header, body: bytes) -> Payload:
        entry = self.fs.lookup(header.nodeid, decode_name(body))
        return (
            encode_entry(
                entry.nodeid, entry.attr, entry_ttl=entry.entry_ttl, attr_ttl=entry.attr_ttl
            ),
        )

    def _getattr(self, header: Header, body: bytes) -> Payload:
        attr, ttl = self.fs.getattr(header.nodeid)
        return (encode_attr_out(attr, ttl),)

    def _open(self, header: Header, body: bytes) -> Payload:
        fh = self.fs.open(header.nodeid, decode_open(body))
        return (encode_open(fh, FOPEN_KEEP_CACHE),)

    def _read(self, header: Header, body: bytes) -> Payload:
        request = decode_read(body)
        return (self.fs.read(header.nodeid, request.fh, request.offset, request.size),)

    def _release(self, header: Header, body: bytes) -> Payload:
        self.fs.release(decode_release(body))
        return ()

    def _opendir(self, header: Header, body: bytes) -> Payload:
        self.fs.opendir(header.nodeid)
        return (encode_open(0, 0),)  # stateless listings: no directory handle

    def _readdir(self, header: Header, body: bytes) -> Payload:
        request = decode_read(body)
        entries = self.fs.readdir(header.nodeid)[request.offset :]
        return (encode_dirents(entries, request.offset, request.size),)

    def _statfs(self, header: Header, body: bytes) -> Payload:
        return (encode_statfs(self.fs.statfs()),)


def _empty(header: Header, body: bytes) -> Payload:
    return ()


def _no_xattr(header: Header, body: bytes) -> Payload:
    raise FuseError(errno.ENODATA)


def _listxattr(header: Header, body: bytes) -> Payload:
    """No names: size 0 asks how big the list is (0); otherwise the empty list itself."""
    return (encode_xattr_size(0),) if decode_getxattr_size(body) == 0 else ()


def _init_again(header: Header, body: bytes) -> Payload:
    log.error("fuse: INIT on a running session (only a fresh mount gets one)")
    raise FuseError(errno.EPROTO)
