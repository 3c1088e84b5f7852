"""A pull in a process of its own, for the crash tests: ``python -m tests.integration.pull_child
STORE_ROOT REF``. With ``CACHEAGENT_CRASH_AT`` set it SIGKILLs itself at that pull step."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from cacheagent.config import PullConfig
from cacheagent.pull.engine import PullEngine, PullTuning, SourceRegistry
from cacheagent.store import Store
from tests.integration.pull_origin import registry_source

KiB = 1 << 10
CONFIG = PullConfig(range_threshold_bytes=512 * KiB, range_chunk_bytes=256 * KiB)
TUNING = PullTuning(ranges_per_blob=4, batch_bytes=64 * KiB, record_interval_seconds=0.005)


async def pull(root: Path, ref: str) -> str:
    store = Store.open(root)
    source = registry_source()
    try:
        engine = PullEngine(store, SourceRegistry([source]), CONFIG, tuning=TUNING)
        model = await engine.pull(ref)
        return model.digest
    finally:
        await source.aclose()
        store.close()


if __name__ == "__main__":
    print(asyncio.run(pull(Path(sys.argv[1]), sys.argv[2])))
