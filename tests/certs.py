"""Test PKI made with the openssl CLI: a CA, a server certificate for 127.0.0.1, and RS256 JWTs.

The openssl binary is what Debian ships (no Python crypto dependency needed for tests).
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support import require_binary


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(
        [require_binary("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60
    )


def make_pki(directory: Path) -> Pki:
    """A self-signed CA and a server certificate for ``127.0.0.1``/``localhost`` it signed."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=cacheagent test CA",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1",
        cwd=directory,
    )  # fmt: skip
    (directory / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", "server.pem", "-extfile", "san.ext",
        cwd=directory,
    )  # fmt: skip
    return Pki(
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def cert_der_b64(cert_pem: Path) -> str:
    """The certificate as standard base64 DER, what a JWT ``x5c`` header carries."""
    body = "".join(
        line for line in cert_pem.read_text().splitlines() if line and not line.startswith("-----")
    )
    return base64.b64encode(base64.b64decode(body)).decode("ascii")


async def sign_jwt(claims: dict[str, object], key: Path, cert: Path) -> str:
    """An RS256 JWT whose ``x5c`` header names ``cert`` (so a registry trusting it verifies it)."""
    header = {"typ": "JWT", "alg": "RS256", "x5c": [cert_der_b64(cert)]}
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    proc = await asyncio.create_subprocess_exec(
        require_binary("openssl"), "dgst", "-sha256", "-sign", str(key),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    signature, err = await asyncio.wait_for(proc.communicate(signing_input.encode()), 30)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl dgst failed: {err.decode(errors='replace')}")
    return f"{signing_input}.{_b64url(signature)}"
