"""gRPC status codes for CSI answers: one table from cacheagent's errors to codes.

Kubelet retries every failed NodePublishVolume with backoff, so the code matters less for
retrying than for the person reading ``kubectl describe pod``: it must say whether to wait
(UNAVAILABLE), fix the pod spec (INVALID_ARGUMENT), ask for access (PERMISSION_DENIED), make
room (RESOURCE_EXHAUSTED) or fix the model reference (NOT_FOUND).
"""

from __future__ import annotations

import grpc

from cacheagent.status_codes import ErrorCodes, grpc_code
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


# Answers of the driver's own making, before the agent-wide table.
_CSI_CODES: ErrorCodes = (
    (LazyModeUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
    (MountBusyError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and message to answer with; INTERNAL only for what nobody anticipated."""
    if isinstance(exc, CsiFailure):
        return exc.code, exc.message
    code = grpc_code(exc, _CSI_CODES)
    if code is grpc.StatusCode.INTERNAL:
        return code, f"internal error: {type(exc).__name__}: {exc}"
    return code, str(exc)
