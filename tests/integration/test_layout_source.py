"""The OCI layout source over real layouts written by layout_writer, read back through tarsafe."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
from pathlib import Path

import pytest

from cacheagent.digest import sha256_digest
from cacheagent.errors import (
    DigestMismatchError,
    ModelNotFoundError,
    SourceError,
)
from cacheagent.refs import LayoutRef, parse_ref
from cacheagent.sources.base import Layer, ResolvedModel, UnpackKind
from cacheagent.sources.layout import OciLayoutSource, blob_path
from cacheagent.sources.manifest import MODELPACK_ARTIFACT, OCI_INDEX, OCI_MANIFEST
from cacheagent.sources.tarsafe import UnpackedFile, unpack_tar
from tests.oci.layout_writer import (
    Flavor,
    LayoutEntry,
    expected_files,
    set_tag,
    synthetic_model,
    write_blob_bytes,
    write_layout,
    write_synthetic_layout,
)

SIZE = 3 << 20


def ref(layout: Path, tag: str | None = "v1", digest: str | None = None) -> LayoutRef:
    return LayoutRef(path=str(layout), tag=tag, digest=digest)


async def fetch_all(
    source: OciLayoutSource, layer: Layer, start: int = 0, end: int | None = None
) -> bytes:
    return b"".join([chunk async for chunk in source.fetch(layer.blob, start, end)])


async def materialise(source: OciLayoutSource, model: ResolvedModel, work: Path) -> dict[str, str]:
    """What the pull engine does, minus the store: fetch every layer, unpack tars safely."""
    tree: dict[str, str] = {}
    for i, layer in enumerate(model.layers):
        data = await fetch_all(source, layer)
        assert sha256_digest(data) == layer.blob.digest
        if layer.unpack == "raw":
            tree[layer.path] = layer.blob.digest
        else:
            unpacked = await asyncio.to_thread(unpack_layer, data, layer, work / f"layer{i}")
            tree.update({entry.path: entry.digest for entry in unpacked})
    return tree


def unpack_layer(data: bytes, layer: Layer, blob: Path) -> tuple[UnpackedFile, ...]:
    blob.write_bytes(data)

    def check(entry: UnpackedFile, tmp: Path) -> None:
        assert sha256_digest(tmp.read_bytes()) == entry.digest

    return unpack_tar(
        blob, layer.unpack, blob.parent, check, max_total_bytes=1 << 30, prefix=layer.path
    )


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[LayoutEntry]]:
    src = tmp_path_factory.mktemp("src")
    return src, synthetic_model(src, SIZE, seed=7)


@pytest.mark.parametrize("flavor", ["modelpack", "oras"])
async def test_resolve_by_tag_and_unpack(
    flavor: Flavor, model_dir: tuple[Path, list[LayoutEntry]], tmp_path: Path
) -> None:
    _, entries = model_dir
    layout = tmp_path / "layout"
    digest = write_layout(layout, entries, tag="v1", flavor=flavor)
    source = OciLayoutSource()
    model = await source.resolve(ref(layout))
    assert model.manifest_digest == digest
    assert sha256_digest(model.manifest) == digest
    assert model.ref == ref(layout)
    if flavor == "modelpack":
        assert model.artifact_type == MODELPACK_ARTIFACT
    tree = await materialise(source, model, tmp_path)
    assert tree == expected_files(entries)
    assert "code/modeling_synthetic.py" in tree
    assert SIZE <= model.total_size < SIZE + (64 << 10)


@pytest.mark.parametrize("flavor", ["modelpack", "oras"])
@pytest.mark.parametrize("weight_unpack", ["tar", "tar+zstd"])
async def test_weights_in_tar_layers(
    flavor: Flavor, weight_unpack: UnpackKind, tmp_path: Path
) -> None:
    entries = synthetic_model(tmp_path / "src", 1 << 20, weight_unpack=weight_unpack)
    layout = tmp_path / "layout"
    write_layout(layout, entries, tag="v1", flavor=flavor)
    source = OciLayoutSource()
    model = await source.resolve(ref(layout))
    assert sum(layer.unpack == weight_unpack for layer in model.layers) == 3
    assert await materialise(source, model, tmp_path) == expected_files(entries)


async def test_synthetic_weights_are_valid_safetensors(
    model_dir: tuple[Path, list[LayoutEntry]],
) -> None:
    src, entries = model_dir
    shards = sorted(src.glob("*.safetensors"))
    assert len(shards) == 3
    for shard in shards:
        data = shard.read_bytes()
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        assert header_len % 8 == 0
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max(t["data_offsets"][1] for t in tensors.values())
        assert 8 + header_len + end == len(data)
        for t in tensors.values():
            rows, cols = t["shape"]
            assert t["data_offsets"][1] - t["data_offsets"][0] == rows * cols * 2
    index = json.loads((src / "model.safetensors.index.json").read_bytes())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert {e.category for e in entries} == {"weight", "weight.config", "doc", "code"}


def test_synthetic_model_is_deterministic(tmp_path: Path) -> None:
    a = write_synthetic_layout(tmp_path / "a", 1 << 20, seed=3)
    b = write_synthetic_layout(tmp_path / "b", 1 << 20, seed=3)
    c = write_synthetic_layout(tmp_path / "c", 1 << 20, seed=4)
    assert a == b != c
    assert not list(tmp_path.glob(".synthetic-*")), "scratch dir left behind"


async def test_resolve_by_digest_and_parsed_ref(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    v1 = write_synthetic_layout(layout, 1 << 20, tag="v1", seed=1)
    v2 = write_synthetic_layout(layout, 1 << 20, tag="v2", seed=2)
    source = OciLayoutSource()
    assert (await source.resolve(parse_ref(f"oci-layout://{layout}:v2"))).manifest_digest == v2
    by_digest = await source.resolve(parse_ref(f"oci-layout://{layout}@{v1}"))
    assert by_digest.manifest_digest == v1
    # a digest wins over a tag
    assert (await source.resolve(ref(layout, "v2", v1))).manifest_digest == v1


async def test_retag_moves_the_tag(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_synthetic_layout(layout, 1 << 16, tag="v1", seed=1)
    newer = write_synthetic_layout(layout, 1 << 16, tag="v1", seed=2)
    assert (await OciLayoutSource().resolve(ref(layout))).manifest_digest == newer
    index = json.loads((layout / "index.json").read_bytes())
    assert len(index["manifests"]) == 1


async def test_fetch_ranges(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_synthetic_layout(layout, 1 << 20, tag="v1", code_layer=False)
    source = OciLayoutSource(chunk_bytes=64 << 10)
    model = await source.resolve(ref(layout))
    layer = max(model.layers, key=lambda la: la.blob.size)
    whole = blob_path(layout, layer.blob.digest).read_bytes()
    chunks = [c async for c in source.fetch(layer.blob)]
    assert len(chunks) == -(-len(whole) // (64 << 10))
    assert b"".join(chunks) == whole
    assert await fetch_all(source, layer, 1000, 200_000) == whole[1000:200_000]
    assert await fetch_all(source, layer, len(whole) - 5) == whole[-5:]
    assert await fetch_all(source, layer, 10, 10) == b""
    with pytest.raises(ValueError, match="outside blob"):
        await fetch_all(source, layer, 0, len(whole) + 1)
    with pytest.raises(ValueError, match="outside blob"):
        await fetch_all(source, layer, 5, 4)


async def test_missing_tag(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_synthetic_layout(layout, 1 << 16, tag="v1")
    with pytest.raises(
        ModelNotFoundError, match=rf"tag 'nope' not found in OCI layout {layout} \(tags: v1\)"
    ):
        await OciLayoutSource().resolve(ref(layout, "nope"))


async def test_missing_digest(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_synthetic_layout(layout, 1 << 16, tag="v1")
    missing = sha256_digest(b"nothing")
    with pytest.raises(ModelNotFoundError, match=rf"manifest {missing} not found in OCI layout"):
        await OciLayoutSource().resolve(ref(layout, None, missing))


async def test_not_a_layout(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no OCI image layout"):
        await OciLayoutSource().resolve(ref(tmp_path / "absent"))


async def test_wrong_layout_version(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_synthetic_layout(layout, 1 << 16, tag="v1")
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    with pytest.raises(SourceError, match=r"unsupported imageLayoutVersion '2\.0\.0'"):
        await OciLayoutSource().resolve(ref(layout))


async def test_tampered_manifest(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    digest = write_synthetic_layout(layout, 1 << 16, tag="v1")
    path = blob_path(layout, digest)
    path.write_bytes(path.read_bytes().replace(b'"size": ', b'"size":  ', 1))
    with pytest.raises(DigestMismatchError, match=rf"expected {digest}"):
        await OciLayoutSource().resolve(ref(layout))


async def test_manifest_size_must_match_descriptor(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    digest = write_synthetic_layout(layout, 1 << 16, tag="v1")
    size = blob_path(layout, digest).stat().st_size
    set_tag(layout, "v1", {"mediaType": OCI_MANIFEST, "digest": digest, "size": size + 1})
    with pytest.raises(SourceError, match=f"does not have the {size + 1} bytes") as caught:
        await OciLayoutSource().resolve(ref(layout))
    assert str(size) not in str(caught.value).replace(str(size + 1), "")


async def test_oversized_manifest_refused(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_synthetic_layout(layout, 1 << 16, tag="v1")
    with pytest.raises(SourceError, match="over the 200-byte limit"):
        await OciLayoutSource(manifest_max_bytes=200).resolve(ref(layout))


async def test_nested_index_follows_platform(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    amd = write_synthetic_layout(layout, 1 << 16, tag="amd", seed=1)
    arm = write_synthetic_layout(layout, 1 << 16, tag="arm", seed=2)

    def entry(digest: str, arch: str) -> dict[str, object]:
        size = blob_path(layout, digest).stat().st_size
        platform = {"os": "linux", "architecture": arch}
        return {"mediaType": OCI_MANIFEST, "digest": digest, "size": size, "platform": platform}

    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [entry(amd, "amd64"), entry(arm, "arm64")],
        }
    ).encode()
    index_digest = write_blob_bytes(layout, index)
    set_tag(layout, "multi", {"mediaType": OCI_INDEX, "digest": index_digest, "size": len(index)})
    arm_source = OciLayoutSource(platform=("linux", "arm64"))
    assert (await arm_source.resolve(ref(layout, "multi"))).manifest_digest == arm
    by_digest = await OciLayoutSource(platform=("linux", "amd64")).resolve(
        ref(layout, None, index_digest)
    )
    assert by_digest.manifest_digest == amd
    with pytest.raises(SourceError, match="ambiguous"):
        await OciLayoutSource().resolve(ref(layout, "multi"))


async def test_fetch_needs_a_resolved_model(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_synthetic_layout(layout, 1 << 16, tag="v1")
    resolved = await OciLayoutSource().resolve(ref(layout))
    with pytest.raises(ModelNotFoundError, match="no model this oci-layout source has resolved"):
        await fetch_all(OciLayoutSource(), resolved.layers[0])


async def test_fetch_missing_or_wrong_size_blob(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_synthetic_layout(layout, 1 << 16, tag="v1")
    source = OciLayoutSource()
    model = await source.resolve(ref(layout))
    first, second = model.layers[0], model.layers[1]
    blob_path(layout, first.blob.digest).unlink()
    with pytest.raises(ModelNotFoundError, match=first.blob.digest):
        await fetch_all(source, first)
    append(blob_path(layout, second.blob.digest), b"extra")
    with pytest.raises(SourceError, match=second.blob.digest) as caught:
        await fetch_all(source, second)
    # The size of what was opened is not told (it may be a file the ref's author cannot read).
    actual = blob_path(layout, second.blob.digest).stat().st_size
    assert str(actual) not in str(caught.value)


async def test_other_ref_kinds_refused() -> None:
    with pytest.raises(SourceError, match="cannot resolve"):
        await OciLayoutSource().resolve(parse_ref("registry.example.com/models/x:v1"))


async def test_container_image_in_layout_is_a_modelcar(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_synthetic_layout(layout, 1 << 16, tag="v1")
    layer = b"not really a layer"
    layer_digest = write_blob_bytes(layout, layer)
    config = write_blob_bytes(layout, b"{}")
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config,
                "size": 2,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest,
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    digest = write_blob_bytes(layout, manifest)
    set_tag(layout, "image", {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest)})
    resolved = await OciLayoutSource().resolve(ref(layout, "image"))
    assert [(la.unpack, la.subtree) for la in resolved.layers] == [("tar+gzip", "models")]


def test_writer_streams_big_files(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    chunk = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
    with open(big, "wb") as f:
        for _ in range(20):
            f.write(chunk)
    digest = write_layout(tmp_path / "layout", [LayoutEntry("big.bin", big)], tag="v1")
    manifest = json.loads(blob_path(tmp_path / "layout", digest).read_bytes())
    layer = manifest["layers"][0]
    assert layer["size"] == 20 << 20
    assert layer["digest"] == sha256_digest(chunk * 20)
    assert layer["annotations"] == {"org.cncf.model.filepath": "big.bin"}
