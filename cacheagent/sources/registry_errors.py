"""What a registry says went wrong: the distribution spec's ``{"errors": [{code, message,
detail}]}`` body, shortened for an error message. Docker Hub's ``TOOMANYREQUESTS`` (the pull
quota), ``DENIED``, ``NAME_UNKNOWN`` and ``MANIFEST_UNKNOWN`` tell a user far more than a status.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

_MAX_ERROR_BODY = 64 << 10
_MAX_SHOWN = 400
_READ_SECONDS = 5.0


def describe_errors(body: bytes) -> str:
    """``CODE: message (detail); ...`` from an error body; its text when it is not the spec's
    JSON; "" when empty. Printable characters only, bounded."""
    text = body.decode("utf-8", errors="replace")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if isinstance(errors, list) and errors:
        text = "; ".join(_one(e) for e in errors[:5])
    shown = "".join(c if c.isprintable() else " " for c in text).strip()
    return shown[:_MAX_SHOWN]


def _one(error: object) -> str:
    if not isinstance(error, dict):
        return str(error)
    code, message = error.get("code", ""), error.get("message", "")
    detail = error.get("detail")
    parts = ": ".join(str(p) for p in (code, message) if p)
    if detail not in (None, "", {}, []):
        parts += f" ({json.dumps(detail, separators=(',', ':'), default=str)[:200]})"
    return parts


async def error_detail(resp: aiohttp.ClientResponse) -> str:
    """The registry's own words about a failed request ("" when it gave none or would not say
    within a few seconds); the caller still owns ``resp``."""
    declared = resp.content_length
    if resp.method == "HEAD" or (declared is not None and declared > _MAX_ERROR_BODY):
        return ""
    body = bytearray()
    try:
        async with asyncio.timeout(_READ_SECONDS):
            async for chunk in resp.content.iter_chunked(16 << 10):
                body += chunk
                if len(body) >= _MAX_ERROR_BODY:
                    break
    except (aiohttp.ClientError, OSError, TimeoutError):
        return ""
    return describe_errors(bytes(body[:_MAX_ERROR_BODY]))
