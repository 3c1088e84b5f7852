"""Manifest parsing, index selection and layer -> file mapping (sources/manifest.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cacheagent.digest import sha256_digest
from cacheagent.errors import SourceError, UnsafePathError
from cacheagent.sources.indexes import select_from_index
from cacheagent.sources.layout import blob_path
from cacheagent.sources.manifest import (
    ANNOTATION_FILEPATH,
    ANNOTATION_ORAS_UNPACK,
    ANNOTATION_TITLE,
    DOCKER_MANIFEST_LIST,
    MODELPACK_ARTIFACT,
    MODELPACK_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    ParsedIndex,
    ParsedManifest,
    is_index,
    layers_of,
    parse_manifest,
)
from tests.oci.layout_writer import LayoutEntry, write_layout

MAX = 1 << 20
D1 = sha256_digest(b"one")
D2 = sha256_digest(b"two")
D3 = sha256_digest(b"three")
WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
IMAGE_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def desc(
    media_type: str, digest: str = D1, size: int = 3, notes: dict[str, str] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if notes:
        out["annotations"] = notes
    return out


def manifest_doc(layers: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": MODELPACK_ARTIFACT,
        "config": desc(MODELPACK_CONFIG, D3, 10),
        "layers": layers,
    }
    doc.update(extra)
    return doc


def parse(doc: dict[str, Any], **kwargs: Any) -> ParsedManifest | ParsedIndex:
    return parse_manifest(json.dumps(doc).encode(), max_bytes=MAX, **kwargs)


def parse_model(doc: dict[str, Any]) -> ParsedManifest:
    parsed = parse(doc)
    assert isinstance(parsed, ParsedManifest)
    return parsed


def fpath(path: str) -> dict[str, str]:
    return {ANNOTATION_FILEPATH: path}


# -- manifests the writer builds -----------------------------------------------------------------


def read_manifest(layout: Path, digest: str) -> ParsedManifest:
    parsed = parse_manifest(blob_path(layout, digest).read_bytes(), max_bytes=MAX)
    assert isinstance(parsed, ParsedManifest)
    return parsed


def writer_entries(tmp_path: Path) -> list[LayoutEntry]:
    code = tmp_path / "src" / "code"
    code.mkdir(parents=True)
    (code / "run.py").write_text("print('hi')\n")
    return [
        LayoutEntry("model.safetensors", b"weights", "raw", "weight"),
        LayoutEntry("sub/config.json", b"{}", "raw", "weight.config"),
        LayoutEntry("code", code, "tar+gzip", "code"),
    ]


def test_modelpack_manifest_from_writer(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    digest = write_layout(layout, writer_entries(tmp_path), tag="v1", flavor="modelpack")
    manifest = read_manifest(layout, digest)
    assert manifest.is_modelpack
    assert manifest.artifact_type == MODELPACK_ARTIFACT
    assert manifest.config.media_type == MODELPACK_CONFIG
    layers = layers_of(manifest)
    assert [(layer.path, layer.unpack) for layer in layers] == [
        ("model.safetensors", "raw"),
        ("sub/config.json", "raw"),
        ("", "tar+gzip"),
    ]
    assert layers[0].blob.digest == sha256_digest(b"weights")
    assert layers[0].blob.size == len(b"weights")
    assert layers[1].blob.media_type == "application/vnd.cncf.model.weight.config.v1.raw"
    assert layers[2].blob.media_type == "application/vnd.cncf.model.code.v1.tar+gzip"


def test_oras_manifest_from_writer(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    digest = write_layout(layout, writer_entries(tmp_path), tag="v1", flavor="oras")
    manifest = read_manifest(layout, digest)
    assert not manifest.is_modelpack
    assert manifest.artifact_type == "application/vnd.unknown.artifact.v1"
    layers = layers_of(manifest)
    # oras labels plain files "...layer.v1.tar": they stay files unless marked for unpacking
    assert layers[0].blob.media_type == "application/vnd.oci.image.layer.v1.tar"
    assert [(layer.path, layer.unpack) for layer in layers] == [
        ("model.safetensors", "raw"),
        ("sub/config.json", "raw"),
        ("", "tar+gzip"),
    ]


# -- layer rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media_type", "kind"),
    [
        ("application/vnd.cncf.model.weight.v1.raw", "raw"),
        ("application/vnd.cncf.model.weight.v1.tar", "tar"),
        ("application/vnd.cncf.model.weight.config.v1.tar+gzip", "tar+gzip"),
        ("application/vnd.cncf.model.doc.v1.tar+zstd", "tar+zstd"),
        ("application/vnd.cncf.model.code.v1.raw", "raw"),
        ("application/vnd.cncf.model.dataset.v1.tar", "tar"),
        ("application/vnd.cnai.model.weight.v1.raw", "raw"),
    ],
)
def test_modelpack_media_types(media_type: str, kind: str) -> None:
    layers = layers_of(parse_model(manifest_doc([desc(media_type, notes=fpath("w/x.bin"))])))
    assert layers[0].unpack == kind
    assert layers[0].path == ("w/x.bin" if kind == "raw" else "")


def test_modelpack_raw_falls_back_to_title() -> None:
    layers = layers_of(
        parse_model(manifest_doc([desc(WEIGHT_RAW, notes={ANNOTATION_TITLE: "a.bin"})]))
    )
    assert layers[0].path == "a.bin"


def test_filepath_wins_over_title() -> None:
    notes = {ANNOTATION_FILEPATH: "real.bin", ANNOTATION_TITLE: "other.bin"}
    assert (
        layers_of(parse_model(manifest_doc([desc(WEIGHT_RAW, notes=notes)])))[0].path == "real.bin"
    )


def test_modelpack_raw_without_path_names_the_layer() -> None:
    with pytest.raises(SourceError, match=rf"layer 0 \({D1}\).*no file path"):
        layers_of(parse_model(manifest_doc([desc(WEIGHT_RAW)])))


def test_modelpack_tar_without_annotation_unpacks_at_root() -> None:
    doc = manifest_doc([desc("application/vnd.cncf.model.weight.v1.tar")])
    assert layers_of(parse_model(doc))[0].path == ""


def test_legacy_modelpack_with_plain_image_layers() -> None:
    doc = manifest_doc([desc("application/vnd.oci.image.layer.v1.tar")])
    assert layers_of(parse_model(doc))[0].unpack == "tar"


@pytest.mark.parametrize(
    ("media_type", "kind"),
    [
        ("application/vnd.oci.image.layer.v1.tar", "tar"),
        ("application/vnd.oci.image.layer.v1.tar+gzip", "tar+gzip"),
        ("application/vnd.oci.image.layer.v1.tar+zstd", "tar+zstd"),
        ("application/x-tar.tar.gz", "tar+gzip"),
    ],
)
def test_oras_unpack_annotation(media_type: str, kind: str) -> None:
    notes = {ANNOTATION_TITLE: "dir", ANNOTATION_ORAS_UNPACK: "true"}
    doc = manifest_doc([desc(media_type, notes=notes)], artifactType="application/x-thing")
    layer = layers_of(parse_model(doc))[0]
    assert (layer.path, layer.unpack) == ("", kind)


def test_oras_titled_tarball_without_unpack_is_a_file() -> None:
    doc = manifest_doc(
        [desc(IMAGE_LAYER, notes={ANNOTATION_TITLE: "data.tar.gz"})], artifactType="x/y"
    )
    layer = layers_of(parse_model(doc))[0]
    assert (layer.path, layer.unpack) == ("data.tar.gz", "raw")


def test_container_image_is_a_modelcar() -> None:
    doc = manifest_doc(
        [desc(IMAGE_LAYER, D1), desc("application/vnd.docker.image.rootfs.diff.tar.gzip", D2)],
        artifactType=None,
        config=desc("application/vnd.oci.image.config.v1+json", D3),
    )
    parsed = parse_model(doc)
    assert parsed.artifact_type == "application/vnd.oci.image.config.v1+json"
    layers = layers_of(parsed)
    assert [(la.blob.digest, la.unpack, la.subtree) for la in layers] == [
        (D1, "tar+gzip", "models"),
        (D2, "tar+gzip", "models"),
    ]


def test_titleless_layer_of_a_non_image_is_not_a_model() -> None:
    doc = manifest_doc(
        [desc(IMAGE_LAYER, D1)], artifactType=None, config=desc("application/x.other", D3)
    )
    with pytest.raises(SourceError, match=rf"layer 0 \({D1}.*not a model artifact"):
        layers_of(parse_model(doc))


def test_manifest_without_layers_is_not_a_model() -> None:
    with pytest.raises(SourceError, match="no layers"):
        layers_of(parse_model(manifest_doc([])))


def test_two_layers_same_path() -> None:
    doc = manifest_doc(
        [desc(WEIGHT_RAW, D1, notes=fpath("a.bin")), desc(WEIGHT_RAW, D2, notes=fpath("a.bin"))]
    )
    with pytest.raises(SourceError, match=rf"{D1} and {D2} both write 'a.bin'"):
        layers_of(parse_model(doc))


def test_file_where_a_directory_is_needed() -> None:
    doc = manifest_doc(
        [desc(WEIGHT_RAW, D1, notes=fpath("a")), desc(WEIGHT_RAW, D2, notes=fpath("a/b"))]
    )
    with pytest.raises(SourceError, match="needs it to be a directory"):
        layers_of(parse_model(doc))


def test_same_blob_at_two_paths_is_fine() -> None:
    doc = manifest_doc(
        [desc(WEIGHT_RAW, D1, notes=fpath("a")), desc(WEIGHT_RAW, D1, notes=fpath("b"))]
    )
    assert [layer.path for layer in layers_of(parse_model(doc))] == ["a", "b"]


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../../b", "a\x00b", "x" * 300])
def test_unsafe_annotation_paths(path: str) -> None:
    doc = manifest_doc([desc(WEIGHT_RAW, notes=fpath(path))])
    with pytest.raises(UnsafePathError, match=D1):
        layers_of(parse_model(doc))


def test_unsafe_path_on_tar_layer_is_refused_too() -> None:
    doc = manifest_doc([desc("application/vnd.cncf.model.weight.v1.tar", notes=fpath("../x"))])
    with pytest.raises(UnsafePathError):
        layers_of(parse_model(doc))


# -- malformed documents -----------------------------------------------------------------------


def good() -> dict[str, Any]:
    return manifest_doc([desc(WEIGHT_RAW, notes=fpath("a"))])


def with_layer(**changes: Any) -> dict[str, Any]:
    doc = good()
    doc["layers"][0].update(changes)
    return doc


def without(key: str) -> dict[str, Any]:
    doc = good()
    del doc[key]
    return doc


def without_layer_field(key: str) -> dict[str, Any]:
    doc = good()
    del doc["layers"][0][key]
    return doc


BAD: list[tuple[str, Any, str]] = [
    ("schema 1", {**good(), "schemaVersion": 1}, "schemaVersion"),
    ("schema string", {**good(), "schemaVersion": "2"}, "schemaVersion"),
    ("schema bool", {**good(), "schemaVersion": True}, "schemaVersion"),
    ("no schema", without("schemaVersion"), "schemaVersion"),
    ("unknown mediaType", {**good(), "mediaType": "text/plain"}, "'mediaType'"),
    ("no config", without("config"), "'config': missing"),
    ("config not object", {**good(), "config": []}, "'config'"),
    ("no layers", without("layers"), "'layers': missing"),
    ("layers not list", {**good(), "layers": {}}, "'layers': want an array"),
    ("layer not object", {**good(), "layers": ["x"]}, "'layers[0]'"),
    ("no digest", without_layer_field("digest"), "'layers[0].digest': missing"),
    ("bad digest", with_layer(digest="sha256:xyz"), "'layers[0].digest'"),
    ("sha512", with_layer(digest="sha512:" + "a" * 128), "'layers[0].digest'"),
    ("upper hex", with_layer(digest="sha256:" + "A" * 64), "'layers[0].digest'"),
    ("negative size", with_layer(size=-1), "'layers[0].size': negative"),
    ("string size", with_layer(size="3"), "'layers[0].size'"),
    ("bool size", with_layer(size=True), "'layers[0].size'"),
    ("no size", without_layer_field("size"), "'layers[0].size': missing"),
    ("no mediaType", without_layer_field("mediaType"), "'layers[0].mediaType'"),
    ("empty mediaType", with_layer(mediaType=""), "'layers[0].mediaType': empty"),
    ("annotation value", with_layer(annotations={"k": 1}), "'layers[0].annotations.k'"),
    ("annotations list", with_layer(annotations=[]), "'layers[0].annotations'"),
    ("artifactType int", {**good(), "artifactType": 5}, "'artifactType'"),
]


@pytest.mark.parametrize(("doc", "field"), [(d, f) for _, d, f in BAD], ids=[n for n, _, _ in BAD])
def test_bad_manifest_names_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(SourceError, match="manifest field") as info:
        parse(doc)
    assert field in str(info.value)


def test_too_big() -> None:
    data = json.dumps(good()).encode()
    with pytest.raises(SourceError, match=rf"{len(data)} bytes, over the 100-byte limit"):
        parse_manifest(data, max_bytes=100)


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe", b"[1, 2]", b"null"])
def test_not_a_json_object(data: bytes) -> None:
    with pytest.raises(SourceError, match="JSON"):
        parse_manifest(data, max_bytes=MAX)


def test_media_type_must_match_transport() -> None:
    with pytest.raises(SourceError, match="served as"):
        parse(good(), media_type=OCI_INDEX)


def test_media_type_from_transport_or_shape() -> None:
    doc = good()
    del doc["mediaType"]
    assert isinstance(parse(doc), ParsedManifest)
    assert isinstance(parse(doc, media_type=f"{OCI_MANIFEST}; charset=utf-8"), ParsedManifest)
    assert is_index(parse({"schemaVersion": 2, "manifests": []}))
    assert not is_index(parse(doc))


def test_docker_manifest_list_is_an_index() -> None:
    parsed = parse({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": []})
    assert is_index(parsed)
    assert parsed.media_type == DOCKER_MANIFEST_LIST


# -- indexes -------------------------------------------------------------------------------------


def entry(digest: str, platform: tuple[str, str] | None = None, **notes: str) -> dict[str, Any]:
    out = desc(OCI_MANIFEST, digest, 100, notes=notes)
    if platform:
        out["platform"] = {"os": platform[0], "architecture": platform[1]}
    return out


def index_of(*entries: dict[str, Any]) -> ParsedIndex:
    parsed = parse({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(entries)})
    assert isinstance(parsed, ParsedIndex)
    return parsed


def test_select_by_platform() -> None:
    index = index_of(entry(D1, ("linux", "amd64")), entry(D2, ("linux", "arm64")))
    assert select_from_index(index, ("linux", "arm64")).digest == D2
    assert select_from_index(index, ("linux", "amd64")).digest == D1


def test_select_single_artifact_entry() -> None:
    index = index_of(entry(D1, ("linux", "amd64")), entry(D2))
    assert select_from_index(index, None).digest == D2
    assert select_from_index(index, ("linux", "s390x")).digest == D2


def test_select_only_entry_even_with_other_platform() -> None:
    assert (
        select_from_index(index_of(entry(D1, ("linux", "arm64"))), ("linux", "amd64")).digest == D1
    )


def test_select_ignores_attestations() -> None:
    attestation = entry(
        D2, ("unknown", "unknown"), **{"vnd.docker.reference.type": "attestation-manifest"}
    )
    assert (
        select_from_index(index_of(entry(D1, ("linux", "amd64")), attestation), None).digest == D1
    )


def test_select_empty() -> None:
    with pytest.raises(SourceError, match="lists no manifests"):
        select_from_index(index_of(), ("linux", "amd64"))


def test_select_ambiguous_artifacts() -> None:
    with pytest.raises(SourceError, match=rf"ambiguous.*{D1} \(no platform\), {D2}"):
        select_from_index(index_of(entry(D1), entry(D2)), None)


def test_select_no_platform_given() -> None:
    index = index_of(entry(D1, ("linux", "amd64")), entry(D2, ("linux", "arm64")))
    with pytest.raises(SourceError, match=r"no platform given.*linux/amd64"):
        select_from_index(index, None)


def test_select_no_match() -> None:
    index = index_of(entry(D1, ("linux", "amd64")), entry(D2, ("linux", "arm64")))
    with pytest.raises(SourceError, match="platform windows/amd64"):
        select_from_index(index, ("windows", "amd64"))


def test_select_two_for_same_platform() -> None:
    index = index_of(entry(D1, ("linux", "arm64")), entry(D2, ("linux", "arm64")))
    with pytest.raises(SourceError, match="2 entries for platform linux/arm64"):
        select_from_index(index, ("linux", "arm64"))


def test_bad_platform_field() -> None:
    bad = entry(D1)
    bad["platform"] = {"os": "linux"}
    with pytest.raises(SourceError, match=r"'manifests\[0\].platform.architecture': missing"):
        index_of(bad)
