"""Just enough of the Hugging Face Hub on 127.0.0.1 for the HF source tests.

Answers, shaped like the real Hub:

* ``GET /api/models/{org}/{name}/revision/{revision}`` -> ``{"id", "sha", "siblings"}``
* ``GET /api/models/{org}/{name}/tree/{revision}?recursive=true`` -> a JSON array of
  ``{"type": "file", "oid", "size", "path", "lfs": {"oid", "size", "pointerSize"}}`` entries
  (``lfs`` only for LFS files), paged with a ``Link: <...>; rel="next"`` header when
  ``page_size`` is set;
* ``GET /{org}/{name}/resolve/{revision}/{path}`` -> the file itself for git files, a 302 to
  ``cdn_url + <sha256>`` for LFS files (the CDN is a separate server, as on the Hub).

With ``token`` set, every request must carry ``Authorization: Bearer <token>`` (401 otherwise),
and unknown repos or revisions answer 404.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from aiohttp import web

from tests.loopback import start_loopback


@dataclass
class HfRepo:
    repo_id: str
    commit: str
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit
    files: dict[str, bytes] = field(default_factory=dict)  # git (non-LFS) files
    lfs_files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class HfServer:
    cdn_url: str = ""  # LFS redirects go to cdn_url + <sha256 hex>
    token: str | None = None
    page_size: int | None = None
    repos: dict[str, HfRepo] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
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

    def _repo(self, request: web.Request) -> tuple[HfRepo, str]:
        self.requests.append((request.path_qs, dict(request.headers.items())))
        if (
            self.token is not None
            and request.headers.get("Authorization") != f"Bearer {self.token}"
        ):
            raise web.HTTPUnauthorized(
                text='{"error":"Invalid credentials in Authorization header"}'
            )
        repo = self.repos.get(f"{request.match_info['org']}/{request.match_info['name']}")
        if repo is None:
            raise web.HTTPNotFound(text='{"error":"Repository not found"}')
        revision = request.match_info["revision"]
        commit = repo.branches.get(revision, revision)
        if commit != repo.commit:
            raise web.HTTPNotFound(text='{"error":"Invalid rev id"}')
        return repo, commit

    async def _revision(self, request: web.Request) -> web.Response:
        repo, commit = self._repo(request)
        siblings = [{"rfilename": p} for p in sorted({*repo.files, *repo.lfs_files})]
        return web.json_response({"id": repo.repo_id, "sha": commit, "siblings": siblings})

    def _entries(self, repo: HfRepo) -> list[dict[str, object]]:
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

    async def _tree(self, request: web.Request) -> web.Response:
        repo, _ = self._repo(request)
        entries = self._entries(repo)
        if self.page_size is None:
            return web.json_response(entries)
        cursor = int(request.query.get("cursor", "0"))
        page = entries[cursor : cursor + self.page_size]
        headers = {}
        if cursor + self.page_size < len(entries):
            nxt = request.url.update_query(cursor=str(cursor + self.page_size))
            headers["Link"] = f'<{nxt}>; rel="next"'
        return web.json_response(page, headers=headers)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo, _ = self._repo(request)
        path = request.match_info["path"]
        if path in repo.files:
            return web.Response(body=repo.files[path])
        if path in repo.lfs_files:
            oid = hashlib.sha256(repo.lfs_files[path]).hexdigest()
            raise web.HTTPFound(location=f"{self.cdn_url}{oid}")
        raise web.HTTPNotFound(text='{"error":"Entry not found"}')

    async def start(self) -> HfServer:
        app = web.Application()
        base = "/api/models/{org}/{name}"
        app.router.add_get(base + "/revision/{revision}", self._revision)
        app.router.add_get(base + "/tree/{revision}", self._tree)
        app.router.add_get("/{org}/{name}/resolve/{revision}/{path:.+}", self._resolve)
        self._runner, self.port = await start_loopback(app, shutdown_timeout=2.0)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
