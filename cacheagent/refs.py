"""Model references: the one string that names a model in CSI attributes, preheat and the CLI.

Pure (no I/O). ``parse_ref`` turns text into one of four frozen dataclasses and every ref prints
back as its canonical form, so ``parse_ref(str(ref)) == ref`` and two spellings of the same model
compare equal (the store keys tags and leases by that form).

Forms and the decisions taken where the brief is silent:

``[oci://]host[:port]/repo/sub[:tag][@sha256:<hex>]`` (``OciRef``)
    Docker's naming rules: the first path component is the registry only when more components
    follow and it contains a ``.`` or a ``:`` or is ``localhost``; otherwise the registry is
    ``docker.io`` and a one-component repository gets the ``library/`` prefix
    (``index.docker.io`` is ``docker.io``). So ``localhost:5000`` alone is
    ``docker.io/library/localhost:5000``, as with ``docker pull``.
    Repository components and tags follow the OCI distribution grammar. With neither tag nor
    digest the tag is ``latest``; with a digest only there is no tag; with both, both are kept
    and the digest is what identifies the content (the tag is then informational).
    The canonical form drops ``oci://`` and lowercases the registry host.

``oci-layout:///abs/dir[:tag][@sha256:<hex>]`` (``LayoutRef``)
    The path must be absolute and already normalised (no ``.``/``..``, no empty components, no
    trailing ``/``). A tag is what follows the last ``:`` of the last path component and a
    digest what follows the last ``@`` when no ``/`` comes after it; so a directory whose last
    component holds ``:`` or ``@`` cannot be named. Like the registry form, the tag defaults to
    ``latest``.

``hf://org/name@revision`` (``HfRef``)
    The revision is required (a branch, a tag, a ref such as ``refs/pr/1``, or a 40-hex commit)
    so that nothing silently follows ``main``; only a commit makes the ref immutable. Legacy
    single-name repos (``hf://gpt2@main``) have no org.

``https://host[:port]/path/file[?query]#sha256=<hex>`` (``HttpRef``)
    The fragment is the expected digest and is required. ``http://`` parses too, and
    ``HttpRef.insecure`` says so: whether plain HTTP may be used is the sources' decision.
    Credentials in the URL are refused (they would end up in logs and in the store index).
    The default port is dropped, scheme and host are lowercased; path and query are kept as
    written.

``s3://bucket[/key-or-prefix][@pin]`` (``S3Ref``)
    An object, or every object under a prefix, in S3 or an S3-compatible store (endpoint from
    config). The pin after the last ``@`` (when no ``/`` follows it) is ``sha256:<hex>``, the
    expected manifest digest (what the agent computed for that listing before); 32 hex digits
    (``-N`` for a multipart upload), an ETag; anything else, a version id. A pinned reference is
    immutable. Bucket names follow S3's rules; keys may not hold empty, ``.`` or ``..``
    components.

``<any of the above>|option|...`` (``ViewRef``)
    A view of the model: file patterns and the Hugging Face cache layout
    (``cacheagent.viewopts`` has the options). Its canonical form is part of the cache key.

Whitespace and control characters are errors anywhere, not trimmed: a reference is an
identifier, and a silently repaired one would name something the user did not write.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeAlias
from urllib.parse import urlsplit

from cacheagent.errors import RefError
from cacheagent.refcheck import (
    MAX_OCI_NAME_LENGTH,
    check_abs_path,
    check_bucket,
    check_hf_repo_id,
    check_object_key,
    check_repo_component,
    check_revision,
    check_tag,
    check_version_id,
)
from cacheagent.refgrammar import digest_part, host_port_part, sha256_hex_part
from cacheagent.viewopts import ViewOptions, parse_view_options

RefKind = Literal["oci", "oci-layout", "hf", "http", "s3"]

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
MAX_REF_LENGTH = 8192
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class _Ref:
    """What every reference kind shares: printing as its canonical form."""

    __slots__ = ()

    @property
    def canonical(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.canonical


@dataclass(frozen=True)
class OciRef(_Ref):
    """An artifact in an OCI registry; ``registry`` is ``host[:port]``."""

    kind: ClassVar[Literal["oci"]] = "oci"
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def canonical(self) -> str:
        return f"{self.registry}/{self.repository}{_tag_digest_suffix(self.tag, self.digest)}"

    @property
    def origin(self) -> str:
        return self.registry

    @property
    def is_immutable(self) -> bool:
        return self.digest is not None


@dataclass(frozen=True)
class LayoutRef(_Ref):
    """A manifest in an OCI image layout directory on this machine."""

    kind: ClassVar[Literal["oci-layout"]] = "oci-layout"
    path: str
    tag: str | None
    digest: str | None

    @property
    def canonical(self) -> str:
        return f"oci-layout://{self.path}{_tag_digest_suffix(self.tag, self.digest)}"

    @property
    def origin(self) -> str:
        return self.path

    @property
    def is_immutable(self) -> bool:
        return self.digest is not None


@dataclass(frozen=True)
class HfRef(_Ref):
    """A Hugging Face Hub model repository at a revision; the endpoint comes from config."""

    kind: ClassVar[Literal["hf"]] = "hf"
    repo_id: str
    revision: str

    @property
    def canonical(self) -> str:
        return f"hf://{self.repo_id}@{self.revision}"

    @property
    def origin(self) -> str:
        return "hf"

    @property
    def is_immutable(self) -> bool:
        return _COMMIT_RE.fullmatch(self.revision) is not None


@dataclass(frozen=True)
class HttpRef(_Ref):
    """One file over HTTP(S); ``url`` has no fragment, ``sha256`` is ``sha256:<hex>``."""

    kind: ClassVar[Literal["http"]] = "http"
    url: str
    sha256: str

    @property
    def canonical(self) -> str:
        return f"{self.url}#sha256={self.sha256.removeprefix('sha256:')}"

    @property
    def origin(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def is_immutable(self) -> bool:
        return True

    @property
    def insecure(self) -> bool:
        """Plain HTTP: the source must be configured to allow it."""
        return self.url.startswith("http:")


@dataclass(frozen=True)
class S3Ref(_Ref):
    """Objects in an S3 bucket: one object, or all under a prefix (``key`` ending in ``/``,
    or found to be no object); at most one of ``digest``, ``etag``, ``version`` pins it."""

    kind: ClassVar[Literal["s3"]] = "s3"
    bucket: str
    key: str
    digest: str | None = None
    etag: str | None = None
    version: str | None = None

    @property
    def canonical(self) -> str:
        pin = self.digest or self.etag or self.version
        return f"s3://{self.bucket}/{self.key}" + (f"@{pin}" if pin else "")

    @property
    def origin(self) -> str:
        return f"s3://{self.bucket}"

    @property
    def is_immutable(self) -> bool:
        return bool(self.digest or self.etag or self.version)


PlainRef: TypeAlias = OciRef | LayoutRef | HfRef | HttpRef | S3Ref


@dataclass(frozen=True)
class ViewRef(_Ref):
    """A view of another reference's model: some of its files, or another layout.

    It has no ``digest`` of its own (the view's digest is computed from the base manifest's),
    so nothing mistakes the base model for the view.
    """

    base: PlainRef
    options: ViewOptions

    @property
    def kind(self) -> RefKind:
        return self.base.kind

    @property
    def canonical(self) -> str:
        return self.base.canonical + self.options.suffix

    @property
    def origin(self) -> str:
        return self.base.origin

    @property
    def is_immutable(self) -> bool:
        return self.base.is_immutable


ModelRef: TypeAlias = PlainRef | ViewRef


def pin_digest(ref: ModelRef, digest: str) -> ModelRef:
    """``ref`` fixed to the manifest ``digest`` an earlier resolution found, where its kind
    names content by manifest digest (registries, layouts); other kinds pin their content in
    the reference itself (a URL's expected sha256, a revision) and come back unchanged."""
    if isinstance(ref, OciRef | LayoutRef):
        return dataclasses.replace(ref, digest=digest)
    return ref


def parse_ref(text: str) -> ModelRef:
    """Parse and normalise a model reference; raises ``RefError`` naming the bad part."""
    _check_characters(text)
    base_text, bar, options = text.partition("|")
    if not bar:
        return _parse_plain(text)
    base = _parse_plain(base_text) if base_text else None
    if base is None:
        raise RefError(text, "reference", "nothing before '|'")
    default_hf = base.repo_id if isinstance(base, HfRef) else None
    view = parse_view_options(text, options.split("|"), default_hf_repo=default_hf)
    if view.hf_cache:
        check_hf_repo_id(text, view.hf_cache)
    return ViewRef(base, view)


def _parse_plain(text: str) -> PlainRef:
    match = _SCHEME_RE.match(text)
    if match is None:
        return _parse_oci(text, "oci", text)
    scheme = match.group(1).lower()
    after = text[match.end() :]
    parser = _PARSERS.get(scheme)
    if not after.startswith("//"):
        if parser is None:
            return _parse_oci(text, "oci", text)
        raise RefError(
            text,
            "scheme",
            f"'{match.group(0)}' must be followed by '//', as in {_EXAMPLES[scheme]}",
        )
    if parser is None:
        known = ", ".join(f"{name}://" for name in _PARSERS)
        raise RefError(text, "scheme", f"unknown scheme {match.group(1)!r} (expected {known})")
    return parser(text, scheme, after[2:])


def _check_characters(text: str) -> None:
    if not text:
        raise RefError(text, "reference", "empty reference")
    if len(text) > MAX_REF_LENGTH:
        raise RefError(
            text, "reference", f"reference is {len(text)} characters, at most {MAX_REF_LENGTH}"
        )
    for char in text:
        if char.isspace():
            raise RefError(text, "reference", f"contains whitespace ({char!r})")
        if not char.isprintable():
            raise RefError(text, "reference", f"contains a control character ({char!r})")


def _tag_digest_suffix(tag: str | None, digest: str | None) -> str:
    return (f":{tag}" if tag is not None else "") + (f"@{digest}" if digest is not None else "")


# --- OCI registry -----------------------------------------------------------------------------


def _parse_oci(ref: str, _scheme: str, rest: str) -> OciRef:
    name_tag, at, digest_text = rest.partition("@")
    if "@" in digest_text:
        raise RefError(ref, "digest", "more than one '@'")
    digest = digest_part(ref, digest_text) if at else None
    name, tag = _split_tag(name_tag)
    if tag is not None:
        check_tag(ref, tag)
    registry, repository = _split_registry(ref, name)
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return OciRef(registry=registry, repository=repository, tag=tag, digest=digest)


def _split_tag(name_tag: str) -> tuple[str, str | None]:
    colon = name_tag.rfind(":")
    if colon > name_tag.rfind("/"):
        return name_tag[:colon], name_tag[colon + 1 :]
    return name_tag, None


def _split_registry(ref: str, name: str) -> tuple[str, str]:
    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first.lower() == "localhost"):
        registry = host_port_part(ref, first, "registry", default_port=None)
        path = remainder
    else:
        registry, path = DEFAULT_REGISTRY, name
    if registry == "index.docker.io":
        registry = DEFAULT_REGISTRY
    if not path:
        raise RefError(ref, "repository", "missing repository name")
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    for component in path.split("/"):
        check_repo_component(ref, component)
    total = len(registry) + 1 + len(path)
    if total > MAX_OCI_NAME_LENGTH:
        raise RefError(
            ref,
            "repository",
            f"registry/repository is {total} characters, at most {MAX_OCI_NAME_LENGTH}",
        )
    return registry, path


