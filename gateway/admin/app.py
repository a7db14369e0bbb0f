"""The admin API: ``/healthz/ready`` for now.

Ready means a snapshot is loaded and every listener this process (or, with several
workers, every worker) was asked to serve is bound. It runs on hypercorn in the same
event loop as the data plane (or in the supervising parent with several workers);
it is never on the request path.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

__all__ = ["Readiness", "build_admin_app", "serve_admin"]


@dataclass
class Readiness:
    snapshot_version: str | None = None
    listeners_up: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.snapshot_version is not None and self.listeners_up and not self.draining


def build_admin_app(readiness: Readiness) -> Starlette:
    async def ready(request: Request) -> PlainTextResponse:
        if readiness.ready:
            return PlainTextResponse(f"ready {readiness.snapshot_version}\n")
        if readiness.draining:
            reason = "draining"
        elif readiness.snapshot_version is None:
            reason = "no configuration loaded"
        else:
            reason = "listeners not up"
        return PlainTextResponse(f"not ready: {reason}\n", status_code=503)

    return Starlette(routes=[Route("/healthz/ready", ready)])


def _plain_lifespan(app: Starlette) -> Any:
    """The app with lifespan answered here, so that hypercorn's shutdown (which
    cancels the lifespan task) ends quietly instead of reporting a failure."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        try:
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        except asyncio.CancelledError:
            return

    return asgi


async def serve_admin(readiness: Readiness, port: int, stop: asyncio.Event) -> None:
    """Serve the admin app on 127.0.0.1:``port`` until ``stop`` is set."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    config.graceful_timeout = 1.0
    await serve(_plain_lifespan(build_admin_app(readiness)), config, shutdown_trigger=stop.wait)
