"""The pure parts of the FUSE layer: the model tree, mount paths, attributes, error mapping."""

from __future__ import annotations

import errno
import stat

import pytest

from cacheagent.errors import (
    DigestMismatchError,
    ModelNotFoundError,
    OriginUnavailableError,
    SizeMismatchError,
    StoreError,
    UnsafePathError,
)
from cacheagent.fuse.errmap import ErrorKind, classify
from cacheagent.fuse.provider import FuseFile
from cacheagent.fuse.stats import FuseStats
from cacheagent.fuse.tree import (
    Directory,
    ModelTree,
    dir_attrs,
    file_attrs,
    is_model_name,
)

FILES = [
    FuseFile("config.json", 10),
    FuseFile("weights/b.safetensors", 2000),
    FuseFile("weights/a.safetensors", 1000),
    FuseFile("weights/shards/0.bin", 5),
    FuseFile("tokenizer/vocab.txt", 7),
]


def test_tree_has_every_directory_with_sorted_children_and_subdir_counts() -> None:
    tree = ModelTree.build(FILES)
    assert tree.lookup("") == Directory(("config.json", "tokenizer", "weights"), subdirs=2)
    assert tree.lookup("weights") == Directory(
        ("a.safetensors", "b.safetensors", "shards"), subdirs=1
    )
    assert tree.lookup("weights/shards") == Directory(("0.bin",), subdirs=0)
    assert tree.lookup("weights/a.safetensors") == FuseFile("weights/a.safetensors", 1000)
    assert tree.lookup("weights/c") is None
    assert tree.total_bytes == 3022
    assert tree.file_count == 5


def test_an_empty_model_is_an_empty_directory() -> None:
    tree = ModelTree.build([])
    assert tree.lookup("") == Directory((), subdirs=0)
    assert tree.total_bytes == 0


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../x", "a/../b", "a//b", "a/./b", "a/", "", "a\0b", "x" * 256],
)
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(UnsafePathError):
        ModelTree.build([FuseFile(path, 1)])


@pytest.mark.parametrize(
    "files",
    [
        [FuseFile("a", 1), FuseFile("a", 2)],
        [FuseFile("a", 1), FuseFile("a/b", 2)],
        [FuseFile("a/b", 2), FuseFile("a", 1)],
    ],
    ids=["twice", "file-then-dir", "dir-then-file"],
)
def test_clashing_paths_are_refused(files: list[FuseFile]) -> None:
    with pytest.raises(UnsafePathError):
        ModelTree.build(files)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("sha256:" + "a" * 64, True),
        ("plain", True),
        ("", False),
        (".", False),
        ("..", False),
        ("a/b", False),
    ],
)
def test_model_names_must_be_one_path_component(name: str, ok: bool) -> None:
    assert is_model_name(name) is ok


def test_attributes_are_read_only_root_owned_and_keep_execute_bits() -> None:
    plain = file_attrs(FuseFile("a", 1025, mode=0o644), time_ns=5)
    assert plain["st_mode"] == stat.S_IFREG | 0o444
    assert (plain["st_size"], plain["st_blocks"], plain["st_nlink"]) == (1025, 3, 1)
    assert (plain["st_uid"], plain["st_gid"], plain["st_mtime"]) == (0, 0, 5)
    script = file_attrs(FuseFile("run.sh", 1, mode=0o775), time_ns=5)
    assert script["st_mode"] == stat.S_IFREG | 0o555
    directory = dir_attrs(subdirs=3, time_ns=7)
    assert directory["st_mode"] == stat.S_IFDIR | 0o555
    assert directory["st_nlink"] == 5


@pytest.mark.parametrize(
    ("exc", "kind", "code"),
    [
        (ModelNotFoundError("m"), ErrorKind.NOT_FOUND, errno.ENOENT),
        (FileNotFoundError("f"), ErrorKind.NOT_FOUND, errno.ENOENT),
        (DigestMismatchError("sha256:a", "sha256:b"), ErrorKind.VERIFY, errno.EIO),
        (SizeMismatchError("sha256:a", 1, 2), ErrorKind.VERIFY, errno.EIO),
        (OriginUnavailableError("down"), ErrorKind.ORIGIN, errno.EIO),
        (StoreError("x"), ErrorKind.IO, errno.EIO),
        (PermissionError("p"), ErrorKind.IO, errno.EIO),
        (KeyError("bug"), ErrorKind.INTERNAL, errno.EIO),
    ],
)
def test_provider_errors_map_to_a_kind_and_errno(
    exc: BaseException, kind: ErrorKind, code: int
) -> None:
    failure = classify(exc)
    assert (failure.kind, failure.errno) == (kind, code)


def test_stats_snapshot_is_a_copy() -> None:
    stats = FuseStats()
    stats.record_read(10)
    stats.record_read(5)
    stats.record_lazy_fetch(7)
    stats.record_error("verify")
    snap = stats.snapshot()
    stats.record_error("verify")
    assert (snap.reads, snap.read_bytes, snap.lazy_fetched_bytes) == (2, 15, 7)
    assert snap.errors == {"verify": 1}
    assert stats.snapshot().errors == {"verify": 2}
