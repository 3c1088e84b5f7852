"""How the CLI prints: JSON for ``--json``, and the agent's protobuf replies as plain dicts."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from cacheagent.errors import CacheAgentError


class UsageError(CacheAgentError):
    """A flag's value is malformed (exit code 2, like a bad reference or config key)."""

    def __init__(self, flag: str, problem: str) -> None:
        self.flag = flag
        super().__init__(f"{flag}: {problem}")


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def message_dict(message: Message) -> dict[str, Any]:
    """Proto field names; fields without presence printed even when zero, optional ones only
    when set (an unknown ETA stays absent rather than 0)."""
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
