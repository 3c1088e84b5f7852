"""The pull engine's knobs from the configuration (``pull.*``), for the two composition roots
(the daemon and the offline CLI)."""

from __future__ import annotations

from cacheagent.config import PullConfig
from cacheagent.pull.engine import PullTuning


def tuning_from_config(pull: PullConfig, *, tag_ttl_seconds: float) -> PullTuning:
    """The knobs a config file sets (``pull.*``, ``store.tag_ttl_seconds``); the rest stay at
    their measured defaults."""
    return PullTuning(
        ranges_per_blob=pull.ranges_per_blob,
        hash_mode=pull.hash_mode,
        tag_ttl_seconds=tag_ttl_seconds,
        max_blob_bytes=pull.max_blob_bytes,
        max_unpack_ratio=pull.max_unpack_ratio,
    )
