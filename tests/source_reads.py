"""Read a blob through any origin the way the pull engine does: the whole span, joined."""

from __future__ import annotations

from cacheagent.sources.base import BlobRef, Source


async def read_all(source: Source, blob: BlobRef, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in source.fetch(blob, start, end)])
