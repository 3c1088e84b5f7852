"""Volume attributes written for other model CSI drivers, mapped onto ours. Pure.

modelpack/model-csi-driver (https://github.com/modelpack/model-csi-driver) names its keys
``<service_name>/<key>`` with the service name ``model.csi.modelpack.org``
(``pkg/config/config.go``: ``ParameterKeyType``, ``ParameterKeyReference``,
``ParameterKeyMountID``, ``ParameterKeyCheckDiskQuota``, ``ParameterKeyExcludeModelWeights``,
``ParameterKeyExcludeFilePatterns``, ``ParameterVolumeContextNodeIP``), and its docs
(``docs/getting-started.md``) show a pod with only
``model.csi.modelpack.org/reference: <image ref>``. Its node service
(``pkg/service/node.go``) publishes an inline volume when ``/reference`` is set;
``controller_local.go`` requires ``/type`` to be ``image`` and parses ``/check-disk-quota`` with
Go's ``strconv.ParseBool``; ``exclude-file-patterns`` is a JSON array of globs
(``dynamic_server_handler.go`` marshals it so).

The mapping (``translate_model_csi_driver``):

==========================================  ============================================
``model.csi.modelpack.org/reference``       ``model``
``model.csi.modelpack.org/type``            must be ``image`` (the only type it supports)
``.../exclude-model-weights``               ``exclude-weights: "true"``
``.../exclude-file-patterns`` (JSON list)   ``exclude`` (comma-joined globs)
``.../mount-id``, ``.../node-ip``           accepted and ignored (its dynamic-volume API)
``.../check-disk-quota``                    accepted and ignored (our store always enforces
                                            its capacity)
==========================================  ============================================

Errors are ``ValueError`` naming the foreign key; ``attributes`` turns them into
INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

MODEL_CSI_PREFIX = "model.csi.modelpack.org/"
REFERENCE = MODEL_CSI_PREFIX + "reference"
TYPE = MODEL_CSI_PREFIX + "type"
EXCLUDE_WEIGHTS = MODEL_CSI_PREFIX + "exclude-model-weights"
EXCLUDE_PATTERNS = MODEL_CSI_PREFIX + "exclude-file-patterns"
CHECK_DISK_QUOTA = MODEL_CSI_PREFIX + "check-disk-quota"
_IGNORED = frozenset({MODEL_CSI_PREFIX + "mount-id", MODEL_CSI_PREFIX + "node-ip"})
KNOWN_KEYS = frozenset(
    {REFERENCE, TYPE, EXCLUDE_WEIGHTS, EXCLUDE_PATTERNS, CHECK_DISK_QUOTA} | _IGNORED
)
# Go's strconv.ParseBool
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def translate_model_csi_driver(context: Mapping[str, str]) -> dict[str, str]:
    """``context`` with model-csi-driver's keys replaced by ours (module docstring)."""
    foreign = {k: v for k, v in context.items() if k.startswith(MODEL_CSI_PREFIX)}
    if not foreign:
        return dict(context)
    unknown = sorted(set(foreign) - KNOWN_KEYS)
    if unknown:
        raise ValueError(
            f"unknown model-csi-driver attribute(s) {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(sorted(KNOWN_KEYS))}"
        )
    out = {k: v for k, v in context.items() if k not in foreign}
    if REFERENCE in foreign:
        if "model" in out:
            raise ValueError(f"give either 'model' or {REFERENCE!r}, not both")
        out["model"] = foreign[REFERENCE].strip()
    kind = foreign.get(TYPE, "image").strip()
    if kind != "image":
        raise ValueError(f"{TYPE!r} must be 'image' (the only type defined), not {kind!r}")
    _go_bool(CHECK_DISK_QUOTA, foreign.get(CHECK_DISK_QUOTA, "false"))
    if _go_bool(EXCLUDE_WEIGHTS, foreign.get(EXCLUDE_WEIGHTS, "false")):
        out["exclude-weights"] = "true"
    if EXCLUDE_PATTERNS in foreign:
        patterns = _json_patterns(foreign[EXCLUDE_PATTERNS])
        if patterns:
            out["exclude"] = ",".join([*filter(None, [out.get("exclude", "")]), *patterns])
    return out


def _go_bool(key: str, text: str) -> bool:
    value = text.strip()
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE or value == "":
        return False
    raise ValueError(f"{key!r} must be a boolean ('true' or 'false'), not {text!r}")


def _json_patterns(text: str) -> list[str]:
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{EXCLUDE_PATTERNS!r} must be a JSON array of glob strings: {exc.msg}"
        ) from exc
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{EXCLUDE_PATTERNS!r} must be a JSON array of glob strings")
    return [p for p in value if p]
