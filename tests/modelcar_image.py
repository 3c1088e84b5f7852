"""Build container images the way image builders write them, for the modelcar tests.

Each layer is a gzip'd tar of a filesystem diff (OCI image-spec "Image Layer Filesystem
Changeset"): directories, regular files, symlinks and device nodes of a base OS, the model
under ``/models``, and whiteouts (``.wh.<name>`` empty files; ``.wh..wh..opq`` for opaque
directories) in upper layers. The image config is a real OCI image config with
``rootfs.diff_ids``. ``image_index`` builds the index modelcar builders publish: the
runnable image for ``linux/amd64`` beside the ModelPack manifest (``unknown/unknown``, with
``artifactType`` on its descriptor).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tests.oci_push import OCI_INDEX, OCI_MANIFEST, Artifact, canonical_json, sha256

IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
IMAGE_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class Entry:
    """One tar member: a file (``data``), a directory, a symlink (``link``) or a char device."""

    path: str
    data: bytes | None = None
    kind: str = "file"  # file | dir | symlink | device | hardlink
    link: str = ""
    mode: int = 0o644


def file(path: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(path, data, "file", mode=mode)


def whiteout(path: str) -> Entry:
    head, _, name = path.rpartition("/")
    return Entry(f"{head}/.wh.{name}" if head else f".wh.{name}", b"")


def opaque(directory: str) -> Entry:
    return Entry(f"{directory}/.wh..wh..opq", b"")


BASE_OS: tuple[Entry, ...] = (
    Entry("usr/", kind="dir"),
    Entry("usr/bin/", kind="dir"),
    file("usr/bin/busybox", b"\x7fELF not really", 0o755),
    Entry("bin", kind="symlink", link="usr/bin"),
    Entry("etc/", kind="dir"),
    file("etc/os-release", b'ID=testos\nVERSION_ID="1"\n'),
    Entry("etc/alternatives", kind="symlink", link="/usr/bin/busybox"),
    Entry("dev/", kind="dir"),
    Entry("dev/null", kind="device"),
    Entry("etc/motd", kind="hardlink", link="etc/os-release"),
)


def layer_tar(entries: Sequence[Entry]) -> bytes:
    """An uncompressed tar of ``entries`` (paths as ``./x`` like ``docker save`` writes some)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.path)
            info.mode = entry.mode
            info.mtime = 1_700_000_000
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            elif entry.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, entry.link
                tar.addfile(info)
            elif entry.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, entry.link
                tar.addfile(info)
            elif entry.kind == "device":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
                tar.addfile(info)
            else:
                assert entry.data is not None
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
    return out.getvalue()


def image(
    layers: Sequence[Sequence[Entry]], platform: tuple[str, str] = ("linux", "amd64")
) -> Artifact:
    """A runnable-image-shaped OCI image manifest (gzip layers, image config with diff_ids)."""
    tars = [layer_tar(entries) for entries in layers]
    blobs = [gzip.compress(t, mtime=0) for t in tars]
    config = canonical_json(
        {
            "architecture": platform[1],
            "os": platform[0],
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars],
            },
        }
    )
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": IMAGE_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [
                {"mediaType": IMAGE_LAYER_GZIP, "digest": sha256(b), "size": len(b)} for b in blobs
            ],
        }
    )
    return Artifact(manifest, {sha256(config): config, **{sha256(b): b for b in blobs}})


def image_index(
    runnable: Artifact, modelpack: Artifact, *, modelpack_artifact_type: str | None
) -> Artifact:
    """The index a modelcar builder publishes: the image (linux/amd64) and the ModelPack
    manifest (unknown/unknown), the latter with ``artifactType`` on its descriptor."""
    model_desc: dict[str, object] = {
        "mediaType": OCI_MANIFEST,
        "digest": modelpack.digest,
        "size": len(modelpack.manifest),
        "platform": {"os": "unknown", "architecture": "unknown"},
        "annotations": {"org.opencontainers.image.title": "model"},
    }
    if modelpack_artifact_type is not None:
        model_desc["artifactType"] = modelpack_artifact_type
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": runnable.digest,
                "size": len(runnable.manifest),
                "platform": {"os": "linux", "architecture": "amd64"},
            },
            model_desc,
        ],
    }
    return Artifact(canonical_json(doc), {}, OCI_INDEX)


def expected_tree(layers: Sequence[Sequence[Entry]]) -> Mapping[str, bytes]:
    """What the ``/models`` subtree holds after stacking, computed independently of the agent
    by applying the layers to a plain dict."""
    tree: dict[str, bytes] = {}
    for entries in layers:
        for entry in entries:
            path = entry.path.removeprefix("./")
            if not path.startswith("models/") or entry.kind != "file":
                continue
            rel = path.removeprefix("models/")
            head, _, name = rel.rpartition("/")
            prefix = f"{head}/" if head else ""
            if name == ".wh..wh..opq":
                for key in [k for k in tree if k.startswith(prefix)]:
                    del tree[key]
            elif name.startswith(".wh."):
                hidden = prefix + name.removeprefix(".wh.")
                tree.pop(hidden, None)
                for key in [k for k in tree if k.startswith(hidden + "/")]:
                    del tree[key]
        for entry in entries:
            path = entry.path.removeprefix("./")
            name = path.rpartition("/")[2]
            if not path.startswith("models/") or name.startswith(".wh."):
                continue
            if entry.kind == "file":
                assert entry.data is not None
                tree[path.removeprefix("models/")] = entry.data
            elif entry.kind == "hardlink":
                target = entry.link.removeprefix("./").removeprefix("models/")
                tree[path.removeprefix("models/")] = tree[target]
    return tree
