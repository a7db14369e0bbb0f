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
from .metrics import RequestMetrics
from .routing.table import Snapshot
from .server.events import DownstreamStream, ResponseHead, StreamReset
from .stages import (
    ActionStage,
    CorsStage,
    EdgeHeadersStage,
    LocalReply,
    RequestContext,
    RouteStage,
    UpstreamStage,
    finish_response_headers,
)
from .telemetry import AccessLog
from .tracing import OtlpExporter, TraceStage
from .upstream.pool import UpstreamPools

__all__ = ["Pipeline", "SnapshotSource"]

log = logging.getLogger("meshgate.pipeline")


class SnapshotSource(Protocol):
    """Anything holding the current Snapshot (``runtime.SnapshotRef``)."""

    current: Snapshot | None


class Pipeline:
    """Runs every request through the stages, in this order."""

    def __init__(
        self,
        snapshots: SnapshotSource,
        pools: UpstreamPools,
        access_log: AccessLog,
        *,
        metrics: RequestMetrics | None = None,
        tracing: TraceStage | None = None,
        exporter: OtlpExporter | None = None,
        security: Any = None,
        limiter: Any = None,  # ratelimit.Limiter
        route_stage: Any = None,  # replaces RouteStage (the egress gateway's)
        upstream_stage: UpstreamStage | None = None,  # replaces UpstreamStage (egress)
    ) -> None:
        self.snapshots = snapshots
        self.access_log = access_log
        self.metrics = metrics
        self.exporter = exporter
        self.upstream = upstream_stage or UpstreamStage(pools)
        # authn.runtime.SecurityRuntime: JWT keys, token cache, decision counters.
        self.security = security
        security_stages: tuple[Any, ...] = ()
        if security is not None:
            from authn.stages import AuthzStage, JwtAuthnStage

            security_stages = (JwtAuthnStage(security), AuthzStage(security))
        limit_stages: tuple[Any, ...] = ()
        if limiter is not None:
            from ratelimit.stage import RateLimitStage

            limit_stages = (RateLimitStage(limiter),)
        self.stages = (
            # Hop-by-hop headers out, then the request id and the forwarded headers,
            # in one pass (EdgeHeadersStage): first, so that every later log line and
            # refusal carries the id, the forwarded headers describe the connection
            # as the client made it, and no route can match on (or forward) what only
            # described the downstream connection.
            EdgeHeadersStage(),
            # Trace headers once the request is clean and before routing, so that
            # refused and locally answered requests are part of the trace too.
            *((tracing,) if tracing is not None else ()),
            # JWT authentication, then authorization, before routing: where Envoy puts
            # jwt_authn and rbac (ahead of its router) for Istio. Verified claims can
            # then choose a route (@request.auth.claims), and a refused request never
            # costs a route lookup. Both return at once when no policy is bound.
            *security_stages,
            # Routing needs the request as the client sent it (host, path, headers).
            route_stage or RouteStage(),
            # CORS needs the route's policy, and answers preflights before the
            # action so a redirect or direct response never swallows one.
            CorsStage(),
            # Rate limits after authentication and authorization, so a claim can key
            # a limit and a request they refuse spends no token; after routing,
            # because limits are attached to routes (a route name keys a policy);
            # after CORS, so a preflight the gateway answers costs nothing. Before
            # the action, so a redirect or direct response on a limited route counts.
            *limit_stages,
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
                    if reply.__class__ is not LocalReply:
                        # A stage marked ``is_async`` returned a coroutine: it must
                        # wait (a JWKS refetch, an external authorizer). Sync stages
                        # and the usual paths never get here.
                        reply = await reply
                        if reply is None:
                            continue
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
            now = perf_counter()
            self.access_log.log(ctx, now)
            if self.metrics is not None:
                self.metrics.record(
                    ctx.upstream_cluster,
                    ctx.status,
                    ctx.flags,
                    (now - ctx.start) * 1000.0,
                    ctx.bytes_received,
                    ctx.bytes_sent,
                )
            if self.exporter is not None:
                route = ctx.route
                self.exporter.finish(ctx, ctx.status, route.origin.ref if route else "-")

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
