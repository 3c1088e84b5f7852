"""View references (``ref|include=...``), file patterns, modelcar layer stacking and the
ModelPack-first index rule. Pure logic; end to end: tests/integration/test_formats.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from cacheagent.config import PolicyConfig
from cacheagent.digest import sha256_digest
from cacheagent.errors import PolicyDeniedError, RefError, SourceError, UnsafePathError
from cacheagent.policy import check_mount, check_pod_ref, check_source
from cacheagent.refs import HfRef, OciRef, S3Ref, ViewRef, parse_ref
from cacheagent.sources.base import BlobRef, Layer, ResolvedModel
from cacheagent.sources.indexes import select_from_index
from cacheagent.sources.manifest import (
    MODELPACK_ARTIFACT,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ParsedIndex,
    Platform,
)
from cacheagent.sources.modelcar import stack_layers
from cacheagent.sources.tarsafe import unpack_tar
from cacheagent.sources.views import assemble, narrow
from cacheagent.store import ModelFile
from cacheagent.viewopts import ViewOptions
from tests.modelcar_image import BASE_OS, Entry, file, layer_tar

D = [sha256_digest(str(i).encode()) for i in range(8)]
EMPTY = sha256_digest(b"")
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"


# -- references --------------------------------------------------------------------------------


def test_view_ref_round_trips_and_normalises_pattern_order() -> None:
    ref = parse_ref("oci://Reg.io/m/q:v1|exclude=original/,*.pth|include=*.json,*.safetensors")
    assert isinstance(ref, ViewRef)
    assert ref.base == OciRef("reg.io", "m/q", "v1", None)
    assert ref.canonical == "reg.io/m/q:v1|include=*.json,*.safetensors|exclude=*.pth,original/"
    assert parse_ref(ref.canonical) == ref
    assert (ref.kind, ref.origin, ref.is_immutable) == ("oci", "reg.io", False)
    assert not hasattr(ref, "digest")  # the base's digest must never stand for the view


def test_hf_cache_defaults_to_the_hf_repo() -> None:
    ref = parse_ref("hf://org/name@main|hf-cache")
    assert isinstance(ref, ViewRef) and isinstance(ref.base, HfRef)
    assert ref.options == ViewOptions(hf_cache="org/name")
    assert ref.canonical == "hf://org/name@main|hf-cache=org/name"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("reg.io/m:v1|", "must be followed by an option"),
        ("|include=*", "nothing before"),
        ("reg.io/m:v1|include", "needs '=<glob>"),
        ("reg.io/m:v1|include=a,,b", "empty pattern"),
        ("reg.io/m:v1|include=/abs", "relative to the model root"),
        ("reg.io/m:v1|include=a|include=b", "given twice"),
        ("reg.io/m:v1|hf-cache", "needs '=org/name'"),
        ("reg.io/m:v1|hf-cache=a/b/c", "expected org/name"),  # a single name (gpt2) is valid
        ("reg.io/m:v1|colour=red", "unknown option"),
        ("reg.io/m:v1|include=" + ",".join(f"p{i}" for i in range(65)), "more than 64"),
    ],
)
def test_bad_view_options_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(RefError, match=problem):
        parse_ref(text)


@pytest.mark.parametrize(
    ("opts", "path", "kept"),
    [
        (ViewOptions(include=("*.json",)), "config.json", True),
        (ViewOptions(include=("*.json",)), "sub/x.json", True),  # fnmatch: * crosses /
        (ViewOptions(include=("*.json",)), "model.safetensors", False),
        (ViewOptions(exclude=("original/",)), "original/consolidated.pth", False),
        (ViewOptions(exclude=("original/",)), "originals.txt", True),
        (ViewOptions(include=("*",), exclude=("*.pth",)), "a.pth", False),
        (ViewOptions(), "anything", True),
    ],
)
def test_patterns_follow_huggingface_hub_rules(opts: ViewOptions, path: str, kept: bool) -> None:
    assert opts.keeps(path) is kept


# -- views -------------------------------------------------------------------------------------


def resolved(ref_text: str, layers: list[Layer]) -> ResolvedModel:
    ref = parse_ref(ref_text)
    base = ref.base if isinstance(ref, ViewRef) else ref
    return ResolvedModel(base, D[7], b"manifest", tuple(layers))


def raw(path: str, digest: str, media_type: str = WEIGHT) -> Layer:
    return Layer(BlobRef(digest, 10, media_type), path)


def test_narrow_drops_unwanted_raw_layers_and_gets_its_own_digest() -> None:
    layers = [raw("config.json", D[0], WEIGHT_CONFIG), raw("model.safetensors", D[1])]
    ref = parse_ref("reg.io/m:v1|exclude-weights")
    assert isinstance(ref, ViewRef)
    view = narrow(resolved("reg.io/m:v1", layers), ref)
    assert [la.path for la in view.layers] == ["config.json"]
    assert view.manifest_digest == sha256_digest(view.manifest) != D[7]
    other = parse_ref("reg.io/m:v1|include=*.json")
    assert isinstance(other, ViewRef)
    assert narrow(resolved("reg.io/m:v1", layers), other).manifest_digest != view.manifest_digest


def test_narrow_refuses_a_view_of_nothing() -> None:
    ref = parse_ref("reg.io/m:v1|include=*.gguf")
    assert isinstance(ref, ViewRef)
    with pytest.raises(SourceError, match="keeps none"):
        narrow(resolved("reg.io/m:v1", [raw("a.bin", D[0])]), ref)


def test_assemble_filters_tar_members_but_not_placed_raw_files() -> None:
    ref = parse_ref("reg.io/m:v1|exclude=*.pth")
    assert isinstance(ref, ViewRef)
    tar = Layer(BlobRef(D[2], 10, "application/vnd.cncf.model.code.v1.tar"), "", "tar")
    view = narrow(resolved("reg.io/m:v1", [raw("w.bin", D[0]), tar]), ref)
    groups = [
        [ModelFile("w.bin", D[0], 10)],
        [ModelFile("code/a.py", D[3], 1), ModelFile("code/b.pth", D[4], 1)],
    ]
    assert [f.path for f in assemble(view, groups)] == ["w.bin", "code/a.py"]


def test_hf_cache_view_layout() -> None:
    ref = parse_ref("reg.io/m:v1|hf-cache=org/name")
    assert isinstance(ref, ViewRef)
    base = resolved("reg.io/m:v1", [raw("config.json", D[0]), raw("dup.json", D[0])])
    view = narrow(base, ref)
    commit = D[7].removeprefix("sha256:")[:40]
    snap = f"models--org--name/snapshots/{commit}"
    assert [la.path for la in view.layers] == [f"{snap}/config.json", f"{snap}/dup.json"]
    assert view.inline_files == (("models--org--name/refs/main", commit.encode()),)
    files = assemble(
        view,
        [[ModelFile(f"{snap}/config.json", D[0], 10)], [ModelFile(f"{snap}/dup.json", D[0], 10)]],
    )
    assert [f.path for f in files] == [
        f"{snap}/config.json",
        f"{snap}/dup.json",
        f"models--org--name/blobs/{D[0].removeprefix('sha256:')}",
    ]


def test_hf_cache_view_of_an_hf_ref_uses_the_hub_commit_and_revision() -> None:
    commit = "a" * 40
    ref = parse_ref("hf://org/name@v2|hf-cache")
    assert isinstance(ref, ViewRef)
    base = ResolvedModel(
        ref.base, D[7], b'{"commit": "' + commit.encode() + b'"}', (raw("config.json", D[0]),)
    )
    view = narrow(base, ref)
    assert view.layers[0].path == f"models--org--name/snapshots/{commit}/config.json"
    assert dict(view.inline_files) == {
        "models--org--name/refs/main": commit.encode(),
        "models--org--name/refs/v2": commit.encode(),
    }


# -- modelcar stacking -------------------------------------------------------------------------


def mf(path: str, i: int = 0) -> ModelFile:
    return ModelFile(path, D[i], 1)


def test_stack_upper_layer_replaces_and_whiteouts_hide() -> None:
    lower = [mf("a", 0), mf("dir/x", 1), mf("dir/y", 1), mf("gone", 2), mf("gonedir/z", 2)]
    upper = [
        mf("a", 3),
        ModelFile("dir/.wh..wh..opq", EMPTY, 0),
        mf("dir/new", 4),
        ModelFile(".wh.gone", EMPTY, 0),
        ModelFile(".wh.gonedir", EMPTY, 0),
    ]
    assert stack_layers([lower, upper]) == [mf("a", 3), mf("dir/new", 4)]


def test_stack_file_and_directory_replace_each_other() -> None:
    assert stack_layers([[mf("p/q", 0)], [mf("p", 1)]]) == [mf("p", 1)]
    assert stack_layers([[mf("p", 0)], [mf("p/q", 1)]]) == [mf("p/q", 1)]


def test_stack_whiteout_does_not_hide_its_own_layer() -> None:
    layer = [ModelFile(".wh.a", EMPTY, 0), mf("a", 1)]
    assert stack_layers([[mf("a", 0)], layer]) == [mf("a", 1)]


def test_stack_of_nothing_is_refused() -> None:
    with pytest.raises(SourceError, match="no files under /models"):
        stack_layers([[ModelFile(".wh.x", EMPTY, 0)]])


# -- index selection ---------------------------------------------------------------------------


def entry(i: int, platform: tuple[str, str] | None, artifact_type: str = "") -> Descriptor:
    plat = Platform(*platform) if platform else None
    return Descriptor(OCI_MANIFEST, D[i], 100, {}, artifact_type, plat)


def test_index_prefers_the_modelpack_entry_over_the_platform_match() -> None:
    index = ParsedIndex(
        OCI_INDEX,
        (
            entry(0, ("linux", "amd64")),
            entry(1, ("unknown", "unknown"), MODELPACK_ARTIFACT),
        ),
    )
    assert select_from_index(index, ("linux", "amd64")).digest == D[1]
    assert select_from_index(index, None).digest == D[1]


def test_index_entry_annotated_as_modelpack_wins() -> None:
    marked = Descriptor(
        OCI_MANIFEST,
        D[2],
        100,
        {"org.cncf.model.name": "qwen"},
        "",
        Platform("unknown", "unknown"),
    )
    index = ParsedIndex(OCI_INDEX, (entry(0, ("linux", "amd64")), marked))
    assert select_from_index(index, ("linux", "amd64")).digest == D[2]
    plain = ParsedIndex(OCI_INDEX, (entry(0, ("linux", "amd64")), entry(1, ("unknown", "unknown"))))
    assert select_from_index(plain, ("linux", "amd64")).digest == D[0]


def test_index_with_two_modelpack_entries_is_ambiguous() -> None:
    index = ParsedIndex(
        OCI_INDEX, (entry(0, None, MODELPACK_ARTIFACT), entry(1, None, MODELPACK_ARTIFACT))
    )
    with pytest.raises(SourceError, match="2 ModelPack manifests"):
        select_from_index(index, ("linux", "amd64"))


# -- s3 references -----------------------------------------------------------------------------


def test_s3_refs_and_their_pins() -> None:
    digest = sha256_digest(b"m")
    assert parse_ref("s3://models/qwen/") == S3Ref("models", "qwen/")
    assert parse_ref("s3://models") == S3Ref("models", "")
    assert parse_ref(f"s3://models/qwen/@{digest}") == S3Ref("models", "qwen/", digest=digest)
    etag = "0123456789abcdef0123456789abcdef-12"
    assert parse_ref(f"s3://b-1/k.bin@{etag}") == S3Ref("b-1", "k.bin", etag=etag)
    version = "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrH"
    ref = parse_ref(f"s3://b-1/k.bin@{version}")
    assert ref == S3Ref("b-1", "k.bin", version=version)
    assert (ref.kind, ref.origin, ref.is_immutable) == ("s3", "s3://b-1", True)
    assert not parse_ref("s3://b-1/k/").is_immutable
    assert parse_ref(ref.canonical) == ref
    view = parse_ref("s3://models/qwen/|exclude=*.pth")
    assert isinstance(view, ViewRef) and view.base == S3Ref("models", "qwen/")


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("s3://", "bucket"),
        ("s3://Bad_Bucket/x", "bucket"),
        ("s3://ab/x", "bucket"),
        ("s3://models/a//b", "key"),
        ("s3://models/a/../b", "key"),
        ("s3://models/k@v!", "version"),
    ],
)
def test_bad_s3_refs_name_the_part(text: str, part: str) -> None:
    with pytest.raises(RefError) as err:
        parse_ref(text)
    assert err.value.part == part


# -- tarsafe subtree (modelcar layers) ----------------------------------------------------------


def test_unpack_subtree_skips_the_os_and_strips_the_prefix(tmp_path: Path) -> None:
    src = tmp_path / "layer.tar"
    src.write_bytes(
        layer_tar(
            [
                *BASE_OS,
                Entry("models/", kind="dir"),
                file("./models/a/config.json", b"{}"),
                Entry("models/a/same", kind="hardlink", link="models/a/config.json"),
            ]
        )
    )
    committed: list[str] = []
    files = unpack_tar(
        src,
        "tar",
        tmp_path,
        lambda entry, tmp: committed.append(entry.path),
        max_total_bytes=1 << 20,
        subtree="models",
    )
    assert [f.path for f in files] == ["a/config.json", "a/same"]
    assert committed == ["a/config.json"]


@pytest.mark.parametrize(
    "entry",
    [
        file("models/../etc/passwd", b"x"),
        file("models/a/../../b", b"x"),
        Entry("models/link", kind="symlink", link="../etc/passwd"),
        Entry("models/null", kind="device"),
        Entry("models/motd", kind="hardlink", link="etc/os-release"),
    ],
)
def test_unpack_subtree_refuses_escapes_links_and_devices(tmp_path: Path, entry: Entry) -> None:
    src = tmp_path / "layer.tar"
    src.write_bytes(layer_tar([file("etc/os-release", b"os"), entry]))
    with pytest.raises(UnsafePathError):
        unpack_tar(
            src, "tar", tmp_path, lambda e, t: None, max_total_bytes=1 << 20, subtree="models"
        )


def test_policy_treats_a_view_as_its_base_model() -> None:
    policy = PolicyConfig(
        allowed_sources=("reg.io/models/qwen:v1",),
        namespaces={"team-a": ("reg.io/models/qwen:v1",)},
    )
    view = parse_ref("reg.io/models/qwen:v1|exclude=*.pth|hf-cache=org/qwen")
    check_source(policy, view)
    check_mount(policy, "team-a", view)
    with pytest.raises(PolicyDeniedError):
        check_source(policy, parse_ref("reg.io/models/other:v1|exclude=*.pth"))


def test_pods_may_name_views_of_what_they_may_name_and_listed_s3_buckets() -> None:
    policy = PolicyConfig(pod_s3_buckets=("team-*",))
    check_pod_ref(policy, parse_ref("reg.io/models/qwen:v1|exclude=*.pth"))
    check_pod_ref(policy, parse_ref("s3://team-models/m1/|include=*.json"))
    with pytest.raises(PolicyDeniedError, match=r"policy\.pod_s3_buckets"):
        check_pod_ref(policy, parse_ref("s3://payroll/exports/"))
    with pytest.raises(PolicyDeniedError, match=r"policy\.pod_layout_roots"):
        check_pod_ref(policy, parse_ref("oci-layout:///srv/m:v1|include=*.json"))
