"""RegistrySource against registries as the public ones behave: quota-friendly tag resolution
(HEAD, then GET only for a new digest), strict Accept matching, bearer challenges with several
scopes, ``errors[]`` bodies, presigned CDN redirects (302 and 307) on a second loopback host,
credentials that rotate under a mounted Secret, and Docker credential helpers.

The real ``docker-registry`` is used wherever it can show the behaviour; ``FaultServer`` stands in
where a test must count requests or misbehave on purpose.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from cacheagent.config import PullConfig
from cacheagent.digest import sha256_digest
from cacheagent.errors import ModelNotFoundError, OriginUnavailableError
from cacheagent.pull.engine import PullEngine, PullTuning, SourceRegistry
from cacheagent.pull.progress import PullProgress
from cacheagent.refs import parse_ref
from cacheagent.sources.credentials import Credentials, CredentialStore, RegistryAuthError
from cacheagent.sources.manifest import OCI_ARTIFACT_MANIFEST
from cacheagent.sources.registry import RegistryOptions, RegistrySource
from cacheagent.sources.retry import RetryPolicy
from cacheagent.sources.transport import Transport, TransportOptions
from cacheagent.store import Store
from tests.fault_server import Fault, FaultServer
from tests.integration.pull_origin import registry_source, serve_layout
from tests.oci.layout_writer import synthetic_model, write_layout
from tests.oci_push import OCI_MANIFEST, OciPusher, modelpack_artifact
from tests.registry_server import BasicAuth, RegistryServer
from tests.source_reads import read_all

pytestmark = pytest.mark.registry

FAST = RetryPolicy(
    max_attempts=3, base_delay=0.01, max_delay=1.0, max_total_seconds=5.0, max_server_wait=2.0
)
PASSWORD = "Tr0ub4dor&3-registry-secret"
WEIGHTS = random.Random(5).randbytes(200_000)

MakeSource = Callable[..., RegistrySource]


@pytest.fixture
async def make_source() -> AsyncIterator[MakeSource]:
    made: list[RegistrySource] = []

    def build(*insecure: str, credentials: CredentialStore | None = None) -> RegistrySource:
        source = RegistrySource(
            Transport(TransportOptions(insecure=frozenset(insecure), read_timeout=10.0)),
            credentials=credentials,
            options=RegistryOptions(retry=FAST),
            rng=random.Random(0),
        )
        made.append(source)
        return source

    yield build
    for source in made:
        await source.transport.aclose()


# -- tag resolution ---------------------------------------------------------------------------


async def test_tag_resolution_heads_and_gets_only_new_digests(make_source: MakeSource) -> None:
    first = modelpack_artifact({"model.bin": b"first"})
    second = modelpack_artifact({"model.bin": b"second"})
    async with FaultServer(compress=True) as registry:  # gzips for clients that admit it
        for artifact in (first, second):
            registry.add(f"v2/m/x/manifests/{artifact.digest}", artifact.manifest, OCI_MANIFEST)
        tag = "v2/m/x/manifests/v1"
        registry.add(tag, first.manifest, OCI_MANIFEST, {"Docker-Content-Digest": first.digest})
        source = make_source(registry.host)
        ref = parse_ref(f"{registry.host}/m/x:v1")
        for _ in range(3):
            assert (await source.resolve(ref)).manifest_digest == first.digest
        assert registry.count(tag, "HEAD") == 3
        assert registry.count(tag, "GET") == 0  # a GET is a pull against Docker Hub's quota
        assert registry.count(f"v2/m/x/manifests/{first.digest}", "GET") == 1

        # The tag moves: the new digest is fetched once, by digest.
        registry.add(tag, second.manifest, OCI_MANIFEST, {"Docker-Content-Digest": second.digest})
        for _ in range(2):
            assert (await source.resolve(ref)).manifest_digest == second.digest
        assert registry.count(f"v2/m/x/manifests/{second.digest}", "GET") == 1
        assert registry.count(tag, "GET") == 0
    assert {r.headers.get("Accept-Encoding") for r in registry.requests} == {"identity"}
    # A HEAD's connection is never reused: bytes a server sends after a HEAD (a dripped or
    # chunked body) would otherwise be read as the next response on it.
    carried_a_head: set[str] = set()
    for request in registry.requests:
        assert request.peer not in carried_a_head, "a connection was reused after a HEAD"
        if request.method == "HEAD":
            carried_a_head.add(request.peer)


async def test_tag_resolution_against_the_real_registry(
    tmp_path: Path, make_source: MakeSource
) -> None:
    artifact = modelpack_artifact({"model.bin": WEIGHTS})
    with RegistryServer(tmp_path / "reg") as registry:
        async with OciPusher(registry.url) as pusher:
            digest = await pusher.push("m/real", artifact, "v1")
        source = make_source(registry.host)
        model = await source.resolve(parse_ref(f"{registry.host}/m/real:v1"))
        assert model.manifest_digest == digest
        assert await read_all(source, model.layers[0].blob, 10, 99) == WEIGHTS[10:99]


# -- Accept -----------------------------------------------------------------------------------


async def test_accept_admits_any_type_and_the_oci_11rc_artifact_manifest(
    make_source: MakeSource,
) -> None:
    blob = b"artifact manifest blob"
    artifact_manifest = json.dumps(
        {
            "mediaType": OCI_ARTIFACT_MANIFEST,
            "artifactType": "application/x.test",
            "blobs": [
                {
                    "mediaType": "application/octet-stream",
                    "digest": sha256_digest(blob),
                    "size": len(blob),
                    "annotations": {"org.opencontainers.image.title": "model.bin"},
                }
            ],
        }
    ).encode()
    untyped = modelpack_artifact({"model.bin": b"served as application/json"})
    async with FaultServer(strict_accept=True) as registry:
        registry.add("v2/m/a/manifests/v1", artifact_manifest, OCI_ARTIFACT_MANIFEST)
        registry.add(f"v2/m/a/blobs/{sha256_digest(blob)}", blob)
        registry.add("v2/m/j/manifests/v1", untyped.manifest, "application/json")
        source = make_source(registry.host)
        model = await source.resolve(parse_ref(f"{registry.host}/m/a:v1"))
        assert model.artifact_type == "application/x.test"
        assert [layer.path for layer in model.layers] == ["model.bin"]
        assert await read_all(source, model.layers[0].blob) == blob
        assert (await source.resolve(parse_ref(f"{registry.host}/m/j:v1"))).layers


# -- bearer challenges with several scopes ---------------------------------------------------------


async def test_bearer_challenge_with_several_scopes(make_source: MakeSource) -> None:
    artifact = modelpack_artifact({"model.bin": WEIGHTS})
    async with FaultServer() as tokens, FaultServer(require_authorization="Bearer tok-1") as reg:
        tokens.add("token", b'{"token": "tok-1", "expires_in": 300}', "application/json")
        reg.challenge = (
            f'Bearer realm="{tokens.url("token")}",service="reg.test",'
            'scope="repository:m/x:pull repository:m/base:pull"'
        )
        reg.add("v2/m/x/manifests/v1", artifact.manifest, OCI_MANIFEST)
        reg.add(f"v2/m/x/blobs/{sha256_digest(WEIGHTS)}", WEIGHTS)
        source = make_source(reg.host, tokens.host)
        model = await source.resolve(parse_ref(f"{reg.host}/m/x:v1"))
        assert await read_all(source, model.layers[0].blob) == WEIGHTS
    (asked,) = tokens.seen("token")
    query = parse_qs(urlsplit(asked.raw_path).query)
    assert query["scope"] == ["repository:m/x:pull", "repository:m/base:pull"]
    assert query["service"] == ["reg.test"]
    assert asked.headers.get("Accept-Encoding") == "identity"  # the token service too


# -- errors[] ---------------------------------------------------------------------------------


async def test_registry_errors_are_quoted(tmp_path: Path, make_source: MakeSource) -> None:
    artifact = modelpack_artifact({"model.bin": WEIGHTS})
    with RegistryServer(tmp_path / "reg") as registry:
        async with OciPusher(registry.url) as pusher:
            await pusher.push("m/here", artifact, "v1")
        source = make_source(registry.host)
        with pytest.raises(ModelNotFoundError, match="MANIFEST_UNKNOWN"):
            await source.resolve(parse_ref(f"{registry.host}/m/here:v2"))
        with pytest.raises(ModelNotFoundError, match=r"m/absent:v1 .*MANIFEST_UNKNOWN"):
            await source.resolve(parse_ref(f"{registry.host}/m/absent:v1"))
        model = await source.resolve(parse_ref(f"{registry.host}/m/here:v1"))
        async with OciPusher(registry.url) as pusher:
            await pusher.delete_blob("m/here", model.layers[0].blob.digest)
        with pytest.raises(ModelNotFoundError, match="BLOB_UNKNOWN"):
            await read_all(source, model.layers[0].blob)

    denied = (
        b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}'
    )
    quota = (
        b'{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate '
        b'limit."}]}'
    )
    async with FaultServer() as fake:
        for repo in ("m/denied", "m/quota"):
            fake.add(f"v2/{repo}/manifests/v1", artifact.manifest, OCI_MANIFEST)
        fake.inject("v2/m/denied/manifests/v1", Fault("status", times=9, status=403, body=denied))
        fake.inject(
            "v2/m/quota/manifests/v1",
            Fault("status", times=9, status=429, body=quota, retry_after="21600"),
        )
        source = make_source(fake.host)
        with pytest.raises(RegistryAuthError, match="DENIED: requested access"):
            await source.resolve(parse_ref(f"{fake.host}/m/denied:v1"))
        with pytest.raises(OriginUnavailableError, match="TOOMANYREQUESTS: You have reached"):
            await source.resolve(parse_ref(f"{fake.host}/m/quota:v1"))


# -- blob redirects to a CDN ------------------------------------------------------------------


@pytest.mark.parametrize("status", [302, 307])
async def test_blob_redirect_to_a_presigned_cdn_url(make_source: MakeSource, status: int) -> None:
    artifact = modelpack_artifact({"model.bin": WEIGHTS})
    digest = sha256_digest(WEIGHTS)
    creds = Credentials("carol", PASSWORD)
    async with (
        FaultServer(require_authorization=creds.basic_header()) as registry,
        FaultServer(bind="127.0.0.2", presign_secret="bucket-key") as cdn,
    ):
        registry.add("v2/m/r/manifests/v1", artifact.manifest, OCI_MANIFEST)
        registry.add(f"v2/m/r/blobs/{digest}", WEIGHTS)
        cdn.add("bucket/blob", WEIGHTS)
        location = cdn.presign("bucket/blob")
        registry.inject(
            f"v2/m/r/blobs/{digest}",
            Fault("redirect", times=2, location=location, redirect_status=status),
        )
        source = make_source(
            registry.host, cdn.host, credentials=CredentialStore({registry.host: creds})
        )
        model = await source.resolve(parse_ref(f"{registry.host}/m/r:v1"))
        blob = model.layers[0].blob
        assert await read_all(source, blob) == WEIGHTS
        assert await read_all(source, blob, 1000, 5000) == WEIGHTS[1000:5000]
    seen = cdn.seen("bucket/blob")
    assert [r.headers.get("Range") for r in seen] == [None, "bytes=1000-4999"]
    assert all("Authorization" not in r.headers for r in seen)
    assert all("Signature=" in r.raw_path for r in seen)  # the presigned query survived


# -- credentials that rotate, credential helpers ------------------------------------------------


def kubelet_secret(directory: Path, generation: int, config: dict[str, object]) -> Path:
    """Write ``config.json`` the way the kubelet updates a mounted Secret: a new timestamped
    directory, then an atomic swap of the ``..data`` symlink the file's symlink goes through."""
    directory.mkdir(exist_ok=True)
    version = directory / f"..2026_gen{generation}"
    version.mkdir()
    (version / "config.json").write_text(json.dumps(config))
    staged = directory / "..data_tmp"
    staged.symlink_to(version.name)
    os.replace(staged, directory / "..data")
    link = directory / "config.json"
    if not link.is_symlink():
        link.symlink_to("..data/config.json")
    return link


