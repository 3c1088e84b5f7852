"""HttpSource and HfSource against local servers, and the fetch rules against a faulty origin.

The fault cases run through HttpSource (the simplest source); RegistrySource and HfSource share
the same streaming code (sources/streaming.py), and the registry tests cover its auth/redirect
specifics.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from cacheagent.digest import sha256_digest
from cacheagent.errors import (
    ModelNotFoundError,
    OriginUnavailableError,
    SizeMismatchError,
    SourceError,
    UnsafePathError,
)
from cacheagent.refs import HttpRef, parse_ref
from cacheagent.sources.base import BlobRef, ResolvedModel
from cacheagent.sources.http import HttpOptions, HttpSource
from cacheagent.sources.retry import RetryPolicy
from cacheagent.sources.transport import Transport, TransportOptions
from tests.certs import Pki, make_pki
from tests.fault_server import Fault, FaultServer
from tests.proxy_server import TinyProxy
from tests.source_reads import read_all

FAST = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=2.0, max_total_seconds=10.0)
DATA = random.Random(7).randbytes(256 * 1024 + 17)
DIGEST = sha256_digest(DATA)
TOKEN = "hf_TESTtokenThatMustNeverLeak0123456789"

MakeHttp = Callable[..., HttpSource]


@pytest.fixture
async def origin() -> AsyncIterator[FaultServer]:
    async with FaultServer(stall_seconds=5.0) as server:
        server.add("files/model.bin", DATA)
        yield server


@pytest.fixture
async def make_http() -> AsyncIterator[MakeHttp]:
    made: list[HttpSource] = []

    def build(
        *insecure: str,
        read_timeout: float = 10.0,
        retry: RetryPolicy = FAST,
        proxies: dict[str, str] | None = None,
        ca_file: Path | None = None,
    ) -> HttpSource:
        source = HttpSource(
            Transport(
                TransportOptions(
                    insecure=frozenset(insecure),
                    read_timeout=read_timeout,
                    proxies=proxies or {},
                    ca_file=ca_file,
                )
            ),
            options=HttpOptions(retry=retry, chunk_bytes=32 * 1024),
            rng=random.Random(0),
        )
        made.append(source)
        return source

    yield build
    for source in made:
        await source.transport.aclose()


def http_ref(url: str, data: bytes = DATA) -> HttpRef:
    ref = parse_ref(f"{url}#sha256={hashlib.sha256(data).hexdigest()}")
    assert isinstance(ref, HttpRef)
    return ref


async def resolved(
    source: HttpSource, server: FaultServer, name: str = "files/model.bin"
) -> ResolvedModel:
    return await source.resolve(http_ref(server.url(name)))


def gets(server: FaultServer, name: str = "files/model.bin") -> list[str | None]:
    """The Range header of every GET the server saw for ``name`` (None: no Range)."""
    return [r.headers.get("Range") for r in server.seen(name) if r.method == "GET"]


# -- HttpSource ---------------------------------------------------------------------------------


async def test_http_resolve_and_fetch(origin: FaultServer, make_http: MakeHttp) -> None:
    source = make_http(origin.host)
    model = await resolved(source, origin)
    (layer,) = model.layers
    assert (layer.path, layer.unpack) == ("model.bin", "raw")
    assert layer.blob == BlobRef(DIGEST, len(DATA), "application/octet-stream")
    manifest = json.loads(model.manifest)
    assert manifest["url"] == origin.url("files/model.bin")
    assert manifest["files"] == [{"path": "model.bin", "digest": DIGEST, "size": len(DATA)}]
    assert model.manifest == json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert model.manifest_digest == sha256_digest(model.manifest)
    assert (await resolved(source, origin)).manifest_digest == model.manifest_digest

    assert await read_all(source, layer.blob) == DATA
    assert await read_all(source, layer.blob, 1000, 70_000) == DATA[1000:70_000]
    assert gets(origin) == [None, "bytes=1000-69999"]
    assert origin.served["files/model.bin"] == len(DATA) + 69_000
    assert source.supports_ranges
    assert {r.headers.get("Accept-Encoding") for r in origin.requests} == {"identity"}


async def test_ranged_fetches_reuse_one_connection(
    origin: FaultServer, make_http: MakeHttp
) -> None:
    source = make_http(origin.host)
    blob = (await resolved(source, origin)).layers[0].blob
    for start in range(0, 200_000, 40_000):
        assert await read_all(source, blob, start, start + 40_000) == DATA[start : start + 40_000]
    assert len(origin.requests) == 6
    ranged = [r for r in origin.requests if r.method == "GET"]
    assert len(ranged) == 5
    assert len({r.peer for r in ranged}) == 1  # keep-alive, no handshake per range
    # (the resolve's HEAD says Connection: close: nothing sent after it can poison a GET)
    assert origin.requests[0].headers.get("Connection") == "close"


async def test_http_size_without_content_length(origin: FaultServer, make_http: MakeHttp) -> None:
    origin.add("files/unsized.bin", DATA, declare_length=False)
    source = make_http(origin.host)
    model = await resolved(source, origin, "files/unsized.bin")
    assert model.layers[0].blob.size == len(DATA)  # learned from a Range: bytes=0-0 probe
    assert gets(origin, "files/unsized.bin") == ["bytes=0-0"]
    assert await read_all(source, model.layers[0].blob) == DATA

    # HEAD refused (as with URLs presigned for GET only): the Range probe gives the size.
    origin.inject("files/model.bin", Fault("status", status=403, method="HEAD"))
    assert (await resolved(make_http(origin.host), origin)).layers[0].blob.size == len(DATA)
    assert gets(origin) == ["bytes=0-0"]

    origin.inject("files/unsized.bin", Fault("ignore_range"))
    with pytest.raises(SourceError, match="declares no size"):
        await make_http(origin.host).resolve(http_ref(origin.url("files/unsized.bin")))


@pytest.mark.parametrize(
    ("path", "error", "match"),
    [
        ("files/", SourceError, "names no file"),
        ("files/%2e%2e", UnsafePathError, r"\.\."),
        ("files/a%2Fb", UnsafePathError, "encoded '/'"),
    ],
)
async def test_http_file_name_is_checked(
    origin: FaultServer, make_http: MakeHttp, path: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await make_http(origin.host).resolve(HttpRef(origin.url(path), DIGEST))


async def test_http_requires_insecure_listing_for_plain_http(
    origin: FaultServer, make_http: MakeHttp
) -> None:
    with pytest.raises(SourceError, match=r"registries\.insecure") as info:
        await make_http().resolve(http_ref(origin.url("files/model.bin")))
    assert origin.host in str(info.value)
    assert origin.requests == []  # refused before any connection


async def test_http_missing_file_is_not_found(origin: FaultServer, make_http: MakeHttp) -> None:
    with pytest.raises(ModelNotFoundError, match="nothing-here"):
        await make_http(origin.host).resolve(http_ref(origin.url("files/nothing-here")))


@contextlib.asynccontextmanager
async def https_origin(pki: Pki) -> AsyncIterator[str]:
    """Serve DATA at ``/w.bin`` over TLS with the test PKI's server certificate; yields the URL."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    app = web.Application()

    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=DATA)

    app.router.add_get("/w.bin", serve)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{port}/w.bin"
    finally:
        await runner.cleanup()


