"""The configuration's shape: one frozen dataclass per section, the defaults, the bounds.

Validation is driven by the field annotations, not by one check per key: the type says how a
raw value becomes a typed one (``cacheagent.config.values``) and ``Range`` metadata says which
values are allowed. Sections also check these bounds when built directly, so a hand-made
``PullConfig`` cannot hold a value a file could not.

Defaults chosen where the brief is silent: ``agent.http_listen`` is ``0.0.0.0:9464`` (Prometheus
scrapes the pod; that port serves only metrics and health), logs are ``text`` at ``info``,
``csi.publish_wait_seconds`` is 110 s (inside kubelet's two-minute CSI deadline, and checked
below 120 s at load), ``pull.timeout_seconds`` (per request, without progress) is 60 s and backoff
is capped at 30 s, ``prefetch.mlock_limit_bytes`` is 0 (no locking unless asked), ``csi.socket``
unset means ``<kubelet_dir>/plugins/<driver_name>/csi.sock``, and the API socket is ``0660``
owned by the agent's group unless ``agent.socket_group`` names another.

The engine knobs (``pull.ranges_per_blob``, ``pull.hash_mode``, ``pull.max_blob_bytes``,
``pull.max_unpack_ratio``, ``prefetch.workers``, ``prefetch.method``) default to the values
the benchmarks in the README measured.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, ClassVar, Literal, cast
from typing import get_type_hints as _get_type_hints

from cacheagent.config.convert import to_path
from cacheagent.config.values import (
    ByteSize,
    Capacity,
    CapacitySetting,
    CsiDriverName,
    GroupName,
    HttpUrl,
    ListenAddress,
    LogFormat,
    LogLevel,
    MiB,
    Parser,
    Range,
    Ratio,
    Seconds,
    SocketMode,
    metadata,
    parse_listen_address,
    parse_socket_mode,
)
from cacheagent.errors import ConfigError

_HINTS: dict[type, dict[str, Any]] = {}


def hints(cls: type) -> dict[str, Any]:
    """Resolved annotations with their ``Annotated`` metadata, once per class."""
    if cls not in _HINTS:
        _HINTS[cls] = _get_type_hints(cls, include_extras=True)
    return _HINTS[cls]


@dataclass(frozen=True)
class Section:
    """Base of every section: checks ``Range`` bounds and cross-field rules on construction."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        for name, hint in hints(type(self)).items():
            value = getattr(self, name)
            if value is None:
                continue
            for bound in metadata(hint, Range):
                problem = bound.problem(value)
                if problem is not None:
                    raise ConfigError(f"{self.section}.{name}", problem)
        self._check()

    def _check(self) -> None:
        """Cross-field rules; sections that have some override this."""


# --- the sections -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreConfig(Section):
    section: ClassVar[str] = "store"
    root: Path = Path("/var/lib/cacheagent")
    capacity: CapacitySetting = Capacity(percent=90.0)  # noqa: RUF009 - frozen
    high_watermark: Ratio = 0.95
    low_watermark: Annotated[float, Range(0.0, 1.0, open_low=True, open_high=True)] = 0.85
    tag_ttl_seconds: Seconds = 300.0
    scrub_bytes_per_second: ByteSize = 16 * MiB

    def _check(self) -> None:
        if self.low_watermark >= self.high_watermark:
            raise ConfigError(
                "store.low_watermark",
                f"must be below store.high_watermark ({self.high_watermark:g}), "
                f"got {self.low_watermark:g}",
            )


