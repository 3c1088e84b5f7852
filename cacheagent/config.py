"""The agent's one typed configuration: defaults, then a YAML file, then environment, then flags.

``load_config(path, env, overrides)`` layers, later wins:

1. the dataclass defaults below (production values for a DaemonSet on a GPU node);
2. the YAML file, ``section: {key: value}``;
3. environment variables ``CACHEAGENT_<SECTION>__<KEY>`` (``CACHEAGENT_PULL__RETRIES=3``).
   Lists are comma-separated (``a,b``), mappings are YAML flow text (``{docker.io: [m.local]}``),
   an empty value unsets an optional setting. Variables without the ``__`` separator
   (``CACHEAGENT_CONFIG``...) are not settings and are ignored;
4. ``overrides`` with dotted keys (``{"store.root": "/x"}``), typically command-line flags;
   a ``None`` value means "flag not given" and is skipped.

A layer replaces a whole setting (a mapping is replaced, not merged key by key).

Validation is driven by the field annotations, not by one check per key: the type says how a
raw value (YAML scalar, environment string, flag) becomes a typed one (``ByteSize`` accepts
``500Gi``, ``Seconds`` accepts ``5m``, ``Path`` must be absolute, ``Literal`` lists the choices)
and ``Range`` metadata says which values are allowed. Every error is a ``ConfigError`` whose key
is the dotted path and whose message says what was expected and where the value came from.
Sections also check these bounds when built directly, so a hand-made ``PullConfig`` cannot
hold a value a file could not.

Defaults chosen where the brief is silent: ``agent.http_listen`` is ``0.0.0.0:9464`` (Prometheus
scrapes the pod; that port serves only metrics and health), logs are ``text`` at ``info``,
``csi.publish_wait_seconds`` is 110 s (inside kubelet's two-minute CSI deadline),
``pull.timeout_seconds`` (per request, without progress) is 60 s and backoff is capped at 30 s,
``prefetch.mlock_limit_bytes`` is 0 (no locking unless asked), and ``csi.socket`` unset means
``<kubelet_dir>/plugins/<driver_name>/csi.sock``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, cast, get_args, get_origin
from typing import get_type_hints as _get_type_hints

import yaml

from cacheagent.errors import ConfigError

ENV_PREFIX = "CACHEAGENT_"
_T = TypeVar("_T")


# --- value parsers (public: the CLI parses flags with them too) --------------------------------

_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_SIZE_UNITS = {"": 1, "b": 1} | {
    key: value
    for power, letter in enumerate("kmgtpe", start=1)
    for key, value in (
        (letter, 1000**power),
        (f"{letter}b", 1000**power),
        (f"{letter}i", 1024**power),
        (f"{letter}ib", 1024**power),
    )
}
_NUMBER_RE = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_DURATION_RE = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|s|m|h|d))+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_BYTE_SIZE_EXAMPLE = "a byte size like 500Gi, 10G or 1048576"


def parse_byte_size(value: object) -> int:
    """Bytes from an int or a string with an IEC (Ki, Mi, Gi...) or SI (k, M, G...) suffix.

    Suffixes are case-insensitive and may end in ``B``/``iB``; fractions are allowed when the
    result is a whole number of bytes (``1.5TiB``).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {_BYTE_SIZE_EXAMPLE}, got {value!r}")
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip().lower())
        if match is None or match.group(2) not in _SIZE_UNITS:
            raise ValueError(f"expected {_BYTE_SIZE_EXAMPLE}, got {value!r}")
        amount = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2)]
    elif not math.isfinite(value) or value < 0:
        raise ValueError(f"expected {_BYTE_SIZE_EXAMPLE}, got {value!r}")
    else:
        amount = Fraction(value)
    if amount.denominator != 1:
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(amount)


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like ``30s``, ``5m``, ``1h30m``, ``250ms``, ``2d``."""
    expected = f"expected a duration like 30s, 5m, 1h or a number of seconds, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(expected)
    if isinstance(value, str):
        text = value.strip().lower()
        if _NUMBER_RE.fullmatch(text):
            return float(text)
        if not _DURATION_RE.fullmatch(text):
            raise ValueError(expected)
        return sum(
            float(amount) * _DURATION_UNITS[unit]
            for amount, unit in _DURATION_PART_RE.findall(text)
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(expected)
    return float(value)


def parse_listen_address(value: object) -> str:
    """``host:port``, ``[v6]:port`` or ``:port`` (all interfaces) for a TCP listener."""
    expected = f"expected host:port like 0.0.0.0:9464, got {value!r}"
    if not isinstance(value, str):
        raise ValueError(expected)
    host, colon, port = value.rpartition(":")
    if not colon or not port.isascii() or not port.isdigit():
        raise ValueError(expected)
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {int(port)} out of range 1-65535 in {value!r}")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ValueError(expected)
    return f"{host}:{int(port)}"


def parse_http_url(value: object) -> str:
    """An ``http(s)://host[...]`` base URL, without a trailing ``/``."""
    expected = f"expected an http:// or https:// URL, got {value!r}"
    if not isinstance(value, str):
        raise ValueError(expected)
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.split("/", 1)[0]:
        raise ValueError(expected)
    return value.rstrip("/")


