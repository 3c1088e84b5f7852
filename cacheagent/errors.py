"""The few exception types a caller can act on.

Every error names the thing that is wrong (the reference part, the config key, the blob digest,
the origin) so that the message alone tells a user what to fix. The gRPC layers map these types
to status codes; nothing else should need to inspect messages.
"""

from __future__ import annotations

import errno
import os

#: errno values that mean the store's filesystem is out of space (or quota).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class CacheAgentError(Exception):
    """Base class for every error cacheagent raises on purpose."""


class RefError(CacheAgentError, ValueError):
    """A model reference is malformed; ``part`` names the offending component."""

    def __init__(self, ref: str, part: str, problem: str) -> None:
        self.ref = ref
        self.part = part
        self.problem = problem
        super().__init__(f"invalid model reference {ref!r}: {part}: {problem}")


class ConfigError(CacheAgentError, ValueError):
    """The configuration is invalid; ``key`` is the dotted path of the bad setting."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"config {key}: {problem}")


class StoreError(CacheAgentError):
    """The on-disk store cannot do what was asked."""


class StoreLockedError(StoreError):
    """Another agent already owns this store directory."""


class DigestMismatchError(StoreError):
    """Bytes did not hash to the digest they were fetched for; nothing was committed."""

    def __init__(self, expected: str, actual: str, what: str = "blob") -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"{what} digest mismatch: expected {expected}, got {actual}")


class SizeMismatchError(StoreError):
    """A blob was larger or smaller than declared; nothing was committed."""

    def __init__(self, digest: str, expected: int, actual: int) -> None:
        self.digest = digest
        self.expected = expected
        self.actual = actual
        super().__init__(f"blob {digest}: expected {expected} bytes, got {actual}")


class UnsafePathError(CacheAgentError, ValueError):
    """A file path (annotation, tar member, HF file) would escape the model tree."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"unsafe path {path!r}: {problem}")


class CacheFullError(StoreError):
    """The cache cannot make room even after evicting everything it may evict."""

    def __init__(self, needed: int, available: int, *, detail: str | None = None) -> None:
        self.needed = needed
        self.available = available
        super().__init__(
            f"cache full: {detail}"
            if detail
            else f"cache full: need {needed} bytes, at most {available} bytes can be freed "
            "(the rest is pinned, in use or being pulled)"
        )


class DiskFullError(StoreError):
    """The store's filesystem ran out of space below the configured capacity (something else
    fills the disk, or the capacity is larger than the disk); nothing was committed."""

    def __init__(self, path: str | os.PathLike[str], detail: str) -> None:
        self.path = os.fspath(path)
        super().__init__(
            f"disk full: no space left on the filesystem of {self.path} ({detail}); "
            "free space there or lower store.capacity"
        )


class ModelNotFoundError(CacheAgentError):
    """The model (or the tag, or a blob) does not exist at the origin or in the store."""


class ModelInUseError(StoreError):
    """A model cannot be removed because it is pinned, leased or being pulled."""


class SourceError(CacheAgentError):
    """An origin answered with something we cannot use (bad manifest, bad media type...)."""


class OriginUnavailableError(SourceError):
    """The origin could not be reached or kept failing after the retries ran out."""


class PolicyDeniedError(CacheAgentError):
    """Configured policy refuses this source or this namespace; ``rule`` names the rule."""

    def __init__(self, message: str, rule: str) -> None:
        self.rule = rule
        super().__init__(f"{message} (policy rule: {rule})")
