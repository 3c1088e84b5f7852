"""The `cacheagent` executable: `fuse-keeper` starts without loading the rest of the CLI.

``cacheagent.cli.main`` imports the gRPC client, the config loader and protobuf; the keeper
needs none of them and should start in a blink and stay small, so it is dispatched first.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["fuse-keeper"]:
        from cacheagent.cli.keeper_command import main as keeper_main

        return keeper_main(args[1:])
    from cacheagent.cli.main import main as full_main

    return full_main(args)