def parse_csi_driver_name(value: object) -> str:
    """A CSI driver name: at most 63 characters, alphanumerics with ``-`` and ``.`` inside."""
    if not isinstance(value, str) or not re.fullmatch(
        r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,61}[A-Za-z0-9])?", value
    ):
        raise ValueError(
            "expected a CSI driver name (at most 63 characters, letters, digits, '-' and '.', "
            f"starting and ending with a letter or digit), got {value!r}"
        )
    return value


@dataclass(frozen=True)
class Capacity:
    """A store size limit: a byte count or a percentage of the store's filesystem."""

    bytes: int | None = None
    percent: float | None = None

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.percent is None):
            raise ValueError("Capacity takes exactly one of bytes or percent")
        if self.bytes is not None and self.bytes <= 0:
            raise ValueError(f"capacity must be positive, got {self.bytes} bytes")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise ValueError(f"capacity percentage must be in (0, 100], got {self.percent}%")

    @classmethod
    def parse(cls, value: object) -> Capacity:
        if isinstance(value, Capacity):
            return value
        if isinstance(value, str) and value.strip().endswith("%"):
            number = value.strip()[:-1].strip()
            if _NUMBER_RE.fullmatch(number):
                return cls(percent=float(number))
        try:
            size = parse_byte_size(value)
        except ValueError:
            raise ValueError(
                f"expected a byte size like 500Gi or a percentage like 80%, got {value!r}"
            ) from None
        return cls(bytes=size)

    def resolve(self, fs_total: int) -> int:
        """The limit in bytes for a filesystem of ``fs_total`` bytes."""
        if self.bytes is not None:
            return self.bytes
        return int(fs_total * cast(float, self.percent) / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.bytes)


# --- annotation metadata that drives validation -----------------------------------------------


@dataclass(frozen=True)
class Parser:
    """``Annotated`` metadata: how a raw value becomes this field's value (raises ValueError)."""

    parse: Callable[[object], object]


@dataclass(frozen=True)
class Range:
    """``Annotated`` metadata: numeric bounds; ``open_low``/``open_high`` exclude the bound."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def problem(self, value: float) -> str | None:
        too_low = self.low is not None and (
            value < self.low or (self.open_low and value == self.low)
        )
        too_high = self.high is not None and (
            value > self.high or (self.open_high and value == self.high)
        )
        return f"expected a value in {self}, got {value!r}" if too_low or too_high else None

    def __str__(self) -> str:
        left = "(" if self.open_low or self.low is None else "["
        right = ")" if self.open_high or self.high is None else "]"
        low = "-inf" if self.low is None else _number(self.low)
        high = "inf" if self.high is None else _number(self.high)
        return f"{left}{low}, {high}{right}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


ByteSize = Annotated[int, Parser(parse_byte_size)]
Seconds = Annotated[float, Parser(parse_duration)]
Ratio = Annotated[float, Range(0.0, 1.0, open_low=True)]
ListenAddress = Annotated[str, Parser(parse_listen_address)]
HttpUrl = Annotated[str, Parser(parse_http_url)]
CsiDriverName = Annotated[str, Parser(parse_csi_driver_name)]
CapacitySetting = Annotated[Capacity, Parser(Capacity.parse)]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]

MiB = 1024 * 1024


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations with their ``Annotated`` metadata, once per class."""
    if cls not in _HINTS:
        _HINTS[cls] = _get_type_hints(cls, include_extras=True)
    return _HINTS[cls]


