"""Build OCI image layouts holding model artifacts: the fixture behind tests, the demo and benches.

``write_layout`` packs files into a CNCF ModelPack artifact (the layout modctl would produce: raw
or tar layers labelled ``application/vnd.cncf.model.<category>.v1.<format>``, a ModelPack config,
``org.cncf.model.filepath`` annotations) or an ORAS artifact (what ``oras push`` produces: files
as ``...image.layer.v1.tar`` layers with a title, directories as gzip tarballs with
``io.deis.oras.content.unpack``). Blobs are streamed from the source files and hashed while they
are copied, so multi-GB models need no memory. ``synthetic_model`` makes a deterministic
safetensors-shaped model of a requested size fast enough for a test's setup.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import struct
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, cast

import zstandard

from cacheagent.digest import sha256_digest
from cacheagent.sources.base import UnpackKind
from cacheagent.sources.layout import INDEX_FILE, LAYOUT_FILE, LAYOUT_VERSION, blob_path
from cacheagent.sources.manifest import (
    ANNOTATION_FILEPATH,
    ANNOTATION_ORAS_DIGEST,
    ANNOTATION_ORAS_UNPACK,
    ANNOTATION_REF_NAME,
    ANNOTATION_TITLE,
    MODELPACK_ARTIFACT,
    MODELPACK_CONFIG,
    OCI_EMPTY_CONFIG,
    OCI_INDEX,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    ModelPackCategory,
    modelpack_media_type,
)

Flavor = Literal["modelpack", "oras"]
ORAS_DEFAULT_ARTIFACT_TYPE = "application/vnd.unknown.artifact.v1"
_COPY_BYTES = 8 << 20
_ORAS_TAR_TYPES: dict[UnpackKind, str] = {
    "raw": OCI_LAYER_TAR,
    "tar": OCI_LAYER_TAR,
    "tar+gzip": OCI_LAYER_TAR + "+gzip",
    "tar+zstd": OCI_LAYER_TAR + "+zstd",
}


@dataclass(frozen=True)
class LayoutEntry:
    """One layer to write.

    ``path`` is where the content lands in the model tree: the file for ``raw``; for tar kinds the
    member name of a file ``source``, or the directory a directory ``source`` is archived under
    ("" for the root; ORAS needs a name).
    """

    path: str
    source: Path | bytes
    unpack: UnpackKind = "raw"
    category: ModelPackCategory = "weight"


@dataclass(frozen=True)
class _Written:
    digest: str
    size: int
    diff_id: str


def write_layout(
    layout_dir: Path,
    entries: Sequence[LayoutEntry],
    *,
    tag: str | None = "latest",
    flavor: Flavor = "modelpack",
    name: str = "model",
    artifact_type: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> str:
    """Write (or add to) an OCI layout at ``layout_dir``; returns the manifest digest.

    A ``tag`` already in ``index.json`` is moved to the new manifest.
    """
    init_layout(layout_dir)
    layers = [_write_layer(layout_dir, entry, flavor) for entry in entries]
    if flavor == "modelpack":
        config = _modelpack_config(name, [w for w, _ in layers])
        config_type, kind = MODELPACK_CONFIG, artifact_type or MODELPACK_ARTIFACT
    else:
        config, config_type = b"{}", OCI_EMPTY_CONFIG
        kind = artifact_type or ORAS_DEFAULT_ARTIFACT_TYPE
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": kind,
        "config": _descriptor(config_type, write_blob_bytes(layout_dir, config), len(config)),
        "layers": [descriptor for _, descriptor in layers],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    data = json.dumps(manifest, indent=2).encode()
    digest = write_blob_bytes(layout_dir, data)
    if tag is not None:
        set_tag(layout_dir, tag, _descriptor(OCI_MANIFEST, digest, len(data), artifactType=kind))
    return digest


def init_layout(layout_dir: Path) -> None:
    """Create the ``oci-layout`` marker, an empty ``index.json`` and ``blobs/sha256``."""
    (layout_dir / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    marker = layout_dir / LAYOUT_FILE
    if not marker.exists():
        _write_atomic(marker, json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode())
    if not (layout_dir / INDEX_FILE).exists():
        _write_index(layout_dir, [])


def write_blob_bytes(layout_dir: Path, data: bytes) -> str:
    """Store a small blob (a manifest, a config) and return its digest."""
    digest = sha256_digest(data)
    target = blob_path(layout_dir, digest)
    if not target.exists():
        _write_atomic(target, data)
    return digest


def set_tag(layout_dir: Path, tag: str, descriptor: Mapping[str, Any]) -> None:
    """Point ``tag`` at ``descriptor`` in ``index.json`` (dropping its previous entry)."""
    index = json.loads((layout_dir / INDEX_FILE).read_bytes())
    entries = [
        e
        for e in index.get("manifests", [])
        if e.get("annotations", {}).get(ANNOTATION_REF_NAME) != tag
    ]
    tagged = dict(descriptor)
    tagged["annotations"] = {**tagged.get("annotations", {}), ANNOTATION_REF_NAME: tag}
    entries.append(tagged)
    _write_index(layout_dir, entries)


def expected_files(entries: Sequence[LayoutEntry]) -> dict[str, str]:
    """The model tree ``entries`` should unpack to: model-relative path -> sha256 digest."""
    files: dict[str, str] = {}
    for entry in entries:
        for member, source in _entry_files(entry):
            files[member] = _digest_of(source)
    return files


# ---------------------------------------------------------------------------------------------
# layers


def _write_layer(
    layout_dir: Path, entry: LayoutEntry, flavor: Flavor
) -> tuple[_Written, dict[str, Any]]:
    _check_entry(entry, flavor)
    if entry.unpack == "raw":
        written = _write_raw(layout_dir, entry.source)
    else:
        written = _write_tar(layout_dir, entry)
    if flavor == "modelpack":
        media_type = modelpack_media_type(entry.category, entry.unpack)
        notes = {ANNOTATION_FILEPATH: entry.path} if entry.path else {}
    else:
        media_type = _ORAS_TAR_TYPES[entry.unpack]
        notes = {ANNOTATION_TITLE: entry.path}
        if entry.unpack != "raw":
            notes |= {ANNOTATION_ORAS_UNPACK: "true", ANNOTATION_ORAS_DIGEST: written.diff_id}
    descriptor = _descriptor(media_type, written.digest, written.size)
    if notes:
        descriptor["annotations"] = notes
    return written, descriptor


def _check_entry(entry: LayoutEntry, flavor: Flavor) -> None:
    if entry.path:
        return
    if flavor == "oras":
        raise ValueError("an ORAS layer needs a path (its title)")
    if entry.unpack == "raw" or isinstance(entry.source, bytes) or not entry.source.is_dir():
        raise ValueError("only a directory archived at the model root may have an empty path")


def _write_raw(layout_dir: Path, source: Path | bytes) -> _Written:
    with _blob_sink(layout_dir) as sink:
        if isinstance(source, bytes):
            sink.write(source)
        else:
            with open(source, "rb") as f:
                while chunk := f.read(_COPY_BYTES):
                    sink.write(chunk)
    return _Written(sink.digest, sink.size, sink.digest)


def _write_tar(layout_dir: Path, entry: LayoutEntry) -> _Written:
    with _blob_sink(layout_dir) as sink, _compressor(sink, entry.unpack) as compressed:
        tar_hash = _HashingWriter(compressed)
        with tarfile.open(fileobj=tar_hash.as_file(), mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for member, source in _entry_members(entry):
                _add_member(tar, member, source)
    return _Written(sink.digest, sink.size, tar_hash.digest)


@contextmanager
def _compressor(sink: _HashingWriter, kind: UnpackKind) -> Iterator[IO[bytes]]:
    if kind == "tar":
        yield sink.as_file()
    elif kind == "tar+gzip":
        with gzip.GzipFile(fileobj=sink.as_file(), mode="wb", mtime=0) as gz:
            yield cast(IO[bytes], gz)
    else:
        writer = zstandard.ZstdCompressor().stream_writer(sink.as_file(), closefd=False)
        with writer:
            yield cast(IO[bytes], writer)


def _entry_members(entry: LayoutEntry) -> Iterator[tuple[str, Path | bytes | None]]:
    """Tar members in a reproducible order: (name, content), content None for a directory."""
    source = entry.source
    if isinstance(source, bytes) or source.is_file():
        yield entry.path, source
        return
    if entry.path:
        yield entry.path, None
    for current, dirs, files in os.walk(source):
        dirs.sort()
        base = Path(current).relative_to(source)
        for name in dirs:
            yield _join(entry.path, (base / name).as_posix()), None
        for name in sorted(files):
            yield _join(entry.path, (base / name).as_posix()), Path(current) / name


def _entry_files(entry: LayoutEntry) -> Iterator[tuple[str, Path | bytes]]:
    for member, source in (
        _entry_members(entry) if entry.unpack != "raw" else [(entry.path, entry.source)]
    ):
        if source is not None:
            yield member, source


def _add_member(tar: tarfile.TarFile, name: str, source: Path | bytes | None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    if source is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    elif isinstance(source, bytes):
        info.size, info.mode = len(source), 0o644
        tar.addfile(info, io.BytesIO(source))
    else:
        stat = source.stat()
        info.size, info.mode = stat.st_size, 0o755 if stat.st_mode & 0o111 else 0o644
        with open(source, "rb") as f:
            tar.addfile(info, f)


def _modelpack_config(name: str, layers: Sequence[_Written]) -> bytes:
    config = {
        "descriptor": {"name": name},
        "config": {"format": "safetensors"},
        "modelfs": {"type": "layers", "diffIds": [w.diff_id for w in layers]},
    }
    return json.dumps(config, indent=2).encode()


def _descriptor(media_type: str, digest: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _digest_of(source: Path | bytes) -> str:
    if isinstance(source, bytes):
        return sha256_digest(source)
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        while chunk := f.read(_COPY_BYTES):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


# ---------------------------------------------------------------------------------------------
# files


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, target: IO[bytes]) -> None:
        self._target = target
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._target.write(data)

    def flush(self) -> None:
        self._target.flush()

    def as_file(self) -> IO[bytes]:
        """Hand it to APIs typed for files; they only call write and flush."""
        return cast(IO[bytes], self)

    @property
    def digest(self) -> str:
        return f"sha256:{self._hash.hexdigest()}"


@contextmanager
def _blob_sink(layout_dir: Path) -> Iterator[_HashingWriter]:
    """Stream into a temp file in the blob dir, then rename it to its digest."""
    blobs = layout_dir / "blobs" / "sha256"
    fd, tmp_name = tempfile.mkstemp(dir=blobs, prefix=".tmp-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _HashingWriter(f)
            yield sink
        tmp.replace(blob_path(layout_dir, sink.digest))
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _write_index(layout_dir: Path, entries: list[dict[str, Any]]) -> None:
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    _write_atomic(layout_dir / INDEX_FILE, json.dumps(index, indent=2).encode())


# ---------------------------------------------------------------------------------------------
# synthetic models

_COLUMNS = 256
_BYTES_PER_ROW = _COLUMNS * 2  # BF16
_TENSOR_MAX_BYTES = 32 << 20


def synthetic_model(
    work_dir: Path,
    total_bytes: int,
    *,
    shards: int = 3,
    seed: int = 0,
    code_layer: bool = True,
    weight_unpack: UnpackKind = "raw",
) -> list[LayoutEntry]:
    """Write a deterministic safetensors-shaped model of about ``total_bytes`` under ``work_dir``.

    Files: ``model-0000i-of-0000n.safetensors`` (valid headers, pseudo-random BF16 payload),
    ``model.safetensors.index.json``, ``config.json``, ``tokenizer.json`` (weight.config),
    ``README.md`` (doc) and, with ``code_layer``, a ``code/`` directory packed as a tar+gzip
    code layer. The same arguments always give the same bytes.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows_total = max(shards, total_bytes // _BYTES_PER_ROW)
    weight_map: dict[str, str] = {}
    entries: list[LayoutEntry] = []
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        rows = rows_total // shards + (1 if i < rows_total % shards else 0)
        tensors = _write_safetensors(work_dir / name, rows, rng, first_layer=len(weight_map))
        weight_map.update(dict.fromkeys(tensors, name))
        entries.append(LayoutEntry(name, work_dir / name, weight_unpack, "weight"))
    small = _small_files(weight_map, rows_total * _BYTES_PER_ROW, seed)
    for name, data in small.items():
        (work_dir / name).write_bytes(data)
        category: ModelPackCategory = "doc" if name == "README.md" else "weight.config"
        entries.append(LayoutEntry(name, work_dir / name, "raw", category))
    if code_layer:
        code = work_dir / "code"
        code.mkdir(exist_ok=True)
        (code / "__init__.py").write_text('"""Synthetic model code."""\n')
        (code / "modeling_synthetic.py").write_text(f"HIDDEN = {_COLUMNS}\nSEED = {seed}\n")
        entries.append(LayoutEntry("code", code, "tar+gzip", "code"))
    return entries


def write_synthetic_layout(
    layout_dir: Path,
    total_bytes: int,
    *,
    tag: str = "latest",
    flavor: Flavor = "modelpack",
    seed: int = 0,
    shards: int = 3,
    code_layer: bool = True,
) -> str:
    """``synthetic_model`` + ``write_layout`` with a scratch dir next to the layout."""
    layout_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=layout_dir.parent, prefix=".synthetic-") as scratch:
        entries = synthetic_model(
            Path(scratch), total_bytes, shards=shards, seed=seed, code_layer=code_layer
        )
        return write_layout(layout_dir, entries, tag=tag, flavor=flavor, name=f"synthetic-{seed}")


