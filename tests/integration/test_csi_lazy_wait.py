"""A lazy-mode publish is bounded like a bind-mode one: it answers UNAVAILABLE within
``publish_wait_seconds`` when the reference cannot be resolved in time, and does not hold
the volume lock past kubelet's deadline."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import pytest

from cacheagent.refs import parse_ref
from tests.csi_backend import model_ref
from tests.csi_env import CsiEnv, publish_request
from tests.support import require_root


@pytest.fixture
async def env() -> AsyncIterator[CsiEnv]:
    require_root()
    env = CsiEnv.create()
    try:
        env.backend.add_model("m1", {"w.bin": b"weights"})
        yield env
    finally:
        await env.close()


async def test_a_lazy_publish_that_cannot_resolve_in_time_answers_unavailable(
    env: CsiEnv,
) -> None:
    lazy_root = env.root / "fuse"
    env.backend.lazy_root = lazy_root
    env.backend.lazy_delay = 3600.0  # the origin never answers
    await env.start(publish_wait_seconds=1.0)
    target = env.target()
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await env.node.NodePublishVolume(publish_request("v", target, mode="lazy"), timeout=30)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "still being resolved" in (failure.value.details() or "")
    assert time.monotonic() - started < 10
    # The volume lock was released: kubelet's retry, once the origin answers, publishes.
    env.backend.lazy_delay = 0.0
    digest = env.store.resolve_tag(parse_ref(model_ref("m1")).canonical)
    assert digest is not None
    view = lazy_root / digest.split(":")[1]
    view.mkdir(parents=True)
    (view / "w.bin").write_bytes(b"served while downloading")
    await env.node.NodePublishVolume(publish_request("v", target, mode="lazy"), timeout=30)
    assert (target / "w.bin").read_bytes() == b"served while downloading"
