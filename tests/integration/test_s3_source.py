"""S3Source against moto's real S3-compatible server on loopback: prefixes and single objects,
SHA-256 checksums and hashing when there is none, pins (manifest digest, version, ETag),
parallel ranged GETs through the pull engine, objects replaced mid-pull, and credentials from
config and from the standard AWS environment / credentials-file chain."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from cacheagent.config import PullConfig
from cacheagent.digest import sha256_digest
from cacheagent.errors import DigestMismatchError, ModelNotFoundError, SourceError
from cacheagent.pull.engine import PullEngine, SourceRegistry
from cacheagent.refs import parse_ref
from cacheagent.sources.retry import RetryPolicy
from cacheagent.sources.s3 import S3Options, S3Source
from cacheagent.sources.s3auth import S3Credentials, S3Signer
from cacheagent.sources.transport import Transport, TransportOptions
from cacheagent.store import Store
from tests.s3_server import ACCESS_KEY, SECRET_KEY, S3Server

KiB, MiB = 1 << 10, 1 << 20
FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=1.0, max_total_seconds=10.0)
BIG = random.Random(3).randbytes(3 * MiB + 12345)
FILES = {
    "config.json": b'{"model_type": "s3test"}',
    "tokenizer.json": b'{"version": "1.0"}',
    "model.safetensors": BIG,
    "sub/extra.txt": b"nested",
}


class RecordingS3Source(S3Source):
    """Records the signed headers of every request this source sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[str, str, dict[str, str]]] = []

    async def _send(
        self, method: str, url: URL, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        signed = await self.signer.sign(method, str(url), headers)
        self.sent.append((method, str(url), signed))
        return await self.transport.request(method, url, headers=signed, follow_redirects=False)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        client = server.client()
        client.create_bucket(Bucket="models")
        for path, data in FILES.items():
            client.put_object(
                Bucket="models", Key=f"qwen/{path}", Body=data, ChecksumAlgorithm="SHA256"
            )
        client.put_object(Bucket="models", Key="qwen/", Body=b"")  # a directory marker
        for path, data in FILES.items():  # no SHA-256 checksum (botocore's default CRC32)
            client.put_object(Bucket="models", Key=f"plain/{path}", Body=data)
        client.create_bucket(Bucket="versioned")
        client.put_bucket_versioning(
            Bucket="versioned", VersioningConfiguration={"Status": "Enabled"}
        )
        yield server


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text(SECRET_KEY + "\n")
    return path


@pytest.fixture
async def make_source(s3: S3Server, secret_file: Path) -> AsyncIterator[Any]:
    made: list[RecordingS3Source] = []

    def build(credentials: S3Credentials | None = None) -> RecordingS3Source:
        transport = Transport(TransportOptions(insecure=frozenset({s3.host})))
        creds = credentials or S3Credentials(ACCESS_KEY, secret_file)
        source = RecordingS3Source(
            transport,
            signer=S3Signer("us-east-1", creds),
            options=S3Options(endpoint=s3.endpoint, retry=FAST),
            rng=random.Random(0),
        )
        made.append(source)
        return source

    yield build
    for source in made:
        await source.transport.aclose()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


def engine_for(store: Store, source: S3Source) -> PullEngine:
    config = PullConfig(range_threshold_bytes=512 * KiB, range_chunk_bytes=256 * KiB, retries=2)
    return PullEngine(store, SourceRegistry([source]), config)


def tree(store: Store, digest: str) -> dict[str, bytes]:
    root = store.model_path(digest)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


async def test_prefix_pulls_with_parallel_signed_ranges(make_source: Any, store: Store) -> None:
    source = make_source()
    engine = engine_for(store, source)
    try:
        model = await engine.pull("s3://models/qwen")
    finally:
        await engine.aclose()
    assert tree(store, model.digest) == FILES
    big_digest = sha256_digest(BIG)
    assert {f.path: f.blob for f in model.files}["model.safetensors"] == big_digest
    ranges = {
        h.get("Range")
        for method, url, h in source.sent
        if method == "GET" and "model.safetensors" in url
    }
    assert len(ranges) > 4 and None not in ranges  # parallel ranged GETs, nothing unranged
    assert all("Credential=" + ACCESS_KEY in h["Authorization"] for _, _, h in source.sent)
    object_gets = [h for m, url, h in source.sent if m == "GET" and "list-type" not in url]
    assert object_gets and all(h["If-Match"] for h in object_gets)
    assert engine.fetched_bytes() == {"s3": sum(len(d) for d in FILES.values())}


async def test_objects_without_sha256_are_hashed_at_resolution(make_source: Any) -> None:
    source = make_source()
    resolved = await source.resolve(parse_ref("s3://models/plain/"))
    assert {la.path: la.blob.digest for la in resolved.layers} == {
        p: sha256_digest(d) for p, d in FILES.items()
    }
    with_checksums = await source.resolve(parse_ref("s3://models/qwen/"))
    gets = [u for m, u, _ in source.sent if m == "GET" and "list-type" not in u]
    assert all("/plain/" in u for u in gets)  # checksummed objects were not read to resolve
    assert with_checksums.manifest_digest != resolved.manifest_digest
    source.sent.clear()
    again = await source.resolve(parse_ref("s3://models/plain/"))  # re-listed after the TTL
    assert again.manifest_digest == resolved.manifest_digest
    assert [url for m, url, _ in source.sent if m == "GET" and "list-type" not in url] == []


async def test_manifest_digest_pin_is_verified(make_source: Any, store: Store) -> None:
    source = make_source()
    digest = (await source.resolve(parse_ref("s3://models/qwen/"))).manifest_digest
    pinned = await source.resolve(parse_ref(f"s3://models/qwen/@{digest}"))
    assert pinned.manifest_digest == digest
    wrong = sha256_digest(b"another listing")
    with pytest.raises(DigestMismatchError):
        await source.resolve(parse_ref(f"s3://models/qwen/@{wrong}"))


async def test_single_object_by_version_and_etag(s3: S3Server, make_source: Any) -> None:
    client = s3.client()
    first = client.put_object(Bucket="versioned", Key="m/weights.bin", Body=b"version one")
    client.put_object(Bucket="versioned", Key="m/weights.bin", Body=b"version two!")
    source = make_source()
    old = await source.resolve(parse_ref(f"s3://versioned/m/weights.bin@{first['VersionId']}"))
    assert [(la.path, la.blob.digest) for la in old.layers] == [
        ("weights.bin", sha256_digest(b"version one"))
    ]
    data = b"".join([c async for c in source.fetch(old.layers[0].blob)])
    assert data == b"version one"
    etag = first["ETag"].strip('"')
    with pytest.raises(SourceError, match="ETag is now"):
        await source.resolve(parse_ref(f"s3://versioned/m/weights.bin@{etag}"))


async def test_object_replaced_after_resolution_is_refused(s3: S3Server, make_source: Any) -> None:
    client = s3.client()
    client.put_object(Bucket="models", Key="moving/a.bin", Body=b"before")
    source = make_source()
    resolved = await source.resolve(parse_ref("s3://models/moving/"))
    client.put_object(Bucket="models", Key="moving/a.bin", Body=b"after!")
    with pytest.raises(SourceError, match="changed since it was resolved"):
        b"".join([c async for c in source.fetch(resolved.layers[0].blob)])


async def test_missing_objects_are_not_found(make_source: Any) -> None:
    source = make_source()
    with pytest.raises(ModelNotFoundError, match="s3://models/nothing"):
        await source.resolve(parse_ref("s3://models/nothing-here"))


async def test_credentials_from_the_environment_and_a_profile(
    make_source: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENVIRONMENT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    env_source = make_source(S3Credentials())
    await env_source.resolve(parse_ref("s3://models/qwen/config.json"))
    assert "Credential=AKIDFROMENVIRONMENT/" in env_source.sent[0][2]["Authorization"]

    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[modelteam]\naws_access_key_id = AKIDFROMPROFILE\naws_secret_access_key = s\n"
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    profile_source = make_source(S3Credentials(profile="modelteam"))
    await profile_source.resolve(parse_ref("s3://models/qwen/config.json"))
    assert "Credential=AKIDFROMPROFILE/" in profile_source.sent[0][2]["Authorization"]


async def test_no_credentials_is_a_clear_error(
    make_source: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    source = make_source(S3Credentials())
    with pytest.raises(SourceError, match="no AWS credentials"):
        await source.resolve(parse_ref("s3://models/qwen/config.json"))
