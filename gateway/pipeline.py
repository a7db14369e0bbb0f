"""The request pipeline: the one place where the stages and their order are set.

``Pipeline.handle(stream)`` is the ``RequestHandler`` every protocol adapter calls,
once per request. It reads the current Snapshot once (a request keeps the snapshot
it began with, even across a reload), runs the stages of ``gateway.stages`` in
order, turns any ``GatewayError`` into its response, and writes exactly one
access-log line per request whatever happened: success, refusal, upstream failure,
client abort or a bug.
"""

from __future__ import annotations

import asyncio
import logging
import time
from time import perf_counter
from typing import Any, Protocol

from .errors import DownstreamDisconnected, GatewayError, InternalError, respond_to
from .routing.table import Snapshot
from .server.events import DownstreamStream, ResponseHead, StreamReset
from .stages import (
    ActionStage,
    CorsStage,
    ForwardedHeadersStage,
    HopByHopStage,
    LocalReply,
    RequestContext,
    RequestIdStage,
    RouteStage,
    UpstreamStage,
    finish_response_headers,
)
from .telemetry import AccessLog, rfc3339
from .upstream.pool import UpstreamPools

__all__ = ["Pipeline", "SnapshotSource"]

log = logging.getLogger("meshgate.pipeline")

_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0", "2": "HTTP/2", "3": "HTTP/3"}


class SnapshotSource(Protocol):
    """Anything holding the current Snapshot (``runtime.SnapshotRef``)."""

    current: Snapshot | None


class Pipeline:
    """Runs every request through the stages, in this order."""

    def __init__(
        self, snapshots: SnapshotSource, pools: UpstreamPools, access_log: AccessLog
    ) -> None:
        self.snapshots = snapshots
        self.access_log = access_log
        self.upstream = UpstreamStage(pools)
        self.stages = (
            # The id first, so that every later log line and refusal can carry it.
            RequestIdStage(),
            # Forwarded headers before anything edits the request: they describe
            # the connection as the client made it.
            ForwardedHeadersStage(),
            # Hop-by-hop headers out before matching, so a route can never match on
            # (or forward) what only described the downstream connection.
            HopByHopStage(),
            # Routing needs the request as the client sent it (host, path, headers).
            RouteStage(),
            # CORS needs the route's policy, and answers preflights before the
            # action so a redirect or direct response never swallows one.
            CorsStage(),
            # Redirect / direct response / rewrite and header edits: the last word on
            # what goes upstream.
            ActionStage(),
        )
        # Then UpstreamStage.forward, the only stage that awaits.

    async def handle(self, stream: DownstreamStream) -> None:
        """The ``RequestHandler``: one call per request, never raises."""
        # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
        ctx = RequestContext(stream, self.snapshots.current, perf_counter(), time.time())
        try:
            rejection = getattr(stream, "rejection", None)
            if rejection is not None:
                raise rejection
            for stage in self.stages:
                reply = stage.on_request(ctx)
                if reply is not None:
                    await self._reply(ctx, reply)
                    break
            else:
                await self.upstream.forward(ctx)
        except GatewayError as error:
            await self._fail(ctx, error)
        except (asyncio.CancelledError, StreamReset):
            # The client went away (the HTTP/1.1 adapter cancels the request, HTTP/2
            # raises StreamReset): nothing can be answered, only logged.
            ctx.add_flag("DC")
        except Exception as exc:
            route = ctx.route.origin.ref if ctx.route is not None else "-"
            log.error("unhandled error on route %s: %r", route, exc, exc_info=exc)
            await self._fail(ctx, InternalError(repr(exc)))
        finally:
            self.access_log.emit(self._record(ctx, perf_counter()))

    async def _reply(self, ctx: RequestContext, reply: LocalReply) -> None:
        headers = finish_response_headers(ctx, reply.headers)
        head = ResponseHead(reply.status, headers)
        if reply.body:
            await ctx.send_whole(head, reply.body)
        else:
            await ctx.send_head(head, True)

    async def _fail(self, ctx: RequestContext, error: GatewayError) -> None:
        ctx.add_flag(error.flag)
        if isinstance(error, DownstreamDisconnected):
            return
        stream = ctx.stream
        if ctx.response_started:
            # Part of a response is out: the only honest signal left is a reset.
            stream.reset()
            return
        head, body = respond_to(error)
        try:
            if body:
                await ctx.send_whole(head, body)
            else:
                await ctx.send_head(head, True)
        except (StreamReset, asyncio.CancelledError):
            ctx.add_flag("DC")

    def _record(self, ctx: RequestContext, now: float) -> dict[str, Any]:
        head = ctx.head
        route = ctx.route
        if route is not None:
            route_ref = route.origin.ref
            if route.name:
                route_ref = f"{route_ref}:{route.name}"
        else:
            route_ref = "-"
        upstream_ms = ctx.upstream_ms
        return {
            "start_time": rfc3339(ctx.start_wall),
            "method": ctx.method,
            "authority": ctx.authority,
            "path": ctx.path,
            "protocol": _PROTOCOLS.get(head.http_version, head.http_version),
            "status": ctx.status,
            "response_flags": ctx.flags or "-",
            "route": route_ref,
            "upstream_cluster": ctx.upstream_cluster or "-",
            "upstream_host": ctx.upstream_host or "-",
            "bytes_received": ctx.bytes_received,
            "bytes_sent": ctx.bytes_sent,
            "duration_ms": round((now - ctx.start) * 1000.0, 3),
            "upstream_service_time_ms": round(upstream_ms, 3) if upstream_ms is not None else None,
            "request_id": ctx.request_id or "-",
            "x_forwarded_for": ctx.xff or head.peer,
            "user_agent": ctx.user_agent,
        }
