"""Model reference parsing: every accepted form, every refusal naming its part, round trips."""

from __future__ import annotations

import dataclasses

import pytest

from cacheagent.errors import RefError
from cacheagent.refs import HfRef, HttpRef, LayoutRef, ModelRef, OciRef, parse_ref

H = "0123456789abcdef" * 4
D = f"sha256:{H}"
COMMIT = "a" * 40

GOOD: list[tuple[str, ModelRef, str]] = [
    # OCI by tag, digest, both; registry detection; docker.io defaults
    (
        "registry.example.com/models/qwen2.5-0.5b:v1",
        OciRef("registry.example.com", "models/qwen2.5-0.5b", "v1", None),
        "registry.example.com/models/qwen2.5-0.5b:v1",
    ),
    (
        "oci://registry.example.com/models/qwen:v1",
        OciRef("registry.example.com", "models/qwen", "v1", None),
        "registry.example.com/models/qwen:v1",
    ),
    (
        f"registry.example.com/models/qwen@{D}",
        OciRef("registry.example.com", "models/qwen", None, D),
        f"registry.example.com/models/qwen@{D}",
    ),
    (
        f"registry.example.com/models/qwen:v1@{D}",
        OciRef("registry.example.com", "models/qwen", "v1", D),
        f"registry.example.com/models/qwen:v1@{D}",
    ),
    (
        "registry.example.com/models/qwen",
        OciRef("registry.example.com", "models/qwen", "latest", None),
        "registry.example.com/models/qwen:latest",
    ),
    (
        "localhost:5000/x/y:t",
        OciRef("localhost:5000", "x/y", "t", None),
        "localhost:5000/x/y:t",
    ),
    ("localhost/x", OciRef("localhost", "x", "latest", None), "localhost/x:latest"),
    (
        "Registry.Example.COM:0443/a/b/c/d:v",
        OciRef("registry.example.com:443", "a/b/c/d", "v", None),
        "registry.example.com:443/a/b/c/d:v",
    ),
    ("[::1]:5000/m:v", OciRef("[::1]:5000", "m", "v", None), "[::1]:5000/m:v"),
    (
        "ubuntu",
        OciRef("docker.io", "library/ubuntu", "latest", None),
        "docker.io/library/ubuntu:latest",
    ),
    ("org/model:v2", OciRef("docker.io", "org/model", "v2", None), "docker.io/org/model:v2"),
    (
        "docker.io/ubuntu:22.04",
        OciRef("docker.io", "library/ubuntu", "22.04", None),
        "docker.io/library/ubuntu:22.04",
    ),
    ("index.docker.io/org/m:v", OciRef("docker.io", "org/m", "v", None), "docker.io/org/m:v"),
    (
        "r.io/a__b/c-d--e/f.g:_Tag.1-x",
        OciRef("r.io", "a__b/c-d--e/f.g", "_Tag.1-x", None),
        "r.io/a__b/c-d--e/f.g:_Tag.1-x",
    ),
    # OCI layout
    (
        "oci-layout:///srv/models/qwen:v1",
        LayoutRef("/srv/models/qwen", "v1", None),
        "oci-layout:///srv/models/qwen:v1",
    ),
    (f"oci-layout:///srv/m@{D}", LayoutRef("/srv/m", None, D), f"oci-layout:///srv/m@{D}"),
    (f"oci-layout:///srv/m:v1@{D}", LayoutRef("/srv/m", "v1", D), f"oci-layout:///srv/m:v1@{D}"),
    ("oci-layout:///srv/m", LayoutRef("/srv/m", "latest", None), "oci-layout:///srv/m:latest"),
    ("oci-layout:///srv/a@b/m:v", LayoutRef("/srv/a@b/m", "v", None), "oci-layout:///srv/a@b/m:v"),
    # Hugging Face
    (
        "hf://Qwen/Qwen2.5-0.5B@main",
        HfRef("Qwen/Qwen2.5-0.5B", "main"),
        "hf://Qwen/Qwen2.5-0.5B@main",
    ),
    (f"hf://org/name@{COMMIT}", HfRef("org/name", COMMIT), f"hf://org/name@{COMMIT}"),
    (
        "hf://org/name_x.y@refs/pr/1",
        HfRef("org/name_x.y", "refs/pr/1"),
        "hf://org/name_x.y@refs/pr/1",
    ),
    ("hf://gpt2@main", HfRef("gpt2", "main"), "hf://gpt2@main"),  # legacy single-name repo
    # HTTP(S)
    (
        f"https://files.example.com/path/model.safetensors#sha256={H}",
        HttpRef("https://files.example.com/path/model.safetensors", D),
        f"https://files.example.com/path/model.safetensors#sha256={H}",
    ),
    (
        f"HTTPS://Files.Example.com:443/f.bin?sig=Ab%2F#sha256={H}",
        HttpRef("https://files.example.com/f.bin?sig=Ab%2F", D),
        f"https://files.example.com/f.bin?sig=Ab%2F#sha256={H}",
    ),
    (
        f"http://127.0.0.1:8080/f.bin#sha256={H}",
        HttpRef("http://127.0.0.1:8080/f.bin", D),
        f"http://127.0.0.1:8080/f.bin#sha256={H}",
    ),
    (f"http://h:80/f#sha256={H}", HttpRef("http://h/f", D), f"http://h/f#sha256={H}"),
]

