"""Registry credentials and the distribution auth handshake (basic and bearer token).

Credentials come from a Docker ``config.json`` (what a Kubernetes ``dockerconfigjson`` Secret
holds) and/or are passed explicitly; explicit ones win. Credential helpers (``credsStore``,
``credHelpers``) run programs on the node and are not supported.

The flow follows the distribution spec: a request goes out with whatever we already hold for
the registry; a 401 carries ``WWW-Authenticate``; for ``Basic`` we answer with the credentials,
for ``Bearer realm=...,service=...,scope=...`` we ask the realm for a token (HTTP basic with the
credentials, or an OAuth2 refresh-token POST when config.json has an ``identitytoken``) and cache
it per (registry, scope) until ``expires_in`` runs out. A second 401 right after a fresh answer
means the credentials are wrong, reported naming the registry and user, never the secret.

Secrets never reach a log line, an exception message or a repr.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from yarl import URL

from cacheagent.errors import ConfigError, SourceError
from cacheagent.sources.retry import is_retryable
from cacheagent.sources.streaming import TransientError, read_bounded
from cacheagent.sources.transport import Transport

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
#: Tokens live this long when the token service does not say (the spec's default).
DEFAULT_TOKEN_SECONDS = 60
_MAX_TOKEN_RESPONSE = 1 << 20


class RegistryAuthError(SourceError):
    """The registry refused us: no credentials, wrong credentials, or no access to the repo."""

    def __init__(self, registry: str, problem: str) -> None:
        self.registry = registry
        super().__init__(f"registry {registry}: {problem}")


@dataclass(frozen=True)
class Credentials:
    """A username/password pair, or an identity (refresh) token. The repr hides the secrets."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def __repr__(self) -> str:
        kind = "identity_token" if self.identity_token else "password"
        return f"Credentials(username={self.username!r}, {kind}=<redacted>)"

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.password, self.identity_token) if s)


