"""HfSource against a Hub test server that behaves like the real Hub (tests/hf_server.py): gzip
when asked, a CDN on a second loopback host (127.0.0.2) behind presigned URLs, a rate-limited
resolver path with the Hub's ``RateLimit`` header, ``X-Error-Code`` answers, single-name repos,
revisions with slashes, and a mirror whose pagination links point at another host.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from cacheagent.digest import sha256_digest
from cacheagent.errors import ModelNotFoundError, OriginUnavailableError, SourceError
from cacheagent.refs import HfRef, parse_ref
from cacheagent.sources.base import BlobRef
from cacheagent.sources.hf import HfOptions, HfSource
from cacheagent.sources.hf_protocol import HfAccessError
from cacheagent.sources.retry import RetryPolicy
from cacheagent.sources.transport import Transport, TransportOptions
from tests.fault_server import FaultServer
from tests.hf_server import HfRepo, HfServer
from tests.source_reads import read_all

FAST = RetryPolicy(
    max_attempts=4, base_delay=0.01, max_delay=2.0, max_total_seconds=10.0, max_server_wait=5.0
)
TOKEN = "hf_TESTtokenThatMustNeverLeak0123456789"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SAFETENSORS = random.Random(3).randbytes(150_000)
CONFIG_JSON = b'{"model_type": "test", "hidden_size": 8}\n'
EXTRA = b"lfs extra"


def hf_repo(repo_id: str = "acme/tiny-model", **options: object) -> HfRepo:
    return HfRepo(
        repo_id=repo_id,
        commit=COMMIT,
        branches={"main": COMMIT, "v1.0": COMMIT, "refs/pr/1": COMMIT},
        files={"config.json": CONFIG_JSON, ".gitattributes": b"*.safetensors filter=lfs\n"},
        lfs_files={"model.safetensors": SAFETENSORS, "sub/dir/extra.bin": EXTRA},
        **options,  # type: ignore[arg-type]
    )


def cdn_name(data: bytes) -> str:
    return f"lfs/{hashlib.sha256(data).hexdigest()}"


@dataclass
class Hub:
    server: HfServer
    cdn: FaultServer

    def build(
        self,
        token: str | None = TOKEN,
        *,
        endpoint: str | None = None,
        retry: RetryPolicy = FAST,
        small_file_max_bytes: int = 1 << 20,
        small_cache_bytes: int = 64 << 20,
        extra_hosts: tuple[str, ...] = (),
    ) -> HfSource:
        insecure = frozenset({self.server.host, self.cdn.host, *extra_hosts})
        return HfSource(
            Transport(TransportOptions(insecure=insecure)),
            options=HfOptions(
                endpoint=endpoint or self.server.endpoint,
                token=token,
                retry=retry,
                small_file_max_bytes=small_file_max_bytes,
                small_cache_bytes=small_cache_bytes,
            ),
        )


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    async with FaultServer(bind="127.0.0.2", presign_secret="cdn-signing-key") as cdn:
        server = HfServer(cdn=cdn, token=TOKEN)
        server.add(hf_repo())
        for data in hf_repo().lfs_files.values():
            cdn.add(cdn_name(data), data)
        await server.start()
        try:
            yield Hub(server, cdn)
        finally:
            await server.stop()


@pytest.fixture
async def make_hf(hub: Hub) -> AsyncIterator[Callable[..., HfSource]]:
    made: list[HfSource] = []

    def build(*args: object, **kwargs: object) -> HfSource:
        source = hub.build(*args, **kwargs)  # type: ignore[arg-type]
        made.append(source)
        return source

    yield build
    for source in made:
        await source.transport.aclose()


def blobs(model_layers: object) -> dict[str, BlobRef]:
    return {layer.path: layer.blob for layer in model_layers}  # type: ignore[attr-defined]


async def test_hf_resolve_and_fetch(
    hub: Hub, make_hf: Callable[..., HfSource], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = make_hf()
    model = await source.resolve(HfRef("acme/tiny-model", "main"))
    by_path = blobs(model.layers)
    assert sorted(by_path) == [
        ".gitattributes",
        "config.json",
        "model.safetensors",
        "sub/dir/extra.bin",
    ]
    assert by_path["model.safetensors"].digest == sha256_digest(SAFETENSORS)  # lfs.oid
    assert by_path["config.json"] == BlobRef(
        sha256_digest(CONFIG_JSON), len(CONFIG_JSON), "application/octet-stream"
    )
    manifest = json.loads(model.manifest)
    assert (manifest["repo"], manifest["commit"]) == ("acme/tiny-model", COMMIT)
    assert model.manifest_digest == sha256_digest(model.manifest)

    # Same commit, any name for it (a slash in it too): same model digest.
    for revision in ("v1.0", "refs/pr/1", COMMIT):
        again = await make_hf().resolve(HfRef("acme/tiny-model", revision))
        assert again.manifest_digest == model.manifest_digest
    assert "/api/models/acme/tiny-model/revision/refs%2Fpr%2F1" in hub.server.paths()

    weights = by_path["model.safetensors"]
    assert await read_all(source, weights) == SAFETENSORS
    assert await read_all(source, weights, 1000, 2000) == SAFETENSORS[1000:2000]
    cdn_gets = hub.cdn.seen(cdn_name(SAFETENSORS))
    assert [r.headers.get("Range") for r in cdn_gets] == [None, "bytes=1000-1999"]
    assert all("Authorization" not in r.headers for r in hub.cdn.requests)  # the token stayed
    assert all(h["Authorization"] == f"Bearer {TOKEN}" for _, _, h in hub.server.requests)

    # Small git files were hashed at resolve and are served from memory.
    resolves = hub.server.resolves()
    assert await read_all(source, by_path["config.json"], 2) == CONFIG_JSON[2:]
    assert hub.server.resolves() == resolves
    assert TOKEN not in caplog.text and TOKEN not in repr(source)


async def test_every_request_asks_for_identity_encoding(
    hub: Hub, make_hf: Callable[..., HfSource]
) -> None:
    """The Hub and its CDN gzip JSON and text when asked; we never ask (sizes and digests are of
    the stored bytes). The server compresses whenever gzip is admitted, so this fails on a
    client with aiohttp's default ``Accept-Encoding: gzip, deflate``."""
    hub.cdn.compress = True
    source = make_hf()
    model = await source.resolve(HfRef("acme/tiny-model", "main"))
    by_path = blobs(model.layers)
    assert await read_all(source, by_path["sub/dir/extra.bin"]) == EXTRA
    assert await read_all(source, by_path["config.json"]) == CONFIG_JSON
    seen = [h for _, _, h in hub.server.requests] + [r.headers for r in hub.cdn.requests]
    assert len(seen) >= 6
    assert {h.get("Accept-Encoding") for h in seen} == {"identity"}


