"""The agent API on TCP: served only with TLS, optionally requiring client certificates."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest

from cacheagent._proto.cacheagent.v1 import agent_pb2 as pb
from cacheagent._proto.cacheagent.v1 import agent_pb2_grpc as pb_grpc
from tests.agent_process import AgentProcess
from tests.certs import Pki, make_pki
from tests.registry_server import free_port
from tests.support import require_binary


def status_over(channel: grpc.Channel) -> pb.StatusResponse:
    with channel:
        return pb_grpc.AgentStub(channel).Status(pb.StatusRequest(), timeout=10)


def client_cert(pki: Pki, directory: Path) -> tuple[bytes, bytes]:
    """A client key and certificate signed by the test CA."""
    openssl = require_binary("openssl")
    key, csr, cert = directory / "client.key", directory / "client.csr", directory / "client.pem"
    subprocess.run(
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=rollout-controller"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    subprocess.run(
        [openssl, "x509", "-req", "-in", csr, "-CA", pki.ca_cert, "-CAkey", pki.ca_key,
         "-CAcreateserial", "-days", "2", "-out", cert],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return key.read_bytes(), cert.read_bytes()


def tls_agent(work: Path, pki: Pki, port: int, **settings: str) -> AgentProcess:
    listen = {
        "tcp_listen": f"127.0.0.1:{port}",
        "tls_cert": str(pki.server_cert),
        "tls_key": str(pki.server_key),
    }
    return AgentProcess(work, extra={"agent": {**listen, **settings}})


def test_tcp_api_requires_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    agent = tls_agent(tmp_path / "agent", pki, port)
    with agent:
        roots = pki.ca_cert.read_bytes()
        secure = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(roots))
        assert status_over(secure).store_root == str(agent.store_root)
        with pytest.raises(grpc.RpcError) as plain:
            status_over(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_certificates_when_a_client_ca_is_set(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    with tls_agent(tmp_path / "agent", pki, port, tls_client_ca=str(pki.ca_cert)):
        roots = pki.ca_cert.read_bytes()
        anonymous = grpc.ssl_channel_credentials(roots)
        with pytest.raises(grpc.RpcError):
            status_over(grpc.secure_channel(f"127.0.0.1:{port}", anonymous))
        key, cert = client_cert(pki, tmp_path)
        mutual = grpc.ssl_channel_credentials(roots, private_key=key, certificate_chain=cert)
        assert status_over(grpc.secure_channel(f"127.0.0.1:{port}", mutual)).version


def test_tcp_without_tls_is_a_config_error(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent", extra={"agent": {"tcp_listen": "127.0.0.1:1"}})
    with pytest.raises(RuntimeError, match=r"agent\.tcp_listen: the API is only served on TCP"):
        agent.start()
    agent.cleanup()
