"""Committing blobs: verify, then make visible; nothing visible on a mismatch."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheagent.digest import sha256_digest
from cacheagent.errors import DigestMismatchError, SizeMismatchError
from cacheagent.store import Store
from tests.support import require
from tests.unit.store_helpers import mode_of, visible_blobs, write_partial


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "store") as s:
        yield s


def test_commit_verifies_renames_and_records(store: Store) -> None:
    digest, partial = write_partial(store, b"weights" * 1000)
    store.partial_path(digest).with_suffix(".ranges").write_text("[[0, 7000]]")
    path = store.commit_blob(digest, 7000, partial)
    hex_digest = digest.split(":")[1]
    assert path == store.root / "blobs" / "sha256" / hex_digest[:2] / hex_digest
    assert path.read_bytes() == b"weights" * 1000
    assert mode_of(path) == 0o444
    assert not partial.exists()
    assert not (store.root / "partial" / f"{hex_digest}.ranges").exists()
    assert store.has_blob(digest)
    assert store.usage().used == 7000 and store.usage().blobs == 1


def test_wrong_bytes_are_rejected_and_nothing_is_visible(store: Store) -> None:
    expected = sha256_digest(b"the real bytes")
    partial = store.partial_path(expected)
    partial.write_bytes(b"the evil bytes")
    ranges = partial.with_name(partial.name + ".ranges")
    ranges.write_text("[]")
    with pytest.raises(DigestMismatchError) as info:
        store.commit_blob(expected, len(b"the real bytes"), partial)
    assert info.value.expected == expected
    assert info.value.actual == sha256_digest(b"the evil bytes")
    assert not partial.exists() and not ranges.exists()
    assert not store.has_blob(expected)
    assert visible_blobs(store.root) == {}
    assert store.usage().used == 0


@pytest.mark.parametrize("declared", [5, 50])
def test_size_mismatch_is_rejected_even_when_verified(store: Store, declared: int) -> None:
    digest, partial = write_partial(store, b"0123456789")
    with pytest.raises(SizeMismatchError) as info:
        store.commit_blob(digest, declared, partial, verified=True)
    assert (info.value.expected, info.value.actual) == (declared, 10)
    assert not partial.exists()
    assert not store.has_blob(digest)
    assert visible_blobs(store.root) == {}


def test_verified_commit_trusts_the_caller_hash(store: Store) -> None:
    # The pull engine hashes while downloading; the store must not hash again. Proof: a
    # wrong-content file with verified=True is accepted (only the size is checked).
    lie = sha256_digest(b"other content")
    partial = store.partial_path(lie)
    partial.write_bytes(b"content here!")
    store.commit_blob(lie, 13, partial, verified=True)
    assert store.has_blob(lie)


def test_committing_twice_keeps_one_blob(store: Store) -> None:
    digest, partial = write_partial(store, b"abc")
    first = store.commit_blob(digest, 3, partial)
    inode = first.stat().st_ino
    _, again = write_partial(store, b"abc")
    assert store.commit_blob(digest, 3, again) == first
    assert not again.exists()
    assert first.stat().st_ino == inode
    assert store.usage().blobs == 1


def test_add_blob_bytes(store: Store) -> None:
    digest = store.add_blob_bytes(b'{"manifest": true}')
    assert digest == sha256_digest(b'{"manifest": true}')
    assert store.blob_path(digest).read_bytes() == b'{"manifest": true}'
    assert store.add_blob_bytes(b'{"manifest": true}') == digest
    assert list((store.root / "partial").iterdir()) == []


def test_commit_from_a_file_outside_partial(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "elsewhere.bin"
    src.write_bytes(b"outside")
    digest = sha256_digest(b"outside")
    store.commit_blob(digest, 7, src)
    assert store.blob_path(digest).read_bytes() == b"outside"
    assert not src.exists()


def test_commit_from_another_filesystem_copies(store: Store) -> None:
    shm = Path("/dev/shm")
    require(
        shm.is_dir() and shm.stat().st_dev != store.root.stat().st_dev,
        "needs /dev/shm on a filesystem other than the store's",
    )
    src = shm / f"cacheagent-test-{os.getpid()}"
    src.write_bytes(b"from tmpfs")
    digest = sha256_digest(b"from tmpfs")
    try:
        path = store.commit_blob(digest, 10, src)
    finally:
        src.unlink(missing_ok=True)
    assert path.read_bytes() == b"from tmpfs"
    assert path.stat().st_dev == store.root.stat().st_dev
    assert list((store.root / "partial").iterdir()) == []


def test_bad_digest_is_refused(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(ValueError, match="sha256"):
        store.commit_blob("md5:abc", 1, src)
    assert src.exists()
