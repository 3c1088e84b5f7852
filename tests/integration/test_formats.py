"""Model formats end to end against the real docker-registry: indexes that carry a ModelPack
manifest beside a runnable image, modelcar images, and file-pattern views of a model.

Every model is built by its format's own rules (tests/modelcar_image.py, tests/oci_push.py),
pushed over the distribution API, pulled by the real engine into a real store, and the tree on
disk is compared with what the format says it holds.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cacheagent.errors import SourceError, UnsafePathError
from cacheagent.pull.engine import PullEngine, SourceRegistry
from cacheagent.refs import parse_ref
from cacheagent.sources.registry import RegistryOptions, RegistrySource
from cacheagent.sources.retry import RetryPolicy
from cacheagent.sources.transport import Transport, TransportOptions
from cacheagent.store import Store
from tests.modelcar_image import (
    BASE_OS,
    Entry,
    expected_tree,
    file,
    image,
    image_index,
    opaque,
    whiteout,
)
from tests.oci_push import MODELPACK_ARTIFACT, Artifact, OciPusher, modelpack_artifact
from tests.registry_server import RegistryServer

pytestmark = pytest.mark.registry

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=1.0, max_total_seconds=10.0)
WEIGHTS = random.Random(7).randbytes(200_000)
MODEL_FILES = {
    "config.json": b'{"model_type": "test"}',
    "tokenizer.json": b'{"version": "1.0"}',
    "model.safetensors": WEIGHTS,
    "original/consolidated.pth": WEIGHTS[::-1],
}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path / "registry") as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
async def engine(registry: RegistryServer, store: Store) -> AsyncIterator[PullEngine]:
    transport = Transport(TransportOptions(insecure=frozenset({registry.host})))
    source = RegistrySource(
        transport, options=RegistryOptions(platform=("linux", "amd64"), retry=FAST)
    )
    eng = PullEngine(store, SourceRegistry([source]))
    yield eng
    await eng.aclose()
    await transport.aclose()


async def push(registry: RegistryServer, repo: str, artifact: Artifact, tag: str) -> str:
    async with OciPusher(registry.url) as pusher:
        return await pusher.push(repo, artifact, tag)


def tree(store: Store, digest: str) -> dict[str, bytes]:
    root = store.model_path(digest)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


MODELCAR_LAYERS: list[list[Entry]] = [
    list(BASE_OS),
    [],  # empty layers (ENV, WORKDIR...): the same blob twice in one image
    [],
    [
        Entry("./models/", kind="dir"),
        file("./models/config.json", b'{"model_type": "old"}'),
        file("./models/model.safetensors", WEIGHTS),
        file("./models/stale.bin", b"removed by a whiteout above"),
        Entry("./models/extra/", kind="dir"),
        file("./models/extra/a.txt", b"hidden by the opaque dir above"),
        file("./models/extra/b.txt", b"also hidden"),
        file("./models/run.sh", b"#!/bin/sh\necho hi\n", 0o755),
        file("./etc/model-note", b"outside /models: ignored"),
    ],
    [
        file("./models/config.json", b'{"model_type": "test"}'),
        whiteout("./models/stale.bin"),
        opaque("./models/extra"),
        file("./models/extra/c.txt", b"the only file left in extra"),
        file("./models/tokenizer.json", b'{"version": "1.0"}'),
        Entry("./models/tokenizer-link", kind="hardlink", link="./models/tokenizer.json"),
    ],
]


async def test_index_with_image_and_modelpack_picks_modelpack(
    registry: RegistryServer, engine: PullEngine, store: Store
) -> None:
    """The index a modelcar builder publishes: the node's platform (linux/amd64) matches the
    runnable image, yet the ModelPack manifest beside it is what gets pulled."""
    modelpack = modelpack_artifact(MODEL_FILES)
    runnable = image(MODELCAR_LAYERS)
    index = image_index(runnable, modelpack, modelpack_artifact_type=MODELPACK_ARTIFACT)
    await push(registry, "models/both", runnable, runnable.digest)
    await push(registry, "models/both", modelpack, modelpack.digest)
    await push(registry, "models/both", index, "v1")

    model = await engine.pull(f"{registry.host}/models/both:v1")

    assert model.digest == modelpack.digest
    assert tree(store, model.digest) == MODEL_FILES


async def test_index_without_modelpack_entry_takes_the_modelcar_image(
    registry: RegistryServer, engine: PullEngine, store: Store
) -> None:
    """Without the ModelPack descriptor mark the platform rule applies, and the image is
    accepted as a modelcar rather than refused as "not a model artifact"."""
    modelpack = modelpack_artifact(MODEL_FILES)
    runnable = image(MODELCAR_LAYERS)
    index = image_index(runnable, modelpack, modelpack_artifact_type=None)
    await push(registry, "models/plain", runnable, runnable.digest)
    await push(registry, "models/plain", modelpack, modelpack.digest)
    await push(registry, "models/plain", index, "v1")

    model = await engine.pull(f"{registry.host}/models/plain:v1")

    assert model.digest == runnable.digest
    assert tree(store, model.digest) == expected_tree(MODELCAR_LAYERS)


async def test_modelcar_image_takes_only_models_with_whiteouts(
    registry: RegistryServer, engine: PullEngine, store: Store
) -> None:
    runnable = image(MODELCAR_LAYERS)
    await push(registry, "models/car", runnable, "v1")

    model = await engine.pull(f"{registry.host}/models/car:v1")

    files = tree(store, model.digest)
    assert files == expected_tree(MODELCAR_LAYERS)
    assert files == {
        "config.json": b'{"model_type": "test"}',
        "model.safetensors": WEIGHTS,
        "extra/c.txt": b"the only file left in extra",
        "run.sh": b"#!/bin/sh\necho hi\n",
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer-link": b'{"version": "1.0"}',
    }
    modes = {f.path: f.mode for f in model.files}
    assert modes["run.sh"] == 0o555 and modes["config.json"] == 0o444


async def test_image_without_models_dir_is_refused_by_name(
    registry: RegistryServer, engine: PullEngine, store: Store
) -> None:
    runnable = image([list(BASE_OS)])
    await push(registry, "models/os-only", runnable, "v1")

    with pytest.raises(SourceError, match="no files under /models"):
        await engine.pull(f"{registry.host}/models/os-only:v1")
    assert store.get_model(runnable.digest) is None


async def test_hard_link_out_of_models_is_refused(
    registry: RegistryServer, engine: PullEngine
) -> None:
    layers = [
        list(BASE_OS),
        [Entry("models/passwd", kind="hardlink", link="etc/os-release")],
    ]
    await push(registry, "models/escape", image(layers), "v1")

    with pytest.raises(UnsafePathError, match="outside /models"):
        await engine.pull(f"{registry.host}/models/escape:v1")


async def test_patterns_pull_only_matching_files_and_share_blobs(
    registry: RegistryServer, engine: PullEngine, store: Store
) -> None:
    modelpack = modelpack_artifact(MODEL_FILES)
    await push(registry, "models/qwen", modelpack, "v1")
    base = f"{registry.host}/models/qwen:v1"

    light = await engine.pull(f"{base}|include=*.json")
    assert tree(store, light.digest) == {
        "config.json": MODEL_FILES["config.json"],
        "tokenizer.json": MODEL_FILES["tokenizer.json"],
    }
    small = sum(len(MODEL_FILES[p]) for p in ("config.json", "tokenizer.json"))
    assert engine.fetched_bytes() == {"oci": small}  # the weights never left the registry

    no_dupes = await engine.pull(f"{base}|exclude=*.pth,original/")
    full = await engine.pull(base)
    assert len({light.digest, no_dupes.digest, full.digest}) == 3
    assert set(tree(store, no_dupes.digest)) == {
        "config.json",
        "tokenizer.json",
        "model.safetensors",
    }
    assert tree(store, full.digest) == MODEL_FILES
    view_weights = store.model_path(no_dupes.digest) / "model.safetensors"
    full_weights = store.model_path(full.digest) / "model.safetensors"
    assert view_weights.stat().st_ino == full_weights.stat().st_ino  # one blob, two trees
    # each byte came from the origin once, across the three models
    assert engine.fetched_bytes() == {"oci": sum(len(d) for d in MODEL_FILES.values())}


async def test_pattern_set_is_part_of_the_cache_key(
    registry: RegistryServer, engine: PullEngine, store: Store
) -> None:
    await push(registry, "models/key", modelpack_artifact(MODEL_FILES), "v1")
    base = f"{registry.host}/models/key:v1"
    one = await engine.pull(f"{base}|exclude=original/,*.pth")
    same = await engine.pull(f"{base}|exclude=*.pth,original/")  # same set, other order
    assert one.digest == same.digest
    stored = store.get_model(one.digest)
    assert stored is not None
    assert parse_ref(f"{base}|exclude=*.pth,original/").canonical in stored.refs
    assert f"{base}|exclude=*.pth,original/" in stored.refs


async def test_pattern_that_keeps_nothing_is_refused(
    registry: RegistryServer, engine: PullEngine
) -> None:
    await push(registry, "models/none", modelpack_artifact(MODEL_FILES), "v1")
    with pytest.raises(SourceError, match="keeps none"):
        await engine.pull(f"{registry.host}/models/none:v1|include=*.gguf")


async def test_modelcar_view_filters_stacked_files(
    registry: RegistryServer, engine: PullEngine, store: Store
) -> None:
    await push(registry, "models/carview", image(MODELCAR_LAYERS), "v1")
    model = await engine.pull(f"{registry.host}/models/carview:v1|exclude=*.safetensors,extra/")
    assert set(tree(store, model.digest)) == {
        "config.json",
        "run.sh",
        "tokenizer.json",
        "tokenizer-link",
    }
