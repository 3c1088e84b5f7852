"""Text views of what the agent answers: models, status, eviction plans, batch pulls. Pure.

Each takes the JSON form of a reply (``MessageToDict`` with proto field names, or the offline
equivalent), so ``--json`` and the text views always show the same data.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from cacheagent.cli.render import human_age, human_bytes, table
from cacheagent.digest import short_digest

Reply = Mapping[str, Any]


def model_rows(models: Sequence[Reply], now: float | None = None) -> str:
    now = time.time() if now is None else now
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


def _resident(m: Reply) -> str:
    size = int(m.get("size_bytes", 0))
    if m.get("state") == "pulling":  # still downloading: how far, how fast
        done, rate = int(m.get("done_bytes", 0)), float(m.get("bytes_per_second", 0))
        share = f"{100 * done / size:.0f}%" if size else human_bytes(done)
        return f"pulling {share}, {human_bytes(rate)}/s"
    resident = int(m.get("resident_bytes", 0))
    return "-" if not size else f"{100 * resident / size:.0f}%"


def model_detail(info: Reply) -> str:
    lines = [model_rows([info]), "", f"path: {info.get('path', '')}"]
    lines += [f"lease: {x['kind']} {x['holder']}" for x in info.get("leases", [])]
    files = [[f["path"], human_bytes(int(f["size"]))] for f in info.get("files", [])]
    lines.append(table(["FILE", "SIZE"], files))
    return "\n".join(lines)


def status_text(status: Reply) -> str:
    capacity = int(status.get("capacity_bytes", 0))
    used = int(status.get("used_bytes", 0))
    cap = human_bytes(capacity) if capacity else "unlimited"
    share = f" ({100 * used / capacity:.0f}%)" if capacity else ""
    lines = [
        f"cacheagent {status.get('version')} on {status.get('node_id') or '-'}",
        f"store:   {status.get('store_root')}",
        f"cache:   {human_bytes(used)} of {cap}{share}, {status.get('models', 0)} models",
    ]
    pulls = status.get("pulls", [])
    lines += [_pull_line(p) for p in pulls] or ["pulls:   none in flight"]
    lines.append(_memory_line(status))
    lines += [_model_memory_line(m) for m in status.get("memory", [])]
    if status.get("nvml_up"):
        lines += [_gpu_line(g) for g in status.get("gpus", [])]
    else:
        lines.append(f"gpus:    none ({status.get('nvml_reason') or 'NVML not available'})")
    return "\n".join(lines)


def _pull_line(pull: Reply) -> str:
    done, total = int(pull.get("bytes_done", 0)), int(pull.get("bytes_total", 0))
    rate = float(pull.get("bytes_per_second", 0.0))
    eta = pull.get("eta_seconds")
    share = f" {100 * done / total:.0f}%" if total else ""
    return (
        f"pull:    {pull.get('ref')} {pull.get('state') or 'downloading'} "
        f"{human_bytes(done)} / {human_bytes(total)}{share}, {human_bytes(rate)}/s, "
        f"ETA {'-' if eta is None else f'{float(eta):.0f}s'}"
    )


def _memory_line(status: Reply) -> str:
    locked = human_bytes(int(status.get("memory_locked_bytes", 0)))
    limit = status.get("memory_lock_limit_bytes")
    if limit is None:
        text = f"memory:  {locked} locked (no limit but RLIMIT_MEMLOCK)"
    elif int(limit) == 0:
        text = "memory:  locking off (prefetch.mlock_limit_bytes is 0)"
    else:
        text = f"memory:  {locked} locked (limit {human_bytes(int(limit))})"
    if "memory_resident_bytes" in status:
        text += f", {human_bytes(int(status['memory_resident_bytes']))} of models in page cache"
    return text


def _model_memory_line(m: Reply) -> str:
    text = (
        f"  {short_digest(m['manifest_digest'])} {m.get('ref') or '-'}: "
        f"{human_bytes(int(m.get('resident_bytes', 0)))} in RAM"
    )
    locked = int(m.get("locked_bytes", 0))
    return f"{text}, {human_bytes(locked)} locked" if locked else text


def _gpu_line(gpu: Reply) -> str:
    used, total = int(gpu.get("memory_used_bytes", 0)), int(gpu.get("memory_total_bytes", 0))
    util = gpu.get("utilization_gpu_percent")
    return (
        f"gpu {gpu.get('index', 0)}:   {gpu.get('name')} {gpu.get('uuid')} "
        f"memory {human_bytes(used)} / {human_bytes(total)}, "
        f"utilisation {'-' if util is None else f'{float(util):.0f}%'}"
    )


def reclaim_text(reply: Reply, now: float | None = None) -> str:
    now = time.time() if now is None else now
    dry = bool(reply.get("dry_run"))
    freed = human_bytes(int(reply.get("bytes_freed", 0)))
    models = reply.get("models", [])
    lines = [f"why:     {reply.get('reason')}"]
    if not models and not int(reply.get("orphan_blobs", 0)):
        lines.append("nothing to evict")
    else:
        verb = "would evict" if dry else "evicted"
        lines.append(
            table(
                ["", "DIGEST", "REF", "SIZE", "LAST USED", "WHY"],
                [
                    [
                        verb,
                        short_digest(m["manifest_digest"]),
                        m.get("ref") or "-",
                        human_bytes(int(m.get("size_bytes", 0))),
                        human_age(now - float(m.get("last_used_unix", now))),
                        m.get("reason", ""),
                    ]
                    for m in models
                ],
            )
        )
        orphans = int(reply.get("orphan_blobs", 0))
        if orphans:
            lines.append(f"and {orphans} blobs no model uses")
        lines.append(f"{'would free' if dry else 'freed'} {freed}")
    if int(reply.get("need_bytes", 0)) and not reply.get("satisfied"):
        lines.append(
            f"cannot free the {human_bytes(int(reply['need_bytes']))} asked for: "
            "the rest is pinned or in use"
        )
    lines += [
        f"kept:    {short_digest(m['manifest_digest'])} {m.get('ref') or '-'} ({m.get('reason')})"
        for m in reply.get("kept", [])
    ]
    return "\n".join(lines)


def pull_summary(outcomes: Sequence[Reply]) -> str:
    """One line per model with its own time, then a summary line."""
    lines = []
    for o in outcomes:
        seconds = f"{float(o['seconds']):.1f}s"
        if o.get("error"):
            lines.append(f"{o['ref']}: FAILED after {seconds}: {o['error']}")
        else:
            size = human_bytes(int(o.get("size", 0)))
            lines.append(f"{o['ref']}: {o['digest']} {size} in {seconds}")
    failed = sum(1 for o in outcomes if o.get("error"))
    lines.append(f"{len(outcomes) - failed} of {len(outcomes)} pulled, {failed} failed")
    return "\n".join(lines)
