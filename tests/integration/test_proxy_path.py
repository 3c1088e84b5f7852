"""The per-origin upstream proxy (``registries.proxy``) through a real HTTP proxy, tinyproxy:
the path a Dragonfly ``dfdaemon`` proxy takes on a cluster (README, "Dragonfly")."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheagent.config import load_config
from cacheagent.pull.engine import PullEngine, SourceRegistry
from cacheagent.refs import parse_ref
from cacheagent.sources.base import BlobRef
from cacheagent.sources.factory import build_sources
from cacheagent.store import Store
from tests.certs import make_pki
from tests.fault_server import FaultServer
from tests.fleet_support import files_of
from tests.oci_push import OciPusher, modelpack_artifact, sha256
from tests.proxy_server import TinyProxy
from tests.registry_server import RegistryServer, TokenAuth
from tests.token_service import TokenService

PASSWORD = "dfdaemon-path-secret"
WEIGHTS = os.urandom(1 << 20)
FILES = {"model.safetensors": WEIGHTS, "config.json": b'{"layers": 2}'}


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[TinyProxy]:
    with TinyProxy(tmp_path / "tinyproxy") as server:
        yield server


async def test_bearer_token_registry_through_the_proxy_with_ranges(
    tmp_path: Path, proxy: TinyProxy
) -> None:
    pki = make_pki(tmp_path / "pki")
    tokens = TokenService(key=pki.ca_key, cert=pki.ca_cert, users={"bob": PASSWORD})
    await tokens.start()
    try:
        auth = TokenAuth(tokens.realm, tokens.service, tokens.issuer, pki.ca_cert)
        with RegistryServer(tmp_path / "registry", token=auth) as registry:
            async with OciPusher(registry.url, username="bob", password=PASSWORD) as pusher:
                await pusher.push("secure/model", modelpack_artifact(FILES), "v1")
            docker_config = tmp_path / "config.json"
            secret = base64.b64encode(f"bob:{PASSWORD}".encode()).decode()
            docker_config.write_text(json.dumps({"auths": {registry.host: {"auth": secret}}}))
            # Exactly the settings the README gives for a dfdaemon proxy, with tinyproxy's URL.
            config = load_config(
                None,
                {},
                {
                    "registries.insecure": ["127.0.0.1"],
                    "registries.proxy": {"*": proxy.url},
                    "registries.docker_config": str(docker_config),
                    "pull.range_threshold_bytes": "256Ki",
                    "pull.range_chunk_bytes": "128Ki",
                },
            )
            origins = build_sources(config)
            store = Store.open(tmp_path / "store")
            engine = PullEngine(store, SourceRegistry(origins.sources), config.pull)
            try:
                model = await engine.pull(f"{registry.host}/secure/model:v1")
                tree = files_of(store.root / "models" / model.digest.replace(":", "/"))
            finally:
                await engine.aclose()
                await origins.aclose()
                store.close()
    finally:
        await tokens.stop()
    assert tree == {p: sha256(d).split(":")[1] for p, d in FILES.items()}
    seen = proxy.requests()
    urls = [url for method, url in seen if method == "GET"]
    base = f"http://{registry.host}/v2/secure/model"
    assert any(u.startswith(tokens.realm) for u in urls), seen  # the token, through the proxy
    # The tag is resolved with a HEAD and the manifest fetched by digest (quota-friendly).
    assert ("HEAD", f"{base}/manifests/v1") in seen
    assert f"{base}/manifests/{model.digest}" in urls
    # 1 MiB in 128 KiB ranges: eight ranged GETs of the same blob went through the proxy.
    assert urls.count(f"{base}/blobs/{sha256(WEIGHTS)}") == 8


async def test_range_requests_pass_through_the_proxy(tmp_path: Path, proxy: TinyProxy) -> None:
    async with FaultServer() as origin:
        origin.add("weights.bin", WEIGHTS)
        config = load_config(
            None,
            {},
            {
                "registries.insecure": ["127.0.0.1"],
                "registries.proxy": {origin.host: proxy.url},
                "policy.http_allowed_networks": ["127.0.0.0/8"],  # the test origin's loopback
            },
        )
        origins = build_sources(config)
        try:
            http = next(s for s in origins.sources if s.kind == "http")
            ref = parse_ref(f"{origin.url('weights.bin')}#sha256={sha256(WEIGHTS).split(':')[1]}")
            resolved = await http.resolve(ref)
            blob: BlobRef = resolved.layers[0].blob
            got = b"".join([c async for c in http.fetch(blob, 1000, 5000)])
        finally:
            await origins.aclose()
    assert got == WEIGHTS[1000:5000]
    ranged = [s for s in origin.seen("weights.bin") if "Range" in s.headers]
    assert ranged and ranged[-1].headers["Range"] == "bytes=1000-4999"
    assert "tinyproxy" in ranged[-1].headers.get("Via", "")  # it really went through the proxy
    assert proxy.requests()[-1] == ("GET", origin.url("weights.bin"))
