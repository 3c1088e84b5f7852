"""The agent API's listeners: the unix socket (claimed, with its mode and group) and the
optional TCP listener, which never serves without TLS."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from cacheagent._proto.cacheagent.v1 import agent_pb2_grpc as pb_grpc
from cacheagent.api import AgentService
from cacheagent.config import Config
from cacheagent.errors import ConfigError
from cacheagent.sockets import prepare_socket, resolve_gid, set_access

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660


async def start_agent_api(
    socket_path: Path,
    servicer: AgentService,
    tls: TcpTls | None = None,
    *,
    max_calls: int | None = None,
    mode: int = SOCKET_MODE,
    group: str | None = None,
) -> grpc.aio.Server:
    """Serve the agent API; calls beyond ``max_calls`` in flight get RESOURCE_EXHAUSTED. The
    socket gets ``mode`` (agent.socket_mode) and ``group`` (agent.socket_group: a name or GID;
    a socket directory the agent creates gets it too)."""
    gid = await asyncio.to_thread(resolve_gid, group)
    # Another agent (another store, so its own store lock) may be serving this path: gRPC
    # would unlink its socket and take the path over. Probe first, as the CSI socket does.
    await asyncio.to_thread(prepare_socket, socket_path, "agent.socket", gid=gid)
    server = grpc.aio.server(maximum_concurrent_rpcs=max_calls)
    pb_grpc.add_AgentServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix://{socket_path}")
    if tls is not None:
        credentials = await asyncio.to_thread(tls.credentials)
        if server.add_secure_port(tls.address, credentials) == 0:
            raise ConfigError("agent.tcp_listen", f"cannot listen on {tls.address}")
    # The socket is created by start(); a tight umask means it never exists with wider rights.
    old = os.umask(0o777 & ~mode)
    try:
        await server.start()
    finally:
        os.umask(old)
    await asyncio.to_thread(set_access, socket_path, mode, gid)
    log.info("agent API serving on %s", socket_path)
    if tls is not None:
        log.info(
            "agent API serving on %s (TLS%s)",
            tls.address,
            ", client certs" if tls.client_ca else "",
        )
    return server


@dataclass(frozen=True)
class TcpTls:
    """The agent API's optional TCP listener; it never serves without TLS."""

    address: str
    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_config(cls, config: Config) -> TcpTls | None:
        agent = config.agent
        if agent.tcp_listen is None or agent.tls_cert is None or agent.tls_key is None:
            return None
        return cls(agent.tcp_listen, agent.tls_cert, agent.tls_key, agent.tls_client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        try:
            pair = (self.key.read_bytes(), self.cert.read_bytes())
            roots = self.client_ca.read_bytes() if self.client_ca is not None else None
        except OSError as err:
            raise ConfigError(
                "agent.tls_cert", f"cannot read {err.filename}: {err.strerror}"
            ) from None
        return grpc.ssl_server_credentials(
            [pair], root_certificates=roots, require_client_auth=roots is not None
        )
