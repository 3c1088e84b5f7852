"""Safe streaming unpack of tar layers (sources/tarsafe.py), with hostile archives built here."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import pytest
import zstandard

from cacheagent.errors import SourceError, UnsafePathError
from cacheagent.sources.base import UnpackKind
from cacheagent.sources.tarsafe import MAX_HEADER_BYTES, UnpackedFile, unpack_tar

Member = tuple[tarfile.TarInfo, bytes | None]


def sha(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def reg(name: str, data: bytes = b"", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def make_tar(
    path: Path, members: list[Member], kind: UnpackKind = "tar", fmt: int = tarfile.PAX_FORMAT
) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    if kind == "tar+gzip":
        raw = gzip.compress(raw)
    elif kind == "tar+zstd":
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return path


class Collector:
    """Plays the store: moves each temp file into blobs/ under its digest."""

    def __init__(self, root: Path) -> None:
        self.blobs = root / "blobs"
        self.blobs.mkdir()
        self.seen: list[UnpackedFile] = []

    def __call__(self, entry: UnpackedFile, tmp: Path) -> None:
        assert sha(tmp.read_bytes()) == entry.digest
        tmp.replace(self.blobs / entry.digest.split(":")[1])
        self.seen.append(entry)


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    d = tmp_path / "partial"
    d.mkdir()
    return d


class Unpacker:
    """Writes the members as a tar blob, unpacks it, and checks no temp file is left behind."""

    def __init__(self, tmp_path: Path, tmp_dir: Path) -> None:
        self.tmp_path = tmp_path
        self.tmp_dir = tmp_dir
        self.collector = Collector(tmp_path)

    def __call__(
        self,
        members: list[Member],
        kind: UnpackKind = "tar",
        *,
        limit: int = 1 << 30,
        prefix: str = "",
        max_members: int = 1000,
        fmt: int = tarfile.PAX_FORMAT,
    ) -> tuple[UnpackedFile, ...]:
        src = make_tar(self.tmp_path / "layer", members, kind, fmt)
        try:
            return unpack_tar(
                src,
                kind,
                self.tmp_dir,
                self.collector,
                max_total_bytes=limit,
                prefix=prefix,
                max_members=max_members,
            )
        finally:
            assert list(self.tmp_dir.iterdir()) == [], "temp files left behind"


@pytest.fixture
def unpack(tmp_path: Path, tmp_dir: Path) -> Unpacker:
    return Unpacker(tmp_path, tmp_dir)


GOOD: list[Member] = [
    special(".", tarfile.DIRTYPE),
    special("./weights", tarfile.DIRTYPE),
    reg("./weights/a.bin", b"A" * 5000),
    reg("./weights/run.sh", b"#!/bin/sh\n", mode=0o755),
    reg("deep/er/b.txt", b"bee"),
    special("weights/copy.bin", tarfile.LNKTYPE, "weights/a.bin"),
    reg("empty", b""),
]


@pytest.mark.parametrize("kind", ["tar", "tar+gzip", "tar+zstd"])
def test_good_archive(kind: UnpackKind, unpack: Unpacker) -> None:
    files = unpack(GOOD, kind)
    assert files == (
        UnpackedFile("weights/a.bin", sha(b"A" * 5000), 5000, 0o444),
        UnpackedFile("weights/run.sh", sha(b"#!/bin/sh\n"), 10, 0o555),
        UnpackedFile("deep/er/b.txt", sha(b"bee"), 3, 0o444),
        UnpackedFile("weights/copy.bin", sha(b"A" * 5000), 5000, 0o444),
        UnpackedFile("empty", sha(b""), 0, 0o444),
    )
    collector = unpack.collector
    # the hard link is a second entry for the same blob, not a second blob
    assert [f.path for f in collector.seen] == [
        "weights/a.bin",
        "weights/run.sh",
        "deep/er/b.txt",
        "empty",
    ]
    assert (collector.blobs / sha(b"A" * 5000).split(":")[1]).read_bytes() == b"A" * 5000


def test_prefix(unpack: Unpacker) -> None:
    files = unpack([reg("x/y", b"1")], prefix="models/m")
    assert [f.path for f in files] == ["models/m/x/y"]


def test_large_member_streams_in_chunks(unpack: Unpacker) -> None:
    data = bytes(range(256)) * 12289  # a bit over 3 MiB: several copy chunks
    assert unpack([reg("big", data)], "tar+zstd") == (
        UnpackedFile("big", sha(data), len(data), 0o444),
    )


def test_gnu_long_names_are_read(unpack: Unpacker) -> None:
    name = "d/" + "n" * 200
    link = special("l" * 150, tarfile.LNKTYPE, name)
    files = unpack([reg(name, b"x"), link], fmt=tarfile.GNU_FORMAT)
    assert [f.path for f in files] == [name, "l" * 150]


HOSTILE: list[tuple[str, list[Member], str]] = [
    ("dotdot", [reg("../x", b"1")], r"'\.\./x'"),
    ("nested dotdot", [reg("a/../../x", b"1")], r"'a/\.\./\.\./x'"),
    ("absolute", [reg("/etc/x", b"1")], r"'/etc/x'"),
    ("symlink abs", [special("passwd", tarfile.SYMTYPE, "/etc/passwd")], "'passwd'.*symbolic link"),
    ("symlink up", [special("up", tarfile.SYMTYPE, "../../")], "'up'.*symbolic link"),
    ("symlink inside", [reg("a", b"1"), special("b", tarfile.SYMTYPE, "a")], "'b'.*symbolic link"),
    (
        "hardlink outside",
        [special("h", tarfile.LNKTYPE, "../outside")],
        r"'h'.*hard link target '\.\./outside'",
    ),
    ("hardlink abs", [special("h", tarfile.LNKTYPE, "/etc/passwd")], "'h'.*hard link target"),
    ("hardlink dangling", [special("h", tarfile.LNKTYPE, "later")], "'h'.*not a file earlier"),
    ("hardlink to dir", [special("d", tarfile.DIRTYPE), special("h", tarfile.LNKTYPE, "d")], "'h'"),
    ("char device", [special("null", tarfile.CHRTYPE)], "'null'.*character device"),
    ("block device", [special("sda", tarfile.BLKTYPE)], "'sda'.*block device"),
    ("fifo", [special("pipe", tarfile.FIFOTYPE)], "'pipe'.*FIFO"),
    ("long name", [reg("n" * 300, b"1")], "n{300}"),
    ("long path", [reg("/".join(["d" * 200] * 30), b"1")], "d{200}"),
]


@pytest.mark.parametrize(
    ("members", "pattern"), [(m, p) for _, m, p in HOSTILE], ids=[n for n, _, _ in HOSTILE]
)
def test_hostile_members_refused(members: list[Member], pattern: str, unpack: Unpacker) -> None:
    with pytest.raises(UnsafePathError, match=pattern):
        unpack([reg("ok", b"fine"), *members])
    collector = unpack.collector
    assert all(f.path in ("ok", "a") for f in collector.seen)


def test_nul_in_pax_path_refused(unpack: Unpacker) -> None:
    info, data = reg("ab", b"1")
    info.pax_headers = {"path": "a\x00b"}
    with pytest.raises(UnsafePathError, match="a\\\\x00b"):
        unpack([(info, data)])


@pytest.mark.parametrize(
    ("members", "pattern"),
    [
        ([reg("a", b"1"), reg("a", b"2")], "'a' appears twice"),
        ([reg("./a", b"1"), reg("a", b"2")], "'a' appears twice"),
        ([reg("a", b"1"), reg("a/b", b"2")], "needs 'a', a file, to be a directory"),
        ([reg("a/b", b"1"), reg("a", b"2")], "'a' is both a file and a directory"),
        ([reg("a", b"1"), special("a", tarfile.DIRTYPE)], "'a' is both a file and a directory"),
    ],
)
def test_path_clashes_refused(members: list[Member], pattern: str, unpack: Unpacker) -> None:
    with pytest.raises(SourceError, match=pattern):
        unpack(members)


def test_total_size_limit(unpack: Unpacker) -> None:
    members = [reg("a", b"x" * 600), reg("b", b"y" * 600)]
    with pytest.raises(SourceError, match=r"1000-byte limit \(member 'b' of 600 bytes after 600"):
        unpack(members, "tar+gzip", limit=1000)
    collector = unpack.collector
    assert [f.path for f in collector.seen] == ["a"]


def test_single_member_over_limit_is_refused_before_writing(unpack: Unpacker) -> None:
    with pytest.raises(SourceError, match="100-byte limit"):
        unpack([reg("bomb", b"\0" * 5000)], "tar+zstd", limit=100)


def test_member_count_limit(unpack: Unpacker) -> None:
    with pytest.raises(SourceError, match="more than 3 members"):
        unpack([reg(f"f{i}", b"") for i in range(5)], max_members=3)


def test_oversized_pax_header_refused(unpack: Unpacker) -> None:
    info, data = reg("a", b"1")
    info.pax_headers = {"comment": "c" * (MAX_HEADER_BYTES + 10)}
    with pytest.raises(SourceError, match="extended header"):
        unpack([(info, data)])


@pytest.mark.parametrize("kind", ["tar+gzip", "tar+zstd"])
def test_corrupt_compressed_stream(kind: UnpackKind, tmp_path: Path, tmp_dir: Path) -> None:
    src = tmp_path / "bad"
    src.write_bytes(b"this is not compressed at all" * 10)
    with pytest.raises(SourceError, match="corrupt"):
        unpack_tar(src, kind, tmp_dir, Collector(tmp_path), max_total_bytes=1 << 20)


def test_truncated_archive(tmp_path: Path, tmp_dir: Path) -> None:
    src = make_tar(tmp_path / "t", [reg("a", b"z" * 4000)])
    src.write_bytes(src.read_bytes()[:2048])
    with pytest.raises(SourceError):
        unpack_tar(src, "tar", tmp_dir, Collector(tmp_path), max_total_bytes=1 << 20)
    assert list(tmp_dir.iterdir()) == []


def test_raw_is_not_a_tar(tmp_path: Path, tmp_dir: Path) -> None:
    with pytest.raises(ValueError, match="raw"):
        unpack_tar(tmp_path, "raw", tmp_dir, Collector(tmp_path), max_total_bytes=1)


def test_callback_failure_cleans_up(tmp_path: Path, tmp_dir: Path) -> None:
    src = make_tar(tmp_path / "t", [reg("a", b"1")])

    def fail(entry: UnpackedFile, tmp: Path) -> None:
        raise RuntimeError("store said no")

    with pytest.raises(RuntimeError, match="store said no"):
        unpack_tar(src, "tar", tmp_dir, fail, max_total_bytes=1 << 20)
    assert list(tmp_dir.iterdir()) == []