def _write_safetensors(path: Path, rows: int, rng: random.Random, *, first_layer: int) -> list[str]:
    rows_per_tensor = max(1, _TENSOR_MAX_BYTES // _BYTES_PER_ROW)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    names: list[str] = []
    offset = 0
    for start in range(0, rows, rows_per_tensor):
        count = min(rows_per_tensor, rows - start)
        name = f"model.layers.{first_layer + len(names)}.mlp.weight"
        size = count * _BYTES_PER_ROW
        header[name] = {
            "dtype": "BF16",
            "shape": [count, _COLUMNS],
            "data_offsets": [offset, offset + size],
        }
        names.append(name)
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        remaining = offset
        while remaining:
            n = min(_COPY_BYTES, remaining)
            f.write(rng.randbytes(n))
            remaining -= n
    return names


def _small_files(weight_map: dict[str, str], weight_bytes: int, seed: int) -> dict[str, bytes]:
    config = {
        "architectures": ["SyntheticForCausalLM"],
        "model_type": "synthetic",
        "hidden_size": _COLUMNS,
        "num_hidden_layers": len(weight_map),
        "torch_dtype": "bfloat16",
    }
    vocab = {f"tok{i}": i for i in range(512)}
    tokenizer = {
        "version": "1.0",
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "tok0"},
    }
    index = {"metadata": {"total_size": weight_bytes}, "weight_map": weight_map}
    readme = (
        f"# Synthetic model (seed {seed})\n\nGenerated by cacheagent for tests and benchmarks.\n"
    )
    return {
        "model.safetensors.index.json": json.dumps(index, indent=2).encode(),
        "config.json": json.dumps(config, indent=2).encode(),
        "tokenizer.json": json.dumps(tokenizer).encode(),
        "README.md": readme.encode(),
    }
