"""The FUSE filesystem through real mounts: bytes, metadata, lazy reads, mmap, EROFS, lifecycle."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cacheagent.fuse.directory import DirectoryProvider
from cacheagent.fuse.mount import FS_TYPE, FuseMount, MountError, MountOptions, unmount
from cacheagent.fuse.stats import FuseStats
from cacheagent.mountinfo import find_mount
from tests.files import MiB, fake_digest, write_random_file
from tests.fuse_support import LazyTestProvider, running
from tests.support import require_fuse

REPO = Path(__file__).resolve().parents[2]
DIGEST = fake_digest("model-a")


@pytest.fixture(autouse=True)
def _fuse() -> None:
    require_fuse()


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    yield path
    unmount(path)  # a safety net: every test stops its own mount


@pytest.fixture
def model_root(tmp_path: Path) -> Path:
    """A model directory the way the store lays one out: ``<root>/<digest>/<path>``."""
    model = tmp_path / "models" / DIGEST
    write_random_file(model / "weights" / "model.safetensors", 24 * MiB + 12345, seed=1)
    write_random_file(model / "weights" / "extra.bin", 3 * MiB, seed=2)
    (model / "config.json").write_text('{"hidden_size": 8}\n')
    (model / "run.sh").write_text("#!/bin/sh\n")
    (model / "run.sh").chmod(0o755)
    return tmp_path / "models"


class RecordingProvider(DirectoryProvider):
    """Remembers the largest read the kernel asked for."""

    largest_read = 0

    def read(self, handle: int, offset: int, size: int) -> bytes:
        self.largest_read = max(self.largest_read, size)
        return super().read(handle, offset, size)


def test_reads_a_model_byte_identical_with_manifest_metadata(
    model_root: Path, mountpoint: Path
) -> None:
    provider = RecordingProvider(model_root)
    with FuseMount(mountpoint, provider) as mount:
        entry = find_mount(mountpoint)
        assert entry is not None and entry.fs_type == FS_TYPE
        assert "ro" in entry.options
        assert mount.read_ahead_kb == MountOptions().read_ahead_kb
        assert mount.healthy()

        assert os.listdir(mountpoint) == [DIGEST]
        top = mountpoint / DIGEST
        assert sorted(os.listdir(top)) == ["config.json", "run.sh", "weights"]
        source = model_root / DIGEST
        for rel in ["weights/model.safetensors", "weights/extra.bin", "config.json", "run.sh"]:
            with open(top / rel, "rb") as f:
                assert f.read() == (source / rel).read_bytes(), rel
        weights = (top / "weights" / "model.safetensors").stat()
        assert weights.st_size == 24 * MiB + 12345
        assert stat.S_IMODE(weights.st_mode) == 0o444
        assert (weights.st_uid, weights.st_gid, weights.st_nlink) == (0, 0, 1)
        assert stat.S_IMODE((top / "run.sh").stat().st_mode) == 0o555
        model_dir = top.stat()
        assert stat.S_IMODE(model_dir.st_mode) == 0o555
        assert model_dir.st_nlink == 3  # ".", "..", "weights"
        assert model_dir.st_mtime == pytest.approx(source.stat().st_mtime, abs=1e-6)
        assert os.statvfs(mountpoint).f_blocks * 4096 >= 27 * MiB

        snapshot = mount.stats.snapshot()
        assert snapshot.read_bytes >= 27 * MiB
        assert snapshot.reads >= 27
        assert provider.largest_read == MiB  # max_pages 256: the kernel sends 1 MiB requests
        again = (top / "weights" / "model.safetensors").read_bytes()
        assert len(again) == weights.st_size
        assert mount.stats.snapshot().reads == snapshot.reads  # kept in the kernel's page cache
    assert find_mount(mountpoint) is None
    assert not mount.healthy()


def test_a_new_model_shows_up_without_remounting(model_root: Path, mountpoint: Path) -> None:
    with FuseMount(mountpoint, DirectoryProvider(model_root)):
        later = fake_digest("model-b")
        (model_root / later).mkdir()
        (model_root / later / "w.bin").write_bytes(b"x" * 10)
        assert sorted(os.listdir(mountpoint)) == sorted([DIGEST, later])
        assert (mountpoint / later / "w.bin").read_bytes() == b"x" * 10


def test_lazy_read_of_the_tail_comes_before_the_background_copy(
    tmp_path: Path, mountpoint: Path
) -> None:
    size = 256 * MiB
    source = write_random_file(tmp_path / "src" / "big.bin", size, seed=3)
    stats = FuseStats()
    provider = LazyTestProvider(tmp_path / "work", stats, rate=32 * MiB)  # 8 s for the whole file
    provider.add_model(DIGEST, {"big.bin": source})
    with running(provider), FuseMount(mountpoint, provider, stats=stats):
        path = mountpoint / DIGEST / "big.bin"
        assert path.stat().st_size == size  # the size is known before any byte
        began = time.monotonic()
        fd = os.open(path, os.O_RDONLY)
        try:
            tail = os.pread(fd, MiB, size - MiB)
        finally:
            os.close(fd)
        elapsed = time.monotonic() - began
        blob = provider.blob(DIGEST, "big.bin")
        assert blob.background_end < size - MiB, "the background copy got there first"
        assert elapsed < 3
        with open(source, "rb") as f:
            f.seek(size - MiB)
            assert tail == f.read()
        assert stats.snapshot().lazy_fetched_bytes >= MiB


def test_many_threads_reading_random_ranges_of_a_model_still_downloading(
    tmp_path: Path, mountpoint: Path
) -> None:
    size = 64 * MiB + 777
    source = write_random_file(tmp_path / "src" / "w.bin", size, seed=4)
    expected = source.read_bytes()
    stats = FuseStats()
    provider = LazyTestProvider(tmp_path / "work", stats, rate=MiB)
    provider.add_model(DIGEST, {"w.bin": source})
    path = mountpoint / DIGEST / "w.bin"

    def reader(seed: int) -> int:
        rng = random.Random(seed)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert provider.leases[DIGEST] >= 1
            for _ in range(25):
                offset = rng.randrange(size)
                length = rng.randrange(1, 3 * MiB)
                data = os.pread(fd, length, offset)
                assert data == expected[offset : offset + length], (offset, length)
        finally:
            os.close(fd)
        return 25

    with running(provider), FuseMount(mountpoint, provider, stats=stats):
        with ThreadPoolExecutor(max_workers=8) as pool:
            assert sum(pool.map(reader, range(8))) == 200
        blob = provider.blob(DIGEST, "w.bin")
        assert blob.lazy_bytes > 2 * blob.background_bytes  # served ahead of the slow pull
        assert stats.snapshot().lazy_fetched_bytes == blob.lazy_bytes
        _wait_for(lambda: provider.leases[DIGEST] == 0, "leases released after close")


_MMAP_READER = """
import hashlib, mmap, sys
with open(sys.argv[1], "rb") as f:
    view = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    tail = view[-10:].hex()
    print(hashlib.sha256(view[:]).hexdigest(), tail)
    view.close()
