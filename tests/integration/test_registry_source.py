"""RegistrySource against Debian's real docker-registry (CNCF distribution) on loopback.

Covers: ModelPack and ORAS artifacts pushed over the distribution API, resolution by tag, digest
and through an index, full and ranged blob fetches, manifest limits and digest checks, htpasswd
basic auth from a Docker config.json, bearer tokens from our own token service (cached, renewed
on expiry and on 401), mirrors, the insecure-host rule, TLS with a private CA, and blob
redirects that must not carry the registry's credentials.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cacheagent.digest import sha256_digest
from cacheagent.errors import (
    DigestMismatchError,
    ModelNotFoundError,
    OriginUnavailableError,
    SourceError,
)
from cacheagent.refs import OciRef, parse_ref
from cacheagent.sources.base import BlobRef, ResolvedModel
from cacheagent.sources.credentials import Credentials, CredentialStore, RegistryAuthError
from cacheagent.sources.registry import RegistryOptions, RegistrySource
from cacheagent.sources.retry import RetryPolicy
from cacheagent.sources.transport import Transport, TransportOptions
from tests.certs import Pki, make_pki
from tests.fault_server import Fault, FaultServer
from tests.oci_push import (
    OCI_MANIFEST,
    Artifact,
    OciPusher,
    index_of,
    modelpack_artifact,
    oras_artifact,
)
from tests.registry_server import BasicAuth, RegistryServer, Tls, TokenAuth
from tests.source_reads import read_all
from tests.token_service import TokenService

pytestmark = pytest.mark.registry

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=2.0, max_total_seconds=10.0)
PASSWORD = "Tr0ub4dor&3-registry-secret"
WEIGHTS = random.Random(1).randbytes(300_000)
CONFIG = b'{"architectures": ["Test"]}'

MakeSource = Callable[..., RegistrySource]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path / "registry") as server:
        yield server


@pytest.fixture
async def make_source() -> AsyncIterator[MakeSource]:
    """Builds RegistrySources (each with its own transport) and closes them all at teardown."""
    made: list[RegistrySource] = []

    def build(
        *insecure: str,
        ca_file: Path | None = None,
        credentials: CredentialStore | None = None,
        mirrors: dict[str, list[str]] | None = None,
        manifest_max_bytes: int = 4 << 20,
        platform: tuple[str, str] | None = None,
        read_timeout: float = 10.0,
    ) -> RegistrySource:
        transport = Transport(
            TransportOptions(
                ca_file=ca_file, insecure=frozenset(insecure), read_timeout=read_timeout
            )
        )
        source = RegistrySource(
            transport,
            credentials=credentials,
            options=RegistryOptions(
                mirrors=mirrors or {},
                manifest_max_bytes=manifest_max_bytes,
                platform=platform,
                retry=FAST,
                mirror_cooldown_seconds=60.0,
            ),
            rng=random.Random(0),
        )
        made.append(source)
        return source

    yield build
    for source in made:
        await source.transport.aclose()


def layer_for(model: ResolvedModel, path: str) -> BlobRef:
    return next(layer.blob for layer in model.layers if layer.path == path)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def push(
    registry: RegistryServer,
    repo: str,
    artifact: Artifact,
    tag: str | None = None,
    **pusher_options: Any,
) -> str:
    async with OciPusher(registry.url, **pusher_options) as pusher:
        return await pusher.push(repo, artifact, tag)


# -- resolution and fetching ------------------------------------------------------------------


async def test_modelpack_by_tag_and_digest(
    registry: RegistryServer, make_source: MakeSource
) -> None:
    artifact = modelpack_artifact({"model.safetensors": WEIGHTS, "config.json": CONFIG})
    digest = await push(registry, "models/tiny", artifact, "v1")
    source = make_source(registry.host)

    by_tag = await source.resolve(parse_ref(f"{registry.host}/models/tiny:v1"))
    assert by_tag.manifest_digest == digest == sha256_digest(by_tag.manifest)
    assert by_tag.artifact_type == "application/vnd.cncf.model.manifest.v1+json"
    assert {(layer.path, layer.unpack) for layer in by_tag.layers} == {
        ("model.safetensors", "raw"),
        ("config.json", "raw"),
    }
    by_digest = await source.resolve(parse_ref(f"{registry.host}/models/tiny@{digest}"))
    assert by_digest.manifest == by_tag.manifest

    weights = layer_for(by_tag, "model.safetensors")
    assert weights.digest == sha256_digest(WEIGHTS) and weights.size == len(WEIGHTS)
    assert await read_all(source, weights) == WEIGHTS
    assert await read_all(source, weights, 12_345, 200_001) == WEIGHTS[12_345:200_001]
    assert await read_all(source, weights, 299_999) == WEIGHTS[299_999:]
    assert await read_all(source, weights, 5, 5) == b""
    assert source.supports_ranges and not source.ranges_ignored_by
    with pytest.raises(ValueError, match="outside"):
        await read_all(source, weights, 0, len(WEIGHTS) + 1)


async def test_oras_artifact_pushed_in_chunks(
    registry: RegistryServer, make_source: MakeSource
) -> None:
    artifact = oras_artifact({"weights/part-0.bin": WEIGHTS, "README.md": b"# hi\n"})
    async with OciPusher(registry.url) as pusher:
        digest = await pusher.push("team/oras-model", artifact, "2024-01", chunk_size=64 << 10)
    source = make_source(registry.host)
    model = await source.resolve(parse_ref(f"{registry.host}/team/oras-model:2024-01"))
    assert model.manifest_digest == digest
    assert model.artifact_type == "application/x.test"
    assert await read_all(source, layer_for(model, "weights/part-0.bin")) == WEIGHTS
    assert await read_all(source, layer_for(model, "README.md")) == b"# hi\n"


async def test_index_selects_the_platform_or_the_single_artifact(
    registry: RegistryServer, make_source: MakeSource
) -> None:
    amd = modelpack_artifact({"model.bin": b"amd64 weights"})
    arm = modelpack_artifact({"model.bin": b"arm64 weights"})
    for artifact in (amd, arm):
        await push(registry, "models/multi", artifact)
    index = index_of(
        [
            (amd, {"os": "linux", "architecture": "amd64"}),
            (arm, {"os": "linux", "architecture": "arm64"}),
        ]
    )
    await push(registry, "models/multi", index, "v1")
    single = index_of([(amd, None)])
    await push(registry, "models/multi", single, "single")

    ref = f"{registry.host}/models/multi"
    arm_source = make_source(registry.host, platform=("linux", "arm64"))
    chosen = await arm_source.resolve(parse_ref(f"{ref}:v1"))
    assert chosen.manifest_digest == arm.digest
    assert await read_all(arm_source, chosen.layers[0].blob) == b"arm64 weights"
    assert (await arm_source.resolve(parse_ref(f"{ref}:single"))).manifest_digest == amd.digest
    with pytest.raises(SourceError, match="ambiguous"):
        await make_source(registry.host).resolve(parse_ref(f"{ref}:v1"))


async def test_missing_things_are_not_found(
    registry: RegistryServer, make_source: MakeSource
) -> None:
    artifact = modelpack_artifact({"model.bin": b"present"})
    await push(registry, "models/here", artifact, "v1")
    source = make_source(registry.host)
    with pytest.raises(ModelNotFoundError, match="v2-missing"):
        await source.resolve(parse_ref(f"{registry.host}/models/here:v2-missing"))
    with pytest.raises(ModelNotFoundError):
        await source.resolve(parse_ref(f"{registry.host}/models/absent:v1"))
    model = await source.resolve(parse_ref(f"{registry.host}/models/here:v1"))
    # A blob the manifest names but the registry lost (deleted by digest).
    blob = model.layers[0].blob
    async with OciPusher(registry.url) as pusher:
        await pusher.delete_blob("models/here", blob.digest)
    with pytest.raises(ModelNotFoundError, match=blob.digest):
        await read_all(source, blob)
    with pytest.raises(SourceError, match="resolve the model first"):
        await read_all(source, BlobRef("sha256:" + "0" * 64, 3, "x"))


async def test_manifest_size_limit(registry: RegistryServer, make_source: MakeSource) -> None:
    artifact = modelpack_artifact({f"shard-{i:03}.bin": bytes([i]) for i in range(40)})
    await push(registry, "models/big-manifest", artifact, "v1")
    assert len(artifact.manifest) > 4096
    source = make_source(registry.host, manifest_max_bytes=4096)
    with pytest.raises(SourceError, match="4096-byte limit"):
        await source.resolve(parse_ref(f"{registry.host}/models/big-manifest:v1"))


async def test_manifest_digest_is_computed_not_trusted(make_source: MakeSource) -> None:
    real = modelpack_artifact({"model.bin": b"genuine"})
    evil = modelpack_artifact({"model.bin": b"swapped"})
    async with FaultServer() as fake:
        fake.add(f"v2/m/x/manifests/{real.digest}", evil.manifest, OCI_MANIFEST)
        fake.add(
            "v2/m/x/manifests/v1",
            real.manifest,
            OCI_MANIFEST,
            headers={"Docker-Content-Digest": real.digest},
        )
        fake.add("v2/m/x/manifests/plain", real.manifest, OCI_MANIFEST)
        source = make_source(fake.host)
        with pytest.raises(DigestMismatchError) as info:
            await source.resolve(parse_ref(f"{fake.host}/m/x@{real.digest}"))
        assert info.value.expected == real.digest and info.value.actual == evil.digest
        # The digest a HEAD announces is fetched and checked like a digest reference.
        with pytest.raises(DigestMismatchError):
            await source.resolve(parse_ref(f"{fake.host}/m/x:v1"))
        # No Docker-Content-Digest on HEAD: the manifest is fetched by tag and hashed here.
        resolved = await source.resolve(parse_ref(f"{fake.host}/m/x:plain"))
        assert resolved.manifest_digest == real.digest


# -- auth -------------------------------------------------------------------------------------


def docker_config(tmp_path: Path, host: str, user: str, password: str) -> Path:
    path = tmp_path / "config.json"
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {f"https://{host}/v1/": {"auth": auth}}}))
    return path


async def test_basic_auth_from_docker_config(
    tmp_path: Path, make_source: MakeSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with RegistryServer(tmp_path / "reg", basic=BasicAuth("alice", PASSWORD)) as registry:
        artifact = modelpack_artifact({"model.bin": WEIGHTS})
        await push(registry, "private/m", artifact, "v1", username="alice", password=PASSWORD)
        ref = parse_ref(f"{registry.host}/private/m:v1")

        good = CredentialStore(
            docker_config=docker_config(tmp_path, registry.host, "alice", PASSWORD)
        )
        source = make_source(registry.host, credentials=good)
        model = await source.resolve(ref)
        assert await read_all(source, model.layers[0].blob, 100, 2000) == WEIGHTS[100:2000]

        with pytest.raises(RegistryAuthError, match="no credentials configured") as anonymous:
            await make_source(registry.host).resolve(ref)
        bad = CredentialStore({registry.host: Credentials("alice", "wrong-" + PASSWORD)})
        bad_source = make_source(registry.host, credentials=bad)
        with pytest.raises(RegistryAuthError) as rejected:
            await bad_source.resolve(ref)

    message = str(rejected.value)
    assert registry.host in message and "alice" in message and "rejected" in message
    for text in (message, str(anonymous.value), repr(source), repr(bad_source), caplog.text):
        assert PASSWORD not in text
        assert base64.b64encode(f"alice:{PASSWORD}".encode()).decode() not in text


async def test_bearer_token_flow(
    tmp_path: Path, make_source: MakeSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pki = make_pki(tmp_path / "pki")
    tokens = TokenService(key=pki.ca_key, cert=pki.ca_cert, users={"bob": PASSWORD})
    await tokens.start()
    try:
        auth = TokenAuth(tokens.realm, tokens.service, tokens.issuer, pki.ca_cert)
        with RegistryServer(tmp_path / "reg", token=auth) as registry:
            artifact = modelpack_artifact({"model.bin": WEIGHTS, "config.json": CONFIG})
            await push(registry, "secure/m", artifact, "v1", username="bob", password=PASSWORD)
            pushes = len(tokens.requests)
            creds = CredentialStore({registry.host: Credentials("bob", PASSWORD)})
            # The realm is plain HTTP on loopback, so it must be listed as insecure too.
            source = make_source(registry.host, f"127.0.0.1:{tokens.port}", credentials=creds)
            ref = parse_ref(f"{registry.host}/secure/m:v1")

            model = await source.resolve(ref)
            for layer in model.layers:
                await read_all(source, layer.blob)
            assert source.auth.token_requests == 1  # one token, reused for 3 requests
            assert tokens.requests[-1]["scope"] == "repository:secure/m:pull"
            assert tokens.requests[-1]["service"] == tokens.service

            # The registry stops trusting a token the client still believes fresh (the issuer
            # was rotated): the client gets a new one on the 401 and carries on.
            registry.stop()
            tokens.issuer = "rotated-issuer"
            registry.token = TokenAuth(tokens.realm, tokens.service, tokens.issuer, pki.ca_cert)
            registry.start()
            await source.resolve(ref)
            assert source.auth.token_requests == 2

            # A token is dropped once its expires_in has passed, before the registry complains.
            tokens.expires_in = 1
            fresh = make_source(registry.host, f"127.0.0.1:{tokens.port}", credentials=creds)
            await fresh.resolve(ref)
            await fresh.resolve(ref)
            assert fresh.auth.token_requests == 1
            await asyncio.sleep(1.05)
            await fresh.resolve(ref)
            assert fresh.auth.token_requests == 2
            assert len(tokens.requests) == pushes + 4

            # A config.json identitytoken is traded for an access token by an OAuth2 POST.
            tokens.refresh_tokens["refresh-" + PASSWORD] = "bob"
            oauth = CredentialStore(
                {registry.host: Credentials("<token>", identity_token="refresh-" + PASSWORD)}
            )
            via_oauth = make_source(registry.host, f"127.0.0.1:{tokens.port}", credentials=oauth)
            model = await via_oauth.resolve(ref)
            weights = layer_for(model, "model.bin")
            assert await read_all(via_oauth, weights, 0, 10) == WEIGHTS[:10]
            assert tokens.requests[-1]["method"] == "POST"
            assert tokens.requests[-1]["grant_type"] == "refresh_token"

            wrong = CredentialStore({registry.host: Credentials("bob", "nope-" + PASSWORD)})
            with pytest.raises(RegistryAuthError, match="refused user 'bob'") as refused:
                await make_source(
                    registry.host, f"127.0.0.1:{tokens.port}", credentials=wrong
                ).resolve(ref)
    finally:
        await tokens.stop()
    assert registry.host in str(refused.value)
    for text in (str(refused.value), repr(source), caplog.text):
        assert PASSWORD not in text
        assert "eyJ" not in text  # no JWT (they all start with a base64 '{"')


async def test_blob_redirect_does_not_carry_credentials(make_source: MakeSource) -> None:
    artifact = modelpack_artifact({"model.bin": WEIGHTS})
    blob_digest = sha256_digest(WEIGHTS)
    creds = Credentials("carol", PASSWORD)
    async with (
        FaultServer(require_authorization=creds.basic_header()) as fake,
        FaultServer() as storage,
    ):
        fake.add("v2/m/r/manifests/v1", artifact.manifest, OCI_MANIFEST)
        fake.add(f"v2/m/r/blobs/{blob_digest}", WEIGHTS)
        storage.add("bucket/object", WEIGHTS)
        fake.inject(
            f"v2/m/r/blobs/{blob_digest}",
            Fault("redirect", times=10, location=storage.url("bucket/object?X-Signature=abc")),
        )
        source = make_source(
            fake.host, storage.host, credentials=CredentialStore({fake.host: creds})
        )
        model = await source.resolve(parse_ref(f"{fake.host}/m/r:v1"))
        blob = layer_for(model, "model.bin")
        assert await read_all(source, blob) == WEIGHTS
        assert await read_all(source, blob, 1000, 5000) == WEIGHTS[1000:5000]

    blob_gets = [r for r in fake.seen(f"v2/m/r/blobs/{blob_digest}") if r.method == "GET"]
    assert blob_gets and all(
        r.headers.get("Authorization") == creds.basic_header() for r in blob_gets
    )
    assert len(storage.seen("bucket/object")) == 2
    assert all("Authorization" not in r.headers for r in storage.requests)
    assert storage.seen("bucket/object")[1].headers["Range"] == "bytes=1000-4999"


# -- mirrors, insecure hosts, TLS ---------------------------------------------------------------


async def test_mirrors_first_then_the_registry(tmp_path: Path, make_source: MakeSource) -> None:
    only_on_mirror = modelpack_artifact({"model.bin": b"from the mirror"})
    only_on_origin = modelpack_artifact({"model.bin": b"from the origin"})
    dead = f"127.0.0.1:{closed_port()}"
    with (
        RegistryServer(tmp_path / "origin") as origin,
        RegistryServer(tmp_path / "mirror") as mirror,
    ):
        await push(mirror, "m/a", only_on_mirror, "v1")
        await push(origin, "m/b", only_on_origin, "v1")
        source = make_source(
            origin.host, mirror.host, dead, mirrors={origin.host: [dead, mirror.host]}
        )
        served_by_mirror = await source.resolve(parse_ref(f"{origin.host}/m/a:v1"))
        assert await read_all(source, served_by_mirror.layers[0].blob) == b"from the mirror"
        # The mirror lacks m/b (404): the registry itself answers.
        from_origin = await source.resolve(parse_ref(f"{origin.host}/m/b:v1"))
        assert await read_all(source, from_origin.layers[0].blob) == b"from the origin"
        # The dead mirror is skipped from now on (cooldown), not retried each time.
        assert dead not in [e.host for e in source._endpoints(origin.host)]

        only_dead = make_source(origin.host, dead, mirrors={origin.host: [dead]})
        model = await only_dead.resolve(parse_ref(f"{origin.host}/m/b:v1"))
        assert await read_all(only_dead, model.layers[0].blob) == b"from the origin"


async def test_plain_http_only_for_insecure_hosts(
    registry: RegistryServer, make_source: MakeSource
) -> None:
    await push(registry, "m/c", modelpack_artifact({"model.bin": b"x"}), "v1")
    ref = parse_ref(f"{registry.host}/m/c:v1")
    with pytest.raises(SourceError, match=r"registries\.insecure") as info:
        await make_source().resolve(ref)
    assert registry.host in str(info.value)
    assert (await make_source(registry.host).resolve(ref)).layers


async def test_tls_with_a_private_ca(tmp_path: Path, make_source: MakeSource) -> None:
    pki: Pki = make_pki(tmp_path / "pki")
    tls = Tls(pki.server_cert, pki.server_key)
    with RegistryServer(tmp_path / "reg", tls=tls) as registry:
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        await push(
            registry, "m/tls", modelpack_artifact({"model.bin": WEIGHTS}), "v1", ssl_context=context
        )
        ref = parse_ref(f"{registry.host}/m/tls:v1")
        with pytest.raises(SourceError, match=r"registries\.ca_file"):
            await make_source().resolve(ref)
        source = make_source(ca_file=pki.ca_cert)
        model = await source.resolve(ref)
        assert await read_all(source, model.layers[0].blob) == WEIGHTS


async def test_unreachable_registry_is_unavailable(make_source: MakeSource) -> None:
    host = f"127.0.0.1:{closed_port()}"
    with pytest.raises(OriginUnavailableError, match=host) as info:
        await make_source(host).resolve(OciRef(host, "m/x", "v1", None))
    assert "3 attempt" in str(info.value)
