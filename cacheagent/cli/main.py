"""`cacheagent`: the daemon (`serve`) and its command-line client.

`preheat`, `ls`, `stat`, `rm`, `pin`, `unpin` and `status` talk to the running agent over its
unix socket. `pull`, `gc` and the `--offline` forms of `ls`/`rm`/`pin`/`unpin` open the store
directly, for when no agent runs (an init container, a node being drained, a repair); the store's
lock makes them refuse politely while an agent owns it.

Exit codes: 0 ok, 1 runtime error, 2 bad usage (including a malformed reference or config).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from cacheagent import __version__
from cacheagent.cli.bars import PullBars
from cacheagent.cli.client import AgentClient
from cacheagent.cli.render import human_age, human_bytes, table
from cacheagent.config import Config, load_config
from cacheagent.digest import short_digest
from cacheagent.errors import CacheAgentError, ConfigError, RefError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cacheagent", description="Node-local model cache for Kubernetes GPU nodes."
    )
    parser.add_argument("--version", action="version", version=f"cacheagent {__version__}")
    parser.add_argument("-c", "--config", type=Path, help="YAML config file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set store.root=/mnt/nvme/cache (repeatable)",
    )
    parser.add_argument("--socket", type=Path, help="agent API socket (agent.socket)")
    parser.add_argument("--store-root", type=Path, help="store directory (store.root)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("serve", help="run the agent daemon")

    p = sub.add_parser("preheat", help="pull models through the agent, with progress")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.add_argument("--warm-memory", action="store_true", help="also warm the page cache")
    p.add_argument("--gpu", action="append", default=[], help="warm near this GPU (repeatable)")
    _json_flag(p)

    p = sub.add_parser("pull", help="pull models straight into the store (no agent)")
    p.add_argument("refs", nargs="+", metavar="REF")
    _json_flag(p)

    p = sub.add_parser("ls", help="list cached models")
    _json_flag(p)
    _offline_flag(p)

    p = sub.add_parser("stat", help="show one model")
    p.add_argument("model", help="reference, manifest digest or digest prefix")
    _json_flag(p)

    p = sub.add_parser("rm", help="evict a model")
    p.add_argument("model")
    p.add_argument("--force", action="store_true", help="evict even if pinned")
    _json_flag(p)
    _offline_flag(p)

    for name, text in (("pin", "keep a model from eviction"), ("unpin", "allow eviction again")):
        p = sub.add_parser(name, help=text)
        p.add_argument("model")
        _json_flag(p)
        _offline_flag(p)

    p = sub.add_parser("status", help="agent, cache and GPU status")
    _json_flag(p)

    p = sub.add_parser("gc", help="reconcile the store with the disk (agent stopped)")
    p.add_argument("--fsck", action="store_true", help="check every blob file and tree")
    p.add_argument("--rehash", action="store_true", help="with --fsck: re-hash every blob")
    _json_flag(p)
    for command in sub.choices.values():
        _config_flags_after_command(command)
    return parser


def _config_flags_after_command(p: argparse.ArgumentParser) -> None:
    """``cacheagent serve --config F`` works as well as ``cacheagent --config F serve``.

    Manifests and Dockerfiles put options after the command; separate destinations keep the
    values given before the command (a subcommand's namespace would overwrite them).
    """
    p.add_argument("-c", "--config", dest="config_after", type=Path, default=argparse.SUPPRESS)
    p.add_argument(
        "--set", dest="set_after", action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS
    )


def _merge_config_flags(args: argparse.Namespace) -> None:
    after = getattr(args, "config_after", None)
    if after is not None:
        if args.config is not None and args.config != after:
            raise ConfigError("--config", f"given twice ({args.config} and {after}); give it once")
        args.config = after
    args.set = [*args.set, *getattr(args, "set_after", [])]


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _offline_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--offline", action="store_true", help="work on the store directly (agent stopped)"
    )


def load(args: argparse.Namespace) -> Config:
    _merge_config_flags(args)
    overrides: dict[str, object] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(key, "--set needs KEY=VALUE")
        overrides[key] = value
    if args.socket is not None:
        overrides["agent.socket"] = str(args.socket)
    if args.store_root is not None:
        overrides["store.root"] = str(args.store_root)
    return load_config(args.config, os.environ, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load(args)
        return COMMANDS[args.command](args, config)
    except (RefError, ConfigError) as err:
        print(f"cacheagent: {err}", file=sys.stderr)
        return EXIT_USAGE
    except CacheAgentError as err:
        print(f"cacheagent: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


# -- output helpers -------------------------------------------------------------------------------


def _emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _message_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


@contextmanager
def _agent(config: Config) -> Iterator[AgentClient]:
    with AgentClient(config.agent.socket) as client:
        yield client


def _model_rows(models: Sequence[dict[str, Any]]) -> str:
    now = time.time()
    rows = [
        [
            short_digest(m["manifest_digest"]),
            m.get("ref") or "-",
            human_bytes(int(m.get("size_bytes", 0))),
            str(len(m.get("files", []))),
            "yes" if m.get("pinned") else "",
            _resident(m),
            human_age(now - float(m.get("last_used_unix", now))),
        ]
        for m in models
    ]
    return table(["DIGEST", "REF", "SIZE", "FILES", "PINNED", "IN RAM", "LAST USED"], rows)


def _resident(m: dict[str, Any]) -> str:
    size = int(m.get("size_bytes", 0))
    if m.get("state") == "pulling":  # still downloading: how far, how fast
        done, rate = int(m.get("done_bytes", 0)), float(m.get("bytes_per_second", 0))
        share = f"{100 * done / size:.0f}%" if size else human_bytes(done)
        return f"pulling {share}, {human_bytes(rate)}/s"
    resident = int(m.get("resident_bytes", 0))
    return "-" if not size else f"{100 * resident / size:.0f}%"


# -- agent commands -------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from cacheagent.server import serve

    return asyncio.run(serve(config))


def cmd_preheat(args: argparse.Namespace, config: Config) -> int:
    failed = 0
    final: list[dict[str, Any]] = []
    with _agent(config) as client, PullBars(enabled=not args.json) as bars:
        for event in client.preheat(args.refs, warm_memory=args.warm_memory, gpus=args.gpu):
            bars.update(
                event.ref,
                done=event.bytes_done,
                total=event.bytes_total,
                phase=event.waiting or event.Phase.Name(event.phase).lower(),
            )
            if event.phase in (event.DONE, event.FAILED):
                final.append(_message_dict(event))
                if event.phase == event.FAILED:
                    failed += 1
                    bars.fail(event.ref, f"{event.error} [{event.error_code}]")
                else:
                    bars.finish(event.ref, event.manifest_digest, event.cache_hit)
    if args.json:
        _emit_json(final)
    return EXIT_ERROR if failed else EXIT_OK


def cmd_ls(args: argparse.Namespace, config: Config) -> int:
    if args.offline:
        from cacheagent.cli.offline import offline_models

        models = offline_models(config)
    else:
        with _agent(config) as client:
            models = [_message_dict(m) for m in client.list().models]
    if args.json:
        _emit_json(models)
    elif models:
        print(_model_rows(models))
    else:
        print("no models cached")
    return EXIT_OK


def cmd_stat(args: argparse.Namespace, config: Config) -> int:
    with _agent(config) as client:
        info = _message_dict(client.stat(args.model))
    if args.json:
        _emit_json(info)
        return EXIT_OK
    print(_model_rows([info]))
    print(f"\npath: {info.get('path', '')}")
    for lease in info.get("leases", []):
        print(f"lease: {lease['kind']} {lease['holder']}")
    print(
        table(["FILE", "SIZE"], [[f["path"], human_bytes(int(f["size"]))] for f in info["files"]])
    )
    return EXIT_OK


def _model_change(
    args: argparse.Namespace,
    config: Config,
    online: Callable[[AgentClient], dict[str, Any]],
    offline: Callable[[], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
) -> int:
    if args.offline:
        result = offline()
    else:
        with _agent(config) as client:
            result = online(client)
    if args.json:
        _emit_json(result)
    else:
        print(describe(result))
    return EXIT_OK


def cmd_rm(args: argparse.Namespace, config: Config) -> int:
    from cacheagent.cli import offline

    return _model_change(
        args,
        config,
        lambda c: _message_dict(c.evict(args.model, force=args.force)),
        lambda: offline.remove(config, args.model, force=args.force),
        lambda r: f"evicted {r['manifest_digest']} ({human_bytes(int(r.get('bytes_freed', 0)))})",
    )


def cmd_pin(args: argparse.Namespace, config: Config) -> int:
    return _pin(args, config, pinned=True)


def cmd_unpin(args: argparse.Namespace, config: Config) -> int:
    return _pin(args, config, pinned=False)


def _pin(args: argparse.Namespace, config: Config, *, pinned: bool) -> int:
    from cacheagent.cli import offline

    return _model_change(
        args,
        config,
        lambda c: _message_dict(c.pin(args.model) if pinned else c.unpin(args.model)),
        lambda: offline.set_pinned(config, args.model, pinned),
        lambda r: f"{'pinned' if pinned else 'unpinned'} {r['manifest_digest']}",
    )


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    with _agent(config) as client:
        status = _message_dict(client.status())
    if args.json:
        _emit_json(status)
        return EXIT_OK
    capacity = int(status.get("capacity_bytes", 0))
    used = int(status.get("used_bytes", 0))
    print(f"cacheagent {status.get('version')} on {status.get('node_id') or '-'}")
    print(f"store:  {status.get('store_root')}")
    cap = human_bytes(capacity) if capacity else "unlimited"
    print(f"cache:  {human_bytes(used)} of {cap}, {status.get('models', 0)} models")
    for pull in status.get("pulls", []):
        done, total = int(pull.get("bytes_done", 0)), int(pull.get("bytes_total", 0))
        print(f"pull:   {pull.get('ref')} {human_bytes(done)} / {human_bytes(total)}")
    if status.get("nvml_up"):
        for gpu in status.get("gpus", []):
            print(f"gpu {gpu.get('index', 0)}: {gpu.get('name')} {gpu.get('uuid')}")
    else:
        print(f"gpus:   none ({status.get('nvml_reason') or 'NVML not available'})")
    return EXIT_OK


# -- offline commands -----------------------------------------------------------------------------


def cmd_pull(args: argparse.Namespace, config: Config) -> int:
    from cacheagent.cli.offline import pull_offline

    started = time.monotonic()
    with PullBars(enabled=not args.json) as bars:
        models = asyncio.run(pull_offline(config, args.refs, bars))
    seconds = time.monotonic() - started
    if args.json:
        _emit_json([{**asdict(m), "seconds": seconds} for m in models])
    else:
        for model in models:
            print(f"{model.ref}: {model.digest} {human_bytes(model.size)} in {seconds:.1f}s")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace, config: Config) -> int:
    from cacheagent.cli.offline import gc

    report = gc(config, fsck=args.fsck or args.rehash, rehash=args.rehash)
    if args.json:
        _emit_json(asdict(report))
    else:
        print(report)
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "serve": cmd_serve,
    "preheat": cmd_preheat,
    "pull": cmd_pull,
    "ls": cmd_ls,
    "stat": cmd_stat,
    "rm": cmd_rm,
    "pin": cmd_pin,
    "unpin": cmd_unpin,
    "status": cmd_status,
    "gc": cmd_gc,
}


if __name__ == "__main__":
    raise SystemExit(main())
