"""The FUSE kernel protocol (linux/fuse.h), the parts a read-only filesystem speaks. Pure.

Decodes the requests the kernel writes to ``/dev/fuse`` and encodes the replies and
notifications we write back. Every layout is little-endian with the kernel's padding; sizes
are checked so a short or malformed request raises ``ProtocolError`` naming what was short,
never an ``IndexError`` or a ``struct.error`` from deep inside.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

KERNEL_MAJOR = 7
MIN_MINOR = 31  # max_pages (7.28), init flags above bit 31 not needed; 7.31 is kernel 5.4
MAX_MINOR = 40  # newest minor implemented here: 7.40 added FUSE_NOTIFY_RESEND
ROOT_ID = 1
UNIQUE_RESEND = 1 << 63  # set on the unique of a request the kernel resent (7.40)

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error (negative errno, or a notify code), unique
_INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags (flags2 follows in 7.36+)
_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ... flags2, unused[7]: 64 bytes
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr: 88 bytes
_ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, nsecs
_ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy
_OPEN_IN = struct.Struct("<II")  # flags, open_flags
_OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
_READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
_RELEASE_IN = struct.Struct("<QIIQ")  # fh, flags, release_flags, lock_owner
_GETXATTR_IN = struct.Struct("<II")  # size, padding
_GETXATTR_OUT = struct.Struct("<II")  # size, padding
_KSTATFS = struct.Struct("<QQQQQIIII24x")  # blocks..ffree, bsize, namelen, frsize, pad, spare
_DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type
_BATCH_FORGET_IN = struct.Struct("<II")  # count, dummy
_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino, off, len

FOPEN_KEEP_CACHE = 1 << 1
DT_DIR = 4
DT_REG = 8


class Opcode(IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


WRITE_OPS = frozenset(
    {
        Opcode.SETATTR,
        Opcode.SYMLINK,
        Opcode.MKNOD,
        Opcode.MKDIR,
        Opcode.UNLINK,
        Opcode.RMDIR,
        Opcode.RENAME,
        Opcode.RENAME2,
        Opcode.LINK,
        Opcode.WRITE,
        Opcode.SETXATTR,
        Opcode.REMOVEXATTR,
        Opcode.CREATE,
        Opcode.FALLOCATE,
        Opcode.COPY_FILE_RANGE,
        Opcode.TMPFILE,
    }
)
NO_REPLY_OPS = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT})


class Notify(IntEnum):
    INVAL_INODE = 2
    RESEND = 7


class InitFlag:
    ASYNC_READ = 1 << 0
    PARALLEL_DIROPS = 1 << 18
    MAX_PAGES = 1 << 22


class ProtocolError(ValueError):
    """A request that does not match the FUSE layout it claims (too short, no NUL, ...)."""


@dataclass(frozen=True)
class Header:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


@dataclass(frozen=True)
class Request:
    header: Header
    body: bytes  # everything after the 40-byte header


@dataclass(frozen=True)
class InitIn:
    major: int
    minor: int
    max_readahead: int
    flags: int


@dataclass(frozen=True)
class InitOut:
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    max_pages: int


@dataclass(frozen=True)
class ReadIn:
    fh: int
    offset: int
    size: int


@dataclass(frozen=True)
class Attr:
    """``struct fuse_attr``; times in integer nanoseconds since the epoch."""

    ino: int
    mode: int
    nlink: int
    size: int
    time_ns: int
    uid: int = 0
    gid: int = 0

    @property
    def blocks(self) -> int:
        return (self.size + 511) // 512


@dataclass(frozen=True)
class StatFs:
    blocks: int
    files: int
    bsize: int
    namelen: int


@dataclass(frozen=True)
class Dirent:
    ino: int
    name: bytes
    kind: int  # DT_DIR or DT_REG


def decode_request(data: bytes) -> Request:
    if len(data) < IN_HEADER.size:
        raise ProtocolError(f"request of {len(data)} bytes is shorter than the 40-byte header")
    length, opcode, unique, nodeid, uid, gid, pid, _, _ = IN_HEADER.unpack_from(data)
    if length != len(data):
        raise ProtocolError(f"request header says {length} bytes but {len(data)} were read")
    return Request(Header(length, opcode, unique, nodeid, uid, gid, pid), data[IN_HEADER.size :])


def malformed_unique(data: bytes) -> int | None:
    """The unique of a request ``decode_request`` refused, if its header is whole."""
    if len(data) < IN_HEADER.size:
        return None
    unique: int = IN_HEADER.unpack_from(data)[2]
    return unique


def _unpack(layout: struct.Struct, body: bytes, what: str) -> tuple[int, ...]:
    if len(body) < layout.size:
        raise ProtocolError(f"{what} needs {layout.size} bytes, the request has {len(body)}")
    values: tuple[int, ...] = layout.unpack_from(body)
    return values


def decode_init(body: bytes) -> InitIn:
    major, minor, max_readahead, flags = _unpack(_INIT_IN, body, "fuse_init_in")
    return InitIn(major, minor, max_readahead, flags)


def decode_open(body: bytes) -> int:
    """The open(2) flags of an OPEN or OPENDIR request."""
    return _unpack(_OPEN_IN, body, "fuse_open_in")[0]


def decode_read(body: bytes) -> ReadIn:
    fh, offset, size, *_ = _unpack(_READ_IN, body, "fuse_read_in")
    return ReadIn(fh, offset, size)


def decode_release(body: bytes) -> int:
    """The file handle of a RELEASE or RELEASEDIR request."""
    return _unpack(_RELEASE_IN, body, "fuse_release_in")[0]


def decode_getxattr_size(body: bytes) -> int:
    return _unpack(_GETXATTR_IN, body, "fuse_getxattr_in")[0]


def decode_name(body: bytes) -> str:
    """A NUL-terminated file name (LOOKUP's only argument)."""
    end = body.find(b"\0")
    if end < 0:
        raise ProtocolError("file name is not NUL-terminated")
    return body[:end].decode("utf-8", "surrogateescape")


def decode_batch_forget_count(body: bytes) -> int:
    return _unpack(_BATCH_FORGET_IN, body, "fuse_batch_forget_in")[0]


def encode_reply(unique: int, *payload: bytes, error: int = 0) -> list[bytes]:
    """Header plus payload, ready for ``os.writev``; ``error`` is a positive errno."""
    length = OUT_HEADER.size + sum(len(part) for part in payload)
    return [OUT_HEADER.pack(length, -error, unique), *payload]


def encode_notify(code: Notify, payload: bytes = b"") -> list[bytes]:
    """A notification: unique 0 and the notify code where a reply has its error."""
    return [OUT_HEADER.pack(OUT_HEADER.size + len(payload), int(code), 0), payload]


def encode_inval_inode(nodeid: int) -> list[bytes]:
    """Drop the cached attributes and every cached page of one inode (off 0, len 0: all)."""
    return encode_notify(Notify.INVAL_INODE, _INVAL_INODE_OUT.pack(nodeid, 0, 0))


def encode_init_out(init: InitOut) -> bytes:
    return _INIT_OUT.pack(
        KERNEL_MAJOR,
        init.minor,
        init.max_readahead,
        init.flags & 0xFFFFFFFF,
        init.max_background,
        init.congestion_threshold,
        init.max_write,
        1,  # time_gran: nanosecond timestamps
        init.max_pages,
        0,  # map_alignment
        init.flags >> 32,
    )


def _split_seconds(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1_000_000_000)


def encode_attr(attr: Attr) -> bytes:
    sec, nsec = divmod(attr.time_ns, 1_000_000_000)
    return _ATTR.pack(
        attr.ino,
        attr.size,
        attr.blocks,
        sec,
        sec,
        sec,
        nsec,
        nsec,
        nsec,
        attr.mode,
        attr.nlink,
        attr.uid,
        attr.gid,
        0,  # rdev
        4096,  # blksize
        0,  # flags
    )


def encode_entry(nodeid: int, attr: Attr | None, *, entry_ttl: float, attr_ttl: float) -> bytes:
    """A LOOKUP answer; nodeid 0 with no attributes is a negative entry cached ``entry_ttl``."""
    entry_s, entry_ns = _split_seconds(entry_ttl)
    attr_s, attr_ns = _split_seconds(attr_ttl)
    attrs = encode_attr(attr) if attr is not None else bytes(_ATTR.size)
    return _ENTRY_OUT.pack(nodeid, 0, entry_s, attr_s, entry_ns, attr_ns) + attrs


def encode_attr_out(attr: Attr, ttl: float) -> bytes:
    seconds, nanos = _split_seconds(ttl)
    return _ATTR_OUT.pack(seconds, nanos, 0) + encode_attr(attr)


def encode_open(fh: int, open_flags: int) -> bytes:
    return _OPEN_OUT.pack(fh, open_flags, 0)


def encode_statfs(info: StatFs) -> bytes:
    return _KSTATFS.pack(info.blocks, 0, 0, info.files, 0, info.bsize, info.namelen, info.bsize, 0)


def encode_xattr_size(size: int) -> bytes:
    return _GETXATTR_OUT.pack(size, 0)


def dirent_size(name: bytes) -> int:
    """Bytes one entry takes in a READDIR reply: header plus name, padded to 8."""
    return (_DIRENT.size + len(name) + 7) & ~7


def encode_dirents(entries: list[Dirent], first_offset: int, limit: int) -> bytes:
    """Pack entries numbered from ``first_offset`` until ``limit`` bytes are used.

    Each entry's ``off`` is the offset of the next one, which is what the kernel passes back
    to continue the listing; so a listing needs no state on our side.
    """
    out = bytearray()
    for index, entry in enumerate(entries):
        size = dirent_size(entry.name)
        if len(out) + size > limit:
            break
        record = _DIRENT.pack(entry.ino, first_offset + index + 1, len(entry.name), entry.kind)
        out += record + entry.name + bytes(size - _DIRENT.size - len(entry.name))
    return bytes(out)
