"""Start an aiohttp application on 127.0.0.1 (a free port unless one is given) for a test."""

from __future__ import annotations

from typing import Any

from aiohttp import web


async def start_loopback(
    app: web.Application, port: int = 0, **runner_options: Any
) -> tuple[web.AppRunner, int]:
    """Serve ``app``; returns the runner (``await runner.cleanup()`` stops it) and the port."""
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    bound: int = runner.addresses[0][1]
    return runner, bound
