"""A publish checks sizes: a truncated blob is repaired before its model is published again."""

from __future__ import annotations

import os
from pathlib import Path

from cacheagent.metrics import Metrics
from cacheagent.pull.engine import PullEngine, SourceRegistry
from cacheagent.refs import LayoutRef
from cacheagent.service import ModelService
from cacheagent.sources.layout import OciLayoutSource
from cacheagent.store import Store
from cacheagent.volumes import ReadyModel
from tests.oci.layout_writer import LayoutEntry, write_layout


async def test_a_truncated_blob_is_refetched_before_the_model_is_published(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    write_layout(tmp_path / "layout", [LayoutEntry("w.bin", data, "raw", "weight")], tag="v1")
    ref = LayoutRef(path=str(tmp_path / "layout"), tag="v1", digest=None)
    store = Store.open(tmp_path / "store")
    engine = PullEngine(store, SourceRegistry([OciLayoutSource()]))
    service = ModelService(store, engine)
    try:
        first = await service.ensure_model(ref, wait_seconds=30)
        assert isinstance(first, ReadyModel)
        model = store.get_model(first.digest)
        assert model is not None
        store.add_lease(model.digest, "csi:vol:/pod", "csi")  # a pod uses it
        inode = first.path.stat().st_ino
        blob = store.blob_path(model.files[0].blob)
        blob.chmod(0o644)
        os.truncate(blob, 100)
        again = await service.ensure_model(ref, wait_seconds=30)
        assert isinstance(again, ReadyModel)
        assert (again.path / "w.bin").read_bytes() == data
        assert again.path.stat().st_ino == inode  # repaired in place under the pod
        assert store.check_sizes(model.digest) is None
    finally:
        await engine.aclose()
        store.close()


def flip_a_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


async def test_the_scrub_finds_a_flipped_byte_quarantines_and_fetches_again(
    tmp_path: Path,
) -> None:
    data = os.urandom(1 << 20)
    write_layout(tmp_path / "layout", [LayoutEntry("w.bin", data, "raw", "weight")], tag="v1")
    ref = LayoutRef(path=str(tmp_path / "layout"), tag="v1", digest=None)
    store = Store.open(tmp_path / "store")
    engine = PullEngine(store, SourceRegistry([OciLayoutSource()]))
    metrics = Metrics()
    service = ModelService(store, engine, metrics=metrics)
    try:
        ready = await service.ensure_model(ref, wait_seconds=30)
        assert isinstance(ready, ReadyModel)
        store.add_lease(ready.digest, "csi:vol:/pod", "csi")
        inode = ready.path.stat().st_ino
        model = store.get_model(ready.digest)
        assert model is not None
        blob = store.blob_path(model.files[0].blob)
        blob.chmod(0o644)
        flip_a_byte(blob, 12345)  # same size: no size check sees it
        assert store.check_sizes(ready.digest) is None
        assert await service.scrub_once(64 << 20) == [ready.digest]
        assert (store.root / "quarantine" / blob.name).exists()
        assert metrics.registry.get_sample_value("cacheagent_scrub_failures_total") == 1
        again = await service.ensure_model(ref, wait_seconds=30)  # joins the re-fetch
        assert isinstance(again, ReadyModel)
        assert (again.path / "w.bin").read_bytes() == data
        assert again.path.stat().st_ino == inode  # repaired in place under the pod
        assert await service.scrub_once(64 << 20) == []
    finally:
        await engine.aclose()
        store.close()
