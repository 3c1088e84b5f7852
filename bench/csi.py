"""CSI publish/unpublish latency of a cached model through a real agent, bind and lazy mode.

    sudo .venv/bin/python bench/csi.py [--cycles 1000] [--files 64]

Writes an OCI layout of ``--files`` files, starts ``cacheagent serve`` (FUSE on) on a private
directory tree, preheats the model, then runs ``--cycles`` SetUp + TearDown pairs per mode the
way kubelet does (``tests/kubelet.Kubelet``: a new pod each cycle, its directories and
vol_data.json, NodePublishVolume / NodeUnpublishVolume over the agent's CSI socket). Each
figure is one SetUp (NodePublishVolume plus kubelet's directory work, tens of microseconds) or
one TearDown. Prints p50/p90/p99/max per call and mode (target: p99 at most 50 ms), then checks
that nothing leaked: no mount under the kubelet directory, no CSI lease left on the model.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cacheagent.cli.client import AgentClient  # noqa: E402
from tests.agent_process import AgentProcess, stop_and_unmount  # noqa: E402
from tests.kubelet import InlineVolume, Kubelet, Pod  # noqa: E402
from tests.mounts import mounts_under  # noqa: E402
from tests.oci.layout_writer import LayoutEntry, write_layout  # noqa: E402

DRIVER = "model.cacheagent.io"
P99_TARGET_MS = 50.0


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def cycles(agent: AgentProcess, ref: str, mode: str, count: int) -> tuple[list[float], list[float]]:
    set_up: list[float] = []
    tear_down: list[float] = []
    attributes = {"model": ref} if mode == "bind" else {"model": ref, "mode": mode}
    with Kubelet(agent.csi_socket, agent.kubelet_dir, DRIVER, timeout=30) as kubelet:
        for index in range(count):
            pod, volume = Pod(f"bench-{mode}-{index}"), InlineVolume("model", attributes, True)
            started = time.perf_counter()
            outcome = kubelet.set_up(pod, volume)
            set_up.append(time.perf_counter() - started)
            if not outcome.ok:
                raise RuntimeError(f"{mode} cycle {index}: publish failed: {outcome}")
            if not (kubelet.target(pod, volume) / "file-0000.bin").exists():
                raise RuntimeError(f"{mode} cycle {index}: model not visible")
            started = time.perf_counter()
            outcome = kubelet.tear_down(pod, volume)
            tear_down.append(time.perf_counter() - started)
            if not outcome.ok:
                raise RuntimeError(f"{mode} cycle {index}: unpublish failed: {outcome}")
    return set_up, tear_down


def row(name: str, samples: list[float]) -> str:
    ms = [s * 1000 for s in samples]
    return (
        f"| {name:<34} | {len(ms):>5} | {percentile(ms, 50):>7.2f} | {percentile(ms, 90):>7.2f} "
        f"| {percentile(ms, 99):>7.2f} | {max(ms):>7.2f} | {statistics.fmean(ms):>7.2f} |"
    )


def run(count: int, files: int) -> int:
    base = Path(tempfile.mkdtemp(prefix="cacheagent-csi-bench-", dir="/var/tmp"))
    # Pods naming an OCI layout on the node, and in lazy mode: explicit policy opt-ins.
    policy = {"pod_layout_roots": [str(base)], "lazy_sources": ["oci-layout"]}
    agent = AgentProcess(base / "agent", fuse=True, extra={"policy": policy})
    try:
        entries = [LayoutEntry(f"file-{i:04d}.bin", os.urandom(4096)) for i in range(files)]
        write_layout(base / "layout", entries, tag="v1")
        ref = f"oci-layout://{base / 'layout'}:v1"
        agent.start()
        with AgentClient(agent.socket) as client:
            for update in client.preheat([ref]):
                if update.error:
                    raise RuntimeError(update.error)
            digest = client.stat(ref).manifest_digest
        results = {mode: cycles(agent, ref, mode, count) for mode in ("bind", "lazy")}
        leaked = mounts_under(agent.kubelet_dir)
        with AgentClient(agent.socket) as client:
            leases = [lease.kind for lease in client.stat(digest).leases]
    finally:
        stop_and_unmount(agent)
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nCSI through a real agent: {count} cycles per mode, cached model of {files} files\n")
    print(
        f"| {'call':<34} | {'n':>5} | {'p50 ms':>7} | {'p90 ms':>7} | {'p99 ms':>7} "
        f"| {'max ms':>7} | {'mean':>7} |"
    )
    print(f"|{'-' * 36}|{'-' * 7}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    for mode, (set_up, tear_down) in results.items():
        print(row(f"SetUp (NodePublishVolume), {mode}", set_up))
        print(row(f"TearDown (NodeUnpublish), {mode}", tear_down))
    print(f"\np99 target: <= {P99_TARGET_MS:.0f} ms per call")
    print(f"leaked mounts: {len(leaked)}   CSI leases left: {leases.count('csi')}")
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"kernel {platform.release()}, Python {platform.python_version()}"
    )
    slow = any(
        percentile(samples, 99) * 1000 > P99_TARGET_MS
        for pair in results.values()
        for samples in pair
    )
    return 1 if (leaked or "csi" in leases or slow) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--files", type=int, default=64)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/csi.py needs root (it makes real bind and FUSE mounts)", file=sys.stderr)
        return 2
    return run(args.cycles, args.files)


if __name__ == "__main__":
    raise SystemExit(main())
