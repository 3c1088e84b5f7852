"""Debian's tinyproxy on a loopback port: a real HTTP forward proxy for the upstream-proxy
path (the role a Dragonfly ``dfdaemon`` proxy plays on a cluster).

Runs in the foreground (``-d``), logs every request line to its stderr file (``requests()``
reads them back), and is stopped by PID.
"""

from __future__ import annotations

import contextlib
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
    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary("tinyproxy")
        self.workdir = workdir
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
            "LogLevel Info\nAllow 127.0.0.1\n"
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-d", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        wait_ready(
            self.proc,
            self._listening,
            what="tinyproxy",
            timeout=START_TIMEOUT_SECONDS,
            log=lambda: self.log.read_text(errors="replace"),
        )

    def _listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
            return True
        return False

    def requests(self) -> list[tuple[str, str]]:
        """(method, absolute URL) of every request the proxy forwarded, in order."""
        return _REQUEST.findall(self.log.read_text(errors="replace"))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_child(proc)

    def __enter__(self) -> TinyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