def normalize_registry_host(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``https://r.example:5000/v2`` ->
    ``r.example:5000``. Hosts compare case-insensitively."""
    text = key.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    host = text.split("/", 1)[0].lower()
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def parse_docker_config(
    data: bytes | str, *, source: str = "docker config"
) -> dict[str, Credentials]:
    """Credentials per normalised registry host from a ``config.json`` document."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(source, f"not valid JSON: {exc.__class__.__name__}") from None
    if not isinstance(doc, dict):
        raise ConfigError(source, "not a JSON object")
    auths = doc.get("auths", {})
    if not isinstance(auths, dict):
        raise ConfigError(f"{source}: auths", "not a JSON object")
    if doc.get("credsStore") or doc.get("credHelpers"):
        log.warning("%s: credsStore/credHelpers are not supported and are ignored", source)
    found: dict[str, Credentials] = {}
    for key, entry in auths.items():
        creds = _entry_credentials(entry, f"{source}: auths.{key}")
        if creds is not None:
            found[normalize_registry_host(key)] = creds
    return found


def _entry_credentials(entry: object, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise ConfigError(where, "not a JSON object")
    for name in ("auth", "username", "password", "identitytoken"):
        if not isinstance(entry.get(name, ""), str):
            raise ConfigError(f"{where}.{name}", "not a string")
    username, password = entry.get("username", ""), entry.get("password", "")
    encoded = entry.get("auth", "")
    if encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError(f"{where}.auth", "not base64 of 'user:password'") from None
        if ":" not in decoded:
            raise ConfigError(f"{where}.auth", "decodes to no 'user:password' pair")
        username, password = decoded.split(":", 1)
    identity = entry.get("identitytoken", "")
    if not (username or password or identity):
        return None
    return Credentials(username=username, password=password, identity_token=identity)


def load_docker_config(path: Path) -> dict[str, Credentials]:
    """Credentials from ``path``; a missing file is no credentials (the optional Secret of the
    DaemonSet may not exist), any other read or parse problem is an error."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        log.warning(
            "registries.docker_config: %s does not exist; pulling without registry credentials",
            path,
        )
        return {}
    except OSError as exc:
        raise ConfigError(
            "registries.docker_config", f"cannot read {path}: {exc.strerror}"
        ) from None
    return parse_docker_config(data, source=str(path))


class CredentialStore:
    """Looks credentials up by registry host: explicit ones first, then config.json.

    A key with a port matches only that port; a key without one matches the host on any port.
    """

    def __init__(
        self,
        explicit: Mapping[str, Credentials] | None = None,
        docker_config: Path | None = None,
    ) -> None:
        loaded = load_docker_config(docker_config) if docker_config is not None else {}
        for key, creds in (explicit or {}).items():
            loaded[normalize_registry_host(key)] = creds
        self._by_host = loaded

    def get(self, host: str) -> Credentials | None:
        host = normalize_registry_host(host)
        found = self._by_host.get(host)
        if found is None and ":" in host:
            found = self._by_host.get(host.rsplit(":", 1)[0])
        return found

    def __repr__(self) -> str:
        return f"CredentialStore(hosts={sorted(self._by_host)})"


# ---------------------------------------------------------------------------------------------
# WWW-Authenticate


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic" | "bearer" | ...
    params: Mapping[str, str]


_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse ``Bearer realm="...",service="...",scope="a,b"`` style challenges (RFC 7235)."""
    challenges: list[Challenge] = []
    rest = header.strip()
    while rest:
        scheme_match = re.match(r"([A-Za-z][A-Za-z0-9_-]*)\s*", rest)
        if scheme_match is None:
            break
        rest = rest[scheme_match.end() :]
        params: dict[str, str] = {}
        while True:
            m = _PARAM_RE.match(rest)
            if m is None:
                break
            quoted, bare = m.group(2), m.group(3)
            params[m.group(1).lower()] = (
                re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
            )
            rest = rest[m.end() :]
        challenges.append(Challenge(scheme_match.group(1).lower(), params))
        rest = rest.lstrip(", ")
    return challenges


# ---------------------------------------------------------------------------------------------
# the handshake


@dataclass
class _Token:
    header: str = field(repr=False)
    expires_at: float


class RegistryAuth:
    """Per-agent auth state for every registry: which hosts want Basic, cached bearer tokens."""

    def __init__(
        self,
        transport: Transport,
        credentials: CredentialStore | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transport = transport
        self._credentials = credentials or CredentialStore()
        self._clock = clock
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._basic_hosts: set[str] = set()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.token_requests = 0

    def authorization(self, host: str, scope: str) -> str | None:
        """The Authorization header to send now, or None to go anonymous."""
        token = self._tokens.get((host, scope))
        if token is not None and token.expires_at > self._clock():
            return token.header
        if host in self._basic_hosts:
            creds = self._credentials.get(host)
            return creds.basic_header() if creds is not None else None
        return None

    async def answer(
        self, host: str, scope: str, www_authenticate: str | None, sent: str | None
    ) -> str:
        """The Authorization header that answers a 401, given the header we had ``sent``."""
        challenges = parse_www_authenticate(www_authenticate or "")
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None:
            return await self._bearer(host, scope, bearer, sent)
        if any(c.scheme == "basic" for c in challenges):
            return self._basic(host, sent)
        raise RegistryAuthError(host, f"401 with no usable challenge ({_schemes(challenges)})")

    def rejected(self, host: str, scope: str, sent: str) -> RegistryAuthError:
        """The error for a 401 to the header ``answer`` just gave (forgetting that answer)."""
        who = self._who(host)
        if sent.startswith("Basic "):
            self._basic_hosts.discard(host)
            return RegistryAuthError(host, f"credentials for {who} rejected (401)")
        self._tokens.pop((host, scope), None)
        return RegistryAuthError(
            host, f"a fresh token for {scope} ({who}) was refused (401): no access to it"
        )

    def _basic(self, host: str, sent: str | None) -> str:
        creds = self._credentials.get(host)
        if creds is None:
            raise RegistryAuthError(host, "requires authentication; no credentials configured")
        header = creds.basic_header()
        if sent == header:
            raise self.rejected(host, "", header)
        self._basic_hosts.add(host)
        return header

    def _who(self, host: str) -> str:
        creds = self._credentials.get(host)
        return f"user {creds.username!r}" if creds is not None else "anonymous access"

    async def _bearer(self, host: str, scope: str, challenge: Challenge, sent: str | None) -> str:
        key = (host, scope)
        async with self._locks.setdefault(key, asyncio.Lock()):
            cached = self._tokens.get(key)
            if cached is not None and cached.header != sent and cached.expires_at > self._clock():
                return cached.header  # another request refreshed it while we waited
            self._tokens.pop(key, None)
            token = await self._fetch_token(host, scope, challenge)
            self._tokens[key] = token
            return token.header

    async def _fetch_token(self, host: str, scope: str, challenge: Challenge) -> _Token:
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryAuthError(host, "bearer challenge has no realm")
        url = URL(realm)
        self._transport.check_url(url, what=f"token realm of registry {host}")
        wanted_scope = challenge.params.get("scope") or scope
        service = challenge.params.get("service", "")
        creds = self._credentials.get(host)
        self.token_requests += 1
        if creds is not None and creds.identity_token:
            resp = await self._transport.request(
                "POST",
                url,
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "service": service,
                    "scope": wanted_scope,
                    "client_id": "cacheagent",
                },
            )
        else:
            query = (
                {"service": service, "scope": wanted_scope} if service else {"scope": wanted_scope}
            )
            headers = {"Authorization": creds.basic_header()} if creds is not None else {}
            resp = await self._transport.request("GET", url.update_query(query), headers=headers)
        async with resp:
            what = f"token service {url.host} for {wanted_scope}"
            if resp.status in (401, 403):
                raise RegistryAuthError(
                    host,
                    f"token service {url.host} refused {self._who(host)} for {wanted_scope} "
                    f"({resp.status})",
                )
            if is_retryable(resp.status):
                raise TransientError(f"{what}: HTTP {resp.status}", resp.headers.get("Retry-After"))
            if resp.status != 200:
                raise RegistryAuthError(host, f"{what} answered HTTP {resp.status}")
            body = await read_bounded(resp, _MAX_TOKEN_RESPONSE, what=what)
        return self._token_from(host, body)

    def _token_from(self, host: str, body: bytes) -> _Token:
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RegistryAuthError(
                host, "token service answered something that is not JSON"
            ) from None
        value = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(value, str) or not value:
            raise RegistryAuthError(host, "token service answered no token")
        lifetime = doc.get("expires_in", DEFAULT_TOKEN_SECONDS)
        if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_SECONDS
        # Renew a little early so that a token does not expire between our check and the request.
        margin = min(30.0, lifetime * 0.1)
        return _Token(header=f"Bearer {value}", expires_at=self._clock() + lifetime - margin)

    def __repr__(self) -> str:
        return f"RegistryAuth(credentials={self._credentials!r}, cached_tokens={len(self._tokens)})"


def _schemes(challenges: list[Challenge]) -> str:
    return ", ".join(c.scheme for c in challenges) or "none"
