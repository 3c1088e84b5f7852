"""Soak (CI subset, 100 cycles): CSI publish/unpublish while eviction churns a tight cache.

``bench/soak.py`` runs the same loop for 1,000 cycles and prints a table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import MiB, Rig, fsck, verify_models
from tests.faults.soak import run_soak, soak_agent, soak_models

pytestmark = pytest.mark.root

CYCLES = 100
RSS_SLACK_BYTES = 25 * MiB


def test_soak_publish_unpublish_under_eviction(rig: Rig, tmp_path: Path) -> None:
    models = soak_models(tmp_path)
    agent = soak_agent(rig)
    result = run_soak(agent, models, CYCLES)

    assert result.errors == {}, result.errors
    assert result.publishes == CYCLES and result.unpublishes == CYCLES
    assert result.pulls > len(models), "the capacity never forced a re-pull"
    assert (result.leaked_mounts, result.leaked_leases, result.journal_rows) == (0, 0, 0)
    assert result.rss_end <= result.rss_warm + RSS_SLACK_BYTES, (
        f"RSS grew from {result.rss_warm / MiB:.1f} to {result.rss_end / MiB:.1f} MiB"
    )
    agent.stop()
    report = fsck(agent)
    assert report["corrupt_blobs_removed"] == 0 and report["models_reset"] == 0, report
    assert 1 <= len(verify_models(agent)) <= 3
