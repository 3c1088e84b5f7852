"""How much an on-demand eviction frees and why, and which models it must keep. Pure."""

from __future__ import annotations

import pytest

from cacheagent.api import kept_models
from cacheagent.reclaim import ReclaimTarget, ReclaimTargetError, need_for
from cacheagent.store import Lease, Model

GiB = 1 << 30


def need(kind: str, value: float = 0.0, *, used: int, capacity: int | None = 100 * GiB) -> int:
    return need_for(
        ReclaimTarget(kind, value),  # type: ignore[arg-type]
        used=used,
        capacity=capacity,
        high=0.9,
        low=0.8,
    ).bytes


def test_watermarks_do_what_capacity_eviction_does() -> None:
    assert need("watermarks", used=90 * GiB) == 0  # at the high watermark: nothing
    assert need("watermarks", used=95 * GiB) == 15 * GiB  # past it: down to the low one
    reason = need_for(
        ReclaimTarget("watermarks"), used=95 * GiB, capacity=100 * GiB, high=0.9, low=0.8
    ).reason
    assert "past the high watermark (90%)" in reason and "low watermark (80%)" in reason


def test_levels_and_amounts() -> None:
    assert need("to_fraction", 0.5, used=70 * GiB) == 20 * GiB
    assert need("to_fraction", 0.8, used=70 * GiB) == 0
    assert need("to_bytes", 40 * GiB, used=70 * GiB) == 30 * GiB
    assert need("to_bytes", 40 * GiB, used=10 * GiB, capacity=None) == 0
    assert need("free", 5 * GiB, used=1, capacity=None) == 5 * GiB


def test_percentages_need_a_capacity_and_a_sane_fraction() -> None:
    with pytest.raises(ReclaimTargetError, match="no capacity limit"):
        need("to_fraction", 0.5, used=1, capacity=None)
    with pytest.raises(ReclaimTargetError, match="between 0% and 100%"):
        need("to_fraction", 1.5, used=1)


def model(digest: str, *, pinned: bool = False) -> Model:
    return Model(digest, f"r/{digest}", (), 1, (), 0.0, 0.0, pinned, "oci")


def test_kept_models_are_the_pinned_and_the_leased_with_why() -> None:
    models = [model("a", pinned=True), model("b"), model("c"), model("d")]
    leases = [
        Lease("c", "csi:vol:/t", "csi", 0.0),
        Lease("c", "fuse:1", "fuse", 0.0),
        Lease("d", "pull:1", "pull", 0.0),
    ]
    kept = {m.digest: why for m, why in kept_models(models, leases)}
    assert kept == {
        "a": "pinned",
        "c": "in use by a volume, open through FUSE",
        "d": "being pulled",
    }
