"""OCI manifests and indexes: parse them strictly and map a model artifact's layers to files. Pure.

Two artifact conventions are understood (see ``layers_of``):

* CNCF ModelPack: layer media types ``application/vnd.cncf.model.<category>.v1.<format>`` where
  category is weight, weight.config, doc, code or dataset and format is raw, tar, tar+gzip or
  tar+zstd (the older ``vnd.cnai.model`` prefix is read too). A raw layer is one file whose path is
  the ``org.cncf.model.filepath`` annotation, else ``org.opencontainers.image.title``; a layer with
  neither is an error. A tar layer is unpacked at the model root: its members carry their own
  model-relative paths (as modctl writes them), so its path annotation, if any, is only checked.
* ORAS: any layer with an ``org.opencontainers.image.title``. The layer is that file, byte for byte,
  whatever its media type (``oras push`` labels plain files ``...image.layer.v1.tar``), unless the
  layer says ``io.deis.oras.content.unpack: "true"``: then it is a directory tarball whose members
  are named ``<title>/...``, unpacked at the model root; gzip/zstd follow the media type suffix.

* Modelcar (KServe's convention): a container image (image config media type, every layer an
  image layer tar without a title) whose files under ``/models`` are the model. Each layer
  becomes a tar layer with ``subtree="models"``; ``sources.modelcar`` stacks them in order with
  whiteouts, and only that subtree is kept.

Any other layer (a titleless layer in a non-image manifest, say) makes the manifest "not a model".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard, TypeVar

from cacheagent.digest import is_digest
from cacheagent.errors import SourceError, UnsafePathError
from cacheagent.sources.base import BlobRef, Layer, UnpackKind
from cacheagent.store.paths import safe_relpath

_T = TypeVar("_T")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
#: The OCI 1.1 release candidates' artifact manifest (dropped from 1.1 final, still served by
#: registries that adopted it early): ``blobs`` in place of ``layers``, and no config.
OCI_ARTIFACT_MANIFEST = "application/vnd.oci.artifact.manifest.v1+json"
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST, OCI_ARTIFACT_MANIFEST})
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
#: What a registry client sends in ``Accept`` when it fetches a manifest.
ACCEPT_MEDIA_TYPES = (
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_ARTIFACT_MANIFEST,
)

OCI_EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
_EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
_MODELPACK_PREFIXES = ("application/vnd.cncf.model.", "application/vnd.cnai.model.")
MODELPACK_ARTIFACTS = frozenset(p + "manifest.v1+json" for p in _MODELPACK_PREFIXES)
MODELPACK_CONFIGS = frozenset(p + "config.v1+json" for p in _MODELPACK_PREFIXES)

ModelPackCategory = Literal["weight", "weight.config", "doc", "code", "dataset"]
MODELPACK_CATEGORIES: tuple[ModelPackCategory, ...] = (
    "weight",
    "weight.config",
    "doc",
    "code",
    "dataset",
)
_UNPACK_KINDS: tuple[UnpackKind, ...] = ("raw", "tar", "tar+gzip", "tar+zstd")
_MODELPACK_LAYERS: dict[str, UnpackKind] = {
    f"{prefix}{category}.v1.{kind}": kind
    for prefix in _MODELPACK_PREFIXES
    for category in MODELPACK_CATEGORIES
    for kind in _UNPACK_KINDS
}
# The first ModelPack drafts used plain OCI layer tars under a model artifactType.
_OCI_LAYER_KINDS: dict[str, UnpackKind] = {
    OCI_LAYER_TAR: "tar",
    OCI_LAYER_TAR + "+gzip": "tar+gzip",
    OCI_LAYER_TAR + "+zstd": "tar+zstd",
}

ANNOTATION_FILEPATH = "org.cncf.model.filepath"
_FILEPATH_ANNOTATIONS = (ANNOTATION_FILEPATH, "org.cnai.model.filepath")
ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_ORAS_UNPACK = "io.deis.oras.content.unpack"
ANNOTATION_ORAS_DIGEST = "io.deis.oras.content.digest"
IMAGE_CONFIGS = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)
MODELCAR_SUBTREE = "models"
_IMAGE_LAYER_KINDS: dict[str, UnpackKind] = {
    **_OCI_LAYER_KINDS,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "tar+gzip",
}
# Docker buildx lists attestation manifests (platform unknown/unknown) next to the images.
ANNOTATION_DOCKER_REF_TYPE = "vnd.docker.reference.type"


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor (a reference to a blob, with what the referrer says about it)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    artifact_type: str = ""
    platform: Platform | None = None

    @property
    def blob(self) -> BlobRef:
        return BlobRef(self.digest, self.size, self.media_type)


@dataclass(frozen=True)
class ParsedManifest:
    """An image manifest. ``artifact_type`` is ``artifactType``, else the config media type
    (the OCI artifacts guidance rule)."""

    media_type: str
    artifact_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_modelpack(self) -> bool:
        return (
            self.artifact_type in MODELPACK_ARTIFACTS or self.config.media_type in MODELPACK_CONFIGS
        )


@dataclass(frozen=True)
class ParsedIndex:
    """An image index (or Docker manifest list)."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    artifact_type: str = ""