@dataclass(frozen=True)
class PullConfig(Section):
    """``timeout_seconds``: a response that delivers less than 16 KiB in that time is cut off
    and retried (so a slow-drip origin cannot hold a pull forever); ``retries`` and
    ``retry_max_seconds`` bound the retries of one request; ``rate_limit_max_wait_seconds`` is
    the longest wait an origin may ask for (429 with ``Retry-After`` or ``RateLimit``) before
    the pull fails instead of waiting. ``max_blob_bytes`` refuses a
    manifest that declares a bigger blob (unset: no limit); ``hash_mode`` ``running`` hashes
    while downloading, ``final`` re-reads the blob at the end; ``ranges_per_blob`` is how many
    parallel Range requests one large blob gets; ``max_unpack_ratio`` bounds how many times its
    compressed size a tar layer may unpack to (a zip-bomb guard)."""

    section: ClassVar[str] = "pull"
    range_threshold_bytes: Annotated[ByteSize, Range(1)] = 64 * MiB
    range_chunk_bytes: Annotated[ByteSize, Range(1)] = 16 * MiB
    max_connections_per_origin: Annotated[int, Range(1, 1024)] = 8
    max_connections_total: Annotated[int, Range(1, 4096)] = 32
    retries: Annotated[int, Range(0, 100)] = 5
    retry_max_seconds: Seconds = 30.0
    timeout_seconds: Annotated[Seconds, Range(0, open_low=True)] = 60.0
    manifest_max_bytes: Annotated[ByteSize, Range(1)] = 4 * MiB
    rate_limit_max_wait_seconds: Seconds = 300.0
    max_blob_bytes: Annotated[ByteSize, Range(1)] | None = None
    hash_mode: Literal["running", "final"] = "running"
    ranges_per_blob: Annotated[int, Range(1, 64)] = 8
    max_unpack_ratio: Annotated[float, Range(1, 10_000)] = 32.0


@dataclass(frozen=True)
class RegistriesConfig(Section):
    """``mirrors``: registry host -> mirrors tried first; ``proxy``: origin (or ``*``) -> URL."""

    section: ClassVar[str] = "registries"
    insecure: tuple[str, ...] = ()
    ca_file: Path | None = None
    docker_config: Path | None = None
    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    proxy: Mapping[str, HttpUrl] = field(default_factory=dict)


@dataclass(frozen=True)
class HfConfig(Section):
    """``token_file`` unset: ``HF_TOKEN`` or huggingface_hub's token file is used when present
    (``cacheagent.sources.hftoken``)."""

    section: ClassVar[str] = "hf"
    endpoint: HttpUrl = "https://huggingface.co"
    token_file: Path | None = None


@dataclass(frozen=True)
class AgentConfig(Section):
    """``tcp_listen`` also serves the agent API on TCP, always with TLS (``tls_cert`` and
    ``tls_key``); with ``tls_client_ca`` clients must present a certificate it signed.
    ``socket_mode`` (octal, never world-accessible) and ``socket_group`` (name or GID) are
    applied to the unix socket when the agent binds it, so members of that group can use the
    CLI without root."""

    section: ClassVar[str] = "agent"
    socket: Path = Path("/run/cacheagent/agent.sock")
    http_listen: ListenAddress = "0.0.0.0:9464"
    tcp_listen: ListenAddress | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    # Bounds on the agent API, so that API load cannot starve the CSI driver (README).
    preheat_max_refs: Annotated[int, Range(1, 10_000)] = 256
    preheat_max_concurrent: Annotated[int, Range(1, 1024)] = 4
    api_max_concurrent_calls: Annotated[int, Range(1, 10_000)] = 64
    socket_mode: SocketMode = 0o660
    socket_group: GroupName | None = None

    def _check(self) -> None:
        try:
            parse_socket_mode(self.socket_mode)  # the same rule for a hand-built section
        except ValueError as err:
            raise ConfigError("agent.socket_mode", str(err)) from None
        if self.tcp_listen is not None and (self.tls_cert is None or self.tls_key is None):
            raise ConfigError(
                "agent.tcp_listen",
                "the API is only served on TCP with TLS: set agent.tls_cert and agent.tls_key",
            )


@dataclass(frozen=True)
class CsiConfig(Section):
    """``node_id`` unset: the server uses the node's name (``NODE_NAME``) or hostname."""

    section: ClassVar[str] = "csi"
    driver_name: CsiDriverName = "model.cacheagent.io"
    socket: Path | None = None
    kubelet_dir: Path = Path("/var/lib/kubelet")
    node_id: str | None = None
    publish_wait_seconds: Annotated[Seconds, Range(0, 120, open_high=True)] = 110.0

    @property
    def socket_path(self) -> Path:
        """``socket``, or kubelet's conventional plugin socket for this driver name."""
        if self.socket is not None:
            return self.socket
        return self.kubelet_dir / "plugins" / self.driver_name / "csi.sock"


