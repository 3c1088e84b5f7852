"""Just enough of the Hugging Face Hub on 127.0.0.1 for the HF source tests, behaving as the
real Hub does where our client depends on it.

Answers, shaped like the real Hub:

* ``GET /api/models/{repo}/revision/{revision}`` -> ``{"id", "sha", "siblings"}``; ``repo`` is
  ``org/name`` or a single name (``gpt2``), ``revision`` arrives percent-encoded
  (``refs%2Fpr%2F1``), as huggingface_hub sends it;
* ``GET /api/models/{repo}/tree/{revision}?recursive=true`` -> a JSON array of
  ``{"type": "file", "oid", "size", "path", "lfs": {"oid", "size", "pointerSize"}}`` entries
  (``lfs`` only for LFS files), paged with a ``Link: <...>; rel="next"`` header when
  ``page_size`` is set (pointing at ``page_host`` when given: a mirror whose links name another
  host);
* ``GET|HEAD /{repo}/resolve/{revision}/{path}`` -> the file itself for git files, a 302 to the
  CDN for LFS files: a presigned URL valid ``url_lifetime`` seconds when the CDN has a presign
  secret (as the Hub's CDN URLs are), else a plain one.

Like the Hub: with ``compress`` (the default) JSON answers and git files are gzipped for a
client whose ``Accept-Encoding`` admits gzip; errors carry ``X-Error-Code``/``X-Error-Message``
(``RepoNotFound`` as 401 without a token, ``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``
for a gated repo the token has not been granted); ``throttle(times, seconds)`` makes the next
``times`` resolver requests answer 429 with the Hub's ``RateLimit: "resolvers";r=0;t=<seconds>``
and ``RateLimit-Policy`` headers (the Hub limits that path per five-minute window; a count, not a
clock, keeps the tests deterministic). With ``token`` set, every request must carry
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from aiohttp import web

from tests.fault_server import FaultServer, accepts_gzip
from tests.loopback import start_loopback

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_API_RE = re.compile(rf"^/api/models/{_REPO}/(?P<kind>revision|tree)/(?P<rev>[^/]+)$")
_RESOLVE_RE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass
class HfRepo:
    repo_id: str
    commit: str
    branches: dict[str, str] = field(default_factory=dict)  # branch/tag/ref -> commit
    files: dict[str, bytes] = field(default_factory=dict)  # git (non-LFS) files
    lfs_files: dict[str, bytes] = field(default_factory=dict)
    gated: bool = False  # only tokens in HfServer.granted may read it


class HubError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class HfServer:
    cdn: FaultServer | None = None  # LFS redirects go to the CDN's lfs/<sha256 hex>
    token: str | None = None
    granted: set[str] = field(default_factory=set)  # tokens allowed into gated repos
    page_size: int | None = None
    page_host: str | None = None  # host:port the next-page links point at (a mirror's origin)
    compress: bool = True
    url_lifetime: float = 3600.0
    throttled: tuple[int, int] = (0, 0)  # (resolver requests still to refuse, t= seconds)
    repos: dict[str, HfRepo] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    rate_limited: int = 0  # 429s answered
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, repo: HfRepo) -> None:
        self.repos[repo.repo_id] = repo

    def throttle(self, times: int, seconds: int) -> None:
        self.throttled = (times, seconds)

    def paths(self, method: str | None = None) -> list[str]:
        """The path (and query) of every request, in order, optionally only one method's."""
        return [p for m, p, _ in self.requests if method is None or m == method]

    def resolves(self) -> list[str]:
        return [p for p in self.paths() if "/resolve/" in p]

    # -- request handling -----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs, dict(request.headers.items())))
        try:
            if (
                self.token is not None
                and request.headers.get("Authorization") != f"Bearer {self.token}"
            ):
                raise HubError(401, "", "Invalid credentials in Authorization header")
            api = _API_RE.match(request.raw_path.split("?", 1)[0])
            if api is not None:
                repo, commit = self._repo(request, api["repo"], api["rev"])
                if api["kind"] == "revision":
                    return self._json(request, self._revision(repo, commit))
                return self._tree(request, repo)
            resolve = _RESOLVE_RE.match(request.raw_path.split("?", 1)[0])
            if resolve is not None:
                limited = self._rate_limit()
                if limited is not None:
                    return limited
                repo, _ = self._repo(request, resolve["repo"], resolve["rev"])
                return self._resolve(request, repo, unquote(resolve["path"]))
            raise HubError(404, "", "Not Found")
        except HubError as exc:
            headers = {"X-Error-Message": exc.message}
            if exc.code:
                headers["X-Error-Code"] = exc.code
            body = json.dumps({"error": exc.message})
            return web.Response(
                status=exc.status, text=body, content_type="application/json", headers=headers
            )

    def _repo(self, request: web.Request, repo_id: str, raw_revision: str) -> tuple[HfRepo, str]:
        repo = self.repos.get(repo_id)
        authenticated = request.headers.get("Authorization", "").startswith("Bearer ")
        if repo is None:
            # The Hub cannot tell "private" from "absent" to a stranger: 401 without a token.
            raise HubError(
                404 if authenticated else 401,
                "RepoNotFound",
                "Repository Not Found for url: ... Please make sure you specified the correct "
                "`repo_id` and `repo_type`.",
            )
        if repo.gated:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if token not in self.granted:
                raise HubError(
                    403 if authenticated else 401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted and you are not in the "
                    f"authorized list. Visit https://huggingface.co/{repo_id} to ask for access.",
                )
        revision = unquote(raw_revision)
        commit = repo.branches.get(revision, revision)
        if commit != repo.commit:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, commit

    def _rate_limit(self) -> web.Response | None:
        times, seconds = self.throttled
        if times <= 0:
            return None
        self.throttled = (times - 1, seconds)
        self.rate_limited += 1
        return web.Response(
            status=429,
            text="We had to rate limit you.",
            headers={
                "RateLimit": f'"resolvers";r=0;t={seconds}',
                "RateLimit-Policy": '"fixed window";"resolvers";q=3000;w=300',
            },
        )

    def _json(
        self, request: web.Request, doc: object, headers: dict[str, str] | None = None
    ) -> web.Response:
        return self._body(request, json.dumps(doc).encode(), "application/json", headers)

    def _body(
        self,
        request: web.Request,
        data: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        sent = dict(headers or {})
        if self.compress and accepts_gzip(request.headers.get("Accept-Encoding")):
            data = gzip.compress(data, mtime=0)
            sent["Content-Encoding"] = "gzip"
        return web.Response(body=data, content_type=content_type, headers=sent)

    @staticmethod
    def _revision(repo: HfRepo, commit: str) -> dict[str, object]:
        siblings = [{"rfilename": p} for p in sorted({*repo.files, *repo.lfs_files})]
        return {"id": repo.repo_id, "sha": commit, "siblings": siblings}

    @staticmethod
    def _entries(repo: HfRepo) -> list[dict[str, object]]:
        entries: list[dict[str, object]] = []
        for path, data in sorted(repo.files.items()):
            git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            entries.append({"type": "file", "oid": git_oid, "size": len(data), "path": path})
        for path, data in sorted(repo.lfs_files.items()):
            entries.append(
                {
                    "type": "file",
                    "oid": hashlib.sha1(path.encode()).hexdigest(),
                    "size": len(data),
                    "path": path,
                    "lfs": {
                        "oid": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "pointerSize": 134,
                    },
                }
            )
        dirs = {p.rsplit("/", 1)[0] for p in [*repo.files, *repo.lfs_files] if "/" in p}
        entries.extend(
            {"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)
        )
        return entries

    def _tree(self, request: web.Request, repo: HfRepo) -> web.Response:
        entries = self._entries(repo)
        if self.page_size is None:
            return self._json(request, entries)
        cursor = int(request.query.get("cursor", "0"))
        page = entries[cursor : cursor + self.page_size]
        headers = {}
        if cursor + self.page_size < len(entries):
            nxt = request.url.update_query(cursor=str(cursor + self.page_size))
            if self.page_host is not None:
                host, _, port = self.page_host.rpartition(":")
                nxt = nxt.with_host(host).with_port(int(port))
            headers["Link"] = f'<{nxt}>; rel="next"'
        return self._json(request, page, headers)

    def _resolve(self, request: web.Request, repo: HfRepo, path: str) -> web.Response:
        if path in repo.files:
            return self._body(request, repo.files[path], "text/plain")
        if path in repo.lfs_files and self.cdn is not None:
            name = f"lfs/{hashlib.sha256(repo.lfs_files[path]).hexdigest()}"
            if self.cdn.presign_secret is not None:
                location = self.cdn.presign(name, self.url_lifetime)
            else:
                location = self.cdn.url(name)
            size = str(len(repo.lfs_files[path]))
            return web.Response(status=302, headers={"Location": location, "X-Linked-Size": size})
        raise HubError(404, "EntryNotFound", f"{path} does not exist on this revision")

    async def start(self) -> HfServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.port = await start_loopback(app, shutdown_timeout=2.0)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
