"""Daemon wiring from config: the API socket's group (resolved at bind) and the warmer's knobs."""

from __future__ import annotations

import grp
import os

import pytest

from cacheagent.errors import ConfigError
from cacheagent.sockets import resolve_gid


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


def test_the_warmer_gets_the_configured_workers_and_method() -> None:
    from cacheagent.config import load_config
    from cacheagent.memory.gpu import GpuInventory
    from cacheagent.memory.prefetch import WarmMethod, prefetcher_from_config
    from tests.fake_pynvml import FakeNvml

    config = load_config(None, {}, {"prefetch.workers": "5", "prefetch.method": "read"})
    gpus = GpuInventory(FakeNvml())
    try:
        warmer = prefetcher_from_config(config.prefetch, gpus.numa_cpus_for)
    finally:
        gpus.close()
    assert (warmer.workers, warmer.method) == (5, WarmMethod.READ)
    assert warmer.memory_share == config.prefetch.memory_share