async def test_ranges_come_from_the_redirect_target_resolved_once(
    hub: Hub, make_hf: Callable[..., HfSource]
) -> None:
    source = make_hf()
    weights = blobs((await source.resolve(HfRef("acme/tiny-model", "main"))).layers)[
        "model.safetensors"
    ]
    before = len(hub.server.resolves())
    pieces = [(start, start + 15_000) for start in range(0, 150_000, 15_000)]
    got = await asyncio.gather(*(read_all(source, weights, s, e) for s, e in pieces))
    assert b"".join(got) == SAFETENSORS
    assert len(hub.server.resolves()) - before == 1  # one resolver request for ten ranges
    assert hub.server.paths("HEAD")[-1].endswith("/resolve/" + COMMIT + "/model.safetensors")
    assert len(hub.cdn.seen(cdn_name(SAFETENSORS))) == 10
    assert all("Expires=" in r.raw_path for r in hub.cdn.requests)


async def test_presigned_urls_are_resolved_again_only_when_expiring_or_refused(
    hub: Hub, make_hf: Callable[..., HfSource]
) -> None:
    source = make_hf()
    weights = blobs((await source.resolve(HfRef("acme/tiny-model", "main"))).layers)[
        "model.safetensors"
    ]
    before = len(hub.server.resolves())
    assert await read_all(source, weights, 0, 10) == SAFETENSORS[:10]
    # The CDN rotates its key: the URL we hold is refused (403) and resolved again, once.
    hub.cdn.presign_secret = "rotated-key"
    assert await read_all(source, weights, 10, 20) == SAFETENSORS[10:20]
    assert await read_all(source, weights, 20, 30) == SAFETENSORS[20:30]
    assert len(hub.server.resolves()) - before == 2
    statuses = [r.headers.get("Range") for r in hub.cdn.seen(cdn_name(SAFETENSORS))]
    assert statuses == ["bytes=0-9", "bytes=10-19", "bytes=10-19", "bytes=20-29"]
    assert all("Authorization" not in r.headers for r in hub.cdn.requests)

    # URLs that expire within the safety margin are resolved before each use, not used late.
    hub.server.url_lifetime = 30.0
    fresh = make_hf()
    weights = blobs((await fresh.resolve(HfRef("acme/tiny-model", "main"))).layers)[
        "model.safetensors"
    ]
    before = len(hub.server.resolves())
    for start in (0, 100, 200):
        assert await read_all(fresh, weights, start, start + 50) == SAFETENSORS[start : start + 50]
    assert len(hub.server.resolves()) - before == 3