ParsedDocument = ParsedManifest | ParsedIndex


def is_index(doc: ParsedDocument) -> TypeGuard[ParsedIndex]:
    return isinstance(doc, ParsedIndex)


def is_index_media_type(media_type: str) -> bool:
    return media_type.split(";", 1)[0].strip() in INDEX_MEDIA_TYPES


def modelpack_media_type(category: ModelPackCategory, unpack: UnpackKind) -> str:
    """The ModelPack layer media type for a category and format (what a writer should label)."""
    return f"{_MODELPACK_PREFIXES[0]}{category}.v1.{unpack}"


# ---------------------------------------------------------------------------------------------
# parsing


def parse_manifest(data: bytes, *, max_bytes: int, media_type: str | None = None) -> ParsedDocument:
    """Parse a manifest or index, refusing anything malformed with the offending field named.

    ``media_type`` is what the transport said (a registry's Content-Type); it is used when the
    document has no ``mediaType`` and must agree with it when it has one.
    """
    if len(data) > max_bytes:
        raise SourceError(f"manifest is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise SourceError("manifest is not a JSON object")
    schema = doc.get("schemaVersion")
    artifact = doc.get("mediaType") == OCI_ARTIFACT_MANIFEST  # the 1.1-rc form has no version
    if not artifact and (type(schema) is not int or schema != 2):
        raise SourceError(f"manifest field 'schemaVersion': want 2, got {_show(schema)}")
    kind = _document_media_type(doc, media_type)
    if kind in INDEX_MEDIA_TYPES:
        return _parse_index(doc, kind)
    return _parse_image_manifest(doc, kind)


def _document_media_type(doc: dict[str, Any], transport: str | None) -> str:
    transport = transport.split(";", 1)[0].strip() if transport else None
    declared = _optional_str(doc, "mediaType", "")
    known = MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES
    if declared:
        if declared not in known:
            raise SourceError(f"manifest field 'mediaType': unsupported media type {declared!r}")
        if transport in known and transport != declared:
            raise SourceError(
                f"manifest field 'mediaType': says {declared!r} but was served as {transport!r}"
            )
        return declared
    if transport in known:
        return transport
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc or "layers" in doc:
        return OCI_MANIFEST
    raise SourceError("manifest field 'mediaType': missing, and the document is neither kind")


def _parse_index(doc: dict[str, Any], media_type: str) -> ParsedIndex:
    entries = _required(doc, "manifests", list, "")
    return ParsedIndex(
        media_type=media_type,
        manifests=tuple(_descriptor(e, f"manifests[{i}]") for i, e in enumerate(entries)),
        annotations=_annotations(doc, ""),
        artifact_type=_optional_str(doc, "artifactType", ""),
    )


def _parse_image_manifest(doc: dict[str, Any], media_type: str) -> ParsedManifest:
    if media_type == OCI_ARTIFACT_MANIFEST:  # no config: the OCI empty descriptor stands in
        config = Descriptor(OCI_EMPTY_CONFIG, _EMPTY_JSON_DIGEST, 2)
        blobs = _required(doc, "blobs", list, "")
        return ParsedManifest(
            media_type=media_type,
            artifact_type=_optional_str(doc, "artifactType", ""),
            config=config,
            layers=tuple(_descriptor(e, f"blobs[{i}]") for i, e in enumerate(blobs)),
            annotations=_annotations(doc, ""),
        )
    config = _descriptor(_required(doc, "config", dict, ""), "config")
    layers = _required(doc, "layers", list, "")
    artifact_type = _optional_str(doc, "artifactType", "")
    return ParsedManifest(
        media_type=media_type,
        artifact_type=artifact_type or config.media_type,
        config=config,
        layers=tuple(_descriptor(e, f"layers[{i}]") for i, e in enumerate(layers)),
        annotations=_annotations(doc, ""),
    )


def _descriptor(obj: object, where: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise SourceError(f"manifest field '{where}': not a JSON object")
    media_type = _required(obj, "mediaType", str, where)
    if not media_type:
        raise SourceError(f"manifest field '{where}.mediaType': empty")
    digest = _required(obj, "digest", str, where)
    if not is_digest(digest):
        raise SourceError(
            f"manifest field '{where}.digest': not a sha256 digest "
            f"('sha256:' + 64 lowercase hex): {_show(digest)}"
        )
    size = _required(obj, "size", int, where)
    if size < 0:
        raise SourceError(f"manifest field '{where}.size': negative ({size})")
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        annotations=_annotations(obj, where),
        artifact_type=_optional_str(obj, "artifactType", where),
        platform=_platform(obj.get("platform"), where),
    )


def _platform(obj: object, where: str) -> Platform | None:
    if obj is None:
        return None
    where = f"{where}.platform"
    if not isinstance(obj, dict):
        raise SourceError(f"manifest field '{where}': not a JSON object")
    return Platform(
        os=_required(obj, "os", str, where),
        architecture=_required(obj, "architecture", str, where),
        variant=_optional_str(obj, "variant", where),
    )


def _annotations(obj: dict[str, Any], where: str) -> dict[str, str]:
    value = obj.get("annotations")
    if value is None:
        return {}
    name = _join(where, "annotations")
    if not isinstance(value, dict):
        raise SourceError(f"manifest field '{name}': not a JSON object")
    for key, item in value.items():
        if not isinstance(item, str):
            raise SourceError(f"manifest field '{name}.{key}': not a string")
    return dict(value)


def _required(obj: dict[str, Any], key: str, kind: type[_T], where: str) -> _T:
    name = _join(where, key)
    if key not in obj:
        raise SourceError(f"manifest field '{name}': missing")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SourceError(f"manifest field '{name}': want {_json_type(kind)}, got {_show(value)}")
    return value


def _optional_str(obj: dict[str, Any], key: str, where: str) -> str:
    if obj.get(key) is None:
        return ""
    return _required(obj, key, str, where)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _json_type(kind: type) -> str:
    names = {str: "a string", int: "an integer", list: "an array", dict: "an object"}
    return names.get(kind, kind.__name__)


# ---------------------------------------------------------------------------------------------
# layers -> files


def layers_of(manifest: ParsedManifest) -> tuple[Layer, ...]:
    """Map each layer to where it lands in the model tree (module docstring has the rules)."""
    if not manifest.layers:
        raise SourceError("manifest has no layers: not a model artifact")
    if is_modelcar(manifest):
        return tuple(
            Layer(d.blob, "", _IMAGE_LAYER_KINDS[d.media_type], MODELCAR_SUBTREE)
            for d in manifest.layers
        )
    layers = tuple(_layer(desc, i, manifest.is_modelpack) for i, desc in enumerate(manifest.layers))
    _check_raw_paths(layers)
    return layers


def is_modelcar(manifest: ParsedManifest) -> bool:
    """A container image (no ModelPack or ORAS marks): its ``/models`` subtree is the model."""
    return (
        not manifest.is_modelpack
        and manifest.config.media_type in IMAGE_CONFIGS
        and all(
            d.media_type in _IMAGE_LAYER_KINDS and ANNOTATION_TITLE not in d.annotations
            for d in manifest.layers
        )
    )


def _layer(desc: Descriptor, index: int, modelpack: bool) -> Layer:
    modelpack_kind = _MODELPACK_LAYERS.get(desc.media_type)
    if modelpack_kind is not None:
        return _modelpack_layer(desc, index, modelpack_kind)
    if ANNOTATION_TITLE in desc.annotations:
        return _oras_layer(desc, index)
    legacy_kind = _OCI_LAYER_KINDS.get(desc.media_type)
    if modelpack and legacy_kind is not None:
        return Layer(desc.blob, "", legacy_kind)
    raise SourceError(
        f"layer {index} ({desc.digest}, mediaType {desc.media_type}) has neither a ModelPack "
        f"media type nor an {ANNOTATION_TITLE} annotation: not a model artifact "
        "(a container image?)"
    )


def _modelpack_layer(desc: Descriptor, index: int, kind: UnpackKind) -> Layer:
    names = (*_FILEPATH_ANNOTATIONS, ANNOTATION_TITLE)
    annotated = next((desc.annotations[n] for n in names if n in desc.annotations), None)
    if annotated is None:
        if kind == "raw":
            raise SourceError(
                f"layer {index} ({desc.digest}) is a raw ModelPack layer without a "
                f"{ANNOTATION_FILEPATH} or {ANNOTATION_TITLE} annotation: no file path"
            )
        return Layer(desc.blob, "", kind)
    path = _checked_path(annotated, desc, index)
    return Layer(desc.blob, path if kind == "raw" else "", kind)


def _oras_layer(desc: Descriptor, index: int) -> Layer:
    path = _checked_path(desc.annotations[ANNOTATION_TITLE], desc, index)
    if desc.annotations.get(ANNOTATION_ORAS_UNPACK, "").lower() != "true":
        return Layer(desc.blob, path, "raw")
    return Layer(desc.blob, "", _tar_kind_from_suffix(desc.media_type))


def _tar_kind_from_suffix(media_type: str) -> UnpackKind:
    if media_type.endswith(("+zstd", ".tar.zst", ".tar.zstd")):
        return "tar+zstd"
    if media_type.endswith(("+gzip", ".tar.gz", ".tgz", "gzip")):
        return "tar+gzip"
    return "tar"


def _checked_path(path: str, desc: Descriptor, index: int) -> str:
    try:
        return safe_relpath(path)
    except UnsafePathError as exc:
        raise UnsafePathError(path, f"{exc.problem} (layer {index}, {desc.digest})") from exc


def _check_raw_paths(layers: tuple[Layer, ...]) -> None:
    """Two layers may not write the same file, nor a file where another needs a directory."""
    owners: dict[str, str] = {}
    for layer in layers:
        if layer.unpack != "raw":
            continue
        previous = owners.get(layer.path)
        if previous is not None:
            raise SourceError(
                f"layers {previous} and {layer.blob.digest} both write {layer.path!r}"
            )
        owners[layer.path] = layer.blob.digest
    for path, digest in owners.items():
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in owners:
                raise SourceError(
                    f"layer {owners[parent]} writes file {parent!r} but layer {digest} "
                    f"needs it to be a directory for {path!r}"
                )
