"""Run a `cacheagent serve` command line as a container would, until its readiness URL answers.

For tests that start the agent from something other than this checkout's module (the command
a manifest describes, an installed wheel's entry point); ``tests.agent_process`` covers the
ordinary case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0


def dockerfile_instructions(dockerfile: Path, name: str) -> list[str]:
    """The arguments of every ``name`` instruction (``RUN``, ``CMD``...), continuation lines
    joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    return [
        line.removeprefix(name).strip() for line in text.splitlines() if line.startswith(f"{name} ")
    ]


def get(url: str) -> tuple[int, str]:
    """Status and body; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


@contextmanager
def serving(
    command: Sequence[str], env: Mapping[str, str], ready_url: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``command``, wait until ``ready_url`` answers 200, and on leaving stop it with
    SIGTERM and require exit code 0 (SIGKILL only if it overstays)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(env))
    try:
        _wait_ready(proc, ready_url, log)
        yield proc
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=STOP_TIMEOUT_SECONDS)
        assert code == 0, f"exit code {code} after SIGTERM:\n{log.read_text()}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_SECONDS)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"agent exited with {proc.returncode}:\n{log.read_text()}")
        if get(url)[0] == 200:
            return
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer 200 in {START_TIMEOUT_SECONDS}s:\n{log.read_text()}")
