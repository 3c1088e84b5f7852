"""Structured logging: text for people, JSON for log pipelines, with request context.

Every record carries the request id, model reference and digest of the call it belongs to,
taken from context variables that the API and CSI handlers set, so one grep follows a request
through pull, materialize and mount. Credentials are never passed to loggers; as a second line
of defence, anything that looks like an Authorization header value is masked.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
model_ref: contextvars.ContextVar[str] = contextvars.ContextVar("model_ref", default="")
model_digest: contextvars.ContextVar[str] = contextvars.ContextVar("model_digest", default="")

_SECRET_RE = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")


def _mask(text: str) -> str:
    return _SECRET_RE.sub(lambda m: f"{m.group(1)} ***", text)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.model_ref = model_ref.get()
        record.model_digest = model_digest.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _mask(record.getMessage()),
        }
        for key in ("request_id", "model_ref", "model_digest"):
            value = getattr(record, key, "")
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = _mask(self.formatException(record.exc_info))
        return json.dumps(entry, sort_keys=True)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = _mask(super().format(record))
        context = " ".join(
            f"{key}={value}"
            for key in ("request_id", "model_ref", "model_digest")
            if (value := getattr(record, key, ""))
        )
        return f"{line} [{context}]" if context else line


def setup_logging(*, fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would add a line per scrape.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


@contextmanager
def request_context(*, ref: str = "", digest: str = "", rid: str | None = None) -> Iterator[str]:
    """Bind a request id (new unless given) and the model being worked on to this task."""
    rid = rid or uuid.uuid4().hex[:12]
    tokens = (request_id.set(rid), model_ref.set(ref), model_digest.set(digest))
    try:
        yield rid
    finally:
        model_digest.reset(tokens[2])
        model_ref.reset(tokens[1])
        request_id.reset(tokens[0])