BAD: list[tuple[str, str, str]] = [
    ("", "reference", "empty reference"),
    (" registry.local/m:v", "reference", "whitespace"),
    ("registry.local/m:v\n", "reference", "whitespace"),
    ("registry.local/m\x00:v", "reference", "control character"),
    ("ftp://host/file", "scheme", "unknown scheme 'ftp'"),
    ("hf:org/name@main", "scheme", "must be followed by '//'"),
    ("oci-layout:/srv/m:v", "scheme", "must be followed by '//'"),
    (f"registry.local/m@sha256:{H[:63]}", "digest", "must be 64 hex characters, got 63"),
    (f"registry.local/m@sha256:{H}0", "digest", "must be 64 hex characters, got 65"),
    (f"registry.local/m@sha256:{H[:63]}A", "digest", "must be lowercase hex, found 'A'"),
    ("registry.local/m@sha256:xyz", "digest", "must be hex, found 'x'"),
    (f"registry.local/m@sha512:{H}", "digest", "unsupported digest algorithm 'sha512'"),
    ("registry.local/m@", "digest", "empty digest"),
    (f"registry.local/m@{H}", "digest", "must look like sha256:<64 hex>"),
    (f"registry.local/m@{D}@{D}", "digest", "more than one '@'"),
    (
        "registry.local/Models/qwen:v1",
        "repository",
        "repository component 'Models' must be lowercase",
    ),
    ("registry.local/models//qwen:v1", "repository", "empty path component"),
    ("registry.local/-models/q:v1", "repository", "must start with a lowercase letter or digit"),
    ("registry.local/models./q:v1", "repository", "must end with a lowercase letter or digit"),
    ("registry.local/a...b:v1", "repository", "may only join"),
    ("registry.local/:v1", "repository", "missing repository name"),
    ("registry.local/" + "a" * 250, "repository", "at most 255"),
    ("registry.local/m:", "tag", "empty tag"),
    ("registry.local/m:-v1", "tag", "must start with a letter, digit or '_'"),
    ("registry.local/m:v1!", "tag", "contains '!'"),
    ("registry.local/m:" + "v" * 129, "tag", "129 characters, at most 128"),
    ("localhost:99999/m:v", "port", "port 99999 out of range 1-65535"),
    ("localhost:0/m:v", "port", "port 0 out of range 1-65535"),
    ("localhost:50a0/m:v", "port", "port '50a0' must be a number"),
    ("localhost:/m:v", "port", "empty port"),
    ("reg..local/m:v", "registry", "empty label"),
    ("-reg.local/m:v", "registry", "host label '-reg'"),
    ("[zz]:5000/m:v", "registry", "not an IPv6 address"),
    ("oci-layout://srv/m:v", "path", "path must be absolute"),
    ("oci-layout:///srv//m:v", "path", "empty path component"),
    ("oci-layout:///srv/m/:v", "path", "empty path component"),
    ("oci-layout:///srv/../m:v", "path", "'..' is not allowed"),
    ("oci-layout:///:v", "path", "below '/'"),
    ("oci-layout:///srv/m:", "tag", "empty tag"),
    ("oci-layout:///srv/m@sha256:abc", "digest", "must be 64 hex characters, got 3"),
    ("hf://org/name", "revision", "missing @revision"),
    ("hf://org/name@", "revision", "empty revision"),
    ("hf://org/name@a..b", "revision", "not a valid git ref name"),
    ("hf://org/name@main~1", "revision", "contains '~'"),
    ("hf://gpt2", "revision", "missing @revision"),
    ("hf://a/b/c@main", "repository", "expected org/name"),
    ("hf://org/na--me@main", "repository", "must not contain '--' or '..'"),
    ("hf://org/-name@main", "repository", "must start and end with"),
    ("hf://org/na me@main", "reference", "whitespace"),
    ("hf://org/n!ame@main", "repository", "contains '!'"),
    ("hf://org/" + "n" * 97 + "@main", "repository", "97 characters, at most 96"),
    ("hf://org/name.git@main", "repository", "must not end with '.git'"),
    ("https://host/file", "fragment", "missing #sha256="),
    (f"https://host/file#md5={H}", "fragment", "must be exactly sha256=<64 lowercase hex>"),
    (f"https://host/file#sha256:{H}", "fragment", "must be exactly sha256="),
    (f"https://host/file#sha256={H[:-1]}", "fragment", "must be 64 hex characters, got 63"),
    (f"https://host/file#sha256={H.upper()}", "fragment", "must be lowercase hex"),
    (f"https://host/#sha256={H}", "path", "must end in a file name"),
    (f"https://host#sha256={H}", "path", "must end in a file name"),
    (f"https://user:pw@host/f#sha256={H}", "host", "credentials in the URL are not allowed"),
    (f"https:///f#sha256={H}", "host", "empty host name"),
    (f"https://host:70000/f#sha256={H}", "port", "port 70000 out of range 1-65535"),
    (f"https://[::1/f#sha256={H}", "host", "malformed host"),
]