@dataclass(frozen=True)
class FuseConfig(Section):
    """``max_threads``: libfuse workers; 8 of them never wait for an origin (they serve cached
    bytes). ``origin_wait_seconds``: how long a read waits for bytes from the origin before it
    fails with ETIMEDOUT. ``origin_waits_per_model``: reads of one model that may wait for its
    origin at once; more are refused with EIO (see ``cacheagent.fuse.waits``). ``keeper_socket``:
    the FUSE keeper's socket (``cacheagent.fuse.keeper``); unset, lazy volumes end with the
    agent. ``handover_seconds``: how long the keeper keeps an orphaned connection for the next
    agent, i.e. the longest a lazy reader waits across a restart before its reads fail."""

    section: ClassVar[str] = "fuse"
    enabled: bool = True
    mountpoint: Path = Path("/run/cacheagent/fuse")
    read_ahead_kb: Annotated[int, Range(0, 1024 * 1024)] = 8192
    max_threads: Annotated[int, Range(9, 1024)] = 64
    origin_wait_seconds: Annotated[Seconds, Range(0, 3600, open_low=True)] = 30.0
    origin_waits_per_model: Annotated[int, Range(1, 1024)] = 24
    keeper_socket: Path | None = None
    handover_seconds: Annotated[Seconds, Range(0, 3600, open_low=True)] = 120.0

    def _check(self) -> None:
        if self.keeper_socket is not None and len(os.fsencode(self.keeper_socket)) > 107:
            raise ConfigError("fuse.keeper_socket", "a unix socket path is at most 107 bytes")
        limit = self.max_threads - 8  # cacheagent.fuse.waits.RESERVED_WORKERS
        if self.origin_waits_per_model > limit:
            raise ConfigError(
                "fuse.origin_waits_per_model",
                f"must be at most fuse.max_threads less 8 ({limit}), "
                f"got {self.origin_waits_per_model}",
            )


@dataclass(frozen=True)
class PrefetchConfig(Section):
    """``memory_share``: the fraction of available memory a prefetch may fill; ``workers``
    readers warm in parallel, with ``method`` ``fadvise`` (WILLNEED, the kernel reads) or
    ``read`` (reads into a reused buffer)."""

    section: ClassVar[str] = "prefetch"
    memory_share: Ratio = 0.5
    mlock_limit_bytes: ByteSize = 0
    workers: Annotated[int, Range(1, 64)] = 2
    method: Literal["fadvise", "read"] = "fadvise"