@dataclass(frozen=True)
class _Section:
    """Base of every section: checks ``Range`` bounds and cross-field rules on construction."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        for name, hint in _hints(type(self)).items():
            value = getattr(self, name)
            for bound in _metadata(hint, Range):
                problem = bound.problem(value)
                if problem is not None:
                    raise ConfigError(f"{self.section}.{name}", problem)
        self._check()

    def _check(self) -> None:
        """Cross-field rules; sections that have some override this."""


# --- the sections -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreConfig(_Section):
    section: ClassVar[str] = "store"
    root: Path = Path("/var/lib/cacheagent")
    capacity: CapacitySetting = Capacity(percent=90.0)
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
class PullConfig(_Section):
    """``timeout_seconds``: a response that delivers less than 16 KiB in that time is cut off
    and retried (so a slow-drip origin cannot hold a pull forever); ``retries`` and
    ``retry_max_seconds`` bound the retries of one request; ``rate_limit_max_wait_seconds`` is
    the longest wait an origin may ask for (429 with ``Retry-After`` or ``RateLimit``) before
    the pull fails instead of waiting."""

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


@dataclass(frozen=True)
class RegistriesConfig(_Section):
    """``mirrors``: registry host -> mirrors tried first; ``proxy``: origin (or ``*``) -> URL."""

    section: ClassVar[str] = "registries"
    insecure: tuple[str, ...] = ()
    ca_file: Path | None = None
    docker_config: Path | None = None
    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    proxy: Mapping[str, HttpUrl] = field(default_factory=dict)


@dataclass(frozen=True)
class HfConfig(_Section):
    section: ClassVar[str] = "hf"
    endpoint: HttpUrl = "https://huggingface.co"
    token_file: Path | None = None


@dataclass(frozen=True)
class AgentConfig(_Section):
    """``tcp_listen`` also serves the agent API on TCP, always with TLS (``tls_cert`` and
    ``tls_key``); with ``tls_client_ca`` clients must present a certificate it signed."""

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

    def _check(self) -> None:
        if self.tcp_listen is not None and (self.tls_cert is None or self.tls_key is None):
            raise ConfigError(
                "agent.tcp_listen",
                "the API is only served on TCP with TLS: set agent.tls_cert and agent.tls_key",
            )


@dataclass(frozen=True)
class CsiConfig(_Section):
    """``node_id`` unset: the server uses the node's name (``NODE_NAME``) or hostname."""

    section: ClassVar[str] = "csi"
    driver_name: CsiDriverName = "model.cacheagent.io"
    socket: Path | None = None
    kubelet_dir: Path = Path("/var/lib/kubelet")
    node_id: str | None = None
    publish_wait_seconds: Seconds = 110.0

    @property
    def socket_path(self) -> Path:
        """``socket``, or kubelet's conventional plugin socket for this driver name."""
        if self.socket is not None:
            return self.socket
        return self.kubelet_dir / "plugins" / self.driver_name / "csi.sock"


@dataclass(frozen=True)
class FuseConfig(_Section):
    """``max_threads``: libfuse workers; 8 of them never wait for an origin (they serve cached
    bytes). ``origin_wait_seconds``: how long a read waits for bytes from the origin before it
    fails with ETIMEDOUT. ``origin_waits_per_model``: reads of one model that may wait for its
    origin at once; more are refused with EIO (see ``cacheagent.fuse.waits``)."""

    section: ClassVar[str] = "fuse"
    enabled: bool = True
    mountpoint: Path = Path("/run/cacheagent/fuse")
    read_ahead_kb: Annotated[int, Range(0, 1024 * 1024)] = 8192
    max_threads: Annotated[int, Range(9, 1024)] = 64
    origin_wait_seconds: Annotated[Seconds, Range(0, 3600, open_low=True)] = 30.0
    origin_waits_per_model: Annotated[int, Range(1, 1024)] = 24

    def _check(self) -> None:
        limit = self.max_threads - 8  # cacheagent.fuse.waits.RESERVED_WORKERS
        if self.origin_waits_per_model > limit:
            raise ConfigError(
                "fuse.origin_waits_per_model",
                f"must be at most fuse.max_threads less 8 ({limit}), "
                f"got {self.origin_waits_per_model}",
            )


