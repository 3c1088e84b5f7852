"""Tag cache with TTL, pins, leases and access times."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cacheagent.digest import sha256_digest
from cacheagent.errors import ModelNotFoundError
from cacheagent.store import Store
from tests.unit.store_helpers import add_model

D1 = sha256_digest(b"one")
D2 = sha256_digest(b"two")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "store") as s:
        yield s


def test_tag_resolves_until_its_ttl_passes(store: Store) -> None:
    store.set_tag("reg.example/m:v1", D1, ttl_seconds=0.3)
    assert store.resolve_tag("reg.example/m:v1") == D1
    time.sleep(0.35)
    assert store.resolve_tag("reg.example/m:v1") is None
    assert store.lookup_ref("reg.example/m:v1") == D1  # offline fallback ignores the TTL


def test_zero_ttl_is_expired_at_once(store: Store) -> None:
    store.set_tag("r:latest", D1, ttl_seconds=0)
    assert store.resolve_tag("r:latest") is None
    assert store.lookup_ref("r:latest") == D1


def test_retag_moves_the_tag(store: Store) -> None:
    store.set_tag("r:v1", D1, 60)
    store.set_tag("r:v1", D2, 60)
    assert store.resolve_tag("r:v1") == D2
    assert store.lookup_ref("r:v1") == D2


def test_unknown_ref(store: Store) -> None:
    assert store.resolve_tag("nope:v1") is None
    assert store.lookup_ref("nope:v1") is None


def test_several_tags_point_at_one_model(store: Store) -> None:
    m = add_model(store, "m", {"w": b"w"}, ref="r:v1")
    store.set_tag("r:v1", m.digest, 60)
    store.set_tag("r:latest", m.digest, 60)
    store.set_tag("other:x", D2, 60)
    model = store.get_model(m.digest)
    assert model is not None and model.refs == ("r:latest", "r:v1")
    assert store.list_models()[0].refs == ("r:latest", "r:v1")


def test_lookup_ref_falls_back_to_the_ref_a_model_was_pulled_as(store: Store) -> None:
    m = add_model(store, "m", {"w": b"w"}, ref="r:pulled")
    assert store.resolve_tag("r:pulled") is None
    assert store.lookup_ref("r:pulled") == m.digest


def test_pins(store: Store) -> None:
    m = add_model(store, "m", {"w": b"w"})
    store.pin(m.digest)
    store.pin(m.digest)
    model = store.get_model(m.digest)
    assert model is not None and model.pinned
    store.unpin(m.digest)
    store.unpin(m.digest)
    model = store.get_model(m.digest)
    assert model is not None and not model.pinned
    with pytest.raises(ModelNotFoundError):
        store.pin(D1)


def test_leases(store: Store) -> None:
    m = add_model(store, "m", {"w": b"w"})
    store.add_lease(m.digest, "vol-a", "csi")
    store.add_lease(m.digest, "vol-a", "csi")
    store.add_lease(m.digest, "fh-9", "fuse")
    store.add_lease(D1, "pull-x", "pull")  # a pull leases a digest before the model exists
    assert [(lease.holder, lease.kind) for lease in store.leases(m.digest)] == [
        ("vol-a", "csi"),
        ("fh-9", "fuse"),
    ]
    assert len(store.leases()) == 3
    assert all(lease.created > 0 for lease in store.leases())
    store.release_lease("vol-a")
    store.release_lease("unknown")
    assert [lease.holder for lease in store.leases(m.digest)] == ["fh-9"]
    with pytest.raises(ValueError, match="lease kind 'mount'"):
        store.add_lease(m.digest, "h", "mount")
    with pytest.raises(ValueError, match="holder"):
        store.add_lease(m.digest, "", "csi")


def test_touch_updates_last_use(store: Store) -> None:
    m = add_model(store, "m", {"w": b"w"})
    time.sleep(0.01)
    store.touch(m.digest)
    touched = store.get_model(m.digest)
    assert touched is not None and touched.last_used > m.last_used
    store.touch(D1)  # unknown: ignored


def test_leases_survive_restart_except_fuse_and_pull(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with Store.open(root) as store:
        m = add_model(store, "m", {"w": b"w"})
        store.add_lease(m.digest, "vol-a", "csi")
        store.add_lease(m.digest, "fh-1", "fuse")
        store.add_lease(D1, "pull-1", "pull")
        store.pin(m.digest)
        store.set_tag("r:v1", m.digest, 3600)
    with Store.open(root) as store:
        assert [lease.holder for lease in store.leases()] == ["vol-a"]
        assert store.last_reconcile.leases_dropped == 2
        model = store.get_model(m.digest)
        assert model is not None and model.pinned
        assert store.resolve_tag("r:v1") == m.digest
