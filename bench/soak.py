"""Soak: CSI publish/unpublish cycles of several models while eviction churns a tight cache.

    sudo .venv/bin/python bench/soak.py [--cycles 1000] [--window 2] [--models 4]

Starts a real agent (``cacheagent serve``) whose store holds about three of the ``--models``
small models (``store.capacity``), then runs ``--cycles`` publish + unpublish pairs through the
CSI socket with at most ``--window`` volumes published at once, so models are evicted and pulled
again all the time. Prints the counts, publish latency, the agent's RSS after warm-up and at the
end, and the leak checks; exits 1 on any error other than a retried UNAVAILABLE, a leaked mount,
lease or journal row, or RSS growth above ``--rss-slack-mib``. The CI subset of the same loop is
tests/faults/test_soak.py (100 cycles).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.faults.harness import (  # noqa: E402
    MiB,
    Rig,
    fsck,
    fsck_fixes,
    pid_of,
    rss_bytes,
    verify_models,
)
from tests.faults.soak import SoakResult, run_soak, soak_agent, soak_models  # noqa: E402


def report(result: SoakResult, fsck_fixes: int, models_ok: int) -> list[tuple[str, str]]:
    return [
        ("cycles", str(result.cycles)),
        ("publishes / unpublishes", f"{result.publishes} / {result.unpublishes}"),
        ("pulls (first + after eviction)", str(result.pulls)),
        ("UNAVAILABLE retried", str(result.retries)),
        ("other errors", str(sum(result.errors.values()))),
        ("publish p50 / p99 / max (ms)", _latencies(result)),
        ("RSS after warm-up (MiB)", f"{result.rss_warm / MiB:.1f}"),
        ("RSS at end / peak (MiB)", f"{result.rss_end / MiB:.1f} / {result.rss_peak / MiB:.1f}"),
        ("leaked mounts / leases / rows", _leaks(result)),
        ("fsck --rehash fixes", str(fsck_fixes)),
        ("models verified at end", str(models_ok)),
        ("wall time (s)", f"{result.seconds:.1f}"),
    ]


def _latencies(result: SoakResult) -> str:
    top = max(result.publish_seconds, default=0.0)
    return (
        f"{result.percentile(50) * 1e3:.1f} / {result.percentile(99) * 1e3:.1f} / {top * 1e3:.1f}"
    )


def _leaks(result: SoakResult) -> str:
    return f"{result.leaked_mounts} / {result.leaked_leases} / {result.journal_rows}"


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\ncacheagent soak on {platform.node()} ({os.cpu_count()} CPUs)")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--window", type=int, default=2, help="volumes published at once")
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--rss-slack-mib", type=float, default=25.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/soak.py needs root (it publishes real bind mounts)", file=sys.stderr)
        return 2
    rig = Rig()
    try:
        with tempfile.TemporaryDirectory(prefix="soak-models-") as work:
            models = soak_models(Path(work), args.models)
            agent = soak_agent(rig)

            def tick(cycle: int, result: SoakResult) -> None:
                if cycle % 100 == 0:
                    rss = rss_bytes(pid_of(agent))[0] / MiB
                    print(f"  cycle {cycle}: {result.publishes} published, RSS {rss:.1f} MiB")

            warmup = max(20, args.cycles // 5)
            result = run_soak(
                agent, models, args.cycles, window=args.window, warmup=warmup, on_cycle=tick
            )
            agent.stop()
            fixes = fsck_fixes(fsck(agent))
            models_ok = len(verify_models(agent))
    finally:
        rig.close()
    print_table(report(result, fixes, models_ok))
    for error, count in result.errors.items():
        print(f"  error x{count}: {error}")
    grew = (result.rss_end - result.rss_warm) / MiB
    leaks = result.leaked_mounts + result.leaked_leases + result.journal_rows
    failed = bool(result.errors) or leaks or fixes or grew > args.rss_slack_mib
    print("\nresult:", "FAIL" if failed else "OK", f"(RSS grew {grew:+.1f} MiB)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
