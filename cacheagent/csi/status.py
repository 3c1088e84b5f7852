"""gRPC status codes for CSI answers: one table from cacheagent's errors to codes.

Kubelet retries every failed NodePublishVolume with backoff, so the code matters less for
retrying than for the person reading ``kubectl describe pod``: it must say whether to wait
(UNAVAILABLE), fix the pod spec (INVALID_ARGUMENT), ask for access (PERMISSION_DENIED), make
room (RESOURCE_EXHAUSTED) or fix the model reference (NOT_FOUND).
"""

from __future__ import annotations

import grpc

from cacheagent.errors import (
    CacheFullError,
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
from cacheagent.volumes import LazyModeUnavailableError

from .mounts import MountBusyError


class CsiFailure(Exception):  # noqa: N818 (it is the answer, not an internal error)
    """A request the driver refuses with a specific code; the message goes back to kubelet."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}")


def invalid(message: str) -> CsiFailure:
    return CsiFailure(grpc.StatusCode.INVALID_ARGUMENT, message)


_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    # Order matters: subclasses before their bases.
    (RefError, grpc.StatusCode.INVALID_ARGUMENT),
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
    (LazyModeUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
    (MountBusyError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and message to answer with; INTERNAL only for what nobody anticipated."""
    if isinstance(exc, CsiFailure):
        return exc.code, exc.message
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
