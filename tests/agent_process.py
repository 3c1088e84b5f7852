"""Run a real `cacheagent serve` subprocess on a private directory tree (tests and the demo).

Everything it owns lives under one work directory: the store, both sockets, a stand-in kubelet
directory and the FUSE mountpoint; the HTTP listener takes a free loopback port. ``stop``
sends SIGTERM to the agent's own PID and waits (SIGKILL only if it overstays), ``kill`` sends
SIGKILL to test crash recovery.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.mounts import force_unmount, mounts_under
from tests.registry_server import free_port

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
# The test origins listen on loopback, which an agent refuses for URL origins unless told.
LOOPBACK_HTTP: Mapping[str, Any] = {"http_allowed_networks": ["127.0.0.0/8", "::1"]}


@dataclass
class AgentProcess:
    work: Path
    insecure: tuple[str, ...] = ()
    extra: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    fuse: bool = False
    env: Mapping[str, str] = field(default_factory=dict)  # added to os.environ for `serve`
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # Unix socket paths are limited to 107 bytes; pytest's tmp paths are long.
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ca-", dir="/tmp")))

    @property
    def config_path(self) -> Path:
        return self.work / "config.yaml"

    @property
    def socket(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def csi_socket(self) -> Path:
        return self.run_dir / "csi" / "csi.sock"

    @property
    def kubelet_dir(self) -> Path:
        return self.work / "kubelet"

    @property
    def store_root(self) -> Path:
        return self.work / "store"

    @property
    def fuse_root(self) -> Path:
        return self.run_dir / "fuse"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "store": {"root": str(self.store_root), "capacity": "50%"},
            "registries": {"insecure": list(self.insecure)},
            "agent": {"socket": str(self.socket), "http_listen": f"127.0.0.1:{self.port}"},
            "csi": {
                "socket": str(self.csi_socket),
                "kubelet_dir": str(self.kubelet_dir),
                "node_id": "test-node",
                "publish_wait_seconds": 5,
            },
            "fuse": {"enabled": self.fuse, "mountpoint": str(self.fuse_root)},
        }
        for section, values in self.extra.items():
            config.setdefault(section, {}).update(values)
        return config

    def cli(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run the `cacheagent` CLI against this agent."""
        return subprocess.run(
            [sys.executable, "-m", "cacheagent.cli.main", "--config", str(self.config_path), *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *, wait: bool = True) -> AgentProcess:
        """Start ``serve``; with ``wait`` (default) return once /readyz answers 200."""
        self.work.mkdir(parents=True, exist_ok=True)
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config()))
        log = open(self.work / "agent.log", "ab")  # noqa: SIM115 - lives as long as proc
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cacheagent.cli.main",
                "--config",
                str(self.config_path),
                "serve",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        log.close()
        if not wait:
            return self
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited at start:\n{self.log_text()}")
            if self.get("/readyz")[0] == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"agent not ready in {timeout}s:\n{self.log_text()}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{self.http}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError:
            return 0, ""

    def log_text(self) -> str:
        path = self.work / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it was not running)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                return proc.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_SECONDS)
                raise
        return proc.returncode

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_SECONDS)

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """Remove the socket directory (the agent removes its sockets and unmounts FUSE)."""
        shutil.rmtree(self.run_dir, ignore_errors=True)


def stop_and_unmount(agent: AgentProcess) -> None:
    """Stop ``agent``, force off the mounts it left under its kubelet dir, then remove its
    socket directory."""
    agent.stop()
    for leftover in mounts_under(agent.kubelet_dir):
        force_unmount(leftover)
    agent.cleanup()
