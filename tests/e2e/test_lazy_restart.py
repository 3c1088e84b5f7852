"""Lazy volumes across an agent restart: a pod-like reader streams a model through a lazy
volume while the agent is stopped (SIGTERM) or killed (SIGKILL) and started again. The FUSE
connection outlives the agent in the keeper (``cacheagent fuse-keeper``); the new agent resumes
it and the pull. Real registry behind a bandwidth cap, real FUSE, bind mounts and kubelet-shaped
CSI calls."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cacheagent.cli.client import AgentClient
from cacheagent.mountinfo import find_mount
from tests.agent_process import AgentProcess
from tests.e2e.conftest import Origin, kubelet, wait_until_no_pulls
from tests.e2e.test_lazy_agent import file_digests, lazy_volume
from tests.keeper_support import KeeperProcess, keeper_running
from tests.kubelet import Pod
from tests.mounts import force_unmount, mounts_under
from tests.support import require_fuse
from tests.threaded import serve_in_thread
from tests.throttle_proxy import ThrottleProxy

LINK_BYTES_PER_SECOND = 2 << 20  # the 24 MiB model pulls in ~12 s: the restart lands mid-pull
HANDOVER_SECONDS = 60.0  # the keeper's window; the longest a reader may wait across a restart
CHUNK = 1 << 20
READ_BEFORE_RESTART = 4 << 20
READER_TIMEOUT_SECONDS = 180.0


@dataclass
class Reader:
    """Streams every file of a volume in order, as a model loader would, timing each chunk."""

    root: Path
    digests: dict[str, str] = field(default_factory=dict)
    done_bytes: int = 0
    gaps: list[float] = field(default_factory=list)
    error: BaseException | None = None
    _thread: threading.Thread | None = None

    def start(self) -> Reader:
        self._thread = threading.Thread(target=self._run, name="pod-reader", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the reader hung (read {self.done_bytes} bytes)"
        if self.error is not None:
            raise AssertionError(f"the reader failed: {self.error!r}") from self.error

    def _run(self) -> None:
        try:
            last = time.monotonic()
            for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
                digest = hashlib.sha256()
                fd = os.open(path, os.O_RDONLY)
                try:
                    while chunk := os.read(fd, CHUNK):
                        digest.update(chunk)
                        self.done_bytes += len(chunk)
                        now = time.monotonic()
                        self.gaps.append(now - last)
                        last = now
                finally:
                    os.close(fd)
                self.digests[str(path.relative_to(self.root))] = digest.hexdigest()
        except BaseException as exc:  # reported by join()
            self.error = exc


@pytest.fixture
def keeper() -> Iterator[KeeperProcess]:
    require_fuse()
    home = Path(tempfile.mkdtemp(prefix="ca-keeper-", dir="/tmp"))  # unix socket paths are short
    try:
        with keeper_running(home / "keeper.sock", home / "keeper.log") as running:
            yield running
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _restart(agent: AgentProcess, how: str) -> None:
    if how == "sigterm":
        assert agent.stop() == 0
    else:
        agent.kill()
    agent.start()


def _wait_for(reader: Reader, done: int) -> None:
    deadline = time.monotonic() + READER_TIMEOUT_SECONDS
    while reader.done_bytes < done and reader.error is None:
        assert time.monotonic() < deadline, "the reader made no progress before the restart"
        time.sleep(0.02)


def _wait_for_listing(target: Path, expected: list[str]) -> None:
    """A model that was still downloading is listed anew each second (tar members appear as
    they unpack), so its final listing shows within about a second of the pull's end."""
    deadline = time.monotonic() + 10
    while sorted(os.listdir(target)) != expected:
        assert time.monotonic() < deadline, f"{sorted(os.listdir(target))} != {expected}"
        time.sleep(0.1)