def parse_host_pattern(value: object) -> str:
    """A host glob for the policy: ``name``, ``*.example.com`` or ``name:port`` (no scheme)."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9*?.\-\[\]:]+", value):
        raise ValueError(
            f"expected a host name or glob like models.example.com, *.example.com or "
            f"host:8443 (no scheme, no path), got {value!r}"
        )
    return value.lower()


def parse_network(value: object) -> str:
    """An IP network in CIDR form (``127.0.0.0/8``, ``::1/128``) or a single address."""
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError:
        raise ValueError(
            f"expected an IP network like 127.0.0.0/8 or an address like ::1, got {value!r}"
        ) from None


def _parse_pod_layout_root(value: object) -> PurePosixPath:
    path = to_path(value)
    if any(part in (".", "..") for part in path.parts) or path == Path("/"):
        raise ValueError(f"expected an absolute directory below / without '..', got {value!r}")
    return PurePosixPath(os.path.normpath(path))


HostPattern = Annotated[str, Parser(parse_host_pattern)]
Network = Annotated[str, Parser(parse_network)]
PodLayoutRoot = Annotated[PurePosixPath, Parser(_parse_pod_layout_root)]
RefKindName = Literal["oci", "oci-layout", "hf", "http", "s3"]


@dataclass(frozen=True)
class PolicyConfig(Section):
    """Glob rules over canonical refs and the pod trust boundary; semantics in
    ``cacheagent.policy`` (README "What a pod may name")."""

    section: ClassVar[str] = "policy"
    allowed_sources: tuple[str, ...] = ()
    namespaces: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pod_hf: bool = False
    pod_layout_roots: tuple[PodLayoutRoot, ...] = ()
    pod_http_hosts: tuple[HostPattern, ...] = ()
    lazy_sources: tuple[RefKindName, ...] = ("oci",)
    http_redirect_hosts: tuple[HostPattern, ...] = ()
    http_allowed_networks: tuple[Network, ...] = ()
    pod_s3_buckets: tuple[str, ...] = ()  # bucket globs pods may name (s3:// refs)


@dataclass(frozen=True)
class S3Config(Section):
    """``s3://`` origins. ``endpoint`` unset: AWS (``https://s3.<region>.amazonaws.com``); set it
    for MinIO/Ceph (plain ``http://`` only for hosts in ``registries.insecure``). ``addressing``
    ``auto`` is path-style with an endpoint, virtual-hosted without. Credentials: the static
    pair (``access_key_id`` + ``secret_access_key_file``), else botocore's standard chain
    (``AWS_*`` environment, ``profile`` in the shared credentials/config files, container and
    instance roles); ``anonymous`` sends unsigned requests (public buckets)."""

    section: ClassVar[str] = "s3"
    endpoint: HttpUrl | None = None
    region: str = "us-east-1"
    addressing: Literal["auto", "path", "virtual"] = "auto"
    access_key_id: str | None = None
    secret_access_key_file: Path | None = None
    profile: str | None = None
    anonymous: bool = False

    def _check(self) -> None:
        if (self.access_key_id is None) != (self.secret_access_key_file is None):
            raise ConfigError(
                "s3.access_key_id",
                "static credentials need both s3.access_key_id and s3.secret_access_key_file",
            )


@dataclass(frozen=True)
class PeersConfig(Section):
    """Peer fetch between agents (``cacheagent.peers``): off unless ``enabled``.

    Peers are found by resolving ``dns_name`` (the agents' headless Service) every
    ``refresh_seconds`` through the system resolver, or ``dns_server`` (host:port) when set, and
    from ``static`` (host:port entries). Every agent listens on ``listen``; DNS answers give
    addresses, the port is ``listen``'s. ``advertise_address``: this node's address as peers see
    it, when it is not the listen host nor one of the machine's interface addresses. A peer
    transfer that delivers nothing for ``stall_seconds`` or less than ``min_bytes_per_second``
    over that window is given up (the rest comes from the next node the rendezvous choice names,
    else the origin) and the peer sits out ``cooldown_seconds``. The listener waits up to
    ``miss_wait_seconds`` for a blob it does not hold to start downloading before answering 404.
    ``tls_cert``/``tls_key``: the listener speaks TLS only and agents present that certificate
    to peers; with ``tls_ca``, peers and clients must hold a certificate that CA signed.
    """

    section: ClassVar[str] = "peers"
    enabled: bool = False
    listen: ListenAddress = "0.0.0.0:9465"
    dns_name: str | None = None
    dns_server: ListenAddress | None = None
    static: tuple[str, ...] = ()
    advertise_address: str | None = None
    refresh_seconds: Annotated[Seconds, Range(0, open_low=True)] = 30.0
    stall_seconds: Annotated[Seconds, Range(0, open_low=True)] = 10.0
    min_bytes_per_second: ByteSize = 1 * MiB
    cooldown_seconds: Seconds = 30.0
    miss_wait_seconds: Seconds = 2.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    def _check(self) -> None:
        for i, entry in enumerate(self.static):
            try:
                if parse_listen_address(entry).startswith(":"):
                    raise ValueError(f"expected host:port of a peer, got {entry!r}")
            except ValueError as exc:
                raise ConfigError(f"peers.static[{i}]", str(exc)) from None
        if self.enabled and self.dns_name is None and not self.static:
            raise ConfigError(
                "peers.enabled", "peer fetch needs peers.dns_name or peers.static (or both)"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("peers.tls_cert", "set both peers.tls_cert and peers.tls_key")


@dataclass(frozen=True)
class Config:
    store: StoreConfig = field(default_factory=StoreConfig)
    pull: PullConfig = field(default_factory=PullConfig)
    registries: RegistriesConfig = field(default_factory=RegistriesConfig)
    hf: HfConfig = field(default_factory=HfConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    csi: CsiConfig = field(default_factory=CsiConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    s3: S3Config = field(default_factory=S3Config)
    peers: PeersConfig = field(default_factory=PeersConfig)


def section_types() -> dict[str, type[Section]]:
    return {name: cast(type[Section], hint) for name, hint in hints(Config).items()}
