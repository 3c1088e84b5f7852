"""moto's standalone S3-compatible server (``moto_server`` from PyPI) on a loopback port.

``S3Server`` starts the process, waits until it answers, gives a boto3 client for seeding
buckets (the test's own tool, independent of the agent's S3 code) and stops the process by
PID. Credentials are arbitrary but must be present: moto checks that requests are signed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.child_process import stop_child, wait_ready
from tests.registry_server import free_port

ACCESS_KEY = "AKIDCACHEAGENTTEST"
SECRET_KEY = "cacheagent-test-secret-key-0123456789"
START_TIMEOUT_SECONDS = 90.0  # moto imports a lot; a loaded CI machine is slow


class S3Server:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}"

    def __enter__(self) -> S3Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = Path(sys.executable).with_name("moto_server")
        log = (self.workdir / "moto.log").open("wb")
        self.proc = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
        )
        log.close()
        try:
            wait_ready(
                self.proc,
                self._answers,
                what="moto_server",
                timeout=START_TIMEOUT_SECONDS,
                log=lambda: (self.workdir / "moto.log").read_text(),
            )
        except RuntimeError:
            self.__exit__()
            raise
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def __exit__(self, *exc: object) -> None:
        stop_child(self.proc)
        self.proc = None

    def client(self) -> Any:
        import boto3  # moto's own dependency; only the tests seed buckets with it

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
