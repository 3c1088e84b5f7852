"""A Hugging Face Hub model repository as a model source (``hf://org/name@revision``).

Resolution asks the Hub API (``endpoint`` is configurable, for mirrors and tests):

* ``GET {endpoint}/api/models/{repo}/revision/{revision}`` gives the commit sha the revision
  points at (a 40-hex revision must come back unchanged);
* ``GET {endpoint}/api/models/{repo}/tree/{commit}?recursive=true`` (following ``Link:
  rel="next"`` pages) lists every file with its size, and for LFS files ``lfs.oid``: the file's
  sha256, which becomes its blob digest.

Non-LFS files have only a git blob sha1, which the store cannot verify against. Decision: such
files (configs, tokenizers, READMEs; the Hub caps them at a few MB) are downloaded during resolve,
at most ``small_file_max_bytes`` each, and hashed with sha256; that digest goes in the manifest,
and the bytes stay in a bounded memory cache so the pull that follows need not download them
again. A bigger non-LFS file is refused with its path named.

The model's manifest is synthesized: canonical JSON naming the repo, the commit and every file
(path, digest, size, sorted by path). Its sha256 is the model digest, so one commit always maps
to one digest, whatever branch or tag named it.

Files: ``{endpoint}/{repo}/resolve/{commit}/{path}`` is asked once per file (a ``HEAD`` that does
not follow the redirect, as huggingface_hub does); every range of the file is then fetched from
where it redirects (the CDN's presigned URL). The Hub rate-limits the resolver path per
five-minute window, and a 140 GB model fetched in 16 MiB ranges would otherwise ask it about
8,400 times. The file is resolved again only when the presigned URL is about to expire (its
``Expires``/``X-Amz-*`` query) or the CDN refuses it (401/403). Same-host redirects (a renamed
repo) are followed while resolving.

The token goes only to the endpoint's own host: never to the CDN, nor to another host a mirror's
pagination links name (``HF_ENDPOINT``-style mirrors may page through the Hub itself, which is
followed, anonymously). Repo ids may be single names (``hf://gpt2@main``) and revisions may hold
slashes (``refs/pr/1``: percent-encoded in API paths). The Hub's ``X-Error-Code`` answers become
errors a user can act on (see hf_protocol.py); 429s wait as the Hub's ``RateLimit`` header asks
(see retry.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from cacheagent.digest import is_digest, sha256_digest
from cacheagent.errors import ConfigError, SizeMismatchError, SourceError
from cacheagent.refs import HfRef, ModelRef
from cacheagent.sources.base import BlobRef, Layer, ResolvedModel
from cacheagent.sources.hf_protocol import HfAccessError, hub_error, presigned_expiry
from cacheagent.sources.http import canonical_json
from cacheagent.sources.retry import RetryPolicy
from cacheagent.sources.streaming import (
    BlobHomes,
    StreamingSource,
    raise_for_status,
    read_bounded,
    resolve_span,
)
from cacheagent.sources.transport import Transport, host_port
from cacheagent.store.paths import safe_relpath

HF_ARTIFACT_TYPE = "application/vnd.cacheagent.hf.model.v1+json"
FILE_MEDIA_TYPE = "application/octet-stream"
DEFAULT_ENDPOINT = "https://huggingface.co"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_MAX_API_BYTES = 32 << 20
_MAX_TREE_PAGES = 1000
_MAX_FILES = 100_000
_SMALL_DOWNLOADS_AT_ONCE = 8
_MAX_CACHED_COMMITS = 64
_MAX_LOCATIONS = 4096
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: A presigned URL this close to its expiry is resolved again before use: a range must finish.
EXPIRY_MARGIN_SECONDS = 60.0


@dataclass(frozen=True)
class HfOptions:
    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = field(default=None, repr=False)
    small_file_max_bytes: int = 16 << 20
    small_cache_bytes: int = 64 << 20
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    chunk_bytes: int = 1 << 20


def read_token_file(path: Path) -> str:
    """The token in ``hf.token_file`` (whitespace trimmed); the error never shows the token."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError("hf.token_file", f"cannot read {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError("hf.token_file", f"{path} is empty")
    return token


@dataclass(frozen=True)
class HfFile:
    path: str
    digest: str
    size: int


@dataclass(frozen=True)
class _Home:
    repo_id: str
    commit: str
    path: str


@dataclass(frozen=True)
class _Location:
    """Where a file's bytes are fetched from, and until when (Unix time) that URL works."""

    url: URL
    expires_at: float | None


class _SmallFiles:
    """Bytes of non-LFS files hashed during resolve, bounded in total (oldest dropped)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._total = 0
        self._data: OrderedDict[str, bytes] = OrderedDict()

    def put(self, digest: str, data: bytes) -> None:
        if digest in self._data or len(data) > self._limit:
            return
        self._data[digest] = data
        self._total += len(data)
        while self._total > self._limit:
            _, dropped = self._data.popitem(last=False)
            self._total -= len(dropped)

    def get(self, digest: str) -> bytes | None:
        return self._data.get(digest)


class HfSource(StreamingSource):
    """Resolves Hub revisions to commits and fetches their files."""

    kind = "hf"

    def __init__(
        self,
        transport: Transport | None = None,
        *,
        options: HfOptions | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options or HfOptions()
        super().__init__(
            transport, retry=self.options.retry, chunk_bytes=self.options.chunk_bytes, rng=rng
        )
        self.endpoint = URL(self.options.endpoint.rstrip("/"))
        self.transport.check_url(self.endpoint, what="hf.endpoint")
        self.origin = host_port(self.endpoint)
        self._homes: BlobHomes[_Home] = BlobHomes()
        self._small = _SmallFiles(self.options.small_cache_bytes)
        self._commits: OrderedDict[tuple[str, str], tuple[HfFile, ...]] = OrderedDict()
        self._locations: OrderedDict[str, _Location] = OrderedDict()
        self._locating: dict[str, asyncio.Lock] = {}  # one resolve per file at a time
        self.wall_clock = time.time  # presigned URLs expire by the wall clock

    def __repr__(self) -> str:
        token = "set" if self.options.token else "none"
        return f"HfSource(endpoint={str(self.endpoint)!r}, token={token})"

    # -- resolve --------------------------------------------------------------------------------

    async def resolve(self, ref: ModelRef) -> ResolvedModel:
        if not isinstance(ref, HfRef):
            raise SourceError(f"the hf source cannot resolve {ref} (a {ref.kind} ref)")
        commit = await self._commit_of(ref)
        files = self._commits.get((ref.repo_id, commit))
        if files is None:
            files = await self._list_files(ref.repo_id, commit)
            self._commits[(ref.repo_id, commit)] = files
            while len(self._commits) > _MAX_CACHED_COMMITS:
                self._commits.popitem(last=False)
        manifest = canonical_json(
            {
                "mediaType": HF_ARTIFACT_TYPE,
                "repo": ref.repo_id,
                "commit": commit,
                "files": [{"path": f.path, "digest": f.digest, "size": f.size} for f in files],
            }
        )
        for f in files:
            self._homes.remember(f.digest, _Home(ref.repo_id, commit, f.path))
        return ResolvedModel(
            ref=ref,
            manifest_digest=sha256_digest(manifest),
            manifest=manifest,
            layers=tuple(
                Layer(BlobRef(f.digest, f.size, FILE_MEDIA_TYPE), f.path, "raw") for f in files
            ),
            artifact_type=HF_ARTIFACT_TYPE,
        )

    async def _commit_of(self, ref: HfRef) -> str:
        url = self._url(f"api/models/{ref.repo_id}/revision/{quote(ref.revision, safe='')}")
        doc, _ = await self._get_json(url, f"hf://{ref.repo_id}@{ref.revision}")
        commit = doc.get("sha") if isinstance(doc, dict) else None
        if not isinstance(commit, str) or not _COMMIT_RE.match(commit):
            raise SourceError(f"{self.origin}: hf://{ref.repo_id}@{ref.revision}: no commit sha")
        if _COMMIT_RE.match(ref.revision) and commit != ref.revision:
            raise SourceError(
                f"{self.origin}: hf://{ref.repo_id}@{ref.revision}: "
                f"the Hub answered commit {commit}"
            )
        return commit

    async def _list_files(self, repo_id: str, commit: str) -> tuple[HfFile, ...]:
        what = f"file list of hf://{repo_id}@{commit}"
        url: URL | None = self._url(f"api/models/{repo_id}/tree/{commit}").with_query(
            recursive="true"
        )
        entries: list[Mapping[str, Any]] = []
        for _ in range(_MAX_TREE_PAGES):
            if url is None:
                break
            page, next_url = await self._get_json(url, what)
            if not isinstance(page, list):
                raise SourceError(f"{self.origin}: {what}: not a JSON array")
            entries.extend(e for e in page if isinstance(e, dict) and e.get("type") == "file")
            if len(entries) > _MAX_FILES:
                raise SourceError(f"{self.origin}: {what}: more than {_MAX_FILES} files")
            url = next_url
        else:
            raise SourceError(f"{self.origin}: {what}: more than {_MAX_TREE_PAGES} pages")
        if not entries:
            raise SourceError(f"{self.origin}: {what}: the repository has no files")
        files = sorted(await self._describe(repo_id, commit, entries), key=lambda f: f.path)
        for before, after in itertools.pairwise(files):
            if before.path == after.path:
                raise SourceError(f"{self.origin}: {what}: lists {after.path!r} twice")
        return tuple(files)

    async def _describe(
        self, repo_id: str, commit: str, entries: list[Mapping[str, Any]]
    ) -> list[HfFile]:
        """LFS files as listed; git files downloaded and hashed (a few at a time)."""
        files: list[HfFile] = []
        small: list[tuple[str, int]] = []
        for entry in entries:
            path, lfs = _entry_path(entry), entry.get("lfs")
            if isinstance(lfs, dict):
                files.append(_lfs_file(path, lfs))
            else:
                small.append((path, self._small_size(repo_id, commit, path, entry.get("size"))))
        gate = asyncio.Semaphore(_SMALL_DOWNLOADS_AT_ONCE)

        async def one(path: str, size: int) -> HfFile:
            async with gate:
                return await self._hash_small(repo_id, commit, path, size)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(path, size)) for path, size in small]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return files + [task.result() for task in tasks]

    def _small_size(self, repo_id: str, commit: str, path: str, size: object) -> int:
        """The size of a git (non-LFS) file, which must be small enough to hash at resolve."""
        what = f"hf://{repo_id}@{commit} file {path!r}"
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise SourceError(f"{self.origin}: {what}: bad size {size!r}")
        limit = self.options.small_file_max_bytes
        if size > limit:
            raise SourceError(
                f"{self.origin}: {what} is {size} bytes, not in LFS, and over the {limit}-byte "
                "limit for files hashed at resolve"
            )
        return size

    async def _hash_small(self, repo_id: str, commit: str, path: str, size: int) -> HfFile:
        what = f"hf://{repo_id}@{commit} file {path!r}"
        url = self._file_url(repo_id, commit, path)

        async def attempt() -> bytes:
            resp = await self._get(url, {})
            async with resp:
                self._check_status(resp, what)
                return await read_bounded(resp, size, what=what)

        data = await self._retrying(attempt, what=what, origin=self.origin)
        if len(data) != size:
            raise SizeMismatchError(what, size, len(data))
        digest = sha256_digest(data)
        self._small.put(digest, data)
        return HfFile(path, digest, size)

    # -- fetch ----------------------------------------------------------------------------------

    async def fetch(
        self, blob: BlobRef, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        home = self._homes.find(blob, "hf")
        cached = self._small.get(blob.digest)
        if cached is not None and len(cached) == blob.size:
            stop = resolve_span(blob, start, end)
            if stop > start:
                yield cached[start:stop]
            return
        what = f"hf://{home.repo_id}@{home.commit} file {home.path!r}"

        async def open_response(headers: Mapping[str, str]) -> aiohttp.ClientResponse:
            url = await self._location(home, blob.digest)
            resp = await self._get(url, headers)
            if resp.status in (401, 403) and not self._is_endpoint(url):
                resp.release()  # the CDN refused the presigned URL: expired or revoked
                url = await self._location(home, blob.digest, stale=url)
                resp = await self._get(url, headers)
            if resp.status in (401, 403):
                resp.release()
                self._check_status(resp, what)
            return resp

        async with contextlib.aclosing(
            self._stream(open_response, blob, start, end, self.origin)
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _location(self, home: _Home, digest: str, *, stale: URL | None = None) -> URL:
        """Where to fetch ``home`` from: resolved once, again only when it is about to expire
        or is ``stale`` (refused), unless another fetch already replaced it. Concurrent ranges
        of one file wait for one resolve; other files never wait for it (a 429 may be long)."""
        usable = self._usable(digest, stale)
        if usable is not None:
            return usable
        lock = self._locating.setdefault(digest, asyncio.Lock())
        try:
            async with lock:
                usable = self._usable(digest, stale)
                if usable is not None:
                    return usable
                found = await self._resolve_file(home)
                self._locations[digest] = found
                self._locations.move_to_end(digest)
                while len(self._locations) > _MAX_LOCATIONS:
                    self._locations.popitem(last=False)
                return found.url
        finally:
            if not lock.locked():
                self._locating.pop(digest, None)

    def _usable(self, digest: str, stale: URL | None) -> URL | None:
        cached = self._locations.get(digest)
        if cached is None or cached.url == stale:
            return None
        deadline = cached.expires_at
        if deadline is not None and deadline - self.wall_clock() < EXPIRY_MARGIN_SECONDS:
            return None
        return cached.url

    async def _resolve_file(self, home: _Home) -> _Location:
        """One resolver request (plus same-host redirects): where the file's bytes live."""
        what = f"hf://{home.repo_id}@{home.commit} file {home.path!r}"

        async def attempt() -> _Location:
            url = self._file_url(home.repo_id, home.commit, home.path)
            for _ in range(self.transport.options.max_redirects + 1):
                resp = await self.transport.request(
                    "HEAD",
                    url,
                    headers={**self._headers(url), "Connection": "close"},
                    follow_redirects=False,
                )
                resp.close()  # not pooled: bytes sent after a HEAD would poison the connection
                location = resp.headers.get("Location")
                if resp.status not in _REDIRECTS or not location:
                    self._check_status(resp, what)
                    return _Location(url, None)
                url = url.join(URL(location, encoded=True))
                if not self._is_endpoint(url):
                    self.transport.check_url(url, what=f"{what}: download URL")
                    return _Location(url, presigned_expiry(url))
            raise SourceError(f"{self.origin}: {what}: too many redirects")

        return await self._retrying(attempt, what=what, origin=self.origin)

    # -- HTTP helpers ---------------------------------------------------------------------------

    def _url(self, path: str) -> URL:
        return URL(f"{self.endpoint}/{path}", encoded=True)

    def _file_url(self, repo_id: str, commit: str, path: str) -> URL:
        return self._url(f"{repo_id}/resolve/{commit}/{quote(path)}")

    def _is_endpoint(self, url: URL) -> bool:
        return (url.scheme, host_port(url)) == (self.endpoint.scheme, self.origin)

    def _headers(self, url: URL) -> dict[str, str]:
        """The token, for the endpoint's own host only."""
        token = self.options.token
        return {"Authorization": f"Bearer {token}"} if token and self._is_endpoint(url) else {}

    async def _get(self, url: URL, headers: Mapping[str, str]) -> aiohttp.ClientResponse:
        return await self.transport.request("GET", url, headers={**headers, **self._headers(url)})

    def _check_status(self, resp: aiohttp.ClientResponse, what: str) -> None:
        if 200 <= resp.status < 300:
            return
        known = hub_error(
            resp.status,
            resp.headers,
            what=what,
            origin=self.origin,
            token_configured=bool(self.options.token),
        )
        if known is not None:
            raise known
        if resp.status in (401, 403):
            hint = "the token was refused" if self.options.token else "no hf token is configured"
            raise HfAccessError(
                f"{self.origin}: {what}: access denied ({resp.status}): the repo is private or "
                f"gated, or does not exist ({hint}; see hf.token_file)"
            )
        raise_for_status(resp.status, resp.headers, what=what, origin=self.origin)

    async def _get_json(self, url: URL, what: str) -> tuple[Any, URL | None]:
        """A JSON API answer and the URL of its next page, if any."""

        async def attempt() -> tuple[Any, URL | None]:
            resp = await self._get(url, {})
            async with resp:
                self._check_status(resp, what)
                body = await read_bounded(resp, _MAX_API_BYTES, what=what)
                link = resp.links.get("next")
                next_link = link.get("url") if link is not None else None
            try:
                doc = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise SourceError(f"{self.origin}: {what}: the Hub answered non-JSON") from None
            return doc, self._next_page(next_link, what)

        result: tuple[Any, URL | None] = await self._retrying(
            attempt, what=what, origin=self.origin
        )
        return result

    def _next_page(self, link: object, what: str) -> URL | None:
        """The next page, wherever a mirror says it is (checked like any URL; no token sent
        to another host)."""
        if link is None:
            return None
        url = self.endpoint.join(URL(str(link), encoded=True))
        self.transport.check_url(url, what=f"{what}: next page")
        return url


def _entry_path(entry: Mapping[str, Any]) -> str:
    path = entry.get("path")
    if not isinstance(path, str):
        raise SourceError(f"hf tree entry without a path: {str(entry)[:200]}")
    return safe_relpath(path)


def _lfs_file(path: str, lfs: Mapping[str, Any]) -> HfFile:
    oid, size = lfs.get("oid"), lfs.get("size")
    digest = f"sha256:{oid}"
    if not isinstance(oid, str) or not is_digest(digest):
        raise SourceError(f"hf file {path!r}: lfs.oid is not a sha256: {oid!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise SourceError(f"hf file {path!r}: bad lfs.size {size!r}")
    return HfFile(path, digest, size)
