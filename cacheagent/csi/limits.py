"""Bounds on every field a CSI request carries, checked before anything else reads it. Pure.

The CSI socket is reachable by whoever can write under the kubelet plugin directory, and kubelet
itself passes pod-authored strings through (volume attributes, PV mount options). Without bounds
a 1 MB volume id or a 10,000-key volume context is parsed, logged and echoed back into the
error (whose trailer then exceeds the HTTP/2 header limit: the client sees RESOURCE_EXHAUSTED
"Stream removed" instead of the reason). So every string and map is bounded here and refused with
INVALID_ARGUMENT naming the field and the limit, control characters in identifiers are refused
(a newline in a volume id would forge a log line), and ``shown`` is the one way a request
string is echoed into a message: escaped (``repr``) and truncated.

The limits are generous for what kubelet sends (an inline volume id is ``csi-`` and 64 hex
digits; a target path is ``<kubelet dir>/pods/<uid>/volumes/kubernetes.io~csi/<name>/mount``)
and far below what gRPC's 4 MiB message limit would let through.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .status import invalid

MAX_ID_BYTES = 1024
"""volume_id: the CSI spec's default string limit is 128 bytes; PV volumeHandles run longer."""
MAX_PATH_BYTES = 4096
"""target_path, volume_path, staging_target_path: PATH_MAX."""
MAX_NAME_BYTES = 255
"""One component of a path: NAME_MAX (a longer one is ENAMETOOLONG from every syscall)."""
MAX_CONTEXT_KEYS = 64
MAX_CONTEXT_KEY_BYTES = 256
MAX_CONTEXT_VALUE_BYTES = 16 * 1024
"""Large enough for a model URL and for kubelet's ``serviceAccount.tokens`` JSON."""
MAX_CONTEXT_BYTES = 64 * 1024
MAX_MOUNT_FLAGS = 32
MAX_FLAG_BYTES = 256
MAX_SHORT_BYTES = 256
"""fs_type, volume_mount_group and the keys of secrets and publish_context."""
SHOWN_CHARS = 128
"""How much of a request string an error message or a log line echoes."""

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` as it may appear in a message: quoted, escaped, at most ``limit`` characters."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({_size(text)} bytes)"


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def check_string(field: str, value: str, limit: int, *, identifier: bool = False) -> str:
    """``value`` if it is at most ``limit`` bytes (and, for identifiers, has no control chars)."""
    size = _size(value)
    if size > limit:
        raise invalid(f"{field} is {size} bytes; the limit is {limit} bytes")
    if identifier and _CONTROL_RE.search(value):
        raise invalid(f"{field} contains control characters: {shown(value)}")
    return value


def check_path(field: str, value: str) -> str:
    """A path within PATH_MAX whose every component is within NAME_MAX."""
    check_string(field, value, MAX_PATH_BYTES, identifier=True)
    for part in value.split("/"):
        if _size(part) > MAX_NAME_BYTES:
            raise invalid(
                f"{field} has a component of {_size(part)} bytes ({shown(part, 40)}); "
                f"the limit is {MAX_NAME_BYTES} bytes per component"
            )
    return value


def check_map(
    field: str,
    values: Mapping[str, str],
    *,
    max_keys: int = MAX_CONTEXT_KEYS,
    max_key: int = MAX_CONTEXT_KEY_BYTES,
    max_value: int = MAX_CONTEXT_VALUE_BYTES,
    max_total: int = MAX_CONTEXT_BYTES,
    echo: bool = True,
) -> None:
    """Bound a ``map<string, string>``: key count, each key and value, and the total.

    ``echo=False`` for secrets: their keys may be named in a message, their values never.
    """
    if len(values) > max_keys:
        raise invalid(f"{field} has {len(values)} entries; the limit is {max_keys}")
    total = 0
    for key, value in values.items():
        check_string(f"{field} key {shown(key, 40)}", key, max_key, identifier=True)
        name = f"{field}[{shown(key, 40)}]"
        size = _size(value)
        if size > max_value:
            raise invalid(f"{name} is {size} bytes; the limit is {max_value} bytes")
        if echo and _CONTROL_RE.search(value):
            raise invalid(f"{name} contains control characters: {shown(value)}")
        total += _size(key) + size
    if total > max_total:
        raise invalid(f"{field} is {total} bytes in all; the limit is {max_total} bytes")


def check_list(field: str, values: Iterable[str], max_items: int, max_item: int) -> None:
    items = list(values)
    if len(items) > max_items:
        raise invalid(f"{field} has {len(items)} entries; the limit is {max_items}")
    for item in items:
        check_string(f"{field} entry", item, max_item, identifier=True)