# --- OCI layout -------------------------------------------------------------------------------


def _parse_layout(ref: str, _scheme: str, rest: str) -> LayoutRef:
    if not rest.startswith("/"):
        raise RefError(ref, "path", "path must be absolute, as in oci-layout:///srv/models/x:v1")
    body, digest = rest, None
    head, at, tail = rest.rpartition("@")
    if at and "/" not in tail:
        body, digest = head, digest_part(ref, tail)
    path, tag = _split_tag(body)
    if tag is not None:
        check_tag(ref, tag)
    check_abs_path(ref, path)
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return LayoutRef(path=path, tag=tag, digest=digest)


# --- Hugging Face -----------------------------------------------------------------------------


def _parse_hf(ref: str, _scheme: str, rest: str) -> HfRef:
    repo_id, at, revision = rest.partition("@")
    check_hf_repo_id(ref, repo_id)
    if not at:
        raise RefError(ref, "revision", "missing @revision (a branch, tag or 40-hex commit)")
    check_revision(ref, revision)
    return HfRef(repo_id=repo_id, revision=revision)


# --- HTTP(S) ----------------------------------------------------------------------------------


def _parse_http(ref: str, scheme: str, rest: str) -> HttpRef:
    body, hash_mark, fragment = rest.partition("#")
    if not hash_mark:
        raise RefError(ref, "fragment", "missing #sha256=<64 hex> (the file's expected digest)")
    algorithm, equals, hex_part = fragment.partition("=")
    if not equals or algorithm != "sha256":
        raise RefError(
            ref, "fragment", f"fragment must be exactly sha256=<64 lowercase hex>, got {fragment!r}"
        )
    digest = "sha256:" + sha256_hex_part(ref, "fragment", hex_part)
    try:
        parts = urlsplit(f"{scheme}://{body}")
    except ValueError as exc:
        raise RefError(ref, "host", f"malformed host ({exc})") from None
    if "@" in parts.netloc:
        raise RefError(ref, "host", "credentials in the URL are not allowed (they would be logged)")
    host = host_port_part(ref, parts.netloc, "host", default_port=_DEFAULT_PORTS[scheme])
    if not parts.path or parts.path.endswith("/"):
        raise RefError(ref, "path", "URL path must end in a file name")
    query = f"?{parts.query}" if parts.query else ""
    return HttpRef(url=f"{scheme}://{host}{parts.path}{query}", sha256=digest)


