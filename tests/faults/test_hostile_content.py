"""Hostile model content pulled through the real agent from OCI layouts: every escape refused.

The layouts are written by hand (``tarfile`` members the layout writer would never produce, and
path annotations that point outside the model), then preheated by reference. Each pull must fail
with an error that names the offending member or path, commit no model, and leave nothing
outside the store (the escape targets are unique paths the test checks afterwards).
"""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cacheagent.sources.manifest import (
    ANNOTATION_FILEPATH,
    ANNOTATION_TITLE,
    MODELPACK_ARTIFACT,
    MODELPACK_CONFIG,
    OCI_EMPTY_CONFIG,
    OCI_MANIFEST,
    modelpack_media_type,
)
from tests.agent_process import AgentProcess
from tests.faults.harness import Rig, open_view, preheat_failure, preheat_ok, status
from tests.oci.layout_writer import init_layout, set_tag, write_blob_bytes

OUTSIDE = Path("/tmp") / f"cacheagent-escape-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    rig = Rig()
    try:
        yield rig.agent().start()
    finally:
        rig.close()


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    return tmp_path / "layout"


# --------------------------------------------------------------------------- building layouts


def member(
    name: str,
    data: bytes = b"",
    *,
    kind: bytes = tarfile.REGTYPE,
    link: str = "",
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def write_manifest(layout: Path, layers: list[dict[str, object]], *, oras: bool = False) -> str:
    config = b"{}" if oras else json.dumps({"descriptor": {"name": "hostile"}}).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/x.hostile" if oras else MODELPACK_ARTIFACT,
        "config": _descriptor(OCI_EMPTY_CONFIG if oras else MODELPACK_CONFIG, config, layout),
        "layers": layers,
    }
    data = json.dumps(manifest).encode()
    digest = write_blob_bytes(layout, data)
    set_tag(layout, "v1", {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(data)})
    return digest


def _descriptor(media_type: str, data: bytes, layout: Path, **notes: str) -> dict[str, object]:
    init_layout(layout)
    desc: dict[str, object] = {
        "mediaType": media_type,
        "digest": write_blob_bytes(layout, data),
        "size": len(data),
    }
    if notes:
        desc["annotations"] = notes
    return desc


def tar_layout(layout: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> str:
    blob = tar_bytes(members)
    layer = _descriptor(modelpack_media_type("weight", "tar"), blob, layout)
    return write_manifest(layout, [layer])


def raw_layout(layout: Path, path: str, *, oras: bool = False) -> str:
    if oras:
        layer = _descriptor(
            "application/octet-stream", b"payload", layout, **{ANNOTATION_TITLE: path}
        )
    else:
        layer = _descriptor(
            modelpack_media_type("weight", "raw"), b"payload", layout, **{ANNOTATION_FILEPATH: path}
        )
    return write_manifest(layout, [layer], oras=oras)


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Hostile:
    build: Callable[[Path], str]
    names: str  # the member or path the error must name


GOOD = member("config.json", b'{"ok": true}')
LONG_COMPONENT = "w" * 300
LONG_PATH = "/".join(["d" * 200] * 21) + "/f"

CASES: dict[str, Hostile] = {
    "dotdot member": Hostile(
        lambda d: tar_layout(d, [member(f"../{OUTSIDE.name}", b"x")]), f"../{OUTSIDE.name}"
    ),
    "dotdot after a good member": Hostile(
        lambda d: tar_layout(d, [GOOD, member(f"a/../../{OUTSIDE.name}", b"x")]),
        f"a/../../{OUTSIDE.name}",
    ),
    "absolute member": Hostile(lambda d: tar_layout(d, [member(str(OUTSIDE), b"x")]), str(OUTSIDE)),
    "symlink to an absolute path": Hostile(
        lambda d: tar_layout(d, [member("weights", kind=tarfile.SYMTYPE, link="/etc/passwd")]),
        "weights",
    ),
    "symlink leaving the tree": Hostile(
        lambda d: tar_layout(
            d,
            [
                member("escape", kind=tarfile.SYMTYPE, link=f"../../../{OUTSIDE.name}"),
                member("escape/owned", b"x"),
            ],
        ),
        "escape",
    ),
    "hard link to an absolute path": Hostile(
        lambda d: tar_layout(d, [member("shadow", kind=tarfile.LNKTYPE, link="/etc/shadow")]),
        "shadow",
    ),
    "hard link leaving the tree": Hostile(
        lambda d: tar_layout(
            d, [GOOD, member("hl", kind=tarfile.LNKTYPE, link=f"../{OUTSIDE.name}")]
        ),
        "hl",
    ),
    "character device": Hostile(
        lambda d: tar_layout(d, [member("null", kind=tarfile.CHRTYPE)]), "null"
    ),
    "block device": Hostile(lambda d: tar_layout(d, [member("sda", kind=tarfile.BLKTYPE)]), "sda"),
    "fifo": Hostile(lambda d: tar_layout(d, [member("pipe", kind=tarfile.FIFOTYPE)]), "pipe"),
    "over-long component": Hostile(
        lambda d: tar_layout(d, [member(LONG_COMPONENT, b"x")]), LONG_COMPONENT[:40]
    ),
    "over-long path": Hostile(lambda d: tar_layout(d, [member(LONG_PATH, b"x")]), "d" * 40),
    "duplicate member": Hostile(lambda d: tar_layout(d, [GOOD, GOOD]), "config.json"),
    "file where a directory must be": Hostile(
        lambda d: tar_layout(d, [GOOD, member("config.json/inner", b"x")]), "config.json"
    ),
    "filepath annotation with dotdot": Hostile(
        lambda d: raw_layout(d, f"../../{OUTSIDE.name}"), f"../../{OUTSIDE.name}"
    ),
    "absolute filepath annotation": Hostile(lambda d: raw_layout(d, str(OUTSIDE)), str(OUTSIDE)),
    "oras title with dotdot": Hostile(
        lambda d: raw_layout(d, f"models/../../{OUTSIDE.name}", oras=True),
        f"models/../../{OUTSIDE.name}",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_content_is_refused(agent: AgentProcess, layout: Path, case: str) -> None:
    hostile = CASES[case]
    digest = hostile.build(layout)
    code, message = preheat_failure(agent, f"oci-layout://{layout}:v1")
    assert code == "INVALID_ARGUMENT" or code == "FAILED_PRECONDITION", message
    assert hostile.names in message, message
    with open_view(agent) as store:
        assert store.get_model(digest) is None, "a hostile model was committed"
    for escaped in (OUTSIDE, agent.store_root.parent / OUTSIDE.name, agent.work / OUTSIDE.name):
        assert not escaped.exists(), f"{escaped} was written outside the store"
    assert status(agent).version


def test_the_agent_still_pulls_a_clean_layout(agent: AgentProcess, layout: Path) -> None:
    digest = tar_layout(layout, [GOOD, member("weights/a.bin", b"a" * 1000)])
    event = preheat_ok(agent, f"oci-layout://{layout}:v1")
    assert event.manifest_digest == digest
    with open_view(agent) as store:
        model = store.get_model(digest)
        assert model is not None
        assert sorted(f.path for f in model.files) == ["config.json", "weights/a.bin"]
