"""A small synchronous client of the agent API, used by the CLI and the demo.

It turns "no agent there" into one clear error that names the socket, instead of a gRPC stack
trace, and maps status codes back to exit-worthy messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc

from cacheagent._proto.cacheagent.v1 import agent_pb2 as pb
from cacheagent._proto.cacheagent.v1 import agent_pb2_grpc as pb_grpc
from cacheagent.errors import CacheAgentError

T = TypeVar("T")


class AgentUnreachableError(CacheAgentError):
    """No agent answers on the socket."""

    def __init__(self, socket_path: Path, detail: str) -> None:
        self.socket_path = socket_path
        super().__init__(
            f"no cacheagent is answering on {socket_path} ({detail}); "
            "start it with `cacheagent serve` or point --socket at the right path"
        )


class AgentAccessError(CacheAgentError):
    """The socket is there but this user may not connect to it."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        super().__init__(
            f"permission denied on {socket_path}: run as root or as a member of the socket's "
            "group (the agent's agent.socket_group and agent.socket_mode)"
        )


class AgentCallError(CacheAgentError):
    """The agent answered with an error status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(f"{message} [{code.name}]")


class AgentClient:
    def __init__(self, socket_path: Path, *, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        self._stub = pb_grpc.AgentStub(self._channel)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _error(self, err: grpc.RpcError) -> CacheAgentError:
        # Errors raised by stubs are also grpc.Call objects; the stubs' types don't say so.
        code: grpc.StatusCode = getattr(err, "code", lambda: grpc.StatusCode.UNKNOWN)()
        detail: str = getattr(err, "details", lambda: str(err))() or ""
        if code != grpc.StatusCode.UNAVAILABLE:
            return AgentCallError(code, detail or code.name)
        try:
            self.socket_path.stat()
        except PermissionError:  # a directory on the way is closed to this user
            return AgentAccessError(self.socket_path)
        except OSError:
            return AgentUnreachableError(self.socket_path, "socket file does not exist")
        if "permission denied" in detail.lower():
            return AgentAccessError(self.socket_path)
        if "connect" in detail.lower():
            return AgentUnreachableError(self.socket_path, detail)
        return AgentCallError(code, detail or code.name)

    def preheat(
        self,
        refs: list[str],
        *,
        warm_memory: bool = False,
        gpus: list[str] | None = None,
        lock_memory: bool = False,
    ) -> Iterator[pb.PreheatEvent]:
        request = pb.PreheatRequest(
            refs=refs, warm_memory=warm_memory, gpus=gpus or [], lock_memory=lock_memory
        )
        try:
            yield from self._stub.Preheat(request)
        except grpc.RpcError as err:
            raise self._error(err) from None

    def _unary(self, method: Callable[..., T], request: object) -> T:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise self._error(err) from None

    def stat(self, model: str) -> pb.ModelInfo:
        return self._unary(self._stub.Stat, pb.StatRequest(model=model))

    def list(self) -> pb.ListResponse:
        return self._unary(self._stub.List, pb.ListRequest())

    def evict(self, model: str, *, force: bool = False) -> pb.EvictResponse:
        return self._unary(self._stub.Evict, pb.EvictRequest(model=model, force=force))

    def pin(self, model: str) -> pb.ModelInfo:
        return self._unary(self._stub.Pin, pb.PinRequest(model=model))

    def unpin(self, model: str) -> pb.ModelInfo:
        return self._unary(self._stub.Unpin, pb.PinRequest(model=model))

    def status(self, *, memory: bool = False) -> pb.StatusResponse:
        return self._unary(self._stub.Status, pb.StatusRequest(memory=memory))

    def reclaim(self, request: pb.ReclaimRequest) -> pb.ReclaimResponse:
        return self._unary(self._stub.Reclaim, request)
