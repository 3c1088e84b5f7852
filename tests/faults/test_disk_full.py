"""The store's filesystem fills up in the middle of a pull.

The store lives on a 64 MiB tmpfs shared with a filler file (other data on the node's disk), so
the capacity check passes (the store itself is far below its limit) and the disk runs out while
the pull writes: once while preallocating a raw blob's partial file, once while a tar layer
unpacks. The client must get RESOURCE_EXHAUSTED with a message that says the disk is full, the
model already cached must stay whole, nothing of the failed model may be visible, the agent must
keep answering, and once space is freed the same pull must succeed without a restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from cacheagent._proto.cacheagent.v1 import agent_pb2 as apb
from tests.agent_process import AgentProcess
from tests.faults.harness import (
    OK,
    LayoutModel,
    MiB,
    Rig,
    agent_call,
    fsck,
    make_model,
    open_view,
    preheat_failure,
    preheat_ok,
    publish,
    status,
    target_path,
    unpublish,
    verify_models,
)
from tests.oci.layout_writer import LayoutEntry, write_layout
from tests.support import require_binary

pytestmark = pytest.mark.root

DISK_BYTES = 64 * MiB
FILLER_BYTES = 40 * MiB


def mount_small_disk(rig: Rig, agent: AgentProcess) -> Path:
    """A 64 MiB tmpfs holding the agent's store (through a symlink) and a filler file."""
    disk = rig.root / "disk"
    disk.mkdir()
    subprocess.run(
        [require_binary("mount"), "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0755", "tmpfs",
         str(disk)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    (disk / "store").mkdir()
    agent.work.mkdir(parents=True, exist_ok=True)
    agent.store_root.symlink_to(disk / "store")
    return disk


def fill(disk: Path) -> Path:
    filler = disk / "filler.bin"
    with open(filler, "wb") as f:
        for _ in range(FILLER_BYTES // MiB):
            f.write(os.urandom(MiB))
    return filler


def raw_model(path: Path) -> LayoutModel:
    """24 MiB of raw weights: two 12 MiB partial files do not fit in what is left."""
    return make_model(path, seed=7, weight_bytes=24 * MiB)


def tar_model(path: Path) -> LayoutModel:
    """A tar+gzip layer of about 11 MiB that unpacks to 20 MiB of hex text."""
    text = os.urandom(10 * MiB).hex().encode()
    digest = write_layout(path, [LayoutEntry("weights.txt", text, "tar+gzip", "weight")], tag="v1")
    return LayoutModel(path, "v1", digest, {"weights.txt": text})


@pytest.mark.parametrize("build", [raw_model, tar_model], ids=["preallocate", "unpack"])
def test_disk_full_mid_pull(rig: Rig, tmp_path: Path, build: Callable[[Path], LayoutModel]) -> None:
    agent = rig.agent()
    disk = mount_small_disk(rig, agent)
    kept = make_model(tmp_path / "kept", seed=3, weight_bytes=4 * MiB)
    big = build(tmp_path / "big")
    agent.start()
    preheat_ok(agent, kept.ref)
    filler = fill(disk)

    code, message = preheat_failure(agent, big.ref)
    assert code == "RESOURCE_EXHAUSTED", message
    assert "no space left" in message.lower() or "disk full" in message.lower(), message
    assert str(disk / "store") in message, message  # where: the store's filesystem

    answer = status(agent)
    assert answer.models == 1
    listed = agent_call(agent, "List", apb.ListRequest())
    assert [m.manifest_digest for m in listed.models] == [kept.digest]
    with open_view(agent) as store:
        assert store.get_model(big.digest) is None

    filler.unlink()  # the operator frees space: the same agent finishes the pull
    preheat_ok(agent, big.ref)
    agent.stop()
    report = fsck(agent)
    assert report["corrupt_blobs_removed"] == 0 and report["models_reset"] == 0, report
    assert set(verify_models(agent)) == {kept.digest, big.digest}
    assert len(json.loads(agent.cli("ls", "--offline", "--json").stdout)) == 2


def readyz(agent: AgentProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{agent.http}/readyz", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def wait_readyz(agent: AgentProcess, code: int, timeout: float = 60.0) -> str:
    """The /readyz body once it answers ``code`` (the store is checked every 2 s)."""
    deadline = time.monotonic() + timeout
    while (answer := readyz(agent))[0] != code:
        assert time.monotonic() < deadline, f"/readyz never answered {code}: {answer}"
        time.sleep(0.1)
    return answer[1]


def fill_up(disk: Path) -> Path:
    """Write until the filesystem refuses: nothing is left for the store's index."""
    filler = disk / "filler.bin"
    with open(filler, "wb") as f:
        for _ in range(DISK_BYTES // MiB):
            try:
                f.write(os.urandom(MiB))
                f.flush()
            except OSError:
                break
    return filler


def test_a_full_disk_turns_readyz_while_cached_models_still_publish(
    rig: Rig, tmp_path: Path
) -> None:
    agent = rig.agent()
    disk = mount_small_disk(rig, agent)
    kept = make_model(tmp_path / "kept", seed=5, weight_bytes=4 * MiB)
    agent.start()
    preheat_ok(agent, kept.ref)
    wait_readyz(agent, 200)

    filler = fill_up(disk)
    assert "disk" in wait_readyz(agent, 503).lower()
    for i in range(5):  # journal row, lease and access time: all written with the disk full
        target = target_path(agent, f"full{i}")
        assert publish(agent, f"full-{i}", target, kept.ref) == (OK, "")
        shard = "model-00001-of-00002.safetensors"
        assert (target / shard).read_bytes() == kept.files[shard]
        assert unpublish(agent, f"full-{i}", target) == (OK, "")

    filler.unlink()  # room again: the store says it is ready without a restart
    wait_readyz(agent, 200)
