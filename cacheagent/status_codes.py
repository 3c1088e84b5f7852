"""One table from cacheagent's errors to gRPC status codes, shared by the agent API and CSI.

The code tells the caller what to do: wait and retry (UNAVAILABLE), fix the request
(INVALID_ARGUMENT), ask for access (PERMISSION_DENIED), make room (RESOURCE_EXHAUSTED), fix the
model reference (NOT_FOUND), or fix the artifact or the situation (FAILED_PRECONDITION).
INTERNAL is kept for what nobody anticipated.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from cacheagent.errors import (
    CacheFullError,
    ConfigError,
    DigestMismatchError,
    DiskFullError,
    ModelInUseError,
    ModelNotFoundError,
    OriginUnavailableError,
    PolicyDeniedError,
    RefError,
    SizeMismatchError,
    SourceError,
    StoreLockedError,
    UnsafePathError,
)

ErrorCodes = Sequence[tuple[type[BaseException], grpc.StatusCode]]

ERROR_CODES: ErrorCodes = (
    # Order matters: subclasses before their bases.
    (RefError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (PolicyDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (OriginUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (CacheFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DiskFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # A download that failed verification is worth another try (another mirror, a fixed proxy).
    (DigestMismatchError, grpc.StatusCode.UNAVAILABLE),
    (SizeMismatchError, grpc.StatusCode.UNAVAILABLE),
    (StoreLockedError, grpc.StatusCode.UNAVAILABLE),
    # The artifact itself is unusable (hostile paths, unknown media types): retrying won't help.
    (UnsafePathError, grpc.StatusCode.FAILED_PRECONDITION),
    (SourceError, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelInUseError, grpc.StatusCode.FAILED_PRECONDITION),
)


def grpc_code(exc: BaseException, extra: ErrorCodes = ()) -> grpc.StatusCode:
    """The status code for ``exc``; ``extra`` entries (a service's own errors) are tried first."""
    for kind, code in (*extra, *ERROR_CODES):
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL
