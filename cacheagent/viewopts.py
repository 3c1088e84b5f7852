"""View options of a model reference: which files a volume shows, and in what layout. Pure.

A reference may end in ``|``-separated options (``|`` never occurs in the other forms; a URL
that needs one writes ``%7C``)::

    registry.example.com/models/qwen:v1|include=*.json,tokenizer*|exclude=*.pth,original/
    hf://org/name@main|hf-cache
    registry.example.com/models/qwen:v1|exclude-weights|hf-cache=org/qwen

``include=`` / ``exclude=`` take comma-separated globs matched against the model-relative
path, with the rules of ``huggingface_hub``'s ``allow_patterns`` / ``ignore_patterns``
(``fnmatch``: ``*`` also matches ``/``; a pattern ending in ``/`` means everything below that
directory). A file is kept when it matches some include pattern (or none is given) and no
exclude pattern. ``exclude-weights`` drops the ModelPack weight layers (model-csi-driver's
``exclude-model-weights``). ``hf-cache[=org/name]`` presents the model in the Hugging Face cache
layout (``models--org--name/{blobs,refs,snapshots/<rev>}``); for ``hf://`` refs the name
defaults to the repo.

The options are part of the canonical reference (patterns sorted and deduplicated), hence of
the cache key: a view is a model of its own, whose files are hard links to the same blobs as
the full model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from cacheagent.errors import RefError

MAX_PATTERNS = 64
MAX_PATTERN_LENGTH = 256
_PATTERN_FORBIDDEN = frozenset(",|")


@dataclass(frozen=True)
class ViewOptions:
    """The parsed options; the empty value is the full model in its own layout."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    exclude_weights: bool = False
    hf_cache: str = ""

    @property
    def empty(self) -> bool:
        return self == ViewOptions()

    @property
    def filters(self) -> bool:
        return bool(self.include or self.exclude or self.exclude_weights)

    @property
    def suffix(self) -> str:
        """The canonical ``|...`` text (options in a fixed order)."""
        parts = []
        if self.include:
            parts.append("include=" + ",".join(self.include))
        if self.exclude:
            parts.append("exclude=" + ",".join(self.exclude))
        if self.exclude_weights:
            parts.append("exclude-weights")
        if self.hf_cache:
            parts.append(f"hf-cache={self.hf_cache}")
        return "".join(f"|{p}" for p in parts)

    def keeps(self, path: str) -> bool:
        """Whether the model-relative ``path`` is in the view (by the patterns)."""
        if self.include and not _matches(path, self.include):
            return False
        return not _matches(path, self.exclude)


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(path, p + "*" if p.endswith("/") else p) for p in patterns)


def parse_view_options(
    ref: str, segments: Sequence[str], *, default_hf_repo: str | None = None
) -> ViewOptions:
    """Parse the ``|``-separated segments after the base reference (raises RefError, part
    ``view``). ``default_hf_repo`` is what a bare ``hf-cache`` means (the repo of an hf ref)."""
    include: set[str] = set()
    exclude: set[str] = set()
    exclude_weights = False
    hf_cache: str | None = None
    seen: set[str] = set()
    for segment in segments:
        if not segment:
            raise RefError(ref, "view", "'|' must be followed by an option")
        key, equals, value = segment.partition("=")
        if key in seen:
            raise RefError(ref, "view", f"option {key!r} given twice")
        seen.add(key)
        if key in ("include", "exclude"):
            if not equals:
                raise RefError(ref, "view", f"option {key!r} needs '=<glob>[,<glob>...]'")
            (include if key == "include" else exclude).update(_patterns(ref, key, value))
        elif key == "exclude-weights" and not equals:
            exclude_weights = True
        elif key == "hf-cache":
            hf_cache = value if equals else default_hf_repo
            if not hf_cache:
                raise RefError(ref, "view", "option 'hf-cache' needs '=org/name' here")
        else:
            raise RefError(
                ref,
                "view",
                f"unknown option {segment!r}; known: include=, exclude=, exclude-weights, "
                "hf-cache[=org/name]",
            )
    if len(include) + len(exclude) > MAX_PATTERNS:
        raise RefError(ref, "view", f"more than {MAX_PATTERNS} file patterns")
    return ViewOptions(
        include=tuple(sorted(include)),
        exclude=tuple(sorted(exclude)),
        exclude_weights=exclude_weights,
        hf_cache=hf_cache or "",
    )


def _patterns(ref: str, key: str, value: str) -> list[str]:
    patterns = value.split(",")
    for pattern in patterns:
        if not pattern:
            raise RefError(ref, "view", f"empty pattern in {key}={value!r}")
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise RefError(
                ref, "view", f"pattern is {len(pattern)} characters, at most {MAX_PATTERN_LENGTH}"
            )
        if pattern.startswith("/"):
            raise RefError(ref, "view", f"pattern {pattern!r} must be relative to the model root")
        if any(c in _PATTERN_FORBIDDEN for c in pattern):
            raise RefError(ref, "view", f"pattern {pattern!r} contains ',' or '|'")
    return patterns
