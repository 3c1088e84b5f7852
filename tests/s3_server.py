"""moto's standalone S3-compatible server (``moto_server`` from PyPI) on a loopback port.

``S3Server`` starts the process, waits until it answers, gives a boto3 client for seeding
buckets (the test's own tool, independent of the agent's S3 code) and stops the process by
PID. Credentials are arbitrary but must be present: moto checks that requests are signed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

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
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {(self.workdir / 'moto.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("moto_server did not answer in time")

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
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