"""


def test_mmap_shared_read_only_works(tmp_path: Path, mountpoint: Path) -> None:
    """In another process: this one must not fault on the mount while holding the GIL."""
    size = 16 * MiB + 5
    source = write_random_file(tmp_path / "src" / "m.bin", size, seed=5)
    expected = source.read_bytes()
    stats = FuseStats()
    provider = LazyTestProvider(tmp_path / "work", stats, rate=4 * MiB)
    provider.add_model(DIGEST, {"m.bin": source})
    with running(provider), FuseMount(mountpoint, provider, stats=stats):
        done = subprocess.run(
            [sys.executable, "-c", _MMAP_READER, str(mountpoint / DIGEST / "m.bin")],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert done.stdout.split() == [hashlib.sha256(expected).hexdigest(), expected[-10:].hex()]
        assert stats.snapshot().lazy_fetched_bytes > 0


def test_every_write_operation_fails_with_erofs(model_root: Path, mountpoint: Path) -> None:
    with FuseMount(mountpoint, DirectoryProvider(model_root)):
        top = mountpoint / DIGEST
        existing = top / "config.json"
        attempts: dict[str, Callable[[], object]] = {
            "open for writing": lambda: os.open(existing, os.O_WRONLY),
            "open read-write": lambda: os.open(existing, os.O_RDWR),
            "open with O_TRUNC": lambda: os.open(existing, os.O_RDONLY | os.O_TRUNC),
            "create": lambda: os.open(top / "new", os.O_CREAT | os.O_WRONLY, 0o644),
            "mkdir": lambda: os.mkdir(top / "dir"),
            "mkdir at root": lambda: os.mkdir(mountpoint / "dir"),
            "rmdir": lambda: os.rmdir(top / "weights"),
            "unlink": lambda: os.unlink(existing),
            "rename": lambda: os.rename(existing, top / "moved.json"),
            "link": lambda: os.link(existing, top / "hard"),
            "symlink": lambda: os.symlink("config.json", top / "soft"),
            "chmod": lambda: os.chmod(existing, 0o777),
            "chown": lambda: os.chown(existing, 1, 1),
            "truncate": lambda: os.truncate(existing, 0),
            "utime": lambda: os.utime(existing, (1, 1)),
            "setxattr": lambda: os.setxattr(existing, "user.a", b"1"),
            "removexattr": lambda: os.removexattr(existing, "user.a"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as raised:
                attempt()
            assert raised.value.errno == errno.EROFS, what
        with pytest.raises(OSError) as missing_xattr:
            os.getxattr(existing, "user.a")
        assert missing_xattr.value.errno == errno.ENODATA
        assert os.listxattr(existing) == []
    assert (model_root / DIGEST / "config.json").read_text() == '{"hidden_size": 8}\n'


def test_provider_failure_is_eio_and_counted(tmp_path: Path, mountpoint: Path) -> None:
    source = write_random_file(tmp_path / "src" / "bad.bin", 2 * MiB, seed=6)
    stats = FuseStats()
    provider = LazyTestProvider(tmp_path / "work", stats, rate=1024 * MiB)
    provider.add_model(DIGEST, {"bad.bin": source}, corrupt=frozenset({"bad.bin"}))
    with running(provider), FuseMount(mountpoint, provider, stats=stats):
        assert provider.blob(DIGEST, "bad.bin").done.wait(10)
        with pytest.raises(OSError) as raised:
            (mountpoint / DIGEST / "bad.bin").read_bytes()
        assert raised.value.errno == errno.EIO
        with pytest.raises(FileNotFoundError):
            (mountpoint / DIGEST / "absent.bin").stat()
        with pytest.raises(FileNotFoundError):
            (mountpoint / fake_digest("unknown")).stat()
    assert stats.snapshot().errors.get("verify", 0) >= 1


def test_second_mount_on_a_live_mountpoint_is_refused(model_root: Path, mountpoint: Path) -> None:
    with FuseMount(mountpoint, DirectoryProvider(model_root)):
        with pytest.raises(MountError, match="live"):
            FuseMount(mountpoint, DirectoryProvider(model_root)).start()
        assert os.listdir(mountpoint) == [DIGEST]


def test_stop_unmounts_even_with_a_file_open(model_root: Path, mountpoint: Path) -> None:
    mount = FuseMount(mountpoint, DirectoryProvider(model_root))
    mount.start()
    try:
        fd = os.open(mountpoint / DIGEST / "config.json", os.O_RDONLY)
    finally:
        mount.stop()
    try:
        assert find_mount(mountpoint) is None
        assert not mount.healthy()
        with pytest.raises(OSError):
            os.pread(fd, 10, 0)
    finally:
        os.close(fd)


_CHILD = """
import sys, time
from pathlib import Path
from cacheagent.fuse.directory import DirectoryProvider
from cacheagent.fuse.mount import FuseMount
FuseMount(Path(sys.argv[1]), DirectoryProvider(Path(sys.argv[2]))).start()
print("ready", flush=True)
time.sleep(120)
"""


def test_mount_left_by_a_killed_agent_is_cleared_at_start(
    model_root: Path, mountpoint: Path
) -> None:
    """Nobody else held its /dev/fuse descriptor, so the connection died with the process."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(mountpoint), str(model_root)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert mountpoint.stat().st_nlink == 3  # the kernel now caches the root's attributes
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        if child.stdout is not None:
            child.stdout.close()

    with pytest.raises(OSError) as raised:
        os.statvfs(mountpoint)
    assert raised.value.errno == errno.ENOTCONN

    with FuseMount(mountpoint, DirectoryProvider(model_root)) as mount:
        assert mount.healthy()
        data = (mountpoint / DIGEST / "weights" / "extra.bin").read_bytes()
        assert data == (model_root / DIGEST / "weights" / "extra.bin").read_bytes()