def basic_config(host: str, user: str, password: str) -> dict[str, object]:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"auths": {host: {"auth": auth}}}


@pytest.fixture
def private_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path / "reg", basic=BasicAuth("alice", PASSWORD)) as registry:
        yield registry


async def push_private(registry: RegistryServer) -> str:
    async with OciPusher(registry.url, username="alice", password=PASSWORD) as pusher:
        await pusher.push("private/m", modelpack_artifact({"model.bin": WEIGHTS}), "v1")
    return f"{registry.host}/private/m:v1"


async def test_docker_config_is_read_again_when_the_secret_changes(
    tmp_path: Path, private_registry: RegistryServer, make_source: MakeSource
) -> None:
    ref = parse_ref(await push_private(private_registry))
    host = private_registry.host
    path = kubelet_secret(tmp_path / "secret", 1, basic_config(host, "alice", "expired-token"))
    store = CredentialStore(docker_config=path)  # checks the file at most once a second...
    source = make_source(host, credentials=store)
    with pytest.raises(RegistryAuthError, match="rejected"):
        await source.resolve(ref)
    kubelet_secret(tmp_path / "secret", 2, basic_config(host, "alice", PASSWORD))
    assert (await source.resolve(ref)).layers  # ...and at once after a rejection
    assert store.reloads == 1

    # The optional Secret created after the agent started: picked up on the first rejection.
    later = tmp_path / "later" / "config.json"
    waiting_for_it = CredentialStore(docker_config=later)
    source = make_source(host, credentials=waiting_for_it)
    with pytest.raises(RegistryAuthError, match="no credentials configured"):
        await source.resolve(ref)
    later.parent.mkdir()
    later.write_text(json.dumps(basic_config(host, "alice", PASSWORD)))
    assert (await source.resolve(ref)).layers

    # A rotation that leaves a broken file keeps the last good credentials.
    watching = CredentialStore(docker_config=path, recheck_seconds=0.0)
    kubelet_secret(tmp_path / "secret", 3, {"auths": []})
    assert (await make_source(host, credentials=watching).resolve(ref)).layers
    assert watching.reloads == 0


