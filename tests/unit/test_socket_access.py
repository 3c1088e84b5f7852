"""agent.socket_group resolves to a GID when the agent binds, or fails naming the key."""

from __future__ import annotations

import grp
import os

import pytest

from cacheagent.errors import ConfigError
from cacheagent.server import resolve_gid


def test_a_group_name_or_number_resolves_to_a_gid() -> None:
    own = grp.getgrgid(os.getgid()).gr_name
    assert resolve_gid(own) == os.getgid()
    assert resolve_gid("4242") == 4242
    assert resolve_gid(None) is None


def test_an_unknown_group_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_gid("no-such-group-cacheagent")
    assert err.value.key == "agent.socket_group"
    assert "no-such-group-cacheagent" in err.value.problem
