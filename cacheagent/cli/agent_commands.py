"""The commands that talk to the running agent over its API socket.

``ls``, ``stat``, ``rm``, ``pin`` and ``unpin`` also take ``--offline`` and then open the store
directly (``cacheagent.cli.offline``); ``gc --dry-run`` and ``evict`` ask the agent's
``Reclaim`` call, so eviction on demand follows the same rules as capacity eviction.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cacheagent._proto.cacheagent.v1 import agent_pb2 as pb
from cacheagent.cli.bars import PullBars
from cacheagent.cli.client import AgentClient
from cacheagent.cli.output import UsageError, emit_json, message_dict
from cacheagent.cli.render import human_bytes
from cacheagent.cli.views import model_detail, model_rows, reclaim_text, status_text
from cacheagent.config import Config, parse_byte_size

EXIT_OK, EXIT_ERROR = 0, 1


@contextmanager
def agent(config: Config) -> Iterator[AgentClient]:
    with AgentClient(config.agent.socket) as client:
        yield client


def cmd_preheat(args: argparse.Namespace, config: Config) -> int:
    failed = 0
    final: list[dict[str, Any]] = []
    with agent(config) as client, PullBars(enabled=not args.json) as bars:
        events = client.preheat(
            args.refs,
            warm_memory=args.warm_memory or args.lock_memory,
            gpus=args.gpu,
            lock_memory=args.lock_memory,
        )
        for event in events:
            phase = event.waiting or event.Phase.Name(event.phase).lower()
            bars.update(event.ref, done=event.bytes_done, total=event.bytes_total, phase=phase)
            if event.phase not in (event.DONE, event.FAILED):
                continue
            final.append(message_dict(event))
            if event.phase == event.FAILED:
                failed += 1
                bars.fail(event.ref, f"{event.error} [{event.error_code}]")
            else:
                bars.finish(event.ref, event.manifest_digest, event.cache_hit)
    if args.json:
        emit_json(final)
    return EXIT_ERROR if failed else EXIT_OK


def cmd_ls(args: argparse.Namespace, config: Config) -> int:
    if args.offline:
        from cacheagent.cli.offline import offline_models

        models = offline_models(config)
    else:
        with agent(config) as client:
            models = [message_dict(m) for m in client.list().models]
    if args.json:
        emit_json(models)
    else:
        print(model_rows(models) if models else "no models cached")
    return EXIT_OK


def cmd_stat(args: argparse.Namespace, config: Config) -> int:
    if args.offline:
        from cacheagent.cli.offline import stat_offline

        info = stat_offline(config, args.model)
    else:
        with agent(config) as client:
            info = message_dict(client.stat(args.model))
    if args.json:
        emit_json(info)
    else:
        print(model_detail(info))
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
        with agent(config) as client:
            result = online(client)
    if args.json:
        emit_json(result)
    else:
        print(describe(result))
    return EXIT_OK


def cmd_rm(args: argparse.Namespace, config: Config) -> int:
    from cacheagent.cli import offline

    return _model_change(
        args,
        config,
        lambda c: message_dict(c.evict(args.model, force=args.force)),
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
        lambda c: message_dict(c.pin(args.model) if pinned else c.unpin(args.model)),
        lambda: offline.set_pinned(config, args.model, pinned),
        lambda r: f"{'pinned' if pinned else 'unpinned'} {r['manifest_digest']}",
    )


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    with agent(config) as client:
        status = message_dict(client.status(memory=True))
    if args.json:
        emit_json(status)
    else:
        print(status_text(status))
    return EXIT_OK


def reclaim(args: argparse.Namespace, config: Config, request: pb.ReclaimRequest) -> int:
    """Send a Reclaim request and print the plan (dry run) or what was evicted. Exit 1 when
    the target cannot be met because the rest is pinned or in use."""
    with agent(config) as client:
        reply = client.reclaim(request)
    if args.json:
        emit_json(message_dict(reply))
    else:
        print(reclaim_text(message_dict(reply)))
    return EXIT_ERROR if reply.need_bytes and not reply.satisfied else EXIT_OK


def cmd_evict(args: argparse.Namespace, config: Config) -> int:
    return reclaim(args, config, evict_request(args.to, args.free, dry_run=args.dry_run))


def evict_request(to: str | None, free: str | None, *, dry_run: bool) -> pb.ReclaimRequest:
    """``--to 80%`` (of capacity) or ``--to 400Gi`` (bytes used), or ``--free 50Gi``."""
    if free is not None:
        return pb.ReclaimRequest(free_bytes=_size("--free", free), dry_run=dry_run)
    assert to is not None  # argparse requires one of the two
    text = to.strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise UsageError("--to", f"expected a percentage like 80%, got {to!r}") from None
        if not 0 <= percent <= 100:
            raise UsageError("--to", f"a percentage of capacity is 0% to 100%, got {to!r}")
        return pb.ReclaimRequest(to_capacity_fraction=percent / 100, dry_run=dry_run)
    return pb.ReclaimRequest(to_used_bytes=_size("--to", text), dry_run=dry_run)


def _size(flag: str, text: str) -> int:
    try:
        return parse_byte_size(text)
    except ValueError as err:
        raise UsageError(flag, str(err)) from None