async def test_rate_limited_resolver_is_waited_out_and_reported(
    hub: Hub, make_hf: Callable[..., HfSource]
) -> None:
    source = make_hf()
    model = await source.resolve(HfRef("acme/tiny-model", "main"))
    by_path = blobs(model.layers)
    assert await read_all(source, by_path["model.safetensors"], 0, 10) == SAFETENSORS[:10]
    # The window's resolves are spent: the next file's resolve gets 429 with r=0;t=1.
    hub.server.throttle(times=1, seconds=1)
    fetch = asyncio.create_task(read_all(source, by_path["sub/dir/extra.bin"]))
    note = ""
    for _ in range(300):
        note = source.waiting()
        if note or fetch.done():
            break
        await asyncio.sleep(0.01)
    assert hub.server.host in note and "HTTP 429" in note and "asked to wait 1 s" in note
    assert await fetch == EXTRA
    assert hub.server.rate_limited == 1
    assert source.waiting() == ""

    # A wait longer than the bound fails, naming the setting that allows more.
    strict = make_hf(retry=RetryPolicy(max_attempts=4, base_delay=0.01, max_server_wait=5.0))
    model = await strict.resolve(HfRef("acme/tiny-model", "main"))
    hub.server.throttle(times=1, seconds=300)
    with pytest.raises(OriginUnavailableError, match=r"pull\.rate_limit_max_wait_seconds"):
        await read_all(strict, blobs(model.layers)["sub/dir/extra.bin"])


async def test_hub_error_codes_are_passed_through(
    hub: Hub, make_hf: Callable[..., HfSource]
) -> None:
    hub.server.add(hf_repo("acme/gated-model", gated=True))
    with pytest.raises(HfAccessError, match="gated repository") as gated:
        await make_hf().resolve(HfRef("acme/gated-model", "main"))
    message = str(gated.value)
    assert "not been granted access" in message and "restricted" in message
    assert TOKEN not in message
    hub.server.granted.add(TOKEN)
    assert (await make_hf().resolve(HfRef("acme/gated-model", "main"))).layers

    with pytest.raises(ModelNotFoundError, match="repository not found"):
        await make_hf().resolve(HfRef("acme/absent", "main"))
    with pytest.raises(ModelNotFoundError, match=r"revision not found.*Invalid rev id: nope"):
        await make_hf().resolve(HfRef("acme/tiny-model", "nope"))
    hub.server.token = None
    with pytest.raises(ModelNotFoundError, match="private repo looks the same"):
        await make_hf(token=None).resolve(HfRef("acme/absent", "main"))


