"""CacheFilesystem's callbacks called directly (no mount), over real directories."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from cacheagent.errors import DigestMismatchError
from cacheagent.fuse.directory import DirectoryProvider
from cacheagent.fuse.fs import CacheFilesystem
from cacheagent.fuse.libfuse import mfusepy
from cacheagent.fuse.mount import MountOptions
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


def _errno_of(call: Callable[[], object]) -> int:
    with pytest.raises(OSError) as raised:
        call()
    assert raised.value.errno is not None
    return raised.value.errno


def test_metadata_comes_from_the_listing_and_is_cached(
    fs: CacheFilesystem, provider: CountingProvider
) -> None:
    assert fs.readdir("/", 0) == [".", "..", MODEL]
    assert fs.getattr("/")["st_nlink"] == 3
    assert fs.readdir(f"/{MODEL}", 0) == [".", "..", "config.json", "weights"]  # no symlink
    attrs = fs.getattr(f"/{MODEL}/weights/w.bin")
    assert attrs["st_size"] == 10240
    assert stat.S_ISREG(attrs["st_mode"])
    assert stat.S_ISDIR(fs.getattr(f"/{MODEL}/weights")["st_mode"])
    assert provider.listings == 1
    fs.forget(MODEL)
    fs.getattr(f"/{MODEL}")
    assert provider.listings == 2


def test_missing_names_are_enoent_and_not_counted_as_errors(fs: CacheFilesystem) -> None:
    assert _errno_of(lambda: fs.getattr(f"/{MODEL}/nope")) == errno.ENOENT
    assert _errno_of(lambda: fs.getattr("/sha256:unknown")) == errno.ENOENT
    assert _errno_of(lambda: fs.getattr(f"/{MODEL}/link")) == errno.ENOENT
    assert _errno_of(lambda: fs.readdir(f"/{MODEL}/config.json", 0)) == errno.ENOTDIR
    assert fs.stats.snapshot().errors == {}


def test_reads_are_clamped_to_the_file_and_counted(
    fs: CacheFilesystem, provider: CountingProvider
) -> None:
    fh = fs.open(f"/{MODEL}/weights/w.bin", os.O_RDONLY)
    assert fs.open_handles == 1
    assert fs.read("", 100, 10200, fh) == (bytes(range(256)) * 40)[10200:]
    assert fs.read("", 100, 10240, fh) == b""
    assert fs.read("", 100, 99999, fh) == b""
    fs.release("", fh)
    assert provider.released == [fh]
    assert fs.open_handles == 0
    snap = fs.stats.snapshot()
    assert (snap.reads, snap.read_bytes) == (1, 40)
    assert _errno_of(lambda: fs.read("", 10, 0, fh)) == errno.EBADF


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC])
def test_opening_for_writing_is_erofs(fs: CacheFilesystem, flags: int) -> None:
    assert _errno_of(lambda: fs.open(f"/{MODEL}/config.json", flags)) == errno.EROFS
    assert fs.stats.snapshot().errors == {"read_only": 1}


def test_opening_a_directory_is_eisdir(fs: CacheFilesystem) -> None:
    assert _errno_of(lambda: fs.open(f"/{MODEL}/weights", os.O_RDONLY)) == errno.EISDIR
    assert _errno_of(lambda: fs.open("/", os.O_RDONLY)) == errno.EISDIR


def test_every_write_type_callback_is_erofs(fs: CacheFilesystem) -> None:
    p = f"/{MODEL}/config.json"
    calls: list[Callable[[], object]] = [
        lambda: fs.write(p, b"x", 0, 1),
        lambda: fs.create(p, 0o644, os.O_WRONLY),
        lambda: fs.mkdir(f"/{MODEL}/d", 0o755),
        lambda: fs.mknod(f"/{MODEL}/n", 0o644, 0),
        lambda: fs.rmdir(f"/{MODEL}/weights"),
        lambda: fs.unlink(p),
        lambda: fs.rename(p, p + ".old"),
        lambda: fs.link(p + ".hard", p),
        lambda: fs.symlink(p + ".soft", "config.json"),
        lambda: fs.chmod(p, 0o777),
        lambda: fs.chown(p, 1, 1),
        lambda: fs.truncate(p, 0),
        lambda: fs.utimens(p, (1, 1)),
        lambda: fs.fallocate(p, 0, 0, 10, 1),
        lambda: fs.setxattr(p, "user.a", b"1", 0),
        lambda: fs.removexattr(p, "user.a"),
    ]
    assert [_errno_of(call) for call in calls] == [errno.EROFS] * len(calls)
    assert fs.stats.snapshot().errors == {"read_only": len(calls)}
    assert _errno_of(lambda: fs.getxattr(p, "user.a")) == errno.ENODATA
    assert fs.listxattr(p) == []


def test_provider_read_failures_become_eio_and_are_counted(
    fs: CacheFilesystem, provider: CountingProvider
) -> None:
    fh = fs.open(f"/{MODEL}/weights/w.bin", os.O_RDONLY)
    provider.read_error = DigestMismatchError("sha256:a", "sha256:b")
    assert _errno_of(lambda: fs.read("", 10, 0, fh)) == errno.EIO
    provider.read_error = RuntimeError("bug")
    assert _errno_of(lambda: fs.read("", 10, 0, fh)) == errno.EIO
    provider.read_error = None
    provider.truncate_reads = True  # a short answer would read as end-of-file: refuse it
    assert _errno_of(lambda: fs.read("", 10, 0, fh)) == errno.EIO
    assert fs.stats.snapshot().errors == {"verify": 1, "internal": 1, "io": 1}
    fs.release("", fh)


def test_statfs_reports_the_models_as_used_space(fs: CacheFilesystem) -> None:
    info = fs.statfs("/")
    assert info["f_blocks"] == 3  # 10242 bytes in 4 KiB blocks
    assert (info["f_bfree"], info["f_bavail"], info["f_namemax"]) == (0, 0, 255)
    assert info["f_files"] == 1 + 4  # mount root + model dir, weights dir, two files


def test_only_the_intended_fuse_operations_are_registered(fs: CacheFilesystem) -> None:
    """mfusepy wires every attribute named after a FUSE operation; nothing may slip in."""
    names = {field[0] for field in mfusepy.fuse_operations._fields_}
    wired = {
        name
        for name in names
        if (value := getattr(fs, name, None)) is not None
        and not getattr(value, "libfuse_ignore", False)
    }
    writes = {"write", "create", "mkdir", "mknod", "rmdir", "unlink", "rename", "link",
              "symlink", "chmod", "chown", "truncate", "utimens", "fallocate", "setxattr",
              "removexattr"}  # fmt: skip
    reads = {"getattr", "readdir", "statfs", "getxattr", "listxattr", "open", "read", "release"}
    lifecycle = {"destroy"}  # forgets libfuse's session before libfuse frees it
    assert wired == writes | reads | lifecycle


def test_mount_options_never_use_direct_io_and_are_read_only() -> None:
    kwargs = MountOptions().fuse_kwargs()
    assert "direct_io" not in kwargs
    assert kwargs["ro"] is True
    assert kwargs["kernel_cache"] is True
    assert kwargs["auto_unmount"] is True
    assert kwargs["nothreads"] is False
    assert kwargs["fsname"] == kwargs["subtype"] == "cacheagent"
