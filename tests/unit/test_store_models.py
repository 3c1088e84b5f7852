"""Model trees: hard links with the right modes, safe paths, pending models, removal."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheagent.digest import sha256_digest
from cacheagent.errors import (
    DigestMismatchError,
    ModelInUseError,
    ModelNotFoundError,
    SizeMismatchError,
    StoreError,
    UnsafePathError,
)
from cacheagent.store import ModelFile, Store
from cacheagent.store.lookup import find_model
from tests.unit.store_helpers import add_model, manifest_for, mode_of, visible_blobs

FILES = {
    "config.json": b"{}",
    "model-00001.safetensors": b"A" * 4096,
    "tokenizer/vocab.txt": b"hello\nworld\n",
    "tokenizer/deep/merges.txt": b"a b\n",
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "store") as s:
        yield s


def test_tree_is_hard_links_with_read_only_modes(store: Store) -> None:
    model = add_model(store, "m", FILES, ref="reg.example/m:v1")
    root = store.model_path(model.digest)
    assert root == store.root / "models" / "sha256" / model.digest.split(":")[1]
    for f in model.files:
        path = root / f.path
        blob = store.blob_path(f.blob)
        assert path.read_bytes() == FILES[f.path]
        assert path.stat().st_ino == blob.stat().st_ino
        assert path.stat().st_nlink == 2
        assert not path.is_symlink()
        assert mode_of(path) == 0o444
    for directory in (root, root / "tokenizer", root / "tokenizer" / "deep"):
        assert mode_of(directory) == 0o555
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == sorted(FILES)
    assert model.size == sum(len(b) for b in FILES.values())
    assert model.ref == "reg.example/m:v1" and model.source_kind == "oci"
    assert [f.path for f in model.files] == sorted(FILES)
    assert list((store.root / "models" / "sha256").iterdir()) == [root]


def test_shared_blob_is_one_inode_for_every_path(store: Store) -> None:
    a = add_model(store, "a", {"w.bin": b"same", "copy/w.bin": b"same"})
    b = add_model(store, "b", {"other.bin": b"same"})
    blob = store.blob_path(sha256_digest(b"same"))
    assert blob.stat().st_nlink == 4
    assert (store.model_path(a.digest) / "copy/w.bin").stat().st_ino == blob.stat().st_ino
    assert (store.model_path(b.digest) / "other.bin").stat().st_ino == blob.stat().st_ino
    assert store.usage().used == 4


def test_put_model_is_idempotent(store: Store) -> None:
    first = add_model(store, "m", FILES)
    inode = store.model_path(first.digest).stat().st_ino
    again = add_model(store, "m", FILES)
    assert again == first
    assert store.model_path(first.digest).stat().st_ino == inode


@pytest.mark.parametrize(
    "path", ["../escape", "/abs/path", "a//b", "a/../../b", "nul\x00byte", "", "x" * 256]
)
def test_unsafe_paths_are_refused_before_anything_is_written(store: Store, path: str) -> None:
    blob = store.add_blob_bytes(b"data")
    manifest, digest = manifest_for("evil")
    with pytest.raises(UnsafePathError) as info:
        store.put_model(
            digest, [ModelFile(path, blob, 4)], ref=None, source_kind="oci", manifest=manifest
        )
    assert info.value.path == path
    assert store.get_model(digest) is None
    assert list((store.root / "models" / "sha256").iterdir()) == []


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["a.bin", "./a.bin"], "two files at the same path"),
        (["a", "a/b"], "directory"),
    ],
)
def test_conflicting_paths_are_refused(store: Store, paths: list[str], message: str) -> None:
    blob = store.add_blob_bytes(b"data")
    manifest, digest = manifest_for("clash")
    files = [ModelFile(p, blob, 4) for p in paths]
    with pytest.raises(UnsafePathError, match=message):
        store.put_model(digest, files, ref=None, source_kind="oci", manifest=manifest)
    assert list((store.root / "models" / "sha256").iterdir()) == []


def test_missing_blob_is_refused(store: Store) -> None:
    manifest, digest = manifest_for("m")
    ghost = sha256_digest(b"never committed")
    with pytest.raises(StoreError, match="not committed") as info:
        store.put_model(
            digest, [ModelFile("w", ghost, 15)], ref=None, source_kind="oci", manifest=manifest
        )
    assert ghost in str(info.value)
    assert store.get_model(digest) is None


def test_file_size_must_match_the_blob(store: Store) -> None:
    blob = store.add_blob_bytes(b"1234")
    manifest, digest = manifest_for("m")
    with pytest.raises(SizeMismatchError):
        store.put_model(
            digest, [ModelFile("w", blob, 5)], ref=None, source_kind="oci", manifest=manifest
        )
    assert store.get_model(digest) is None


def test_manifest_must_hash_to_the_digest(store: Store) -> None:
    blob = store.add_blob_bytes(b"1234")
    _, digest = manifest_for("m")
    with pytest.raises(DigestMismatchError, match="manifest"):
        store.put_model(
            digest, [ModelFile("w", blob, 4)], ref=None, source_kind="oci", manifest=b"other"
        )


def test_get_and_list_models(store: Store) -> None:
    a = add_model(store, "a", {"x": b"x"})
    b = add_model(store, "b", {"y": b"y"})
    store.touch(a.digest)
    assert store.get_model(sha256_digest(b"unknown")) is None
    assert store.get_model("reg.example/not-a-digest:v1") is None
    listed = store.list_models()
    assert [m.digest for m in listed] == [a.digest, b.digest]
    assert [m.files for m in listed] == [a.files, b.files]
    assert listed[1] == b
    assert listed[1].files == (ModelFile("y", sha256_digest(b"y"), 1),)
    assert store.usage().models == 2
    assert store.get_manifest(a.digest) == manifest_for("a")[0]


def test_listed_files_outlive_the_store(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        model = add_model(store, "m", FILES)
        listed = store.list_models()
    assert [f.path for f in listed[0].files] == sorted(FILES)
    assert len(listed[0].files) == 4 and listed[0].files[0].path == "config.json"
    assert hash(listed[0]) == hash(model)


def test_remove_model_frees_only_unshared_blobs(store: Store) -> None:
    a = add_model(store, "a", {"shared": b"shared!", "own": b"own-a"})
    b = add_model(store, "b", {"shared": b"shared!"})
    store.pin(a.digest)
    assert store.remove_model(a.digest, force=True) == len(b"own-a")
    assert store.get_model(a.digest) is None
    assert not store.model_path(a.digest).exists()
    assert set(visible_blobs(store.root)) == {sha256_digest(b"shared!")}
    assert store.blob_path(sha256_digest(b"shared!")).stat().st_nlink == 2
    assert store.remove_model(b.digest) == len(b"shared!")
    assert visible_blobs(store.root) == {}
    assert [p.name for p in (store.root / "models" / "sha256").iterdir()] == []
    assert store.usage().used == 0
    with pytest.raises(ModelNotFoundError):
        store.remove_model(b.digest)


def test_remove_refuses_pinned_or_leased(store: Store) -> None:
    m = add_model(store, "m", {"w": b"w"})
    store.pin(m.digest)
    with pytest.raises(ModelInUseError, match="pinned"):
        store.remove_model(m.digest)
    store.unpin(m.digest)
    store.add_lease(m.digest, "vol-1", "csi")
    with pytest.raises(ModelInUseError, match="csi:vol-1"):
        store.remove_model(m.digest)
    assert store.get_model(m.digest) is not None
    store.release_lease("vol-1")
    assert store.remove_model(m.digest) == 1


def test_re_adding_after_remove(store: Store) -> None:
    m = add_model(store, "m", FILES)
    store.remove_model(m.digest)
    again = add_model(store, "m", FILES)
    assert (store.model_path(again.digest) / "config.json").read_bytes() == b"{}"


def test_pending_model_then_ready(store: Store) -> None:
    present = store.add_blob_bytes(b"have")
    missing = sha256_digest(b"later")
    manifest, digest = manifest_for("lazy")
    files = [ModelFile("a", present, 4), ModelFile("b/c", missing, 5, 0o555)]
    store.put_pending(digest, files, ref="r", source_kind="hf", manifest=manifest)
    pending = store.get_pending(digest)
    assert pending is not None
    assert pending.missing == (missing,)
    assert pending.files == tuple(files)
    assert pending.size == 9 and pending.source_kind == "hf"
    assert store.get_model(digest) is None
    assert store.list_models() == []
    assert not store.model_path(digest).exists()
    store.add_blob_bytes(b"later")
    model = store.put_model(digest, files, ref="r", source_kind="hf", manifest=manifest)
    assert store.get_pending(digest) is None
    assert model.files[1].mode == 0o555
    assert mode_of(store.model_path(digest) / "b/c") == 0o444  # hard link: the blob's mode
    assert os.path.samefile(store.model_path(digest) / "a", store.blob_path(present))


def test_removing_a_pending_model(store: Store) -> None:
    blob = store.add_blob_bytes(b"partial model")
    manifest, digest = manifest_for("p")
    store.put_pending(
        digest, [ModelFile("w", blob, 13)], ref=None, source_kind="oci", manifest=manifest
    )
    assert store.remove_model(digest) == 13
    assert store.get_pending(digest) is None
    assert not store.has_blob(blob)


def test_ready_model_replaces_a_partial_pending_file_list(store: Store) -> None:
    # A pull records only raw layers as pending; tar members are known once unpacked.
    raw = store.add_blob_bytes(b"raw layer")
    manifest, digest = manifest_for("tarred")
    store.put_pending(
        digest, [ModelFile("raw.bin", raw, 9)], ref="r:1", source_kind="oci", manifest=manifest
    )
    member = store.add_blob_bytes(b"member of a tar")
    files = [ModelFile("raw.bin", raw, 9), ModelFile("code/x.py", member, 15, 0o555)]
    model = store.put_model(digest, files, ref="r:1", source_kind="oci", manifest=manifest)
    assert [f.path for f in model.files] == ["code/x.py", "raw.bin"]
    assert model.size == 24
    listed = store.list_models()[0]
    assert listed.files == model.files and listed.size == 24
    assert (store.model_path(digest) / "code/x.py").read_bytes() == b"member of a tar"
    assert store.fsck().clean


def test_model_digests_lists_ready_and_pending_models(store: Store) -> None:
    ready = add_model(store, "ready", {"a": b"a"})
    manifest, pending = manifest_for("pending")
    files = [ModelFile("w.bin", sha256_digest(b"not yet"), 7)]
    store.put_pending(pending, files, ref=None, source_kind="oci", manifest=manifest)
    assert sorted(store.model_digests()) == sorted([ready.digest, pending])
    assert store.get_model(pending) is None


def test_find_model_by_digest_prefix_and_reference(store: Store) -> None:
    model = add_model(store, "named", {"a": b"a"}, ref="registry.example.com/m/named:v1")
    hexdigest = model.digest.removeprefix("sha256:")
    assert find_model(store, model.digest) == model
    assert find_model(store, hexdigest[:8]) == model
    assert find_model(store, "sha256:" + hexdigest[:8]) == model
    assert find_model(store, hexdigest[:5]) is None, "prefixes under 6 hex are too ambiguous"
    assert find_model(store, "registry.example.com/m/named:v1") == model
    assert find_model(store, "oci://registry.example.com/m/named:v1") == model
    assert find_model(store, "registry.example.com/m/other:v1") is None
