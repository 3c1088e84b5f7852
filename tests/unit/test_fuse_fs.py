"""CacheFilesystem and the opcode dispatcher called directly (no mount), over real directories."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from cacheagent.errors import DigestMismatchError
from cacheagent.fuse import nodes
from cacheagent.fuse.directory import DirectoryProvider
from cacheagent.fuse.dispatch import MAX_PAGES, Dispatcher, negotiate
from cacheagent.fuse.fs import MODEL_TTL_S, ROOT_TTL_S, CacheFilesystem
from cacheagent.fuse.nodes import node_id
from cacheagent.fuse.protocol import (
    IN_HEADER,
    OUT_HEADER,
    ROOT_ID,
    WRITE_OPS,
    InitFlag,
    InitIn,
    Opcode,
    ProtocolError,
    Request,
    decode_request,
)
from cacheagent.fuse.provider import ModelListing
from cacheagent.fuse.stats import FuseStats

MODEL = "sha256:" + "ab" * 32


class CountingProvider(DirectoryProvider):
    """A DirectoryProvider that counts listings and can be told to misbehave."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.listings = 0
        self.released: list[int] = []
        self.read_error: Exception | None = None
        self.truncate_reads = False

    def listing(self, digest: str) -> ModelListing:
        self.listings += 1
        return super().listing(digest)

    def read(self, handle: int, offset: int, size: int) -> bytes:
        if self.read_error is not None:
            raise self.read_error
        data = super().read(handle, offset, size)
        return data[:-1] if self.truncate_reads else data

    def release(self, handle: int) -> None:
        self.released.append(handle)
        super().release(handle)


@pytest.fixture
def provider(tmp_path: Path) -> CountingProvider:
    top = tmp_path / MODEL
    (top / "weights").mkdir(parents=True)
    (top / "weights" / "w.bin").write_bytes(bytes(range(256)) * 40)
    (top / "config.json").write_text("{}")
    (top / "link").symlink_to("/etc/passwd")
    return CountingProvider(tmp_path)


@pytest.fixture
def fs(provider: CountingProvider) -> CacheFilesystem:
    return CacheFilesystem(provider, FuseStats())


def _walk(fs: CacheFilesystem, path: str) -> int:
    nodeid = ROOT_ID
    for name in path.split("/"):
        nodeid = fs.lookup(nodeid, name).nodeid
    return nodeid


def _errno_of(call: Callable[[], object]) -> int:
    with pytest.raises(OSError) as raised:
        call()
    assert raised.value.errno is not None
    return raised.value.errno


def _names(fs: CacheFilesystem, nodeid: int) -> list[str]:
    return [entry.name.decode() for entry in fs.readdir(nodeid)]


def test_metadata_comes_from_the_listing_and_is_cached(
    fs: CacheFilesystem, provider: CountingProvider
) -> None:
    assert _names(fs, ROOT_ID) == [".", "..", MODEL]
    root, root_ttl = fs.getattr(ROOT_ID)
    assert (root.nlink, root_ttl) == (3, ROOT_TTL_S)
    model = fs.lookup(ROOT_ID, MODEL)
    assert model.nodeid == node_id(MODEL, "")
    assert (model.entry_ttl, model.attr_ttl) == (ROOT_TTL_S, MODEL_TTL_S)  # models come and go
    assert _names(fs, model.nodeid) == [".", "..", "config.json", "weights"]  # no symlink
    weights = _walk(fs, f"{MODEL}/weights/w.bin")
    attr, ttl = fs.getattr(weights)
    assert (attr.size, attr.ino, ttl) == (10240, weights, MODEL_TTL_S)
    assert stat.S_ISREG(attr.mode) and stat.S_IMODE(attr.mode) == 0o444
    assert stat.S_ISDIR(fs.getattr(_walk(fs, f"{MODEL}/weights"))[0].mode)
    assert provider.listings == 1
    fs.forget(MODEL)
    fs.lookup(ROOT_ID, MODEL)
    assert provider.listings == 2


def test_a_new_process_answers_for_node_ids_it_never_issued(provider: CountingProvider) -> None:
    first = CacheFilesystem(provider)
    weights = _walk(first, f"{MODEL}/weights")
    file = _walk(first, f"{MODEL}/weights/w.bin")
    second = CacheFilesystem(provider, rebuild_interval_s=3600)  # the next agent: no lookups
    assert [e.name for e in second.readdir(weights)][2:] == [b"w.bin"]
    assert second.getattr(file)[0].size == 10240
    listings = provider.listings
    assert _errno_of(lambda: second.getattr(12345)) == errno.ESTALE  # unknown after a rebuild
    assert provider.listings == listings  # one rebuild per burst, not one per unknown id
    fh = 0x1234
    assert second.read(file, fh, 0, 4) == bytes(range(4))  # adopts the old process's handle
    assert second.open_handles == 1
    second.release(fh)
    assert second.open_handles == 0
    second.release(0x999)  # a handle only the old process had: nothing to close


