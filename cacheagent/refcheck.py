"""Checks of the named parts of a model reference (tags, repository components, layout paths,
Hugging Face names, S3 buckets, keys and versions); the lower grammars (digests, hosts, ports)
are in ``refgrammar``. Pure helpers of ``cacheagent.refs``; each raises
``RefError(ref, part, problem)`` naming the part."""

from __future__ import annotations

import re

from cacheagent.errors import RefError
from cacheagent.refgrammar import first_not_in

MAX_OCI_NAME_LENGTH = 255
MAX_TAG_LENGTH = 128
MAX_HF_NAME_LENGTH = 96
MAX_PATH_BYTES = 4096
MAX_PATH_COMPONENT_BYTES = 255

ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_TAG_CHARS = ALNUM | frozenset("._-")
_HF_CHARS = ALNUM | frozenset("._-")
_REVISION_CHARS = ALNUM | frozenset("._-/")
_REPO_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")


def check_repo_component(ref: str, component: str) -> None:
    if not component:
        raise RefError(ref, "repository", "empty path component")
    if _REPO_COMPONENT_RE.fullmatch(component):
        return
    if _REPO_COMPONENT_RE.fullmatch(component.lower()):
        problem = f"repository component {component!r} must be lowercase"
    elif not (component[0].isascii() and component[0].isalnum()):
        problem = f"repository component {component!r} must start with a lowercase letter or digit"
    elif not (component[-1].isascii() and component[-1].isalnum()):
        problem = f"repository component {component!r} must end with a lowercase letter or digit"
    else:
        problem = (
            f"repository component {component!r} may only join lowercase letters and digits "
            "with one '.', one or two '_', or '-'"
        )
    raise RefError(ref, "repository", problem)


def check_tag(ref: str, tag: str) -> None:
    if not tag:
        raise RefError(ref, "tag", "empty tag after ':'")
    if len(tag) > MAX_TAG_LENGTH:
        raise RefError(ref, "tag", f"tag is {len(tag)} characters, at most {MAX_TAG_LENGTH}")
    if tag[0] not in ALNUM and tag[0] != "_":
        raise RefError(ref, "tag", f"tag {tag!r} must start with a letter, digit or '_'")
    bad = first_not_in(tag, _TAG_CHARS)
    if bad is not None:
        raise RefError(
            ref, "tag", f"tag {tag!r} contains {bad!r}; allowed: letters, digits, '_', '.', '-'"
        )


def check_abs_path(ref: str, path: str) -> None:
    if path == "/":
        raise RefError(ref, "path", "path must name a directory below '/'")
    if len(path.encode()) > MAX_PATH_BYTES:
        raise RefError(ref, "path", f"path is longer than {MAX_PATH_BYTES} bytes")
    for component in path[1:].split("/"):
        if not component:
            raise RefError(ref, "path", "empty path component (doubled or trailing '/')")
        if component in (".", ".."):
            raise RefError(ref, "path", f"path component {component!r} is not allowed")
        if len(component.encode()) > MAX_PATH_COMPONENT_BYTES:
            raise RefError(
                ref, "path", f"path component longer than {MAX_PATH_COMPONENT_BYTES} bytes"
            )


def check_hf_repo_id(ref: str, repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) > 2:  # legacy single-name repos (gpt2) have no org
        raise RefError(ref, "repository", f"expected org/name or name, got {repo_id!r}")
    for name in parts:
        check_hf_name(ref, name)
    if repo_id.endswith(".git"):
        raise RefError(ref, "repository", f"{repo_id!r} must not end with '.git'")


def check_hf_name(ref: str, name: str) -> None:
    if not name:
        raise RefError(ref, "repository", "empty path component")
    if len(name) > MAX_HF_NAME_LENGTH:
        raise RefError(
            ref, "repository", f"{name!r} is {len(name)} characters, at most {MAX_HF_NAME_LENGTH}"
        )
    bad = first_not_in(name, _HF_CHARS)
    if bad is not None:
        raise RefError(
            ref, "repository", f"{name!r} contains {bad!r}; allowed: letters, digits, '-_.'"
        )
    if name[0] in "-." or name[-1] in "-.":
        raise RefError(
            ref, "repository", f"{name!r} must start and end with a letter, digit or '_'"
        )
    if "--" in name or ".." in name:
        raise RefError(ref, "repository", f"{name!r} must not contain '--' or '..'")


def check_revision(ref: str, revision: str) -> None:
    if not revision:
        raise RefError(ref, "revision", "empty revision after '@'")
    if len(revision) > 255:
        raise RefError(ref, "revision", f"revision is {len(revision)} characters, at most 255")
    bad = first_not_in(revision, _REVISION_CHARS)
    if bad is not None:
        raise RefError(
            ref,
            "revision",
            f"revision {revision!r} contains {bad!r}; allowed: letters, digits, '._-/'",
        )
    if (
        revision[0] in "/-."
        or revision[-1] in "/."
        or "//" in revision
        or ".." in revision
        or revision.endswith(".lock")
    ):
        raise RefError(ref, "revision", f"revision {revision!r} is not a valid git ref name")


_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_VERSION_CHARS = ALNUM | frozenset("._+=-")
MAX_KEY_BYTES = 1024


def check_bucket(ref: str, bucket: str) -> None:
    """S3 bucket naming rules (3-63 lowercase letters, digits, '.', '-')."""
    if not bucket:
        raise RefError(ref, "bucket", "missing bucket name, as in s3://bucket/prefix/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise RefError(
            ref,
            "bucket",
            f"bucket {bucket!r} must be 3-63 lowercase letters, digits, '.' or '-', "
            "starting and ending with a letter or digit",
        )


def check_object_key(ref: str, key: str) -> None:
    """A key or prefix whose components can become model paths."""
    if len(key.encode()) > MAX_KEY_BYTES:
        raise RefError(ref, "key", f"key is longer than {MAX_KEY_BYTES} bytes")
    for component in key.removesuffix("/").split("/") if key else ():
        if component in ("", ".", ".."):
            raise RefError(ref, "key", f"key component {component!r} is not allowed")


def check_version_id(ref: str, version: str) -> None:
    if len(version) > MAX_KEY_BYTES or first_not_in(version, _VERSION_CHARS) is not None:
        raise RefError(
            ref,
            "version",
            f"{version!r} is neither sha256:<hex>, an ETag (32 hex) nor a version id "
            "(letters, digits, '._+=-')",
        )
