"""A hostile registry against the real agent: every abuse is a clear, bounded failure.

One agent serves the whole module (it must keep serving after each failure); each case gets a
repository of its own on a ``HostileServer`` listed in ``registries.insecure``. Every case
asserts the error's code and the words that say what went wrong, that the preheat failed within
a bounded time, that nothing of the model was committed (no model, no blob of the declared or
of the served digest), and that the agent's peak resident memory stayed under 300 MB.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from cacheagent.sources.retry import MIN_PROGRESS_BYTES
from tests.agent_process import AgentProcess
from tests.fault_server import Fault
from tests.faults.harness import (
    FAST_PULL,
    MiB,
    Rig,
    blob_files,
    open_view,
    pid_of,
    preheat_failure,
    preheat_ok,
    rss_bytes,
    status,
)
from tests.faults.hostile_server import HostileServer
from tests.oci_push import OCI_INDEX, OCI_MANIFEST, Artifact, canonical_json, modelpack_artifact
from tests.threaded import ThreadedServer

RSS_LIMIT_BYTES = 300 * MiB
FAIL_WITHIN_SECONDS = 30.0
MANIFEST_LIMIT = 1 * MiB


@dataclass
class Hostile:
    server: HostileServer
    origin: ThreadedServer[HostileServer]
    agent: AgentProcess


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    rig = Rig()
    try:
        server = HostileServer(stall_seconds=5.0)
        origin = rig.serve(server)
        extra = {"pull": {**FAST_PULL, "manifest_max_bytes": MANIFEST_LIMIT}}
        agent = rig.agent(insecure=(origin.host,), extra=extra).start()
        yield Hostile(server, origin, agent)
    finally:
        rig.close()


def weights(seed: int, size: int = 1 * MiB) -> Artifact:
    """A one-layer ModelPack artifact (so no other blob of it could be committed)."""
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32)
    return modelpack_artifact({"model.safetensors": data})


def layer_digest(artifact: Artifact) -> str:
    digest: str = json.loads(artifact.manifest)["layers"][0]["digest"]
    return digest


def blob_name(repo: str, digest: str) -> str:
    return f"v2/{repo}/blobs/{digest}"


def manifest_name(repo: str, reference: str = "v1") -> str:
    return f"v2/{repo}/manifests/{reference}"


def fails(h: Hostile, ref: str, *fragments: str, code: str | None = None) -> str:
    """Preheat ``ref``; it must fail in time with ``code`` and every fragment in the message."""
    started = time.monotonic()
    got, message = preheat_failure(h.agent, ref, timeout=FAIL_WITHIN_SECONDS + 30)
    assert time.monotonic() - started < FAIL_WITHIN_SECONDS, f"took too long: {message}"
    assert got != "INTERNAL", message
    if code is not None:
        assert got == code, message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return message


def nothing_committed(h: Hostile, manifest_digest: str | None, *blobs: str) -> None:
    on_disk = blob_files(h.agent)
    for digest in blobs:
        assert digest not in on_disk, f"blob {digest} was committed"
    if manifest_digest is not None:
        with open_view(h.agent) as store:
            assert store.get_model(manifest_digest) is None, "the model was committed"
    _, peak = rss_bytes(pid_of(h.agent))
    assert peak < RSS_LIMIT_BYTES, f"agent peak RSS {peak / MiB:.0f} MiB"
    assert status(h.agent).version  # still serving


# --------------------------------------------------------------------------- blobs


def test_wrong_digest(hostile: Hostile) -> None:
    artifact = weights(1)
    ref = hostile.server.publish("wrong-digest", artifact)
    digest = layer_digest(artifact)
    lie = bytes(b ^ 0xFF for b in artifact.blobs[digest])
    hostile.server.add(blob_name("wrong-digest", digest), lie)
    fails(hostile, ref, "digest mismatch", digest, "sha256:" + hashlib.sha256(lie).hexdigest())
    nothing_committed(hostile, artifact.digest, digest, "sha256:" + hashlib.sha256(lie).hexdigest())


def test_more_bytes_than_declared(hostile: Hostile) -> None:
    artifact = weights(2)
    ref = hostile.server.publish("too-long", artifact)
    digest = layer_digest(artifact)
    hostile.server.add(blob_name("too-long", digest), artifact.blobs[digest] + b"x" * 4096)
    size = len(artifact.blobs[digest])
    fails(hostile, ref, digest, f"expected {size} bytes")
    nothing_committed(hostile, artifact.digest, digest)


def test_more_bytes_than_declared_chunked(hostile: Hostile) -> None:
    artifact = weights(3)
    ref = hostile.server.publish("too-long-chunked", artifact)
    digest = layer_digest(artifact)
    hostile.server.add(
        blob_name("too-long-chunked", digest),
        artifact.blobs[digest] + b"x" * 4096,
        declare_length=False,
    )
    fails(hostile, ref, digest, f"expected {len(artifact.blobs[digest])} bytes")
    nothing_committed(hostile, artifact.digest, digest)


def test_endless_body(hostile: Hostile) -> None:
    artifact = weights(4)
    ref = hostile.server.publish("endless", artifact)
    digest = layer_digest(artifact)
    name = blob_name("endless", digest)
    hostile.server.endless(name)
    fails(hostile, ref, digest, f"expected {len(artifact.blobs[digest])} bytes")
    nothing_committed(hostile, artifact.digest, digest)
    assert hostile.server.sent[name] < 64 * MiB, "the agent kept reading an endless body"


def test_slowloris_blob(hostile: Hostile) -> None:
    artifact = weights(5)
    ref = hostile.server.publish("slow-blob", artifact)
    digest = layer_digest(artifact)
    hostile.server.drip(blob_name("slow-blob", digest), artifact.blobs[digest], interval=0.2)
    fails(
        hostile,
        ref,
        digest,
        "giving up",
        f"less than {MIN_PROGRESS_BYTES} bytes",
        code="UNAVAILABLE",
    )
    nothing_committed(hostile, artifact.digest, digest)


def test_drop_storm_with_a_little_progress_each_time(hostile: Hostile) -> None:
    """Each connection delivers 1% of what is left, then drops: a few bytes of progress per
    attempt must not renew the retry budget forever."""
    artifact = weights(14)
    ref = hostile.server.publish("drop-storm", artifact)
    digest = layer_digest(artifact)
    hostile.server.inject(
        blob_name("drop-storm", digest), Fault("drop", times=100_000, cut_at=0.01)
    )
    fails(hostile, ref, "giving up", code="UNAVAILABLE")
    nothing_committed(hostile, artifact.digest, digest)


def test_5xx_storm_on_a_blob(hostile: Hostile) -> None:
    artifact = weights(6)
    ref = hostile.server.publish("storm-503", artifact)
    digest = layer_digest(artifact)
    hostile.server.inject(blob_name("storm-503", digest), Fault("status", times=1000, status=503))
    fails(hostile, ref, "giving up", "503", code="UNAVAILABLE")
    nothing_committed(hostile, artifact.digest, digest)


def test_redirect_loop_on_a_blob(hostile: Hostile) -> None:
    artifact = weights(7)
    ref = hostile.server.publish("loop-blob", artifact)
    digest = layer_digest(artifact)
    name = blob_name("loop-blob", digest)
    hostile.server.inject(name, Fault("redirect", times=1000, location=f"/{name}"))
    fails(hostile, ref, "redirects")
    nothing_committed(hostile, artifact.digest, digest)


# --------------------------------------------------------------------------- manifests


def test_429_storm_on_the_manifest(hostile: Hostile) -> None:
    artifact = weights(8)
    ref = hostile.server.publish("storm-429", artifact)
    hostile.server.inject(
        manifest_name("storm-429"), Fault("status", times=1000, status=429, retry_after="0")
    )
    fails(hostile, ref, "giving up", "429", code="UNAVAILABLE")
    nothing_committed(hostile, artifact.digest, layer_digest(artifact))


def test_429_asking_for_an_hour(hostile: Hostile) -> None:
    artifact = weights(9)
    ref = hostile.server.publish("storm-429-hour", artifact)
    hostile.server.inject(
        manifest_name("storm-429-hour"), Fault("status", times=1000, status=429, retry_after="3600")
    )
    fails(hostile, ref, "429", code="UNAVAILABLE")
    assert hostile.server.count(manifest_name("storm-429-hour"), "GET") == 1


def test_invalid_json_manifest(hostile: Hostile) -> None:
    hostile.server.add(manifest_name("bad-json"), b'{"schemaVersion": 2, "layers": [', OCI_MANIFEST)
    fails(hostile, f"{hostile.origin.host}/bad-json:v1", "not valid JSON")
    nothing_committed(hostile, None)


def test_huge_manifest_declared(hostile: Hostile) -> None:
    body = b'{"schemaVersion": 2' + b" " * (MANIFEST_LIMIT + 1) + b"}"
    hostile.server.add(manifest_name("huge"), body, OCI_MANIFEST)
    # "is N bytes": refused on its Content-Length, before reading the body
    fails(hostile, f"{hostile.origin.host}/huge:v1", f"is {len(body)} bytes, over the")
    nothing_committed(hostile, None)


def test_huge_manifest_chunked(hostile: Hostile) -> None:
    body = b'{"schemaVersion": 2' + b" " * (8 * MANIFEST_LIMIT) + b"}"
    hostile.server.add(manifest_name("huge-chunked"), body, OCI_MANIFEST, declare_length=False)
    fails(hostile, f"{hostile.origin.host}/huge-chunked:v1", f"over the {MANIFEST_LIMIT}-byte")
    nothing_committed(hostile, None)


def test_endless_manifest(hostile: Hostile) -> None:
    name = manifest_name("endless-manifest")
    hostile.server.endless(name, OCI_MANIFEST)
    fails(hostile, f"{hostile.origin.host}/endless-manifest:v1", "byte limit")
    assert hostile.server.sent[name] < 16 * MANIFEST_LIMIT
    nothing_committed(hostile, None)


def test_slowloris_manifest(hostile: Hostile) -> None:
    artifact = weights(10)
    ref = hostile.server.publish("slow-manifest", artifact)
    hostile.server.drip(
        manifest_name("slow-manifest"), artifact.manifest, interval=0.2, content_type=OCI_MANIFEST
    )
    fails(hostile, ref, "giving up", code="UNAVAILABLE")
    nothing_committed(hostile, artifact.digest, layer_digest(artifact))


def test_redirect_loop_on_the_manifest(hostile: Hostile) -> None:
    name = manifest_name("loop-manifest")
    hostile.server.add(name, b"{}", OCI_MANIFEST)
    hostile.server.inject(name, Fault("redirect", times=1000, location=f"/{name}"))
    fails(hostile, f"{hostile.origin.host}/loop-manifest:v1", "more than 5 redirects")
    nothing_committed(hostile, None)


def test_index_pointing_to_itself(hostile: Hostile) -> None:
    """The index lists a manifest; asked for that digest, the registry serves the index again."""
    target = weights(11)
    index = index_of(target.digest, len(target.manifest), OCI_MANIFEST)
    repo = "self-index"
    hostile.server.add(manifest_name(repo), index, OCI_INDEX)
    hostile.server.add(manifest_name(repo, target.digest), index, OCI_INDEX)
    fails(hostile, f"{hostile.origin.host}/{repo}:v1", "digest mismatch", target.digest)
    nothing_committed(hostile, target.digest, layer_digest(target))


def test_index_chain_too_deep(hostile: Hostile) -> None:
    repo = "deep-index"
    artifact = weights(12)
    hostile.server.publish(repo, artifact, tag="leaf")
    digest, size, media_type = artifact.digest, len(artifact.manifest), OCI_MANIFEST
    for _ in range(5):
        doc = index_of(digest, size, media_type)
        digest = "sha256:" + hashlib.sha256(doc).hexdigest()
        size, media_type = len(doc), OCI_INDEX
        hostile.server.add(manifest_name(repo, digest), doc, OCI_INDEX)
    hostile.server.add(manifest_name(repo), doc, OCI_INDEX)
    fails(hostile, f"{hostile.origin.host}/{repo}:v1", "nested deeper than")
    nothing_committed(hostile, artifact.digest, layer_digest(artifact))


def index_of(digest: str, size: int, media_type: str) -> bytes:
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": media_type, "digest": digest, "size": size}],
        }
    )


# --------------------------------------------------------------------------- afterwards


def test_agent_still_serves_a_good_model(hostile: Hostile) -> None:
    artifact = weights(13, size=2 * MiB)
    ref = hostile.server.publish("good", artifact)
    event = preheat_ok(hostile.agent, ref)
    assert event.manifest_digest == artifact.digest
    current, peak = rss_bytes(pid_of(hostile.agent))
    assert peak < RSS_LIMIT_BYTES and current < RSS_LIMIT_BYTES
    assert os.path.exists(hostile.agent.store_root)