def test_unknown_node_ids_reload_the_models_at_most_once_per_interval(
    provider: CountingProvider,
) -> None:
    eager = CacheFilesystem(provider, rebuild_interval_s=0)
    assert _errno_of(lambda: eager.getattr(12345)) == errno.ESTALE
    assert _errno_of(lambda: eager.getattr(12346)) == errno.ESTALE
    assert provider.listings == 1  # the tree stays cached; each miss asked for the model list
    eager.forget(MODEL)
    assert _errno_of(lambda: eager.getattr(12347)) == errno.ESTALE
    assert provider.listings == 2


def test_missing_names_are_enoent_and_not_counted_as_errors(fs: CacheFilesystem) -> None:
    model = fs.lookup(ROOT_ID, MODEL).nodeid
    assert _errno_of(lambda: fs.lookup(model, "nope")) == errno.ENOENT
    assert _errno_of(lambda: fs.lookup(ROOT_ID, "sha256:unknown")) == errno.ENOENT
    assert _errno_of(lambda: fs.lookup(ROOT_ID, "..")) == errno.ENOENT
    assert _errno_of(lambda: fs.lookup(model, "link")) == errno.ENOENT
    config = fs.lookup(model, "config.json").nodeid
    assert _errno_of(lambda: fs.lookup(config, "x")) == errno.ENOTDIR
    assert _errno_of(lambda: fs.readdir(config)) == errno.ENOTDIR
    assert _errno_of(lambda: fs.opendir(config)) == errno.ENOTDIR
    assert fs.stats.snapshot().errors == {}


def test_reads_are_clamped_to_the_file_and_counted(
    fs: CacheFilesystem, provider: CountingProvider
) -> None:
    file = _walk(fs, f"{MODEL}/weights/w.bin")
    fh = fs.open(file, os.O_RDONLY)
    assert fs.open_handles == 1
    assert 0 < fh < 1 << 63
    assert fs.read(file, fh, 10200, 100) == (bytes(range(256)) * 40)[10200:]
    assert fs.read(file, fh, 10240, 100) == b""
    assert fs.read(file, fh, 99999, 100) == b""
    fs.release(fh)
    assert len(provider.released) == 1
    assert fs.open_handles == 0
    snap = fs.stats.snapshot()
    assert (snap.reads, snap.read_bytes) == (1, 40)


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC])
def test_opening_for_writing_is_erofs(fs: CacheFilesystem, flags: int) -> None:
    config = _walk(fs, f"{MODEL}/config.json")
    assert _errno_of(lambda: fs.open(config, flags)) == errno.EROFS
    assert fs.stats.snapshot().errors == {"read_only": 1}


def test_opening_a_directory_is_eisdir(fs: CacheFilesystem) -> None:
    weights = _walk(fs, f"{MODEL}/weights")
    assert _errno_of(lambda: fs.open(weights, os.O_RDONLY)) == errno.EISDIR
    assert _errno_of(lambda: fs.open(ROOT_ID, os.O_RDONLY)) == errno.EISDIR


def test_provider_read_failures_become_eio_and_are_counted(
    fs: CacheFilesystem, provider: CountingProvider
) -> None:
    file = _walk(fs, f"{MODEL}/weights/w.bin")
    fh = fs.open(file, os.O_RDONLY)
    provider.read_error = DigestMismatchError("sha256:a", "sha256:b")
    assert _errno_of(lambda: fs.read(file, fh, 0, 10)) == errno.EIO
    provider.read_error = RuntimeError("bug")
    assert _errno_of(lambda: fs.read(file, fh, 0, 10)) == errno.EIO
    provider.read_error = None
    provider.truncate_reads = True  # a short answer would read as end-of-file: refuse it
    assert _errno_of(lambda: fs.read(file, fh, 0, 10)) == errno.EIO
    assert fs.stats.snapshot().errors == {"verify": 1, "internal": 1, "io": 1}
    fs.release(fh)


def test_statfs_reports_the_models_as_used_space(fs: CacheFilesystem) -> None:
    info = fs.statfs()
    assert info.blocks == 3  # 10242 bytes in 4 KiB blocks
    assert (info.bsize, info.namelen) == (4096, 255)
    assert info.files == 1 + 4  # mount root + model dir, weights dir, two files


