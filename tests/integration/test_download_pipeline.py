"""The download's fast path keeps its rules: pieces no longer than asked for, every byte that
arrived before a stall kept (even the batch still being written), a stall cut no earlier than
the idle timeout after the last progress."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cacheagent.digest import sha256_digest
from cacheagent.errors import OriginUnavailableError
from cacheagent.pull.download import BlobDownload, DownloadSettings, Limits
from cacheagent.pull.partial_file import sidecar_path
from cacheagent.pull.ranges import load_sidecar
from cacheagent.refs import HttpRef, ModelRef, parse_ref
from cacheagent.sources.base import BlobRef, ResolvedModel, Source
from cacheagent.sources.http import HttpOptions, HttpSource
from cacheagent.sources.retry import RetryPolicy
from cacheagent.sources.transport import Transport, TransportOptions
from tests.fault_server import FaultServer

KiB, MiB = 1024, 1024 * 1024
DATA = random.Random(11).randbytes(2 * MiB + 5)
ONCE = RetryPolicy(max_attempts=1, base_delay=0.0, max_delay=0.0, max_total_seconds=5.0)


async def test_pieces_are_cut_to_chunk_bytes() -> None:
    """aiohttp hands over whole socket reads (up to 256 KiB); a source asked for smaller pieces
    still gets them, and nothing is lost or reordered in the cutting."""
    async with FaultServer(stall_seconds=5.0) as server:
        server.add("files/model.bin", DATA)
        transport = Transport(TransportOptions(insecure=frozenset({server.host})))
        source = HttpSource(transport, options=HttpOptions(chunk_bytes=8 * KiB))
        try:
            ref = parse_ref(f"{server.url('files/model.bin')}#sha256={sha256_digest(DATA)[7:]}")
            assert isinstance(ref, HttpRef)
            blob = (await source.resolve(ref)).layers[0].blob
            pieces = [piece async for piece in source.fetch(blob, 100, len(DATA) - 3)]
        finally:
            await transport.aclose()
    assert b"".join(pieces) == DATA[100:-3]
    assert max(len(p) for p in pieces) <= 8 * KiB
    assert len(pieces) >= len(DATA) // (8 * KiB)


class StallingSource(Source):
    """Sends ``sends`` bytes of the blob in 64 KiB pieces, then goes silent (a hung origin)."""

    kind = "test"
    supports_ranges = False

    def __init__(self, data: bytes, sends: int) -> None:
        self.data = data
        self.sends = sends
        self.last_sent = 0.0

    async def resolve(self, ref: ModelRef) -> ResolvedModel:
        raise NotImplementedError

    async def fetch(
        self, blob: BlobRef, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        for offset in range(start, self.sends, 64 * KiB):
            yield self.data[offset : min(offset + 64 * KiB, self.sends)]
            self.last_sent = time.monotonic()
            await asyncio.sleep(0)
        await asyncio.sleep(3600)


@pytest.mark.parametrize("sends", [0, 1_500_000])
async def test_stall_keeps_what_arrived_and_waits_the_full_idle_timeout(
    tmp_path: Path, sends: int
) -> None:
    idle = 0.5
    blob = BlobRef(sha256_digest(DATA), len(DATA), "application/octet-stream")
    source = StallingSource(DATA, sends)
    settings = DownloadSettings(
        idle_timeout_seconds=idle, batch_bytes=256 * KiB, record_interval_seconds=60, retry=ONCE
    )
    partial = tmp_path / "partial" / "blob"
    download = BlobDownload(blob, source, "test", partial, settings, Limits(4, 4))
    started = time.monotonic()
    with pytest.raises(OriginUnavailableError, match=re.escape("less than 16384 bytes in 0.5 s")):
        await download.run()
    stalled_for = time.monotonic() - (source.last_sent or started)
    assert idle <= stalled_for < idle + 2.0
    # Every byte that arrived (the last batches were still in flight) is on disk and recorded,
    # and a record never claims a byte that did not arrive.
    assert download.held.total() == sends
    record = sidecar_path(partial)
    if sends:
        assert load_sidecar(record.read_text(), blob.digest, blob.size).total() == sends
        assert partial.read_bytes()[:sends] == DATA[:sends]
    else:
        assert not record.exists()
