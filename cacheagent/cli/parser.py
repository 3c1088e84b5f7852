"""The command line's grammar: global options, commands and their flags.

Global options (``--config``, ``--set``, ``--socket``, ``--store-root``, ``--json``) are
accepted before or after the command (``cacheagent --json ls`` and ``cacheagent ls --json``;
``cacheagent serve --config f.yaml``). argparse keeps a subcommand's values in their own
namespace and copies them over the top-level ones, so each global option is declared twice
under two names and ``merge_globals`` combines them: ``--set`` flags accumulate in command-line
order (a later one wins); a single-valued option may be given on either side, and giving it on
both sides with different values is an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cacheagent import __version__
from cacheagent.cli import keeper_command as keeper
from cacheagent.errors import ConfigError

_BEFORE, _AFTER = "g0_", "g1_"
_SINGLE = ("config", "socket", "store_root")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cacheagent", description="Node-local model cache for Kubernetes GPU nodes."
    )
    parser.add_argument("--version", action="version", version=f"cacheagent {__version__}")
    _global_options(parser, _BEFORE)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        _global_options(p, _AFTER)
        return p

    command("serve", "run the agent daemon")

    p = command("config", "print the effective configuration and where each value came from")
    p.add_argument("--check", type=Path, metavar="FILE", help="validate FILE alone; start nothing")

    p = command("preheat", "pull models through the agent, with progress")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.add_argument("--warm-memory", action="store_true", help="also warm the page cache")
    p.add_argument(
        "--lock-memory",
        action="store_true",
        help="warm and lock the pages in RAM (mlock, within prefetch.mlock_limit_bytes)",
    )
    p.add_argument("--gpu", action="append", default=[], help="warm near this GPU (repeatable)")

    p = command("pull", "pull models straight into the store (no agent)")
    p.add_argument("refs", nargs="+", metavar="REF")

    _offline(command("ls", "list cached models"))

    p = command("stat", "show one model")
    p.add_argument("model", help="reference, manifest digest or digest prefix")
    _offline(p)

    p = command("rm", "evict a model")
    p.add_argument("model")
    p.add_argument("--force", action="store_true", help="evict even if pinned")
    _offline(p)

    for name, text in (("pin", "keep a model from eviction"), ("unpin", "allow eviction again")):
        p = command(name, text)
        p.add_argument("model")
        _offline(p)

    command("status", "agent, pulls, cache, memory and GPU status")

    p = command("gc", "reconcile the store with the disk (agent stopped), or preview eviction")
    p.add_argument("--fsck", action="store_true", help="check every blob file and tree")
    p.add_argument("--rehash", action="store_true", help="with --fsck: re-hash every blob")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="ask the agent what capacity eviction would remove now, and why (removes nothing)",
    )

    p = command("evict", "free space now, least recently used first (through the agent)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--to", metavar="LEVEL", help="evict until the store uses at most 80%% or 400Gi"
    )
    target.add_argument("--free", metavar="SIZE", help="evict until SIZE (50Gi) is freed")
    p.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")

    keeper.add_options(command(keeper.NAME, keeper.HELP))
    return parser


def _global_options(p: argparse.ArgumentParser, prefix: str) -> None:
    p.add_argument("-c", "--config", dest=f"{prefix}config", type=Path, help="YAML config file")
    p.add_argument(
        "--set",
        dest=f"{prefix}set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set store.root=/mnt/nvme/cache (repeatable)",
    )
    p.add_argument("--socket", dest=f"{prefix}socket", type=Path, help="agent API socket")
    p.add_argument("--store-root", dest=f"{prefix}store_root", type=Path, help="store directory")
    p.add_argument(
        "--json", dest=f"{prefix}json", action="store_true", help="machine-readable output"
    )


def _offline(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--offline", action="store_true", help="work on the store directly (agent stopped)"
    )


def merge_globals(args: argparse.Namespace) -> argparse.Namespace:
    """Fold the before- and after-command copies of the global options into one each; a
    single-valued option given on both sides with different values is refused (ConfigError)
    rather than one silently winning."""
    merged = vars(args)
    for name in _SINGLE:
        after = merged.pop(f"{_AFTER}{name}", None)
        before = merged.pop(f"{_BEFORE}{name}", None)
        if before is not None and after is not None and before != after:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(flag, f"given twice ({before} and {after}); give it once")
        merged[name] = after if after is not None else before
    merged["set"] = merged.pop(f"{_BEFORE}set", []) + merged.pop(f"{_AFTER}set", [])
    json_before, json_after = merged.pop(f"{_BEFORE}json"), merged.pop(f"{_AFTER}json")
    merged["json"] = bool(json_before or json_after)
    return argparse.Namespace(**merged)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return merge_globals(build_parser().parse_args(argv))
