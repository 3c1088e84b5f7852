"""Volume attributes (CSI ``volume_context``): parsed and validated in one place. Pure.

Accepted keys:

- ``model`` (required): a model reference, parsed by ``cacheagent.refs.parse_ref``.
- ``mode``: ``bind`` (default; the model is complete on disk, then bind-mounted read-only) or
  ``lazy`` (bind-mounted out of the FUSE mount, readable while it downloads).
- ``prefetch``: ``"true"`` or ``"false"`` (default; any letter case): warm the page cache before
  NodePublishVolume returns.
- ``gpus``: comma-separated GPU indexes or UUIDs (``0,1`` or ``GPU-...``/``MIG-...``) whose NUMA
  node the prefetch should favour.
- ``include`` / ``exclude``: comma-separated file globs; ``exclude-weights``: ``"true"`` drops
  the ModelPack weight layers; ``layout``: ``plain`` (default) or ``hf-cache`` (the Hugging Face
  cache layout, named by ``hf-repo: org/name``, which defaults to the repo of an ``hf://``
  model). They make the reference a view (``cacheagent.viewopts``): ``model: m`` with
  ``exclude: "*.pth"`` is the model ``m|exclude=*.pth``, with its own cache key.
- model-csi-driver's keys (``model.csi.modelpack.org/reference`` and the rest), mapped onto
  these by ``csi.dialects``, so a pod written for that driver only changes the driver name.
- the podInfoOnMount keys ``csi.storage.k8s.io/pod.name``, ``pod.namespace``, ``pod.uid``,
  ``serviceAccount.name`` and ``ephemeral``; any other ``csi.storage.k8s.io/`` key (for example
  ``serviceAccount.tokens``) is ignored, since kubelet adds those on its own.

Any other key is an error that names it: a typo such as ``modle`` or ``prefech`` must not
silently publish something other than what the pod author meant.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from cacheagent.errors import RefError
from cacheagent.refs import ModelRef, parse_ref

from .dialects import translate_model_csi_driver
from .status import invalid

Mode = Literal["bind", "lazy"]

KUBELET_PREFIX = "csi.storage.k8s.io/"
POD_NAME = KUBELET_PREFIX + "pod.name"
POD_NAMESPACE = KUBELET_PREFIX + "pod.namespace"
POD_UID = KUBELET_PREFIX + "pod.uid"
SERVICE_ACCOUNT = KUBELET_PREFIX + "serviceAccount.name"
EPHEMERAL = KUBELET_PREFIX + "ephemeral"

_VIEW_KEYS = ("include", "exclude", "exclude-weights", "layout", "hf-repo")
_OWN_KEYS = frozenset({"model", "mode", "prefetch", "gpus", *_VIEW_KEYS})
_GPU_RE = re.compile(r"^(?:\d{1,3}|(?:GPU|MIG)-[0-9A-Za-z-]{1,80})$")
_MAX_GPUS = 64


@dataclass(frozen=True)
class PodInfo:
    """Who is mounting, from podInfoOnMount; empty strings when kubelet did not say."""

    name: str = ""
    namespace: str = ""
    uid: str = ""
    service_account: str = ""
    ephemeral: bool = False


@dataclass(frozen=True)
class VolumeAttributes:
    ref: ModelRef
    mode: Mode = "bind"
    prefetch: bool = False
    gpus: tuple[str, ...] = ()
    pod: PodInfo = PodInfo()


def parse_volume_context(context: Mapping[str, str]) -> VolumeAttributes:
    """Validate ``volume_context``; raise CsiFailure(INVALID_ARGUMENT) naming the bad key."""
    try:
        context = translate_model_csi_driver(context)
    except ValueError as exc:
        raise invalid(f"volume attributes: {exc}") from exc
    unknown = sorted(k for k in context if k not in _OWN_KEYS and not k.startswith(KUBELET_PREFIX))
    if unknown:
        raise invalid(
            f"unknown volume attribute(s) {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(sorted(_OWN_KEYS))} (and {KUBELET_PREFIX}* from kubelet)"
        )
    return VolumeAttributes(
        ref=_parse_model(_with_view(context)),
        mode=_parse_mode(context.get("mode", "bind")),
        prefetch=_parse_bool("prefetch", context.get("prefetch", "false")),
        gpus=_parse_gpus(context.get("gpus", "")),
        pod=PodInfo(
            name=context.get(POD_NAME, ""),
            namespace=context.get(POD_NAMESPACE, ""),
            uid=context.get(POD_UID, ""),
            service_account=context.get(SERVICE_ACCOUNT, ""),
            ephemeral=_parse_bool(EPHEMERAL, context.get(EPHEMERAL, "false")),
        ),
    )


def _parse_model(text: str | None) -> ModelRef:
    if not text:
        raise invalid("volume attribute 'model' is required (a model reference)")
    try:
        return parse_ref(text)
    except RefError as exc:
        raise invalid(f"volume attribute 'model': {exc}") from exc


def _with_view(context: Mapping[str, str]) -> str | None:
    """The ``model`` text with the view attributes appended as reference options."""
    text = context.get("model")
    if not text:
        return text
    options = [f"{key}={context[key]}" for key in ("include", "exclude") if context.get(key)]
    if _parse_bool("exclude-weights", context.get("exclude-weights", "false")):
        options.append("exclude-weights")
    layout = context.get("layout", "plain")
    if layout == "hf-cache":
        repo = context.get("hf-repo")
        options.append(f"hf-cache={repo}" if repo else "hf-cache")
    elif layout != "plain":
        raise invalid(f"volume attribute 'layout' must be 'plain' or 'hf-cache', not {layout!r}")
    elif "hf-repo" in context:
        raise invalid("volume attribute 'hf-repo' needs 'layout: hf-cache'")
    return "|".join([text, *options])


def _parse_mode(text: str) -> Mode:
    if text == "bind":
        return "bind"
    if text == "lazy":
        return "lazy"
    raise invalid(f"volume attribute 'mode' must be 'bind' or 'lazy', not {text!r}")


def _parse_bool(key: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise invalid(f"volume attribute {key!r} must be 'true' or 'false', not {text!r}")


def _parse_gpus(text: str) -> tuple[str, ...]:
    if not text.strip():
        return ()
    gpus = tuple(dict.fromkeys(item.strip() for item in text.split(",")))
    bad = [g for g in gpus if not _GPU_RE.match(g)]
    if bad or len(gpus) > _MAX_GPUS:
        raise invalid(
            f"volume attribute 'gpus' must list up to {_MAX_GPUS} GPU indexes or UUIDs "
            f"separated by commas (e.g. '0,1' or 'GPU-...'); bad item(s): {bad or [text]}"
        )
    return gpus
