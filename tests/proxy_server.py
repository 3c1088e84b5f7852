"""Debian's tinyproxy on a loopback port: a real HTTP forward proxy (with CONNECT) for the
upstream-proxy path (the role a Dragonfly ``dfdaemon`` proxy plays on a cluster) and for the
``HTTPS_PROXY``/``NO_PROXY`` environment an operator sets on nodes.

Runs in the foreground (``-d``, so the PID is the proxy's), logs every request line and every
tunnelled ``CONNECT`` (``requests()`` reads them back, ``log_text()`` gives the whole log), adds
``Via: 1.1 <via_name> ...`` to what it forwards, and is stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
from pathlib import Path

from tests.child_process import stop_child, wait_ready
from tests.registry_server import free_port
from tests.support import require_binary

START_TIMEOUT_SECONDS = 10.0
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+)")


class TinyProxy:
    """One tinyproxy process; use as a context manager (``with TinyProxy(tmp) as proxy``)."""

    def __init__(self, workdir: Path, *, via_name: str = "cacheagent-test-proxy") -> None:
        self.binary = require_binary("tinyproxy")
        self.workdir = workdir
        self.via_name = via_name
        self.port = free_port()
        self.log = workdir / "tinyproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TinyProxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "tinyproxy.conf"
        config.write_text(
            f"Port {self.port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 200\n"
            f'LogLevel Info\nAllow 127.0.0.1\nViaProxyName "{self.via_name}"\n'
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-d", "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )
        try:
            wait_ready(
                self.proc,
                self._listening,
                what="tinyproxy",
                timeout=START_TIMEOUT_SECONDS,
                log=self.log_text,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
            return True
        return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def requests(self) -> list[tuple[str, str]]:
        """(method, absolute URL or CONNECT target) of every request the proxy took, in order."""
        return _REQUEST.findall(self.log_text())

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_child(proc)

    def __enter__(self) -> TinyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
