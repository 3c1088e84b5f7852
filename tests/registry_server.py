"""Start Debian's real ``docker-registry`` (CNCF distribution 2.8) on a loopback port for a test.

``RegistryServer`` writes a config YAML and a temp storage dir, starts the binary, waits until
``/v2/`` answers (200, or 401 when auth is on), and stops it by PID. Auth is off, htpasswd basic
(``htpasswd -Bbn``), or bearer tokens signed by a key whose certificate the registry trusts (run
``tests.token_service.TokenService`` for the realm).
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.child_process import stop_child, wait_ready
from tests.support import require_binary

START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class TokenAuth:
    realm: str
    service: str
    issuer: str
    root_cert: Path


@dataclass(frozen=True)
class BasicAuth:
    username: str
    password: str


@dataclass(frozen=True)
class Tls:
    cert: Path
    key: Path


class RegistryServer:
    """One docker-registry process; use as a context manager (``with RegistryServer(...)``)."""

    def __init__(
        self,
        workdir: Path,
        *,
        basic: BasicAuth | None = None,
        token: TokenAuth | None = None,
        tls: Tls | None = None,
    ) -> None:
        self.binary = require_binary("docker-registry")
        self.workdir = workdir
        self.basic = basic
        self.token = token
        self.tls = tls
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``: the registry name refs and config use."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def _config(self) -> dict[str, object]:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        http: dict[str, object] = {"addr": self.host, "secret": "cacheagent-test-secret"}
        if self.tls is not None:
            http["tls"] = {"certificate": str(self.tls.cert), "key": str(self.tls.key)}
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
        }
        if self.basic is not None:
            htpasswd = self.workdir / "htpasswd"
            out = subprocess.run(
                [require_binary("htpasswd"), "-Bbn", self.basic.username, self.basic.password],
                check=True,
                capture_output=True,
                timeout=30,
            )
            htpasswd.write_bytes(out.stdout)
            config["auth"] = {"htpasswd": {"realm": "cacheagent-test", "path": str(htpasswd)}}
        elif self.token is not None:
            config["auth"] = {
                "token": {
                    "realm": self.token.realm,
                    "service": self.token.service,
                    "issuer": self.token.issuer,
                    "rootcertbundle": str(self.token.root_cert),
                }
            }
        return config

    def start(self) -> RegistryServer:
        config_path = self.workdir / "config.yml"
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(self._config()))
        log = open(self.workdir / "registry.log", "wb")  # noqa: SIM115 - lives as long as proc
        self.proc = subprocess.Popen(
            [self.binary, "serve", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=2, context=context):
                    return True
            except urllib.error.HTTPError as exc:
                return exc.code == 401
            except OSError:
                return False

        assert self.proc is not None
        wait_ready(
            self.proc,
            answers,
            what="docker-registry",
            timeout=START_TIMEOUT_SECONDS,
            log=self.log_text,
        )

    def log_text(self) -> str:
        path = self.workdir / "registry.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_child(proc, STOP_TIMEOUT_SECONDS)

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
