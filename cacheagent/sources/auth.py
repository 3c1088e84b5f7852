"""The distribution auth handshake (basic and bearer token) with the credentials
``credentials.CredentialStore`` finds (explicit, a Docker ``config.json`` re-read when it
changes, credential helpers).

The flow follows the distribution spec: a request goes out with whatever we already hold for
the registry; a 401 carries ``WWW-Authenticate``; for ``Basic`` we answer with the credentials,
for ``Bearer realm=...,service=...,scope=...`` we ask the realm for a token (HTTP basic with the
credentials, or an OAuth2 refresh-token POST when config.json has an ``identitytoken``) and cache
it per (registry, scope) until ``expires_in`` runs out. A challenge may name several scopes,
space-separated (RFC 6749): each goes as its own ``scope`` query parameter (as docker and
containerd send them; token services read them as a list), or space-joined in the OAuth2 form.
A second 401 right after a fresh answer means the credentials are wrong, reported naming the
registry and user, never the secret.

Secrets never reach a log line, an exception message or a repr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from yarl import URL

from cacheagent.sources.credentials import Credentials, CredentialStore, RegistryAuthError
from cacheagent.sources.retry import is_retryable
from cacheagent.sources.streaming import TransientError, read_bounded
from cacheagent.sources.transport import Transport

log = logging.getLogger(__name__)

#: Tokens live this long when the token service does not say (the spec's default).
DEFAULT_TOKEN_SECONDS = 60
_MAX_TOKEN_RESPONSE = 1 << 20


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

    async def authorization(self, host: str, scope: str) -> str | None:
        """The Authorization header to send now, or None to go anonymous."""
        token = self._tokens.get((host, scope))
        if token is not None and token.expires_at > self._clock():
            return token.header
        if host in self._basic_hosts:
            creds = await self._credentials.lookup(host)
            return creds.basic_header() if creds is not None else None
        return None

    async def answer(
        self, host: str, scope: str, www_authenticate: str | None, sent: str | None
    ) -> str:
        """The Authorization header that answers a 401, given the header we had ``sent``."""
        challenges = parse_www_authenticate(www_authenticate or "")
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        creds = await self._credentials.lookup(host)
        try:
            if bearer is not None:
                return await self._bearer(host, scope, bearer, sent, creds)
            if any(c.scheme == "basic" for c in challenges):
                return self._basic(host, sent, creds)
        except RegistryAuthError:
            self._credentials.forget(host)  # what we hold did not do: look again next time
            raise
        raise RegistryAuthError(host, f"401 with no usable challenge ({_schemes(challenges)})")

    def rejected(self, host: str, scope: str, sent: str, detail: str = "") -> RegistryAuthError:
        """The error for a 401 to the header ``answer`` just gave (forgetting that answer);
        ``detail`` is what the registry said."""
        who = self._who(host)
        said = f": {detail}" if detail else ""
        self._credentials.forget(host)
        if sent.startswith("Basic "):
            self._basic_hosts.discard(host)
            return RegistryAuthError(host, f"credentials for {who} rejected (401){said}")
        self._tokens.pop((host, scope), None)
        return RegistryAuthError(
            host, f"a fresh token for {scope} ({who}) was refused (401): no access to it{said}"
        )

    def _basic(self, host: str, sent: str | None, creds: Credentials | None) -> str:
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

    async def _bearer(
        self,
        host: str,
        scope: str,
        challenge: Challenge,
        sent: str | None,
        creds: Credentials | None,
    ) -> str:
        key = (host, scope)
        async with self._locks.setdefault(key, asyncio.Lock()):
            cached = self._tokens.get(key)
            if cached is not None and cached.header != sent and cached.expires_at > self._clock():
                return cached.header  # another request refreshed it while we waited
            self._tokens.pop(key, None)
            token = await self._fetch_token(host, scope, challenge, creds)
            self._tokens[key] = token
            return token.header

    async def _fetch_token(
        self, host: str, scope: str, challenge: Challenge, creds: Credentials | None
    ) -> _Token:
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryAuthError(host, "bearer challenge has no realm")
        url = URL(realm)
        self._transport.check_url(url, what=f"token realm of registry {host}")
        scopes = challenge.params.get("scope", "").split() or [scope]
        wanted_scope = " ".join(scopes)
        service = challenge.params.get("service", "")
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
            query = [("service", service)] if service else []
            query += [("scope", s) for s in scopes]
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
                raise TransientError.from_status(resp.status, resp.headers, what)
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