@pytest.mark.parametrize(("text", "expected", "canonical"), GOOD, ids=[g[0][:60] for g in GOOD])
def test_parses_valid_references(text: str, expected: ModelRef, canonical: str) -> None:
    ref = parse_ref(text)
    assert ref == expected
    assert ref.canonical == canonical
    assert str(ref) == canonical
    assert parse_ref(ref.canonical) == ref


@pytest.mark.parametrize(("text", "part", "fragment"), BAD, ids=[b[0][:60] for b in BAD])
def test_rejects_malformed_references_naming_the_part(text: str, part: str, fragment: str) -> None:
    with pytest.raises(RefError) as caught:
        parse_ref(text)
    assert caught.value.part == part
    assert fragment in caught.value.problem
    assert caught.value.ref == text
    assert part in str(caught.value)


def test_tables_are_big_enough_and_mostly_hostile() -> None:
    assert len(GOOD) + len(BAD) >= 40
    assert len(BAD) * 3 >= len(GOOD) + len(BAD)


@pytest.mark.parametrize(
    ("text", "kind", "origin", "immutable"),
    [
        ("registry.local:5000/m:v1", "oci", "registry.local:5000", False),
        (f"registry.local/m@{D}", "oci", "registry.local", True),
        (f"registry.local/m:v1@{D}", "oci", "registry.local", True),
        ("oci-layout:///srv/m:v1", "oci-layout", "/srv/m", False),
        (f"oci-layout:///srv/m@{D}", "oci-layout", "/srv/m", True),
        ("hf://org/name@main", "hf", "hf", False),
        (f"hf://org/name@{COMMIT}", "hf", "hf", True),
        (f"hf://org/name@{COMMIT.upper()}", "hf", "hf", False),
        (f"https://Files.example.com:8443/f#sha256={H}", "http", "files.example.com:8443", True),
    ],
)
def test_kind_origin_and_immutability(text: str, kind: str, origin: str, immutable: bool) -> None:
    ref = parse_ref(text)
    assert ref.kind == kind
    assert ref.origin == origin
    assert ref.is_immutable is immutable


def test_http_keeps_an_insecure_flag() -> None:
    secure = parse_ref(f"https://h/f#sha256={H}")
    plain = parse_ref(f"http://h/f#sha256={H}")
    assert isinstance(secure, HttpRef)
    assert isinstance(plain, HttpRef)
    assert not secure.insecure
    assert plain.insecure


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("ubuntu", "docker.io/library/ubuntu:latest"),
        ("oci://registry.local/m", "registry.local/m:latest"),
        ("REGISTRY.local:05000/m:v", "registry.local:5000/m:v"),
        ("index.docker.io/library/ubuntu", "ubuntu:latest"),
        ("oci-layout:///srv/m", "oci-layout:///srv/m:latest"),
        (f"https://h:443/f#sha256={H}", f"HTTPS://H/f#sha256={H}"),
    ],
)
def test_equivalent_spellings_are_equal(first: str, second: str) -> None:
    assert parse_ref(first) == parse_ref(second)
    assert hash(parse_ref(first)) == hash(parse_ref(second))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("registry.local/m:v1", "registry.local/m:v2"),
        (f"registry.local/m@{D}", f"registry.local/m:v1@{D}"),
        ("registry.local/m:v1", "oci-layout:///registry.local/m:v1"),
        ("hf://Org/name@main", "hf://org/name@main"),
        (f"https://h/f?a=1#sha256={H}", f"https://h/f#sha256={H}"),
    ],
)
def test_different_references_are_not_equal(first: str, second: str) -> None:
    assert parse_ref(first) != parse_ref(second)


def test_refs_are_frozen_and_hashable() -> None:
    ref = parse_ref("registry.local/m:v1")
    assert isinstance(ref, OciRef)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.tag = "v2"  # type: ignore[misc]
    lookup: dict[ModelRef, int] = {ref: 1}
    assert lookup[parse_ref("oci://registry.local/m:v1")] == 1
