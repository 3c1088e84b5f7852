"""`cacheagent`: the daemon (`serve`) and its command-line client.

`preheat`, `ls`, `stat`, `rm`, `pin`, `unpin`, `status`, `evict` and `gc --dry-run` talk to the
running agent over its unix socket (``cacheagent.cli.agent_commands``). `pull`, `gc` and the
`--offline` forms of `ls`/`stat`/`rm`/`pin`/`unpin` open the store directly, for when no agent
runs (an init container, a node being drained, a repair); the store's lock makes them refuse
politely while an agent owns it. `config` prints the effective configuration or checks a file.

Exit codes: 0 ok, 1 runtime error (for a batch `pull` or `preheat`: any model failed), 2 bad
usage (including a malformed reference, flag value or config).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from cacheagent._proto.cacheagent.v1 import agent_pb2 as pb
from cacheagent.cli import agent_commands as agent
from cacheagent.cli.bars import PullBars
from cacheagent.cli.output import UsageError, emit_json
from cacheagent.cli.parser import parse_args
from cacheagent.cli.views import pull_summary
from cacheagent.config import (
    Config,
    Layered,
    effective_json,
    effective_yaml,
    load_layered,
)
from cacheagent.errors import CacheAgentError, ConfigError, RefError
from cacheagent.refs import parse_ref

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def load(args: argparse.Namespace) -> Layered:
    """The configuration the command runs with: file, environment, then flags."""
    overrides: dict[str, object] = {}
    labels: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(key, "--set needs KEY=VALUE")
        overrides[key] = value
        labels[key] = f"--set {item}"
    for key, flag, value in (
        ("agent.socket", "--socket", args.socket),
        ("store.root", "--store-root", args.store_root),
    ):
        if value is not None:
            overrides[key] = str(value)
            labels[key] = flag
    return load_layered(args.config, os.environ, overrides, labels=labels)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(list(argv) if argv is not None else None)
        if args.command == "config" and args.check is not None:
            return cmd_check(args.check, json_output=args.json)
        layered = load(args)
        if args.command == "config":
            return cmd_config(args, layered)
        return COMMANDS[args.command](args, layered.config)
    except (RefError, ConfigError, UsageError) as err:
        print(f"cacheagent: {err}", file=sys.stderr)
        return EXIT_USAGE
    except CacheAgentError as err:
        print(f"cacheagent: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from cacheagent.server import serve

    return asyncio.run(serve(config))


def cmd_fuse_keeper(args: argparse.Namespace, config: Config) -> int:
    """Reached only with global options before the command (``cacheagent.cli.entry`` takes
    the plain form); the keeper reads no configuration."""
    from cacheagent.cli.keeper_command import run

    return run(args.socket, log_format=args.log_format, log_level=args.log_level)


def cmd_config(args: argparse.Namespace, layered: Layered) -> int:
    if args.json:
        emit_json(effective_json(layered))
    else:
        sys.stdout.write(effective_yaml(layered))
    return EXIT_OK


def cmd_check(path: Path, *, json_output: bool) -> int:
    """Validate ``path`` on its own (no environment, no flags), as ``serve`` would load it."""
    try:
        load_layered(path, {}, {})
    except ConfigError as err:
        if not json_output:
            raise
        emit_json({"file": str(path), "ok": False, "key": err.key, "problem": err.problem})
        return EXIT_USAGE
    if json_output:
        emit_json({"file": str(path), "ok": True})
    else:
        print(f"{path}: ok")
    return EXIT_OK


def cmd_pull(args: argparse.Namespace, config: Config) -> int:
    from cacheagent.cli.offline import pull_offline

    for ref in args.refs:  # a typo is bad usage: fail before any pull starts
        parse_ref(ref)
    with PullBars(enabled=not args.json) as bars:
        outcomes = asyncio.run(pull_offline(config, args.refs, bars))
        for failed in (o for o in outcomes if o.error is not None):
            bars.fail(failed.ref, str(failed.error))
    results = [o.as_dict() for o in outcomes]
    if args.json:
        emit_json(results)
    else:
        print(pull_summary(results))
    return EXIT_ERROR if any(o.error is not None for o in outcomes) else EXIT_OK


def cmd_gc(args: argparse.Namespace, config: Config) -> int:
    if args.dry_run:
        if args.fsck or args.rehash:
            raise UsageError("--dry-run", "previews eviction through the agent; not with --fsck")
        return agent.reclaim(args, config, pb.ReclaimRequest(watermarks=True, dry_run=True))
    from cacheagent.cli.offline import gc

    report = gc(config, fsck=args.fsck or args.rehash, rehash=args.rehash)
    if args.json:
        emit_json(asdict(report))
    else:
        print(report)
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "serve": cmd_serve,
    "preheat": agent.cmd_preheat,
    "pull": cmd_pull,
    "ls": agent.cmd_ls,
    "stat": agent.cmd_stat,
    "rm": agent.cmd_rm,
    "pin": agent.cmd_pin,
    "unpin": agent.cmd_unpin,
    "status": agent.cmd_status,
    "gc": cmd_gc,
    "evict": agent.cmd_evict,
    "fuse-keeper": cmd_fuse_keeper,
}


if __name__ == "__main__":
    raise SystemExit(main())
