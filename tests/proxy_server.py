"""Start Debian's real ``tinyproxy`` (an HTTP forward proxy with CONNECT) on a loopback port.

``ProxyServer`` writes a config and a log file in a temp dir, starts ``tinyproxy -d`` (in the
foreground, so the PID is the proxy's), waits until its port accepts connections, and stops it by
PID. tinyproxy adds ``Via: 1.1 <via_name> ...`` to the requests it forwards and logs every
``CONNECT`` it tunnels, which is how tests tell that a request went through it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.registry_server import free_port
from tests.support import require_binary

START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 10.0


class ProxyServer:
    """One tinyproxy process; use as a context manager (``with ProxyServer(tmp) as proxy``)."""

    def __init__(self, workdir: Path, *, via_name: str = "cacheagent-test-proxy") -> None:
        self.binary = require_binary("tinyproxy")
        self.workdir = workdir
        self.via_name = via_name
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "tinyproxy.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> ProxyServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "tinyproxy.conf"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "Listen 127.0.0.1",
                    "Timeout 30",
                    f'LogFile "{self.log_path}"',
                    "LogLevel Connect",
                    "MaxClients 32",
                    "Allow 127.0.0.1",
                    f'ViaProxyName "{self.via_name}"',
                    "",
                ]
            )
        )
        self.proc = subprocess.Popen(
            [self.binary, "-d", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"tinyproxy exited at start: {self.log_text()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"tinyproxy not listening in {START_TIMEOUT_SECONDS}s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_SECONDS)

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
