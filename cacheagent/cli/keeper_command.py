"""`cacheagent fuse-keeper`: run the FUSE keeper (``cacheagent.fuse.keeper``) until SIGTERM.

The keeper runs in its own DaemonSet and must start fast and stay small, so this module and
what it imports load no gRPC, aiohttp, store or config code: ``cacheagent.cli.entry`` sends
``cacheagent fuse-keeper ...`` here before the rest of the command line is imported.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from cacheagent.errors import CacheAgentError
from cacheagent.fuse.keeper import serve_keeper
from cacheagent.logs import setup_logging

NAME = "fuse-keeper"
HELP = "hold lazy volumes' FUSE connections across agent restarts (its own DaemonSet)"
EXIT_OK, EXIT_ERROR = 0, 1


def add_options(p: argparse.ArgumentParser) -> None:
    """The keeper's own options (``--socket`` is the command line's global one)."""
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"cacheagent {NAME}", description=HELP)
    p.add_argument("--socket", type=Path, required=True, help="the keeper's unix socket")
    add_options(p)
    return p.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    """``cacheagent fuse-keeper --socket PATH [--log-format F] [--log-level L]``."""
    args = parse(argv)
    return run(args.socket, log_format=args.log_format, log_level=args.log_level)


def run(socket_path: Path | None, *, log_format: str, log_level: str) -> int:
    if socket_path is None:
        print(f"cacheagent {NAME}: --socket PATH is required", file=sys.stderr)
        return 2
    setup_logging(fmt=log_format, level=log_level)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        serve_keeper(socket_path, stop=stop)
    except CacheAgentError as err:
        print(f"cacheagent {NAME}: {err}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK
