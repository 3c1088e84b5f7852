"""The one place that opens HTTP connections to origins.

Every source shares a ``Transport``: one aiohttp session (one connection pool, so the total and
per-host limits hold agent-wide), TLS verified against the system store plus an optional extra CA
file, plain HTTP only towards hosts listed as insecure, an optional upstream proxy per origin
(a site running Dragonfly's dfdaemon routes registry traffic through it), and timeouts on connect
and on every socket read (a stalled body fails instead of hanging a pull forever).

Every request says ``Accept-Encoding: identity`` (a session default): the store verifies the
bytes the origin holds, so a CDN that gzips a tokenizer JSON or an API answer when asked would
break sizes and digests, and we never ask.

An origin that no configured proxy entry matches goes through the proxy the agent's environment
names (``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``, lower case winning, minus ``NO_PROXY``
hosts; what operators set on nodes), read once when the transport is made. As with curl (and
unlike Go), loopback hosts are not exempted unless ``NO_PROXY`` lists them.

Redirects are followed here, not by aiohttp, so that every hop is held to the same rules: the
scheme check, the proxy lookup, and no ``Authorization`` header for a different host (registries
redirect blob GETs to object storage, which must never see registry credentials).
"""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from cacheagent import __version__
from cacheagent.errors import ConfigError, SourceError

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class TransportOptions:
    """Connection settings shared by every origin.

    ``insecure`` entries are ``host`` (any port) or ``host:port``. ``proxies`` maps an origin
    (``host:port``, ``host``, or ``*`` for every origin) to an ``http://`` proxy URL.
    ``read_buffer_bytes`` is how much a response may buffer before aiohttp stops reading its
    socket (it pauses at twice that): aiohttp's 64 KiB default pauses and resumes a fast
    body after almost every socket read, which cost a loopback pull about 5% of its time.
    """

    ca_file: Path | None = None
    insecure: frozenset[str] = frozenset()
    proxies: Mapping[str, str] = field(default_factory=dict)
    max_connections: int = 64
    max_connections_per_host: int = 8
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    max_redirects: int = 5
    read_buffer_bytes: int = 1 << 20
    user_agent: str = f"cacheagent/{__version__}"
    proxy_from_environment: bool = True
    # Policy hooks (sources.guard): the connector's resolver, and a check of each hop's URL
    # (first URL, this hop) before it is requested; None means no extra rule.
    resolver: Callable[[], AbstractResolver] | None = None
    check_hop: Callable[[URL, URL], None] | None = None


def host_port(url: URL) -> str:
    """``host:port`` as registries and config name origins (port omitted when default)."""
    host = (url.host or "").lower()
    if url.explicit_port is not None:
        return f"{host}:{url.explicit_port}"
    return host


def redact_url(url: URL | str) -> str:
    """A URL fit for a log line or an error: no userinfo, no query (presigned URLs sign there)."""
    parsed = URL(str(url))
    shown = parsed.with_user(None).with_query(None).with_fragment(None)
    suffix = "?..." if parsed.query_string else ""
    return f"{shown}{suffix}"


class Transport:
    """Builds and owns the aiohttp session; ``request`` is the only way out to the network."""

    def __init__(self, options: TransportOptions | None = None) -> None:
        self.options = options or TransportOptions()
        self._insecure = {h.lower() for h in self.options.insecure}
        self._ssl = self._ssl_context(self.options.ca_file)
        self._env_proxies = environment_proxies() if self.options.proxy_from_environment else {}
        self._session: aiohttp.ClientSession | None = None

    @staticmethod
    def _ssl_context(ca_file: Path | None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("registries.ca_file", f"cannot load {ca_file}: {exc}") from None
        return context

    # -- policy ---------------------------------------------------------------------------------

    def is_insecure(self, origin: str) -> bool:
        origin = origin.lower()
        return origin in self._insecure or origin.rsplit(":", 1)[0] in self._insecure

    def scheme_for(self, origin: str) -> str:
        """The scheme to reach a registry host with: plain HTTP only when configured insecure."""
        return "http" if self.is_insecure(origin) else "https"

    def check_url(self, url: URL, *, what: str = "URL") -> None:
        """Refuse non-HTTP schemes, and plain HTTP towards a host not configured insecure."""
        if url.scheme == "https":
            return
        if url.scheme == "http":
            origin = host_port(url)
            if self.is_insecure(origin):
                return
            raise SourceError(
                f"{what} {redact_url(url)} is plain http:// but {origin} is not listed in "
                "registries.insecure; use https:// or list the host there"
            )
        raise SourceError(f"{what} {redact_url(url)}: unsupported scheme {url.scheme!r}")

    def proxy_for(self, url: URL) -> str | None:
        """The configured proxy for this origin, else the environment's, else None."""
        proxies = self.options.proxies
        origin = host_port(url)
        configured = proxies.get(origin) or proxies.get(url.host or "") or proxies.get("*")
        if configured or not self._env_proxies:
            return configured
        env = self._env_proxies
        if no_proxy_matches(url, env.get("no", "")):
            return None
        return env.get(url.scheme) or env.get("all")

    # -- I/O ------------------------------------------------------------------------------------

    def session(self) -> aiohttp.ClientSession:
        """The shared session, created on first use (it must be made inside the event loop)."""
        if self._session is None or self._session.closed:
            opts = self.options
            connector = aiohttp.TCPConnector(
                limit=opts.max_connections,
                limit_per_host=opts.max_connections_per_host,
                ssl=self._ssl,
                ttl_dns_cache=300,
                resolver=opts.resolver() if opts.resolver is not None else None,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=opts.connect_timeout, sock_read=opts.read_timeout
                ),
                headers={"User-Agent": opts.user_agent, "Accept-Encoding": "identity"},
                auto_decompress=False,
                read_bufsize=opts.read_buffer_bytes,
                trust_env=False,
            )
        return self._session

    async def request(
        self,
        method: str,
        url: URL,
        *,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        follow_redirects: bool = True,
    ) -> aiohttp.ClientResponse:
        """Send one request, following redirects under the rules in the module docstring.

        The caller owns the returned response and must release or close it. TLS failures
        become SourceError with a hint; other transport errors propagate for the retry logic.
        """
        hop_headers = dict(headers or {})
        first_url = url
        first_origin = (url.scheme, host_port(url))
        for _ in range(self.options.max_redirects + 1):
            self.check_url(url)
            if self.options.check_hop is not None:
                self.options.check_hop(first_url, url)
            resp = await self._send(method, url, hop_headers, data)
            location = resp.headers.get("Location")
            if not follow_redirects or resp.status not in _REDIRECTS or not location:
                return resp
            resp.release()
            url = url.join(URL(location, encoded=True))
            if (url.scheme, host_port(url)) != first_origin:
                hop_headers.pop("Authorization", None)
            if resp.status == 303:
                method, data = "GET", None
        raise SourceError(f"{redact_url(url)}: more than {self.options.max_redirects} redirects")

    async def _send(
        self, method: str, url: URL, headers: Mapping[str, str], data: Any
    ) -> aiohttp.ClientResponse:
        try:
            return await self.session().request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                proxy=self.proxy_for(url),
            )
        except aiohttp.ClientSSLError as exc:
            raise SourceError(
                f"TLS with {host_port(url)} failed ({_ssl_reason(exc)}); if it uses a private CA "
                "set registries.ca_file, if it serves plain HTTP list it in registries.insecure"
            ) from None

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


def environment_proxies() -> dict[str, str]:
    """``{scheme: proxy URL, "no": hosts}`` from the environment; a proxy URL aiohttp cannot use
    (``socks5://``...) is a ConfigError naming the variable, at start."""
    found = urllib.request.getproxies_environment()
    for scheme, value in found.items():
        if scheme == "no":
            continue
        proxy = URL(value if "://" in value else f"http://{value}")
        if proxy.scheme not in ("http", "https") or not proxy.host:
            raise ConfigError(
                f"{scheme.upper()}_PROXY (environment)",
                f"{redact_url(proxy)}: only http:// and https:// proxies are supported",
            )
        found[scheme] = str(proxy)
    return found


def no_proxy_matches(url: URL, no_proxy: str) -> bool:
    """True when ``NO_PROXY`` exempts the URL's host: ``*``, the host itself, a parent domain
    (``example.com`` or ``.example.com``), each optionally with ``:port``."""
    host = (url.host or "").lower()
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if entry == "*":
            return True
        name, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if port and (not port.isdigit() or int(port) != url.port):
            continue
        name = name.removeprefix("*").removeprefix(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _ssl_reason(exc: aiohttp.ClientSSLError) -> str:
    inner = exc.os_error if isinstance(exc.os_error, ssl.SSLError) else None
    if inner is not None and getattr(inner, "reason", None):
        return str(inner.reason)
    return exc.__class__.__name__