@dataclass(frozen=True)
class PrefetchConfig(_Section):
    """``memory_share``: the fraction of available memory a prefetch may fill."""

    section: ClassVar[str] = "prefetch"
    memory_share: Ratio = 0.5
    mlock_limit_bytes: ByteSize = 0


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
    path = _to_path(value)
    if any(part in (".", "..") for part in path.parts) or path == Path("/"):
        raise ValueError(f"expected an absolute directory below / without '..', got {value!r}")
    return PurePosixPath(os.path.normpath(path))


HostPattern = Annotated[str, Parser(parse_host_pattern)]
Network = Annotated[str, Parser(parse_network)]
PodLayoutRoot = Annotated[PurePosixPath, Parser(_parse_pod_layout_root)]
RefKindName = Literal["oci", "oci-layout", "hf", "http", "s3"]


@dataclass(frozen=True)
class PolicyConfig(_Section):
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
class S3Config(_Section):
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
class PeersConfig(_Section):
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


def _section_types() -> dict[str, type[_Section]]:
    return {name: cast(type[_Section], hint) for name, hint in _hints(Config).items()}


# --- loading ----------------------------------------------------------------------------------


def load_config(
    path: Path | None, env: Mapping[str, str], overrides: Mapping[str, object]
) -> Config:
    """Build the configuration from its layers; raises ``ConfigError`` naming the bad key."""
    layers = _Layers()
    if path is not None:
        layers.add_file(path)
    for name in sorted(env):
        layers.add_env(name, env[name])
    for key, value in overrides.items():
        if value is not None:
            layers.set(key, value, "override")
    return layers.build()


