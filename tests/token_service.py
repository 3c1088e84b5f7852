"""A tiny registry token service (the distribution bearer-token spec) for tests.

``GET /token?service=...&scope=repository:<name>:pull,push`` with optional HTTP basic auth, or
``POST /token`` with an OAuth2 form (``grant_type=refresh_token``, what clients do with a
config.json ``identitytoken``), answers ``{"token", "access_token", "expires_in", "issued_at"}``
with an RS256 JWT whose ``x5c`` header holds the signing certificate, which the registry trusts
via ``rootcertbundle``.
It records every request (``requests``) so tests can count token fetches.
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from tests.certs import sign_jwt
from tests.loopback import start_loopback


@dataclass
class TokenService:
    key: Path
    cert: Path
    service: str = "cacheagent-test-registry"
    issuer: str = "cacheagent-test-issuer"
    users: dict[str, str] = field(default_factory=dict)  # empty: anonymous pulls allowed
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # refresh token -> user
    expires_in: int = 300
    requests: list[dict[str, str]] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def _user(self, request: web.Request) -> str | None:
        """The authenticated user ("" = anonymous), or None when the credentials are wrong."""
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return "" if not self.users else None
        try:
            user, password = base64.b64decode(header[6:]).decode().split(":", 1)
        except ValueError:
            return None
        return user if self.users.get(user) == password else None

    async def _token(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            form = await request.post()
            params = {k: str(v) for k, v in form.items()}
            user = self.refresh_tokens.get(params.get("refresh_token", ""))
            scopes = (
                [params.get("scope", "")] if params.get("grant_type") == "refresh_token" else []
            )
        else:
            params = dict(request.query)
            user = self._user(request)
            scopes = request.query.getall("scope", [])
        self.requests.append({"method": request.method, **params})
        if user is None:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        now = int(time.time())
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": params.get("service", ""),
            "exp": now + self.expires_in + 120,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = await sign_jwt(claims, self.key, self.cert)
        issued = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return web.json_response(
            {
                "token": token,
                "access_token": token,
                "expires_in": self.expires_in,
                "issued_at": issued,
            }
        )

    async def start(self) -> TokenService:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_post("/token", self._token)
        self._runner, self.port = await start_loopback(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
