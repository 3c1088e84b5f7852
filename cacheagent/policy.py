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

**The pod trust boundary** (``check_pod_ref``, ``check_lazy``). A reference in CSI volume
attributes is written by any pod author, and the agent acts on it from a privileged position
on the node. By default a pod may name OCI registry references only. ``hf://`` needs
``pod_hf``; ``oci-layout://`` needs the layout's path at or below one of ``pod_layout_roots``
(the path is compared lexically: references cannot hold ``..``, and the layout source opens
nothing through a symlink, so the comparison is the truth); ``http(s)://`` needs the URL's host
(or ``host:port``) to match one of the ``pod_http_hosts`` globs. ``mode: lazy`` serves bytes
before their digest is checked, so it is allowed only for the reference kinds listed in
``lazy_sources`` (default: ``oci``). ``s3://`` needs the bucket to match one of the
``pod_s3_buckets`` globs (the agent reads S3 with the node's credentials, so a pod naming any
bucket would read whatever the node may). A view (``<ref>|...``) is judged as its base. The
operator's paths (the CLI and the agent API) are not held to these rules; ``allowed_sources``
applies to everyone.

**HTTP origins** (``redirect_allowed``, ``address_allowed``): a redirect may go to the URL's own
host, to a ``pod_http_hosts`` host, or to a ``http_redirect_hosts`` host; loopback, link-local
and unspecified addresses are refused unless an ``http_allowed_networks`` network holds them.

The functions take any object with the attributes they read (``cacheagent.config.PolicyConfig``
is one), so this module stays independent of the config loader.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import PurePosixPath
from typing import Protocol
from urllib.parse import urlsplit

from cacheagent.errors import PolicyDeniedError
from cacheagent.refs import HttpRef, LayoutRef, ModelRef, S3Ref, ViewRef

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class PolicyRules(Protocol):
    @property
    def allowed_sources(self) -> Sequence[str]: ...

    @property
    def namespaces(self) -> Mapping[str, Sequence[str]]: ...


class PodRules(Protocol):
    """What a pod may name in its volume attributes (the ``policy.pod_*`` keys)."""

    @property
    def pod_hf(self) -> bool: ...

    @property
    def pod_layout_roots(self) -> Sequence[PurePosixPath]: ...

    @property
    def pod_http_hosts(self) -> Sequence[str]: ...

    @property
    def lazy_sources(self) -> Sequence[str]: ...

    @property
    def pod_s3_buckets(self) -> Sequence[str]: ...


class HttpRules(Protocol):
    """Where HTTP origins may lead (redirects) and which addresses they may reach."""

    @property
    def pod_http_hosts(self) -> Sequence[str]: ...

    @property
    def http_redirect_hosts(self) -> Sequence[str]: ...

    @property
    def http_allowed_networks(self) -> Sequence[str]: ...


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


def check_pod_ref(policy: PodRules, ref: ModelRef) -> None:
    """Raise ``PolicyDeniedError`` unless a pod may name ``ref`` at all (no I/O happens here)."""
    if isinstance(ref, ViewRef):  # a view of a model is judged as the model
        ref = ref.base
    if ref.kind == "oci":
        return
    if ref.kind == "hf":
        if policy.pod_hf:
            return
        raise PolicyDeniedError(
            f"pods may not name Hugging Face references ({ref.canonical}); "
            "set policy.pod_hf: true to allow them",
            "policy.pod_hf",
        )
    if isinstance(ref, LayoutRef):
        if _under_any(ref.path, policy.pod_layout_roots):
            return
        raise PolicyDeniedError(
            f"pods may not name OCI layout directories on the node ({ref.canonical}); "
            "list the layout's parent directory in policy.pod_layout_roots to allow it",
            "policy.pod_layout_roots",
        )
    if isinstance(ref, HttpRef):
        host = urlsplit(ref.url).netloc.lower()
        if host_matches(host, policy.pod_http_hosts):
            return
        raise PolicyDeniedError(
            f"pods may not name URLs on {host} ({ref.canonical}); list the host in "
            "policy.pod_http_hosts to allow it",
            "policy.pod_http_hosts",
        )
    if isinstance(ref, S3Ref):
        if any(fnmatchcase(ref.bucket, pattern) for pattern in policy.pod_s3_buckets):
            return
        raise PolicyDeniedError(
            f"pods may not name S3 bucket {ref.bucket} ({ref.canonical}): the agent reads it "
            "with the node's credentials; list the bucket in policy.pod_s3_buckets to allow it",
            "policy.pod_s3_buckets",
        )
    raise PolicyDeniedError(f"pods may not name {ref.kind} references", "policy")


def check_lazy(policy: PodRules, ref: ModelRef) -> None:
    """Raise ``PolicyDeniedError`` unless ``mode: lazy`` may serve ``ref`` before verifying it."""
    if ref.kind in policy.lazy_sources:
        return
    allowed = ", ".join(policy.lazy_sources) or "none"
    raise PolicyDeniedError(
        f"mode: lazy serves bytes before their digest is checked and is not allowed for "
        f"{ref.kind} references ({ref.canonical}); use mode: bind, or add {ref.kind} to "
        f"policy.lazy_sources (now: {allowed})",
        "policy.lazy_sources",
    )


def host_matches(host: str, patterns: Sequence[str]) -> bool:
    """``host`` (``name`` or ``name:port``) against globs naming a host or a ``host:port``.

    A pattern without a port matches the host on any port.
    """
    host = host.lower()
    name = _strip_port(host)
    return any(
        fnmatchcase(host if _has_port(pattern) else name, pattern.lower()) for pattern in patterns
    )


def redirect_allowed(policy: HttpRules, origin: str, target: str) -> bool:
    """Whether an HTTP origin ``origin`` (``host[:port]``) may redirect to ``target``."""
    if target.lower() == origin.lower():
        return True
    return host_matches(target, policy.pod_http_hosts) or host_matches(
        target, policy.http_redirect_hosts
    )


def address_allowed(policy: HttpRules, address: IpAddress) -> bool:
    """Loopback, link-local and unspecified addresses only inside ``http_allowed_networks``.

    An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) is judged as the IPv4 address it maps.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if not (address.is_loopback or address.is_link_local or address.is_unspecified):
        return True
    return any(
        address in ipaddress.ip_network(network, strict=False)
        for network in policy.http_allowed_networks
    )


def _under_any(path: str, roots: Sequence[PurePosixPath]) -> bool:
    candidate = PurePosixPath(path)
    return any(candidate.is_relative_to(root) for root in roots)


def _has_port(host: str) -> bool:
    return _strip_port(host) != host


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() else host
