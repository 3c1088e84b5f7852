"""Which models may be pulled, and which namespaces may mount which models. Pure decisions.

Rules are shell-style globs (``fnmatch``, case-sensitive) matched against a reference's
canonical form (``registry.local/models/qwen:v1``, ``oci-layout:///srv/m:v1``,
``hf://org/name@main``, ``https://host/f#sha256=...``). ``*`` also matches ``/``, so
``registry.local/models/*`` covers every repository below ``models`` at any tag or digest.
Because the canonical form carries the tag (``latest`` when none was written) or digest, a
pattern naming one repository needs a trailing ``*`` or ``:*``. A leading ``oci://`` in a
pattern is ignored, as it is in references. A view (``<ref>|include=...``, see
``cacheagent.viewopts``) matches whatever its base reference matches.

``allowed_sources`` (``check_source``): empty allows everything; otherwise a reference must
match at least one pattern.

``namespaces`` (``check_mount``): a mapping from namespace glob to the reference globs that
namespace may mount, tried in the order written; the first namespace glob that matches decides,
and later rules are not consulted. With no namespace rules at all every namespace may mount
every reference. Once any rule exists, a namespace no rule matches is denied, and so is a
mount whose namespace is unknown (kubelet did not pass ``csi.storage.k8s.io/pod.namespace``).
``check_mount`` does not apply ``allowed_sources``; a caller that may pull calls both.

The functions take any object with the two attributes (``cacheagent.config.PolicyConfig`` is
one), so this module stays independent of the config loader.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Protocol

from cacheagent.errors import PolicyDeniedError
from cacheagent.refs import ModelRef, ViewRef


class PolicyRules(Protocol):
    @property
    def allowed_sources(self) -> Sequence[str]: ...

    @property
    def namespaces(self) -> Mapping[str, Sequence[str]]: ...


def check_source(policy: PolicyRules, ref: ModelRef) -> None:
    """Raise ``PolicyDeniedError`` unless ``ref`` may be pulled at all."""
    if not policy.allowed_sources or _matches_any(ref, policy.allowed_sources):
        return
    raise PolicyDeniedError(
        f"source {ref.canonical} matches none of {', '.join(policy.allowed_sources)}",
        "policy.allowed_sources",
    )


def check_mount(policy: PolicyRules, namespace: str | None, ref: ModelRef) -> None:
    """Raise ``PolicyDeniedError`` unless pods of ``namespace`` may mount ``ref``."""
    if not policy.namespaces:
        return
    if namespace is None:
        raise PolicyDeniedError(
            f"cannot mount {ref.canonical}: the pod's namespace is unknown and namespace "
            "rules are configured",
            "policy.namespaces",
        )
    for pattern, allowed in policy.namespaces.items():
        if not fnmatchcase(namespace, pattern):
            continue
        if _matches_any(ref, allowed):
            return
        raise PolicyDeniedError(
            f"namespace {namespace} may not mount {ref.canonical}",
            f"policy.namespaces[{pattern!r}]",
        )
    raise PolicyDeniedError(f"no namespace rule matches namespace {namespace}", "policy.namespaces")


def _matches_any(ref: ModelRef, patterns: Sequence[str]) -> bool:
    # A view (``ref|exclude=...``) is allowed when the model it shows part of is.
    names = {ref.canonical, ref.base.canonical if isinstance(ref, ViewRef) else ref.canonical}
    return any(
        fnmatchcase(name, pattern.removeprefix("oci://")) for pattern in patterns for name in names
    )
