"""Fixtures of the fault suite: one ``Rig`` per test, torn down whatever happened."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.harness import Rig
from tests.support import require_root


@pytest.fixture
def rig() -> Iterator[Rig]:
    require_root()  # the agent publishes real bind mounts; the suite checks them as root
    world = Rig()
    try:
        yield world
    finally:
        world.close()