def write_helper(bindir: Path, name: str, body: str) -> Path:
    bindir.mkdir(exist_ok=True)
    helper = bindir / f"docker-credential-{name}"
    helper.write_text("#!/bin/sh\n" + body)
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return helper


async def test_credential_helpers(
    tmp_path: Path,
    private_registry: RegistryServer,
    make_source: MakeSource,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = parse_ref(await push_private(private_registry))
    host = private_registry.host
    bindir, calls = tmp_path / "bin", tmp_path / "calls.log"
    answer = json.dumps({"ServerURL": host, "Username": "alice", "Secret": PASSWORD})
    write_helper(bindir, "test", f"cat >> {calls}; echo >> {calls}; echo '{answer}'\n")
    write_helper(
        bindir,
        "empty",
        "cat > /dev/null; echo 'credentials not found in native keychain'; exit 1\n",
    )
    write_helper(bindir, "broken", "cat > /dev/null; echo 'cannot reach the cloud' >&2; exit 3\n")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")

    for config in ({"credHelpers": {host: "test"}}, {"credsStore": "test"}):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        source = make_source(host, credentials=CredentialStore(docker_config=path))
        model = await source.resolve(ref)
        assert await read_all(source, model.layers[0].blob, 0, 100) == WEIGHTS[:100]
    assert calls.read_text().split() == [host, host]  # asked once per store, with the host

    failures = {
        "empty": "no credentials configured",
        "broken": "docker-credential-broken failed (exit 3): cannot reach the cloud",
        "absent": "docker-credential-absent is not on PATH",
    }
    for helper, message in failures.items():
        path = tmp_path / f"{helper}.json"
        path.write_text(json.dumps({"credHelpers": {host: helper}}))
        source = make_source(host, credentials=CredentialStore(docker_config=path))
        with pytest.raises(RegistryAuthError, match=re.escape(message)) as info:
            await source.resolve(ref)
        assert PASSWORD not in str(info.value)


# -- a rate limit's wait shows in the pull's progress ------------------------------------------


async def test_a_rate_limit_wait_shows_in_pull_progress(tmp_path: Path) -> None:
    """A 429 with ``Retry-After: 1`` on a blob: the pull waits it out, and the progress
    snapshots published meanwhile say who asked to wait and why."""
    entries = synthetic_model(tmp_path / "files", 300_000, shards=1, code_layer=False)
    write_layout(tmp_path / "layout", entries, tag="v1")
    store = Store.open(tmp_path / "store")
    async with FaultServer() as server:
        served = serve_layout(server, tmp_path / "layout", "models/limited")
        big = max(served.blob_sizes, key=lambda d: served.blob_sizes[d])
        server.inject(served.blob_paths[big], Fault("status", status=429, retry_after="1"))
        source = registry_source()
        engine = PullEngine(
            store,
            SourceRegistry([source]),
            PullConfig(retries=2, rate_limit_max_wait_seconds=5.0),
            tuning=PullTuning(progress_interval_seconds=0.05),
        )
        seen: list[PullProgress] = []
        try:
            model = await engine.pull(served.ref, progress=seen.append)
        finally:
            await source.aclose()
            store.close()
    assert model.digest == served.manifest_digest
    waits = [s.waiting for s in seen if s.waiting]
    assert waits and server.host in waits[0] and "HTTP 429" in waits[0]
    assert seen[-1].state == "done" and seen[-1].waiting == ""
