"""What the Hugging Face Hub says in headers, turned into errors and deadlines. Pure: no I/O.

* ``X-Error-Code``/``X-Error-Message``: the Hub names the problem (``GatedRepo``,
  ``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``, ``DisabledRepo``) in headers on
  401/403/404. We pass its message on, with what the user can do about it, instead of guessing
  from the status code ("the token was refused" for a gated repo helps nobody).
* Presigned URLs: a file's resolve URL redirects to a CDN URL signed for a limited time. Its
  deadline is in the query: CloudFront's ``Expires=<epoch>``, or S3's ``X-Amz-Date`` plus
  ``X-Amz-Expires``. A URL without one is kept until the CDN refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from yarl import URL

from cacheagent.errors import ModelNotFoundError, SourceError

_MAX_MESSAGE = 300


class HfAccessError(SourceError):
    """The Hub refused access: a gated repo not granted, a disabled repo, or a bad token."""


def hub_message(headers: Mapping[str, str]) -> str:
    """The Hub's ``X-Error-Message``, printable and bounded (it is quoted in our errors)."""
    text = "".join(c for c in headers.get("X-Error-Message", "") if c.isprintable())
    return text[:_MAX_MESSAGE].strip()


def hub_error(
    status: int,
    headers: Mapping[str, str],
    *,
    what: str,
    origin: str,
    token_configured: bool,
) -> Exception | None:
    """The error for a Hub answer carrying ``X-Error-Code``, or None when it carries none."""
    code = headers.get("X-Error-Code", "")
    said = hub_message(headers)
    said = f": {said}" if said else ""
    if code == "GatedRepo":
        who = (
            "the account whose token hf.token_file holds has not been granted access"
            if token_configured
            else "no hf token is configured (hf.token_file)"
        )
        return HfAccessError(
            f"{origin}: {what} is a gated repository and {who} ({status}){said}; accept its "
            "conditions on the repository's Hub page with that account, then retry"
        )
    if code == "RepoNotFound":
        hint = "" if token_configured else " (a private repo looks the same without hf.token_file)"
        return ModelNotFoundError(
            f"{what}: repository not found at {origin} ({status}){said}{hint}"
        )
    if code == "RevisionNotFound":
        return ModelNotFoundError(f"{what}: revision not found at {origin} ({status}){said}")
    if code == "EntryNotFound":
        return ModelNotFoundError(f"{what}: file not found at {origin} ({status}){said}")
    if code == "DisabledRepo":
        return HfAccessError(f"{origin}: {what}: the repository is disabled ({status}){said}")
    if code:
        return SourceError(f"{origin}: {what}: the Hub answered {status} {code}{said}")
    return None


def presigned_expiry(url: URL) -> float | None:
    """The Unix time a presigned URL stops working, or None when it says nothing we can read."""
    query = url.query
    expires = query.get("Expires", "")
    if expires.isdigit():
        return float(expires)
    signed_at, lifetime = query.get("X-Amz-Date", ""), query.get("X-Amz-Expires", "")
    if signed_at and lifetime.isdigit():
        try:
            when = datetime.strptime(signed_at, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            return None
        return when.timestamp() + int(lifetime)
    return None