async def test_https_with_private_ca(tmp_path: Path, make_http: MakeHttp) -> None:
    pki = make_pki(tmp_path / "pki")
    async with https_origin(pki) as url:
        ref = http_ref(url)
        with pytest.raises(SourceError, match=r"registries\.ca_file"):
            await make_http().resolve(ref)
        source = make_http(ca_file=pki.ca_cert)
        model = await source.resolve(ref)
        assert await read_all(source, model.layers[0].blob) == DATA


async def test_proxy_from_the_environment(
    tmp_path: Path, origin: FaultServer, make_http: MakeHttp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY/HTTPS_PROXY/NO_PROXY, as operators set them on nodes, through a real proxy
    (tinyproxy: it adds a Via header to what it forwards and logs the CONNECTs it tunnels)."""
    pki = make_pki(tmp_path / "pki")
    with TinyProxy(tmp_path / "proxy") as proxy:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "example.invalid,.internal.test")
        source = make_http(origin.host)
        model = await resolved(source, origin)
        assert await read_all(source, model.layers[0].blob, 0, 100) == DATA[:100]
        vias = [r.headers.get("Via", "") for r in origin.requests]
        assert len(vias) == 2 and all(proxy.via_name in via for via in vias)

        async with https_origin(pki) as url:
            secure = make_http(ca_file=pki.ca_cert)
            model = await secure.resolve(http_ref(url))
            assert await read_all(secure, model.layers[0].blob) == DATA
            assert f"CONNECT 127.0.0.1:{url.split(':')[2].split('/')[0]}" in proxy.log_text()

        # NO_PROXY lists the origin (host:port form): straight there, no Via.
        monkeypatch.setenv("NO_PROXY", f"example.invalid,{origin.host}")
        direct = make_http(origin.host)
        await resolved(direct, origin)
        assert "Via" not in origin.requests[-1].headers
        # A proxy in the config wins over the environment.
        configured = make_http(origin.host, proxies={origin.host: origin.url()})
        await resolved(configured, origin)
        assert origin.requests[-1].raw_path.startswith("http://")
        assert "Via" not in origin.requests[-1].headers


async def test_upstream_proxy_per_origin(origin: FaultServer, make_http: MakeHttp) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        unreachable = f"127.0.0.1:{s.getsockname()[1]}"
    source = make_http(unreachable, proxies={unreachable: origin.url()})
    ref = http_ref(f"http://{unreachable}/files/model.bin")
    model = await source.resolve(ref)
    assert await read_all(source, model.layers[0].blob, 10, 20) == DATA[10:20]
    # The proxy saw absolute-form requests for the origin it stood in for.
    assert origin.requests[-1].raw_path == f"http://{unreachable}/files/model.bin"


# -- the fault cases ----------------------------------------------------------------------------


async def test_429_retry_after_is_honoured(origin: FaultServer, make_http: MakeHttp) -> None:
    source = make_http(origin.host)
    model = await resolved(source, origin)
    origin.inject("files/model.bin", Fault("status", status=429, retry_after="1"))
    began = time.monotonic()
    assert await read_all(source, model.layers[0].blob) == DATA
    assert time.monotonic() - began >= 0.95
    assert gets(origin) == [None, None]


async def test_503_then_success(origin: FaultServer, make_http: MakeHttp) -> None:
    source = make_http(origin.host)
    model = await resolved(source, origin)
    origin.inject("files/model.bin", Fault("status", times=2, status=503))
    assert await read_all(source, model.layers[0].blob, 5, 500) == DATA[5:500]
    assert gets(origin) == ["bytes=5-499"] * 3


async def test_retries_run_out(origin: FaultServer, make_http: MakeHttp) -> None:
    source = make_http(origin.host)
    model = await resolved(source, origin)
    origin.inject("files/model.bin", Fault("status", times=99, status=502))
    with pytest.raises(OriginUnavailableError) as info:
        await read_all(source, model.layers[0].blob)
    message = str(info.value)
    assert origin.host in message and DIGEST in message and "HTTP 502" in message
    assert len(gets(origin)) == FAST.max_attempts


async def test_dropped_connection_resumes_where_it_stopped(
    origin: FaultServer, make_http: MakeHttp
) -> None:
    source = make_http(origin.host)
    model = await resolved(source, origin)
    origin.inject("files/model.bin", Fault("drop"))
    assert await read_all(source, model.layers[0].blob) == DATA
    first, second = gets(origin)
    assert first is None
    assert second is not None and second.endswith(f"-{len(DATA) - 1}")
    resumed_at = int(second.removeprefix("bytes=").split("-")[0])
    assert resumed_at > 0
    # The origin sent each byte about once, not the whole blob twice.
    assert origin.served["files/model.bin"] < len(DATA) + 64 * 1024


@pytest.mark.parametrize("kind", ["long", "long_chunked"])
async def test_body_longer_than_declared_is_cut_off(
    origin: FaultServer, make_http: MakeHttp, kind: str
) -> None:
    source = make_http(origin.host)
    model = await resolved(source, origin)
    blob = model.layers[0].blob
    origin.inject("files/model.bin", Fault(kind, extra=100_000))  # type: ignore[arg-type]
    received = 0
    with pytest.raises(SizeMismatchError) as info:
        async for chunk in source.fetch(blob):
            received += len(chunk)
    assert info.value.digest == DIGEST and info.value.expected == len(DATA)
    assert received <= len(DATA)


async def test_stalled_body_times_out(origin: FaultServer, make_http: MakeHttp) -> None:
    retry = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=1.0, max_total_seconds=5.0)
    source = make_http(origin.host, read_timeout=0.3, retry=retry)
    model = await resolved(source, origin)
    origin.inject("files/model.bin", Fault("stall", times=2, cut_at=0.0))
    began = time.monotonic()
    with pytest.raises(OriginUnavailableError, match="Timeout") as info:
        await read_all(source, model.layers[0].blob)
    assert time.monotonic() - began < 3.0
    assert DIGEST in str(info.value)


async def test_stalls_with_progress_do_not_exhaust_retries(
    origin: FaultServer, make_http: MakeHttp
) -> None:
    retry = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=1.0, max_total_seconds=5.0)
    source = make_http(origin.host, read_timeout=0.3, retry=retry)
    model = await resolved(source, origin)
    # Three stalls in a row, each after some bytes: more failures than max_attempts, but every
    # attempt gained ground, so the budget restarts and the download completes.
    origin.inject("files/model.bin", Fault("stall", times=3))
    assert await read_all(source, model.layers[0].blob) == DATA
    assert len(gets(origin)) == 4


async def test_origin_ignoring_range_is_handled(origin: FaultServer, make_http: MakeHttp) -> None:
    source = make_http(origin.host)
    model = await resolved(source, origin)
    origin.inject("files/model.bin", Fault("ignore_range", times=2))
    blob = model.layers[0].blob
    assert await read_all(source, blob, 100_000, 100_100) == DATA[100_000:100_100]
    assert await read_all(source, blob, 200_000) == DATA[200_000:]
    assert not source.supports_ranges
    assert source.ranges_ignored_by == {origin.host}


async def test_wrong_bytes_pass_through_for_the_verifier(
    origin: FaultServer, make_http: MakeHttp
) -> None:
    source = make_http(origin.host)
    model = await resolved(source, origin)
    origin.inject("files/model.bin", Fault("wrong"))
    data = await read_all(source, model.layers[0].blob)
    assert len(data) == len(DATA) and sha256_digest(data) != DIGEST


async def test_redirect_to_blob_storage_is_followed(
    origin: FaultServer, make_http: MakeHttp
) -> None:
    async with FaultServer() as storage:
        storage.add("obj", DATA)
        source = make_http(origin.host, storage.host)
        model = await resolved(source, origin)
        origin.inject("files/model.bin", Fault("redirect", location=storage.url("obj")))
        assert await read_all(source, model.layers[0].blob, 7, 99) == DATA[7:99]
        assert [r.headers.get("Range") for r in storage.seen("obj")] == ["bytes=7-98"]


async def test_redirect_to_plain_http_of_a_secure_host_is_refused(
    origin: FaultServer, make_http: MakeHttp
) -> None:
    async with FaultServer() as storage:
        storage.add("obj", DATA)
        source = make_http(origin.host)  # storage is NOT listed insecure
        model = await resolved(source, origin)
        origin.inject("files/model.bin", Fault("redirect", location=storage.url("obj")))
        with pytest.raises(SourceError, match=r"registries\.insecure"):
            await read_all(source, model.layers[0].blob)
        assert storage.requests == []
