"""Which errno a FUSE caller sees for each failure, and under which metric kind it is counted.

Pure: maps exception types to ``(kind, errno)``. The kinds are the only values of the
``kind`` label of ``cacheagent_fuse_errors_total``.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import StrEnum

from cacheagent.errors import (
    CacheAgentError,
    DigestMismatchError,
    ModelNotFoundError,
    SizeMismatchError,
    SourceError,
)
from cacheagent.fuse.waits import LazyReadTimeoutError, OriginBusyError


class ErrorKind(StrEnum):
    NOT_FOUND = "not_found"  # unknown model or path (ENOENT)
    VERIFY = "verify"  # the blob failed digest or size verification (EIO)
    ORIGIN = "origin"  # the bytes could not be fetched from the origin (EIO)
    TIMEOUT = "timeout"  # the origin did not deliver within fuse.origin_wait_seconds (ETIMEDOUT)
    BUSY = "busy"  # too many reads already wait for origins; refused, not queued (EIO)
    IO = "io"  # local I/O or any other provider failure (EIO)
    READ_ONLY = "read_only"  # a write-type operation was refused (EROFS)
    INTERNAL = "internal"  # a bug: an unexpected exception (EIO)


@dataclass(frozen=True)
class Failure:
    kind: ErrorKind
    errno: int


def classify(exc: BaseException) -> Failure:
    """The kind and errno for an exception raised by a content provider."""
    if isinstance(exc, ModelNotFoundError | FileNotFoundError):
        return Failure(ErrorKind.NOT_FOUND, errno.ENOENT)
    if isinstance(exc, DigestMismatchError | SizeMismatchError):
        return Failure(ErrorKind.VERIFY, errno.EIO)
    if isinstance(exc, LazyReadTimeoutError):
        return Failure(ErrorKind.TIMEOUT, errno.ETIMEDOUT)
    if isinstance(exc, OriginBusyError):
        return Failure(ErrorKind.BUSY, errno.EIO)
    if isinstance(exc, SourceError):
        return Failure(ErrorKind.ORIGIN, errno.EIO)
    if isinstance(exc, CacheAgentError | OSError):
        return Failure(ErrorKind.IO, errno.EIO)
    return Failure(ErrorKind.INTERNAL, errno.EIO)
