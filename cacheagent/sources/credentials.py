"""Registry credentials: explicit ones, a Docker ``config.json`` that may change under us, and
Docker credential helpers.

``config.json`` is what a Kubernetes ``dockerconfigjson`` Secret holds. The Secret is mounted,
and the kubelet swaps the file when the Secret changes (ECR tokens last 12 hours, cloud access
tokens one hour, so something rotates it): the file is checked at most once per
``recheck_seconds`` (inode, size, mtime), and at once after a registry rejected our credentials,
and read again when it changed. A changed file that no
longer parses is logged and the credentials read before are kept.

Lookup order for a registry host: explicit credentials; the helper ``credHelpers`` names for the
host; the ``auths`` entry; the ``credsStore`` helper. A helper is the program
``docker-credential-<name>`` on ``PATH``, run as ``docker-credential-<name> get`` with the
registry on stdin; it answers ``{"ServerURL", "Username", "Secret"}`` (Username ``<token>``
means Secret is an identity token). Its answer is kept ``helper_cache_seconds`` and dropped when
the registry rejects it. It runs with the agent's environment (the cloud SDKs the helpers call
find their credentials there) and a timeout.

Secrets never reach a log line, an exception message or a repr.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cacheagent.errors import ConfigError, SourceError

log = logging.getLogger(__name__)
_V = TypeVar("_V")

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
_DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"
_HELPER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAX_HELPER_OUTPUT = 1 << 20
_NOT_FOUND_TEXT = "credentials not found"


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


@dataclass(frozen=True)
class DockerConfig:
    """What cacheagent reads from a ``config.json``: inline credentials and helper names."""

    auths: Mapping[str, Credentials] = field(default_factory=dict)
    cred_helpers: Mapping[str, str] = field(default_factory=dict)  # host -> helper suffix
    creds_store: str = ""


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
    """Inline credentials per normalised registry host from a ``config.json`` document."""
    return dict(parse_docker_config_file(data, source=source).auths)


def parse_docker_config_file(data: bytes | str, *, source: str = "docker config") -> DockerConfig:
    """The whole of a ``config.json`` cacheagent uses, every field checked with its key named."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(source, f"not valid JSON: {exc.__class__.__name__}") from None
    if not isinstance(doc, dict):
        raise ConfigError(source, "not a JSON object")
    auths = doc.get("auths", {})
    if not isinstance(auths, dict):
        raise ConfigError(f"{source}: auths", "not a JSON object")
    found: dict[str, Credentials] = {}
    for key, entry in auths.items():
        creds = _entry_credentials(entry, f"{source}: auths.{key}")
        if creds is not None:
            found[normalize_registry_host(key)] = creds
    helpers = doc.get("credHelpers", {})
    if not isinstance(helpers, dict):
        raise ConfigError(f"{source}: credHelpers", "not a JSON object")
    by_host = {
        normalize_registry_host(host): _helper_name(name, f"{source}: credHelpers.{host}")
        for host, name in helpers.items()
    }
    store = doc.get("credsStore", "")
    store = _helper_name(store, f"{source}: credsStore") if store else ""
    return DockerConfig(auths=found, cred_helpers=by_host, creds_store=store)


def _helper_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not _HELPER_NAME_RE.match(name):
        raise ConfigError(where, f"not a credential helper name (letters, digits, '._-'): {name!r}")
    return name


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
    return dict(_read_docker_config(path).auths)


