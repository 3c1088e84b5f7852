"""Page-cache primitives: which pages of a file are in RAM, and how to lock or drop them.

Python's ``mmap`` object hides the mapping's address (and a read-only mapping cannot be handed
to ``ctypes.c_char.from_buffer``), so files are mapped with libc ``mmap`` directly; that gives
the address ``mincore``, ``mlock`` and ``munlock`` need. Mappings are ``PROT_READ`` +
``MAP_SHARED``: they show the file's page cache and never copy it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PAGE_SIZE = mmap.PAGESIZE
# Bytes mapped per mincore call: bounds the residency vector to 256 KiB whatever the file size.
MINCORE_WINDOW = 1 << 30
_MAP_FAILED = ctypes.c_void_p(-1).value
# mincore defines only bit 0 of each vector byte; the others are reserved.
_RESIDENT_BIT = bytes(b & 1 for b in range(256))


@dataclass(frozen=True)
class Residency:
    """How much of a file set is in the page cache right now."""

    bytes_total: int
    bytes_resident: int

    @property
    def fraction(self) -> float:
        return 1.0 if self.bytes_total == 0 else self.bytes_resident / self.bytes_total

    def __add__(self, other: Residency) -> Residency:
        return Residency(
            self.bytes_total + other.bytes_total, self.bytes_resident + other.bytes_resident
        )


@dataclass(frozen=True)
class LockedRegion:
    """A file mapped and mlocked; the mapping keeps the file's pages pinned until unlocked."""

    path: Path
    address: int
    length: int


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    for name in ("munmap", "mlock", "munlock"):
        getattr(libc, name).argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        getattr(libc, name).restype = ctypes.c_int
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.mincore.restype = ctypes.c_int
    return libc


def _check(ret: int, what: str, path: Path) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", str(path))


def _map(fd: int, offset: int, length: int, path: Path) -> int:
    address = _libc().mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if address is None or address == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}", str(path))
    return int(address)


@contextmanager
def _mapped(fd: int, offset: int, length: int, path: Path) -> Iterator[int]:
    address = _map(fd, offset, length, path)
    try:
        yield address
    finally:
        _libc().munmap(address, length)


def pages(nbytes: int) -> int:
    return -(-nbytes // PAGE_SIZE)


def page_floor(nbytes: int) -> int:
    return nbytes - nbytes % PAGE_SIZE


def resident_vector(fd: int, size: int, path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, bits)`` per window: one byte per page, 1 when the page is resident."""
    for offset in range(0, size, MINCORE_WINDOW):
        length = min(MINCORE_WINDOW, size - offset)
        vector = (ctypes.c_ubyte * pages(length))()
        with _mapped(fd, offset, length, path) as address:
            _check(_libc().mincore(address, length, vector), "mincore", path)
        yield offset, bytes(vector).translate(_RESIDENT_BIT)


def resident_bytes_per_step(path: Path, step: int) -> tuple[int, list[int]]:
    """The file's size and its resident bytes per ``step``-sized slice.

    ``step`` is a whole number of pages that divides the mincore window, or a multiple of it.
    """
    if step <= 0 or step % PAGE_SIZE or (MINCORE_WINDOW % step and step % MINCORE_WINDOW):
        raise ValueError(
            f"step {step} is not a page multiple that divides or is a multiple of {MINCORE_WINDOW}"
        )
    pages_per_step = step // PAGE_SIZE
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        counts = [0] * -(-size // step)
        last_bit = 0
        for offset, bits in resident_vector(fd, size, path):
            first = offset // step
            for i in range(0, len(bits), pages_per_step):
                counts[first + i // pages_per_step] += bits.count(1, i, i + pages_per_step)
            last_bit = bits[-1]
    finally:
        os.close(fd)
    resident = [count * PAGE_SIZE for count in counts]
    if last_bit and size % PAGE_SIZE:
        resident[-1] -= PAGE_SIZE - size % PAGE_SIZE
    return size, resident


def file_residency(path: Path) -> Residency:
    size, per_step = resident_bytes_per_step(path, MINCORE_WINDOW)
    return Residency(size, sum(per_step))


def expand_files(paths: Iterable[Path]) -> list[Path]:
    """Regular files named by ``paths``, directories walked in sorted order.

    Walks never follow symlinks and skip anything that is not a regular file, so a model tree
    cannot lead the caller out of the store.
    """
    files: list[Path] = []
    for path in paths:
        if not path.is_dir() or path.is_symlink():
            files.append(path)
            continue
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                candidate = Path(root, name)
                if candidate.is_file() and not candidate.is_symlink():
                    files.append(candidate)
    return files


def residency(paths: Iterable[Path]) -> Residency:
    """Bytes of ``paths`` (files or model directories) held in the page cache."""
    total = Residency(0, 0)
    for path in expand_files(paths):
        total += file_residency(path)
    return total


def readahead_window(path: Path, sys_root: Path = Path("/sys")) -> int:
    """Bytes one ``POSIX_FADV_WILLNEED`` call reads for ``path``.

    The kernel caps each WILLNEED at max(read_ahead_kb, max_sectors_kb) of the backing device,
    so a larger call silently warms only its first window. Unknown devices (overlay, network
    filesystems) get the kernel's default 128 KiB.
    """
    dev = path.stat().st_dev
    ident = f"{os.major(dev)}:{os.minor(dev)}"
    for queue in (
        sys_root / "dev/block" / ident / "queue",
        sys_root / "dev/block" / ident / ".." / "queue",
    ):
        sizes_kb = [_read_int(queue / name) for name in ("read_ahead_kb", "max_sectors_kb")]
        if any(sizes_kb):
            return max(kb or 0 for kb in sizes_kb) * 1024
    bdi_kb = _read_int(sys_root / "class/bdi" / ident / "read_ahead_kb")
    return (bdi_kb or 128) * 1024


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def drop(paths: Iterable[Path]) -> None:
    """Evict the files' clean pages from the page cache (dirty ones are written back first)."""
    for path in expand_files(paths):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_all_caches() -> None:
    """Empty the whole node's page cache (root only); benchmarks use it for cold reads."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("1\n")


def lock_file(path: Path) -> LockedRegion | None:
    """Map ``path`` and mlock it (reading what is not resident); None for an empty file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        length = os.fstat(fd).st_size
        if length == 0:
            return None
        address = _map(fd, 0, length, path)
    finally:
        os.close(fd)
    if _libc().mlock(address, length) != 0:
        err = ctypes.get_errno()
        _libc().munmap(address, length)
        raise OSError(err, f"mlock: {os.strerror(err)}", str(path))
    return LockedRegion(path, address, length)


def unlock(regions: Sequence[LockedRegion]) -> None:
    for region in regions:
        _libc().munlock(region.address, region.length)
        _libc().munmap(region.address, region.length)


def locked_bytes_of_process() -> int:
    """VmLck of this process (every mlocked page, ours or not), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
    return 0
