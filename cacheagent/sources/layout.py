"""An OCI image layout directory on disk as a model source (``oci-layout:///dir:tag``).

The layout is ``<dir>/oci-layout`` (``{"imageLayoutVersion": "1.0.0"}``), ``<dir>/index.json``
(an image index whose entries carry the tag in ``org.opencontainers.image.ref.name``) and
``<dir>/blobs/sha256/<hex>``. A tag is matched exactly against that annotation; a reference with a
digest ignores its tag. Nested indexes are followed (platform rules in
``indexes.select_from_index``). Every manifest and index read is checked against its descriptor's
digest and size, so a tampered layout fails at resolve; blobs are checked by the pull engine as it
streams them.

``fetch`` needs to know which directory holds a blob, so it serves only blobs of models this
source has resolved (the pull engine always resolves first).

Nothing is opened through a symlink, and nothing outside the layout directory is opened
(``sources.beneath``): a layout may sit in a directory a pod writes, and its files could be
symlinks to another pod's secrets. A blob of the wrong size is refused without saying what size
the opened file had.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path

from cacheagent.digest import hex_of, is_digest, sha256_digest
from cacheagent.errors import (
    DigestMismatchError,
    ModelNotFoundError,
    SourceError,
    UnsafePathError,
)
from cacheagent.refs import LayoutRef, ModelRef
from cacheagent.sources.base import BlobRef, ResolvedModel, Source
from cacheagent.sources.beneath import open_beneath, open_dir
from cacheagent.sources.indexes import select_from_index
from cacheagent.sources.manifest import (
    ANNOTATION_REF_NAME,
    Descriptor,
    ParsedIndex,
    layers_of,
    parse_manifest,
)

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_MANIFEST_MAX_BYTES = 4 << 20
_MAX_INDEX_DEPTH = 4
_MAX_KNOWN_BLOBS = 1 << 17


def blob_path(layout_dir: Path, digest: str) -> Path:
    """Where a layout keeps a blob; the digest is validated first, so it cannot escape."""
    return layout_dir / _blob_relpath(digest)


def _blob_relpath(digest: str) -> str:
    return f"blobs/sha256/{hex_of(digest)}"


class OciLayoutSource(Source):
    """Serves models from OCI image layout directories; ranges are plain file reads."""

    kind = "oci-layout"
    supports_ranges = True

    def __init__(
        self,
        *,
        platform: tuple[str, str] | None = None,
        manifest_max_bytes: int = DEFAULT_MANIFEST_MAX_BYTES,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.platform = platform
        self.manifest_max_bytes = manifest_max_bytes
        self.chunk_bytes = chunk_bytes
        self._blob_dirs: OrderedDict[str, Path] = OrderedDict()

    async def resolve(self, ref: ModelRef) -> ResolvedModel:
        if not isinstance(ref, LayoutRef):
            raise SourceError(f"the oci-layout source cannot resolve {ref} (a {ref.kind} ref)")
        resolved = await asyncio.to_thread(self._resolve, ref)
        self._remember(Path(ref.path), resolved)
        return resolved

    async def fetch(
        self, blob: BlobRef, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        stop = blob.size if end is None else end
        if not 0 <= start <= stop <= blob.size:
            raise ValueError(f"range [{start}, {end}) outside blob {blob.digest} of {blob.size}")
        layout = self._locate(blob)
        fd = await asyncio.to_thread(_open_checked, layout, blob)
        try:
            offset = start
            while offset < stop:
                want = min(self.chunk_bytes, stop - offset)
                chunk = await asyncio.to_thread(os.pread, fd, want, offset)
                if not chunk:
                    raise _wrong_size(blob.digest, blob.size, layout)
                offset += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    # -- resolve (runs in a worker thread) ------------------------------------------------------

    def _resolve(self, ref: LayoutRef) -> ResolvedModel:
        layout = Path(ref.path)
        with _LayoutDir(layout) as dir_fd:
            return self._resolve_in(ref, layout, dir_fd)

    def _resolve_in(self, ref: LayoutRef, layout: Path, dir_fd: int) -> ResolvedModel:
        index = _read_index(layout, dir_fd, self.manifest_max_bytes)
        if ref.digest is not None:
            digest, size, media_type = ref.digest, None, None
        else:
            tagged = _find_tag(index, ref.tag or "latest", layout)
            digest, size, media_type = tagged.digest, tagged.size, tagged.media_type
        for _ in range(_MAX_INDEX_DEPTH):
            data = self._read_verified(layout, dir_fd, digest, size)
            doc = parse_manifest(data, max_bytes=self.manifest_max_bytes, media_type=media_type)
            if not isinstance(doc, ParsedIndex):
                return ResolvedModel(
                    ref=ref,
                    manifest_digest=digest,
                    manifest=data,
                    layers=layers_of(doc),
                    artifact_type=doc.artifact_type,
                )
            chosen = select_from_index(doc, self.platform)
            digest, size, media_type = chosen.digest, chosen.size, chosen.media_type
        raise SourceError(f"{layout}: image indexes nested deeper than {_MAX_INDEX_DEPTH}")

    def _read_verified(self, layout: Path, dir_fd: int, digest: str, size: int | None) -> bytes:
        """Read a manifest or index blob, bounded, and check it against its descriptor."""
        data = _read_bounded(
            layout,
            dir_fd,
            _blob_relpath(digest),
            self.manifest_max_bytes,
            missing=f"manifest {digest} not found in OCI layout {layout}",
        )
        actual = sha256_digest(data)
        if actual != digest:
            raise DigestMismatchError(digest, actual, what=f"manifest in {layout}")
        if size is not None and size != len(data):
            raise _wrong_size(digest, size, layout)
        return data

    # -- blob locations --------------------------------------------------------------------------

    def _remember(self, layout: Path, resolved: ResolvedModel) -> None:
        for layer in resolved.layers:
            self._blob_dirs[layer.blob.digest] = layout
            self._blob_dirs.move_to_end(layer.blob.digest)
        while len(self._blob_dirs) > _MAX_KNOWN_BLOBS:
            self._blob_dirs.popitem(last=False)

    def _locate(self, blob: BlobRef) -> Path:
        """The layout directory holding ``blob``."""
        if not is_digest(blob.digest):
            raise SourceError(f"not a sha256 digest: {blob.digest!r}")
        layout = self._blob_dirs.get(blob.digest)
        if layout is None:
            raise ModelNotFoundError(
                f"blob {blob.digest} belongs to no model this oci-layout source has resolved"
            )
        return layout


class _LayoutDir:
    """The layout directory opened through no symlink; closed when the block ends."""

    def __init__(self, layout: Path) -> None:
        self.layout = layout
        self.fd = -1

    def __enter__(self) -> int:
        try:
            self.fd = open_dir(os.fspath(self.layout))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ModelNotFoundError(f"no OCI image layout at {self.layout}") from exc
        except UnsafePathError as exc:
            raise SourceError(
                f"OCI layout {self.layout}: its path goes through a symlink, which cacheagent "
                "does not follow; name the real directory"
            ) from exc
        except OSError as exc:
            raise SourceError(f"cannot open OCI layout {self.layout}: {exc.strerror}") from exc
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _wrong_size(digest: str, expected: int, layout: Path) -> SourceError:
    """The file's real size is not said: it may not be a file the reference's author may see."""
    return SourceError(
        f"blob {digest} in OCI layout {layout} does not have the {expected} bytes its "
        "descriptor declares"
    )


def _read_index(layout: Path, dir_fd: int, max_bytes: int) -> ParsedIndex:
    marker = layout / LAYOUT_FILE
    missing = f"no OCI image layout at {layout} (no {LAYOUT_FILE} file)"
    raw = _read_bounded(layout, dir_fd, LAYOUT_FILE, 4096, missing=missing)
    _check_layout_version(raw, marker)
    index_path = layout / INDEX_FILE
    data = _read_bounded(
        layout, dir_fd, INDEX_FILE, max_bytes, missing=f"OCI layout {layout} has no {INDEX_FILE}"
    )
    try:
        doc = parse_manifest(data, max_bytes=max_bytes)
    except SourceError as exc:
        raise SourceError(f"{index_path}: {exc}") from exc
    if not isinstance(doc, ParsedIndex):
        raise SourceError(f"{index_path} is not an image index")
    return doc


def _read_bounded(layout: Path, dir_fd: int, relpath: str, limit: int, *, missing: str) -> bytes:
    """Read a small metadata file of the layout whole, refusing one over ``limit`` bytes."""
    fd = _open_in_layout(layout, dir_fd, relpath, missing=missing)
    try:
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise SourceError(f"cannot read {layout / relpath}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) > limit:
        raise SourceError(f"{layout / relpath} is over the {limit}-byte limit")
    return data


def _open_in_layout(layout: Path, dir_fd: int, relpath: str, *, missing: str) -> int:
    try:
        return open_beneath(dir_fd, relpath)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ModelNotFoundError(missing) from exc
    except UnsafePathError as exc:
        raise SourceError(
            f"OCI layout {layout}: {relpath} is not a regular file inside the layout "
            f"({exc.problem}); refused"
        ) from exc
    except OSError as exc:
        raise SourceError(f"cannot open {layout / relpath}: {exc.strerror}") from exc


def _check_layout_version(raw: bytes, marker: Path) -> None:
    try:
        version = json.loads(raw).get("imageLayoutVersion")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise SourceError(f"{marker} is not a JSON object") from exc
    if not isinstance(version, str) or version.split(".")[0] != LAYOUT_VERSION.split(".")[0]:
        raise SourceError(
            f"{marker}: unsupported imageLayoutVersion {version!r} (want {LAYOUT_VERSION})"
        )


def _find_tag(index: ParsedIndex, tag: str, layout: Path) -> Descriptor:
    tagged = [e for e in index.manifests if e.annotations.get(ANNOTATION_REF_NAME) == tag]
    if not tagged:
        known = sorted(
            {t for e in index.manifests if (t := e.annotations.get(ANNOTATION_REF_NAME))}
        )
        raise ModelNotFoundError(
            f"tag {tag!r} not found in OCI layout {layout} (tags: {', '.join(known) or 'none'})"
        )
    if len({e.digest for e in tagged}) > 1:
        raise SourceError(
            f"tag {tag!r} names {len(tagged)} different manifests in OCI layout {layout}"
        )
    return tagged[0]


def _open_checked(layout: Path, blob: BlobRef) -> int:
    with _LayoutDir(layout) as dir_fd:
        fd = _open_in_layout(
            layout,
            dir_fd,
            _blob_relpath(blob.digest),
            missing=f"blob {blob.digest} missing from OCI layout {layout}",
        )
    if os.fstat(fd).st_size != blob.size:
        os.close(fd)
        raise _wrong_size(blob.digest, blob.size, layout)
    return fd