def _read_docker_config(path: Path) -> DockerConfig:
    """The config at ``path``; a missing file is no credentials (the optional Secret of the
    DaemonSet may not exist, or not yet: it is picked up when it appears), any other read or
    parse problem is an error."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        log.warning(
            "registries.docker_config: %s does not exist; pulling without registry credentials",
            path,
        )
        return DockerConfig()
    except OSError as exc:
        raise ConfigError(
            "registries.docker_config", f"cannot read {path}: {exc.strerror}"
        ) from None
    return parse_docker_config_file(data, source=str(path))


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _from_host(keyed: Mapping[str, _V], host: str) -> _V | None:
    """A key with a port matches only that port; a key without one, the host on any port."""
    found = keyed.get(host)
    if found is None and ":" in host:
        found = keyed.get(host.rsplit(":", 1)[0])
    return found


class CredentialStore:
    """Looks credentials up by registry host (see the module docstring for the order)."""

    def __init__(
        self,
        explicit: Mapping[str, Credentials] | None = None,
        docker_config: Path | None = None,
        *,
        recheck_seconds: float = 1.0,
        helper_timeout: float = 30.0,
        helper_cache_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._explicit = {normalize_registry_host(k): v for k, v in (explicit or {}).items()}
        self._path = docker_config
        self._recheck = recheck_seconds
        self._helper_timeout = helper_timeout
        self._helper_ttl = helper_cache_seconds
        self._clock = clock
        self._config = DockerConfig()
        self._stamp: tuple[int, int, int, int] | None = None
        self._checked_at = clock()
        self._helped: dict[str, tuple[float, Credentials | None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.reloads = 0
        if docker_config is not None:
            self._stamp = _stamp(docker_config)
            self._config = _read_docker_config(docker_config)

    def get(self, host: str) -> Credentials | None:
        """What is known now without running anything (a helper's last answer included)."""
        host = normalize_registry_host(host)
        found = _from_host(self._explicit, host)
        if found is None and self._helper_for(host) is not None:
            cached = self._helped.get(host)
            return cached[1] if cached is not None else None
        return found or _from_host(self._config.auths, host)

    async def lookup(self, host: str) -> Credentials | None:
        """The credentials to use for ``host`` now: the config re-read if it changed, a helper
        run if one is configured and its last answer is stale."""
        host = normalize_registry_host(host)
        await self._maybe_reload()
        found = _from_host(self._explicit, host)
        if found is not None:
            return found
        helper = self._helper_for(host)
        if helper is None:
            return _from_host(self._config.auths, host)
        async with self._locks.setdefault(host, asyncio.Lock()):
            cached = self._helped.get(host)
            if cached is not None and cached[0] > self._clock():
                return cached[1]
            creds = await run_helper(helper, host, limit_seconds=self._helper_timeout)
            self._helped[host] = (self._clock() + self._helper_ttl, creds)
            return creds

    def forget(self, host: str) -> None:
        """The registry rejected what we sent: drop a helper's answer and look at the config
        file again on the next lookup, whenever it was last checked."""
        self._helped.pop(normalize_registry_host(host), None)
        self._checked_at = float("-inf")

    def _helper_for(self, host: str) -> str | None:
        """The helper for ``host``: credHelpers first; credsStore when auths has nothing."""
        named = _from_host(self._config.cred_helpers, host)
        if named is not None:
            return named
        if _from_host(self._config.auths, host) is None and self._config.creds_store:
            return self._config.creds_store
        return None

    async def _maybe_reload(self) -> None:
        path = self._path
        if path is None or self._clock() - self._checked_at < self._recheck:
            return
        self._checked_at = self._clock()
        stamp = await asyncio.to_thread(_stamp, path)
        if stamp == self._stamp:
            return
        try:
            config = await asyncio.to_thread(_read_docker_config, path)
        except ConfigError as exc:
            log.warning("%s changed but cannot be used (%s); keeping the previous one", path, exc)
            return
        self._stamp, self._config = stamp, config
        self._helped.clear()
        self.reloads += 1
        log.info("registry credentials re-read from %s (it changed)", path)

    def __repr__(self) -> str:
        hosts = sorted({*self._explicit, *self._config.auths})
        return f"CredentialStore(hosts={hosts}, helpers={sorted(self._config.cred_helpers)})"


async def run_helper(name: str, host: str, *, limit_seconds: float) -> Credentials | None:
    """``docker-credential-<name> get`` for ``host``: its credentials, or None when it has none."""
    program = f"docker-credential-{name}"
    server = _DOCKER_HUB_SERVER_URL if host == DOCKER_HUB else host
    try:
        proc = await asyncio.create_subprocess_exec(
            program,
            "get",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise RegistryAuthError(
            host, f"credential helper {program} is not on PATH ({os.environ.get('PATH', '')})"
        ) from None
    try:
        async with asyncio.timeout(limit_seconds):
            out, err = await proc.communicate(server.encode())
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RegistryAuthError(
            host, f"credential helper {program} ran over {limit_seconds:g} s"
        ) from None
    said = (out + err).decode(errors="replace")
    if proc.returncode != 0:
        if _NOT_FOUND_TEXT in said.lower():
            return None
        first = next((line for line in said.splitlines() if line.strip()), "")[:200]
        raise RegistryAuthError(
            host, f"credential helper {program} failed (exit {proc.returncode}): {first}"
        )
    return _helper_answer(out[:_MAX_HELPER_OUTPUT], program, host)


def _helper_answer(out: bytes, program: str, host: str) -> Credentials | None:
    try:
        doc = json.loads(out)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RegistryAuthError(host, f"credential helper {program} answered non-JSON") from None
    if not isinstance(doc, dict):
        raise RegistryAuthError(host, f"credential helper {program} answered no JSON object")
    username, secret = doc.get("Username", ""), doc.get("Secret", "")
    if not isinstance(username, str) or not isinstance(secret, str):
        raise RegistryAuthError(host, f"credential helper {program}: Username/Secret not strings")
    if not secret:
        return None
    if username == "<token>":
        return Credentials(username=username, identity_token=secret)
    return Credentials(username=username, password=secret)
