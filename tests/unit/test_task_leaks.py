"""The autouse fixture in tests/conftest.py fails a test that leaks asyncio tasks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LEAKY = """
import asyncio


async def test_leaks_a_task() -> None:
    asyncio.get_running_loop().create_task(asyncio.sleep(3600), name="forgotten")


async def test_cancels_what_it_starts() -> None:
    task = asyncio.create_task(asyncio.sleep(3600))
    task.cancel()


async def test_awaits_what_it_starts() -> None:
    await asyncio.create_task(asyncio.sleep(0))
"""


def test_a_test_that_leaks_a_task_errors_and_the_others_pass(tmp_path: Path) -> None:
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    result = subprocess.run(
        [
            sys.executable,
            *("-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest"),
            *("-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function"),
            *("--rootdir", str(tmp_path), str(tmp_path / "test_leaky.py")),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout + result.stderr
    # The leaking test's body passes; its teardown errors, naming the task.
    assert "3 passed, 1 error" in out, out
    assert "ERROR" in out and "test_leaky.py::test_leaks_a_task" in out
    assert "left 1 asyncio task(s) running: forgotten (sleep)" in out
