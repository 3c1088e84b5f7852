"""safe_relpath, tree shapes and the directory layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from cacheagent.errors import UnsafePathError
from cacheagent.store.paths import (
    Layout,
    digest_of_hex,
    digest_of_partial,
    safe_relpath,
    tree_shape,
)

HEX = "ab" + "0" * 62
DIGEST = f"sha256:{HEX}"
_DEEP = "/".join(["d" * 200] * 20) + "/"
LONGEST = _DEEP + "f" * (4096 - len(_DEEP))


@pytest.mark.parametrize(
    ("path", "normalised"),
    [
        ("model.safetensors", "model.safetensors"),
        ("a/b/c.json", "a/b/c.json"),
        ("./config.json", "config.json"),
        ("a/./b", "a/b"),
        ("dir with space/ü.bin", "dir with space/ü.bin"),
        ("..hidden", "..hidden"),
        ("a..b/c", "a..b/c"),
        ("x" * 255, "x" * 255),
        (LONGEST, LONGEST),
    ],
)
def test_safe_relpath_accepts_and_normalises(path: str, normalised: str) -> None:
    assert safe_relpath(path) == normalised


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("", "empty path"),
        ("/etc/passwd", "absolute"),
        ("../escape", "'..'"),
        ("a/../../b", "'..'"),
        ("a/..", "'..'"),
        ("a//b", "empty path component"),
        ("a/", "empty path component"),
        ("a\x00b", "NUL"),
        (".", "model root"),
        ("./.", "model root"),
        ("x" * 256, "255 bytes"),
        ("é" * 128, "255 bytes"),  # 256 bytes in UTF-8
        (LONGEST + "f", "4096 bytes"),
    ],
)
def test_safe_relpath_rejects(path: str, problem: str) -> None:
    with pytest.raises(UnsafePathError) as info:
        safe_relpath(path)
    assert problem in info.value.problem
    assert info.value.path == path


def test_tree_shape_lists_parents_before_children() -> None:
    shape = tree_shape(["b/c/d.bin", "a.txt", "b/e.txt"])
    assert shape.files == ("a.txt", "b/c/d.bin", "b/e.txt")
    assert shape.dirs == ("b", "b/c")


def test_tree_shape_rejects_duplicate_path() -> None:
    with pytest.raises(UnsafePathError, match="two files at the same path"):
        tree_shape(["a/b", "a/b"])


@pytest.mark.parametrize("paths", [["a", "a/b"], ["a/b/c", "a/b"]])
def test_tree_shape_rejects_file_where_directory_must_be(paths: list[str]) -> None:
    with pytest.raises(UnsafePathError, match="need it to be a directory") as info:
        tree_shape(paths)
    assert info.value.path in paths


def test_layout_paths() -> None:
    layout = Layout(Path("/store"))
    assert layout.blob_path(DIGEST) == Path(f"/store/blobs/sha256/ab/{HEX}")
    assert layout.partial_path(DIGEST) == Path(f"/store/partial/{HEX}")
    assert layout.ranges_path(DIGEST) == Path(f"/store/partial/{HEX}.ranges")
    assert layout.model_path(DIGEST) == Path(f"/store/models/sha256/{HEX}")
    assert ":" not in str(layout.model_path(DIGEST))
    assert layout.tmp_tree_path(DIGEST, "7-1").parent == layout.models_dir
    assert layout.tmp_tree_path(DIGEST, "7-1").name.startswith(".tmp-")


def test_layout_rejects_bad_digest() -> None:
    with pytest.raises(ValueError, match="sha256"):
        Layout(Path("/store")).blob_path("sha256:../../etc")


def test_names_back_to_digests() -> None:
    assert digest_of_hex(HEX) == DIGEST
    assert digest_of_hex(HEX.upper()) is None
    assert digest_of_hex("zz") is None
    assert digest_of_partial(HEX) == DIGEST
    assert digest_of_partial(f"{HEX}.ranges") == DIGEST
    assert digest_of_partial(f"{HEX}.tmp-abc") == DIGEST
    assert digest_of_partial(f"{HEX}.other") is None
    assert digest_of_partial("junk") is None