def _parse_s3(ref: str, _scheme: str, rest: str) -> S3Ref:
    body, pin = rest, None
    head, at, tail = rest.rpartition("@")
    if at and "/" not in tail:
        body, pin = head, tail
    bucket, _, key = body.partition("/")
    check_bucket(ref, bucket)
    check_object_key(ref, key)
    if pin is None:
        return S3Ref(bucket, key)
    if pin.startswith("sha256:"):
        return S3Ref(bucket, key, digest=digest_part(ref, pin))
    if _ETAG_RE.fullmatch(pin):
        return S3Ref(bucket, key, etag=pin)
    check_version_id(ref, pin)
    return S3Ref(bucket, key, version=pin)


_ETAG_RE = re.compile(r"[0-9a-f]{32}(?:-[0-9]{1,5})?")
_Parser = Callable[[str, str, str], PlainRef]
_PARSERS: dict[str, _Parser] = {
    "oci": _parse_oci,
    "oci-layout": _parse_layout,
    "hf": _parse_hf,
    "http": _parse_http,
    "https": _parse_http,
    "s3": _parse_s3,
}
_EXAMPLES = {
    "oci": "oci://registry.example.com/models/x:v1",
    "oci-layout": "oci-layout:///srv/models/x:v1",
    "hf": "hf://org/name@main",
    "http": "http://host/path/file#sha256=<hex>",
    "https": "https://host/path/file#sha256=<hex>",
    "s3": "s3://bucket/prefix/",
}
