"""The OCI layout source never follows a symlink nor leaves the layout directory.

Each case runs twice: with openat2(2) and with the O_NOFOLLOW walk used where the kernel has
no openat2, so both paths of ``sources.beneath`` are held to the same rules.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheagent.errors import ModelNotFoundError, SourceError
from cacheagent.refs import LayoutRef
from cacheagent.sources import beneath
from cacheagent.sources.layout import OciLayoutSource, blob_path
from tests.oci.layout_writer import write_synthetic_layout

SECRET = b"top secret token of another pod\n"


@pytest.fixture(params=["openat2", "walk"])
def resolver_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # None: openat2 is tried (this kernel has it); False: the fallback walk is forced.
    monkeypatch.setattr(beneath, "_openat2_works", None if request.param == "openat2" else False)
    yield str(request.param)


def ref(layout: Path) -> LayoutRef:
    return LayoutRef(path=str(layout), tag="v1", digest=None)


def secret_file(tmp_path: Path) -> Path:
    secret = tmp_path / "other-pod-secret"
    secret.write_bytes(SECRET)
    return secret


async def test_blob_symlink_is_not_followed(tmp_path: Path, resolver_mode: str) -> None:
    layout = tmp_path / "layout"
    write_synthetic_layout(layout, 1 << 16, tag="v1")
    source = OciLayoutSource()
    model = await source.resolve(ref(layout))
    layer = model.layers[0]
    target = blob_path(layout, layer.blob.digest)
    # A secret of exactly the declared size: only the symlink rule can stop it.
    secret = tmp_path / "sized-secret"
    secret.write_bytes(SECRET * (layer.blob.size // len(SECRET) + 1))
    os.truncate(secret, layer.blob.size)
    target.unlink()
    target.symlink_to(secret)
    with pytest.raises(SourceError, match="not a regular file inside the layout"):
        async for _ in source.fetch(layer.blob):
            pytest.fail("a byte was read through the symlink")


async def test_manifest_and_index_symlinks_refused(tmp_path: Path, resolver_mode: str) -> None:
    layout = tmp_path / "layout"
    digest = write_synthetic_layout(layout, 1 << 16, tag="v1")
    manifest = blob_path(layout, digest)
    moved = tmp_path / "manifest-elsewhere"
    shutil.move(manifest, moved)
    manifest.symlink_to(moved)
    with pytest.raises(SourceError, match="symlink"):
        await OciLayoutSource().resolve(ref(layout))
    index = layout / "index.json"
    shutil.move(index, tmp_path / "index-elsewhere")
    index.symlink_to(tmp_path / "index-elsewhere")
    with pytest.raises(SourceError, match=r"index\.json is not a regular file"):
        await OciLayoutSource().resolve(ref(layout))


async def test_symlinked_blobs_directory_refused(tmp_path: Path, resolver_mode: str) -> None:
    layout = tmp_path / "layout"
    write_synthetic_layout(layout, 1 << 16, tag="v1")
    shutil.move(layout / "blobs", tmp_path / "blobs-elsewhere")
    (layout / "blobs").symlink_to(tmp_path / "blobs-elsewhere")
    with pytest.raises(SourceError, match="symlink"):
        await OciLayoutSource().resolve(ref(layout))


async def test_layout_path_through_a_symlink_refused(tmp_path: Path, resolver_mode: str) -> None:
    real = tmp_path / "real"
    write_synthetic_layout(real / "layout", 1 << 16, tag="v1")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(SourceError, match="goes through a symlink"):
        await OciLayoutSource().resolve(ref(tmp_path / "link" / "layout"))
    # The real path works.
    assert (await OciLayoutSource().resolve(ref(real / "layout"))).layers


async def test_fifo_blob_refused_without_hanging(tmp_path: Path, resolver_mode: str) -> None:
    layout = tmp_path / "layout"
    write_synthetic_layout(layout, 1 << 16, tag="v1")
    source = OciLayoutSource()
    model = await source.resolve(ref(layout))
    target = blob_path(layout, model.layers[0].blob.digest)
    target.unlink()
    os.mkfifo(target)
    with pytest.raises(SourceError, match="not a regular file"):
        async for _ in source.fetch(model.layers[0].blob):
            pass


async def test_missing_layout_is_not_found(tmp_path: Path, resolver_mode: str) -> None:
    with pytest.raises(ModelNotFoundError, match="no OCI image layout"):
        await OciLayoutSource().resolve(ref(tmp_path / "nothing"))