def test_invalidate_without_a_session_is_false(fs: CacheFilesystem) -> None:
    assert fs.invalidate(MODEL, "config.json") is False
    sent: list[list[bytes]] = []
    fs.notifier = sent.append
    assert fs.invalidate(MODEL, "config.json") is True
    header = OUT_HEADER.unpack(sent[0][0])
    assert header == (16 + 24, 2, 0)  # FUSE_NOTIFY_INVAL_INODE, unique 0
    assert int.from_bytes(sent[0][1][:8], "little") == node_id(MODEL, "config.json")


# -- the dispatcher -----------------------------------------------------------------------------


def _request(opcode: int, nodeid: int = ROOT_ID, body: bytes = b"", unique: int = 7) -> Request:
    length = IN_HEADER.size + len(body)
    return decode_request(IN_HEADER.pack(length, opcode, unique, nodeid, 0, 0, 0, 0, 0) + body)


def _error_of(reply: list[bytes] | None) -> int:
    assert reply is not None
    error: int = OUT_HEADER.unpack(reply[0])[1]
    return -error


def test_every_write_type_opcode_is_erofs_and_counted(fs: CacheFilesystem) -> None:
    dispatcher = Dispatcher(fs)
    errors = [_error_of(dispatcher.handle(_request(op))) for op in sorted(WRITE_OPS)]
    assert errors == [errno.EROFS] * len(WRITE_OPS)
    assert fs.stats.snapshot().errors == {"read_only": len(WRITE_OPS)}


def test_xattrs_forgets_and_unknown_opcodes(fs: CacheFilesystem) -> None:
    dispatcher = Dispatcher(fs)
    size0 = (0).to_bytes(4, "little") * 2
    assert _error_of(dispatcher.handle(_request(Opcode.GETXATTR, body=size0 + b"user.a\0"))) == (
        errno.ENODATA
    )
    probe = dispatcher.handle(_request(Opcode.LISTXATTR, body=size0))
    assert probe is not None and _error_of(probe) == 0 and probe[1] == bytes(8)  # size 0
    listing = dispatcher.handle(_request(Opcode.LISTXATTR, body=(64).to_bytes(4, "little") * 2))
    assert listing is not None and OUT_HEADER.unpack(listing[0])[0] == 16  # the empty list
    assert dispatcher.handle(_request(Opcode.FORGET, body=bytes(8))) is None
    assert dispatcher.handle(_request(Opcode.INTERRUPT, body=bytes(8))) is None
    for opcode in (Opcode.ACCESS, Opcode.FLUSH, Opcode.POLL, Opcode.LSEEK, Opcode.STATX, 4095):
        assert _error_of(dispatcher.handle(_request(opcode))) == errno.ENOSYS
    assert _error_of(dispatcher.handle(_request(Opcode.LOOKUP, body=b"no-nul"))) == errno.EIO
    assert fs.stats.snapshot().errors == {"internal": 1}  # the malformed LOOKUP


def test_a_resent_request_is_answered_with_its_own_unique(fs: CacheFilesystem) -> None:
    unique = (1 << 63) | 42  # FUSE_UNIQUE_RESEND
    reply = Dispatcher(fs).handle(_request(Opcode.GETATTR, body=bytes(16), unique=unique))
    assert reply is not None
    length, error, echoed = OUT_HEADER.unpack(reply[0])
    assert (error, echoed, length) == (0, unique, 16 + 104)


def test_init_negotiation() -> None:
    kernel = InitIn(7, 45, 131072, InitFlag.ASYNC_READ | InitFlag.MAX_PAGES | 1 << 13)
    answer = negotiate(kernel, max_threads=64)
    assert answer.minor == 40  # the newest we implement
    assert answer.flags == InitFlag.ASYNC_READ | InitFlag.MAX_PAGES  # no READDIRPLUS
    assert (answer.max_background, answer.congestion_threshold) == (64, 48)
    assert (answer.max_pages, answer.max_readahead) == (MAX_PAGES, 131072)
    assert negotiate(InitIn(7, 33, 0, 0), 16).minor == 33
    with pytest.raises(ProtocolError, match=r"7\.30 is not supported"):
        negotiate(InitIn(7, 30, 0, 0), 64)


def test_a_path_whose_node_id_clashes_answers_eio(
    fs: CacheFilesystem, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(nodes, "node_id", lambda model, relpath: 43 if relpath else 42)
    model = fs.lookup(ROOT_ID, MODEL).nodeid
    assert model == 42
    assert _errno_of(lambda: fs.lookup(model, "weights")) == errno.EIO  # a file took 43 first
    assert "clashes with" in caplog.text
    assert fs.stats.snapshot().errors == {"io": 1}
