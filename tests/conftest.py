"""Fixtures shared by every test; the skip-or-fail rules live in tests/support.py."""

from __future__ import annotations

import pytest

from tests.support import require_fuse, require_root


@pytest.fixture
def root_required() -> None:
    require_root()


@pytest.fixture
def fuse_required() -> None:
    require_fuse()
