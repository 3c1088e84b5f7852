"""CSI Identity service: who the plugin is, that it has no controller, and whether it is ready."""

from __future__ import annotations

import re

from google.protobuf.wrappers_pb2 import BoolValue

import cacheagent
from cacheagent._proto.csi.v1 import csi_pb2 as pb
from cacheagent._proto.csi.v1 import csi_pb2_grpc as pb_grpc
from cacheagent.errors import ConfigError
from cacheagent.volumes import CsiBackend

from .rpc import Context, RpcRunner

_DRIVER_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$")


def check_driver_name(name: str) -> str:
    """The CSI spec's rule: domain-name notation, at most 63 characters."""
    if not _DRIVER_NAME_RE.match(name):
        raise ConfigError(
            "csi.driver_name",
            f"{name!r} is not a valid CSI driver name (at most 63 characters of letters, digits, "
            "'-' and '.', starting and ending with a letter or digit)",
        )
    return name


class IdentityService(pb_grpc.IdentityServicer):
    def __init__(self, driver_name: str, backend: CsiBackend, rpc: RpcRunner) -> None:
        self._name = check_driver_name(driver_name)
        self._backend = backend
        self._rpc = rpc

    async def GetPluginInfo(  # noqa: N802 (gRPC method name)
        self, request: pb.GetPluginInfoRequest, context: Context
    ) -> pb.GetPluginInfoResponse:
        async def answer() -> pb.GetPluginInfoResponse:
            return pb.GetPluginInfoResponse(name=self._name, vendor_version=cacheagent.__version__)

        return await self._rpc.run("GetPluginInfo", context, answer)

    async def GetPluginCapabilities(  # noqa: N802 (gRPC method name)
        self, request: pb.GetPluginCapabilitiesRequest, context: Context
    ) -> pb.GetPluginCapabilitiesResponse:
        # Node-only plugin: no CONTROLLER_SERVICE, and every node can serve every model, so no
        # VOLUME_ACCESSIBILITY_CONSTRAINTS either.
        async def answer() -> pb.GetPluginCapabilitiesResponse:
            return pb.GetPluginCapabilitiesResponse()

        return await self._rpc.run("GetPluginCapabilities", context, answer)

    async def Probe(  # noqa: N802 (gRPC method name)
        self, request: pb.ProbeRequest, context: Context
    ) -> pb.ProbeResponse:
        async def answer() -> pb.ProbeResponse:
            return pb.ProbeResponse(ready=BoolValue(value=self._backend.store_ready()))

        return await self._rpc.run("Probe", context, answer)