def test_invalidate_drops_the_cached_pages_of_one_file(model_root: Path, mountpoint: Path) -> None:
    """What the agent does for bytes served before their blob failed verification."""
    source = model_root / DIGEST / "config.json"
    with FuseMount(mountpoint, DirectoryProvider(model_root)) as mount:
        path = mountpoint / DIGEST / "config.json"
        assert path.read_text() == '{"hidden_size": 8}\n'
        source.write_text('{"hidden_size": 9}\n')  # same size, other bytes
        assert path.read_text() == '{"hidden_size": 8}\n'  # served from the page cache
        assert mount.fs.invalidate(DIGEST, "config.json") is True
        assert path.read_text() == '{"hidden_size": 9}\n'
        assert mount.fs.invalidate(DIGEST, "never-looked-up.bin") is False
    assert mount.fs.invalidate(DIGEST, "config.json") is False  # no session any more


def test_an_aborted_connection_is_unhealthy(model_root: Path, mountpoint: Path) -> None:
    mount = FuseMount(mountpoint, DirectoryProvider(model_root))
    mount.start()
    try:
        assert mount.healthy()
        subprocess.run(["umount", "-f", str(mountpoint)], check=True, timeout=30)
        _wait_for(lambda: not mount.healthy(), "health to see the connection gone")
    finally:
        mount.stop()
    assert find_mount(mountpoint) is None


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_working_directory_survives_mounting(model_root: Path, mountpoint: Path) -> None:
    before = Path.cwd()
    with FuseMount(mountpoint, DirectoryProvider(model_root)):
        assert Path.cwd() == before
        assert threading.active_count() >= 2
