"""One agent per store, and the read-only view."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cacheagent.errors import ConfigError, StoreError, StoreLockedError
from cacheagent.store import Store
from tests.unit.store_helpers import add_model

HOLD = """
import sys, time
from pathlib import Path
from cacheagent.store import Store
store = Store.open(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_second_open_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with Store.open(tmp_path) as first:
        with pytest.raises(StoreLockedError) as info:
            Store.open(tmp_path)
        message = str(info.value)
        assert str(first.root) in message
        assert "pid" in message
    with Store.open(tmp_path):
        pass  # released on close


def test_lock_names_the_holder_pid_and_dies_with_it(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}\\b"):
            Store.open(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the flock with the process
        try:
            Store.open(tmp_path).close()
            break
        except StoreLockedError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_read_only_view_works_beside_the_agent(tmp_path: Path) -> None:
    with Store.open(tmp_path) as agent:
        model = add_model(agent, "m", {"w": b"weights"})
        with Store.open(tmp_path, lock=False) as view:
            assert [m.digest for m in view.list_models()] == [model.digest]
            assert view.usage().used == 7
            assert view.plan_eviction(7).models == (model.digest,)
            for change in (
                lambda: view.add_blob_bytes(b"x"),
                lambda: view.remove_model(model.digest),
                lambda: view.touch(model.digest),
                lambda: view.pin(model.digest),
                lambda: view.fsck(),
                lambda: view.ensure_room(1),
            ):
                with pytest.raises(StoreError, match="read-only"):
                    change()
        assert agent.get_model(model.digest) is not None


def test_read_only_view_of_no_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store index"):
        Store.open(tmp_path / "missing", lock=False)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"capacity_bytes": -1}, "store.capacity"),
        ({"high_watermark": 1.5}, "store.high_watermark"),
        ({"high_watermark": 0.5, "low_watermark": 0.7}, "store.low_watermark"),
        ({"low_watermark": 0}, "store.low_watermark"),
    ],
)
def test_bad_limits_are_refused(tmp_path: Path, kwargs: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Store.open(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert info.value.key == key