async def test_git_files_not_held_in_memory_come_from_the_endpoint(
    hub: Hub, make_hf: Callable[..., HfSource]
) -> None:
    """A small (non-LFS) file the memory cache no longer holds: the resolver answers 200 itself,
    so its ranges come from the endpoint, with the token, resolved once."""
    source = make_hf(small_cache_bytes=0)
    config = blobs((await source.resolve(HfRef("acme/tiny-model", "main"))).layers)["config.json"]
    before = len(hub.server.resolves())
    assert await read_all(source, config, 0, 5) == CONFIG_JSON[:5]
    assert await read_all(source, config, 5) == CONFIG_JSON[5:]
    resolved = hub.server.resolves()[before:]
    assert len(resolved) == 3  # one HEAD, then two ranged GETs of the same URL
    assert [m for m, p, _ in hub.server.requests[-3:]] == ["HEAD", "GET", "GET"]
    assert all(h["Authorization"] == f"Bearer {TOKEN}" for _, _, h in hub.server.requests)


async def test_hf_other_errors(hub: Hub, make_hf: Callable[..., HfSource]) -> None:
    with pytest.raises(SourceError, match="no hf token is configured"):
        await make_hf(token=None).resolve(HfRef("acme/tiny-model", "main"))
    with pytest.raises(SourceError, match="token was refused") as refused:
        await make_hf(token="hf_wrong-" + TOKEN).resolve(HfRef("acme/tiny-model", "main"))
    assert TOKEN not in str(refused.value)
    with pytest.raises(SourceError, match=r"'\.gitattributes' is 25 bytes, not in LFS, and over"):
        await make_hf(small_file_max_bytes=10).resolve(HfRef("acme/tiny-model", "main"))
    with pytest.raises(SourceError, match="resolve the model first"):
        await read_all(make_hf(), BlobRef(sha256_digest(b"?"), 1, "x"))


async def test_single_name_repo_and_revision_with_slashes(
    hub: Hub, make_hf: Callable[..., HfSource]
) -> None:
    hub.server.add(hf_repo("gpt2"))
    ref = parse_ref("hf://gpt2@refs/pr/1")
    source = make_hf()
    model = await source.resolve(ref)
    assert json.loads(model.manifest)["repo"] == "gpt2"
    weights = blobs(model.layers)["model.safetensors"]
    assert await read_all(source, weights, 5, 50) == SAFETENSORS[5:50]
    assert any(p.startswith("/gpt2/resolve/") for p in hub.server.resolves())


async def test_mirror_pagination_on_another_host(hub: Hub) -> None:
    """An HF_ENDPOINT-style mirror whose ``Link: rel="next"`` points at the Hub itself: the pages
    are followed there, without the mirror's token."""
    mirror = HfServer(cdn=hub.cdn, token=TOKEN, page_size=2, page_host=hub.server.host)
    mirror.add(hf_repo())
    await mirror.start()
    hub.server.token = None  # the Hub serves the public repo anonymously
    hub.server.page_size = 2
    source = hub.build(endpoint=mirror.endpoint, extra_hosts=(mirror.host,))
    try:
        model = await source.resolve(HfRef("acme/tiny-model", "main"))
        assert len(model.layers) == 4
    finally:
        await source.transport.aclose()
        await mirror.stop()
    assert sum("/tree/" in p for p in mirror.paths()) == 1
    assert sum("/tree/" in p for p in hub.server.paths()) == 2  # 4 files + 1 dir, 2 per page
    assert all("Authorization" not in h for _, _, h in hub.server.requests)
