"""Start an aiohttp application on a loopback address (127.0.0.1 unless told; a free port unless
one is given) for a test. 127.0.0.2 is a second host for redirect tests: Linux routes all of
127.0.0.0/8 to the loopback interface."""

from __future__ import annotations

from typing import Any

from aiohttp import web


async def start_loopback(
    app: web.Application, port: int = 0, *, host: str = "127.0.0.1", **runner_options: Any
) -> tuple[web.AppRunner, int]:
    """Serve ``app``; returns the runner (``await runner.cleanup()`` stops it) and the port."""
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound: int = runner.addresses[0][1]
    return runner, bound