def _teardown_fuse(agent: AgentProcess, keeper: KeeperProcess) -> None:
    """The agent detaches (the keeper holds the connection): stop both, then take the dead
    mount down the way the next agent would."""
    agent.stop()
    keeper.stop()
    for leftover in mounts_under(agent.kubelet_dir):
        force_unmount(leftover)
    if find_mount(agent.fuse_root) is not None:
        force_unmount(str(agent.fuse_root))
    agent.cleanup()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_reader_streams_a_lazy_volume_across_an_agent_restart(
    tmp_path: Path, origin: Origin, keeper: KeeperProcess, how: str
) -> None:
    model = origin.models["alpha"]
    proxy = ThrottleProxy(origin.registry.port, LINK_BYTES_PER_SECOND)
    with serve_in_thread(proxy):
        ref = model.ref.replace(origin.registry.host, proxy.address)
        agent = AgentProcess(
            tmp_path / "agent",
            insecure=(proxy.address,),
            fuse=True,
            extra={
                "fuse": {
                    "keeper_socket": str(keeper.socket_path),
                    "handover_seconds": HANDOVER_SECONDS,
                }
            },
        )
        agent.start()
        pod, volume = Pod(f"pod-restart-{how}"), lazy_volume(ref)
        try:
            with kubelet(agent) as k:
                assert k.set_up(pod, volume).ok
                target = k.target(pod, volume)
            reader = Reader(target).start()
            _wait_for(reader, READ_BEFORE_RESTART)
            with AgentClient(agent.socket) as client:
                assert model.digest in [p.manifest_digest for p in client.status().pulls], (
                    "the pull finished before the restart: the test proves nothing"
                )
            _restart(agent, how)
            assert "resumed the connection" in agent.log_text()
            reader.join(READER_TIMEOUT_SECONDS)
            wait_until_no_pulls(agent, timeout=120.0)
            with AgentClient(agent.socket) as client:
                stored = Path(client.stat(model.digest).path)
            # Members of the model's tar layer (code/) show once it is unpacked, so the reader,
            # which listed the volume at the start of the pull, streamed the raw files only.
            expected = file_digests(stored)
            assert reader.digests == {name: expected[name] for name in reader.digests}
            assert {name for name in expected if name.endswith(".safetensors")} <= set(
                reader.digests
            )
            pause = max(reader.gaps)
            print(f"\nlongest pause a reader saw across the {how} restart: {pause:.2f}s")
            assert pause < HANDOVER_SECONDS
            # New opens and listings after the restart go through the resumed connection too.
            _wait_for_listing(target, sorted(os.listdir(stored)))
            with kubelet(agent) as k:
                outcome = k.tear_down(pod, volume)
                assert outcome.ok, outcome
            assert find_mount(target) is None
            assert not mounts_under(agent.kubelet_dir)
        finally:
            _teardown_fuse(agent, keeper)
    assert find_mount(agent.fuse_root) is None


def test_without_an_agent_the_keeper_ends_the_connection_after_the_window(
    tmp_path: Path, origin: Origin, keeper: KeeperProcess
) -> None:
    """No agent comes back: once ``handover_seconds`` pass, a read fails instead of hanging."""
    model = origin.models["beta"]
    window = 3.0
    agent = AgentProcess(
        tmp_path / "agent",
        insecure=(origin.registry.host,),
        fuse=True,
        extra={"fuse": {"keeper_socket": str(keeper.socket_path), "handover_seconds": window}},
    )
    agent.start()
    pod, volume = Pod("pod-orphan"), lazy_volume(model.ref)
    try:
        with kubelet(agent) as k:
            assert k.set_up(pod, volume).ok
            target = k.target(pod, volume)
        assert agent.proc is not None
        os.kill(agent.proc.pid, signal.SIGKILL)
        agent.proc.wait(timeout=30)
        agent.proc = None
        started = time.monotonic()
        with pytest.raises(OSError):
            os.listdir(target)  # waits in the kernel until the keeper gives up
        waited = time.monotonic() - started
        assert waited < window + 30, waited
    finally:
        _teardown_fuse(agent, keeper)