class _Layers:
    """Raw values per dotted key, with where each came from (for error messages)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, object]] = {}
        self.origins: dict[str, str] = {}

    def add_file(self, path: Path) -> None:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read the config file: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), f"not valid YAML: {exc}") from None
        if data is None:
            return
        if not isinstance(data, dict):
            raise ConfigError(
                str(path), f"expected a mapping of sections, got {type(data).__name__}"
            )
        origin = f"file {path}"
        for section, settings in data.items():
            _section_class(str(section), str(section), origin)
            if not isinstance(settings, dict | None):
                raise ConfigError(
                    str(section),
                    f"expected a mapping of settings, got {type(settings).__name__} "
                    f"(from {origin})",
                )
            for key, value in (settings or {}).items():
                self.set(f"{section}.{key}", value, origin)

    def add_env(self, name: str, value: str) -> None:
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            return
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2:
            raise ConfigError(
                name.lower(), f"environment variable {name} is not {ENV_PREFIX}<SECTION>__<KEY>"
            )
        self.set(".".join(parts), value, f"environment variable {name}")

    def set(self, key: str, value: object, origin: str) -> None:
        section, _, field_name = key.partition(".")
        names = [f.name for f in fields(_section_class(section, key, origin))]
        if field_name not in names:
            raise ConfigError(
                key, f"unknown key; {section} has: {', '.join(names)} (from {origin})"
            )
        self.values.setdefault(section, {})[field_name] = value
        self.origins[key] = origin

    def build(self) -> Config:
        built: dict[str, _Section] = {}
        for section, cls in _section_types().items():
            try:
                built[section] = _build_section(cls, self.values.get(section, {}))
            except ConfigError as exc:
                setting = _SETTING_RE.match(exc.key)
                origin = self.origins.get(setting.group(0)) if setting else None
                if origin is None:
                    raise
                raise ConfigError(exc.key, f"{exc.problem} (from {origin})") from None
        return cast(Callable[..., Config], Config)(**built)


_SETTING_RE = re.compile(r"[^.\[]+\.[^.\[]+")


def _section_class(section: str, key: str, origin: str) -> type[_Section]:
    sections = _section_types()
    if section not in sections:
        raise ConfigError(
            key, f"unknown section {section!r}; known: {', '.join(sections)} (from {origin})"
        )
    return sections[section]


def _build_section(cls: type[_T], raw: Mapping[str, object]) -> _T:
    section = cast(type[_Section], cls).section
    hints = _hints(cls)
    kwargs = {
        name: _convert(hints[name], value, f"{section}.{name}") for name, value in raw.items()
    }
    return cast(Callable[..., _T], cls)(**kwargs)


# --- conversion driven by the annotation ------------------------------------------------------


def _metadata(hint: object, kind: type[_T]) -> list[_T]:
    if get_origin(hint) is not Annotated:
        return []
    return [meta for meta in get_args(hint)[1:] if isinstance(meta, kind)]


def _convert(hint: object, raw: object, key: str) -> object:
    try:
        return _convert_value(hint, raw, key)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def _convert_value(hint: object, raw: object, key: str) -> object:
    origin = get_origin(hint)
    if origin is Annotated:
        parsers = _metadata(hint, Parser)
        if parsers:
            return parsers[0].parse(raw)
        return _convert_value(get_args(hint)[0], raw, key)
    if origin in (Union, types.UnionType):
        return _convert_optional(hint, raw, key)
    if origin is Literal:
        return _convert_literal(get_args(hint), raw)
    if origin is tuple:
        return _convert_list(get_args(hint)[0], raw, key)
    if origin is Mapping or origin is dict:
        return _convert_mapping(get_args(hint)[1], raw, key)
    converter = _SCALARS.get(cast(type, hint))
    if converter is None:
        raise TypeError(f"config field {key} has an unsupported type {hint!r}")
    return converter(raw)


def _convert_optional(hint: object, raw: object, key: str) -> object:
    args = [arg for arg in get_args(hint) if arg is not type(None)]
    if len(args) != 1:
        raise TypeError(f"config field {key}: only 'X | None' unions are supported")
    if raw is None or raw == "":
        return None
    return _convert_value(args[0], raw, key)


def _convert_literal(choices: tuple[object, ...], raw: object) -> object:
    if isinstance(raw, str):
        for choice in choices:
            if isinstance(choice, str) and choice.lower() == raw.strip().lower():
                return choice
    raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {raw!r}")


def _convert_list(item: object, raw: object, key: str) -> tuple[object, ...]:
    if isinstance(raw, str):
        items: list[object] = [part.strip() for part in raw.split(",") if part.strip()]
    elif isinstance(raw, list | tuple):
        items = list(raw)
    else:
        raise ValueError(f"expected a list (or comma-separated text), got {raw!r}")
    return tuple(_convert(item, value, f"{key}[{index}]") for index, value in enumerate(items))


def _convert_mapping(value_hint: object, raw: object, key: str) -> dict[str, object]:
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw) or {}
        except yaml.YAMLError:
            raise ValueError(f"expected a mapping in YAML flow syntax, got {raw!r}") from None
    if not isinstance(raw, Mapping):
        raise ValueError(f"expected a mapping, got {raw!r}")
    result: dict[str, object] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(key, f"expected text keys, got {name!r}")
        result[name] = _convert(value_hint, value, f"{key}.{name}")
    return result


def _to_int(raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"[+-]?\d+", raw.strip()):
        return int(raw)
    raise ValueError(f"expected a whole number, got {raw!r}")


def _to_float(raw: object) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        number = float(raw)
    elif isinstance(raw, str):
        try:
            number = float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    else:
        raise ValueError(f"expected a number, got {raw!r}")
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {raw!r}")
    return number


def _to_str(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"expected text, got {type(raw).__name__} {raw!r} (quote it in YAML)")
    if not raw:
        raise ValueError("must not be empty")
    return raw


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _to_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {raw!r}")


def _to_path(raw: object) -> Path:
    if not isinstance(raw, str | Path) or not Path(raw).is_absolute():
        raise ValueError(f"expected an absolute path, got {raw!r}")
    return Path(raw)


_SCALARS: dict[type, Callable[[object], object]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    Path: _to_path,
}
