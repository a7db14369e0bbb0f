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
from collections.abc import Coroutine
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
        # The callback-driven exchange is UpstreamStage's own: a stage that replaces
        # ``forward`` (the egress gateway's) gets every request through ``forward``.
        self._upstream_start = self.upstream.start if type(self.upstream) is UpstreamStage else None
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
            await self._run(ctx, self.stages)
        except (Exception, asyncio.CancelledError) as exc:
            await self._recover(ctx, exc)
        finally:
            self._complete(ctx)

    __call__ = handle

    def start(self, stream: DownstreamStream) -> None:
        """The same request handling driven by callbacks, for an adapter whose stream
        has ``run(coroutine)`` (HTTP/1.1). The stages are synchronous; a bodiless
        request on an idle pooled connection is written upstream and answered from
        the upstream's callback (``UpstreamStage.start``): no task, no future. From
        the first thing that must wait (an async stage, a local reply, a refusal, a
        new connection, a streamed body, a failure) the request continues as a
        coroutine in a task, exactly as ``handle`` would have run it."""
        ctx = RequestContext(stream, self.snapshots.current, perf_counter(), time.time())
        try:
            rejection = stream.rejection  # type: ignore[attr-defined]
            if rejection is not None:
                raise rejection
            for index, stage in enumerate(self.stages):
                reply = stage.on_request(ctx)
                if reply is not None:
                    self._resume(ctx, self._after_stage(ctx, index, reply))
                    return
            upstream_start = self._upstream_start
            if upstream_start is None or not upstream_start(ctx, self._complete, self._resume):
                self._resume(ctx, self.upstream.forward(ctx))
        except Exception as exc:
            self._resume(ctx, _raise(exc))

    def _resume(self, ctx: RequestContext, step: Coroutine[Any, Any, None]) -> None:
        ctx.stream.run(self._guard(ctx, step))  # type: ignore[attr-defined]

    async def _guard(self, ctx: RequestContext, step: Coroutine[Any, Any, None]) -> None:
        """What ``handle`` wraps around the stages, around the rest of a request."""
        try:
            await step
        except (Exception, asyncio.CancelledError) as exc:
            await self._recover(ctx, exc)
        finally:
            self._complete(ctx)

    async def _run(self, ctx: RequestContext, stages: tuple[Any, ...]) -> None:
        """``stages`` in order, then the upstream; a stage's reply ends the request."""
        for stage in stages:
            reply = stage.on_request(ctx)
            if reply is not None:
                if reply.__class__ is not LocalReply:
                    # A stage marked ``is_async`` returned a coroutine: it must wait
                    # (a JWKS refetch, an external authorizer). Sync stages and the
                    # usual paths never get here.
                    reply = await reply
                    if reply is None:
                        continue
                await self._reply(ctx, reply)
                return
        await self.upstream.forward(ctx)

    async def _after_stage(self, ctx: RequestContext, index: int, reply: Any) -> None:
        """Go on after stage ``index`` answered ``reply`` (a LocalReply, or the
        coroutine of an async stage)."""
        if reply.__class__ is not LocalReply:
            reply = await reply
            if reply is None:
                await self._run(ctx, self.stages[index + 1 :])
                return
        await self._reply(ctx, reply)

    async def _recover(self, ctx: RequestContext, exc: BaseException) -> None:
        if isinstance(exc, GatewayError):
            await self._fail(ctx, exc)
        elif isinstance(exc, (asyncio.CancelledError, StreamReset)):
            # The client went away (the HTTP/1.1 adapter cancels the request, HTTP/2
            # raises StreamReset): nothing can be answered, only logged.
            ctx.add_flag("DC")
        else:
            route = ctx.route.origin.ref if ctx.route is not None else "-"
            log.error("unhandled error on route %s: %r", route, exc, exc_info=exc)
            await self._fail(ctx, InternalError(repr(exc)))

    def _complete(self, ctx: RequestContext) -> None:
        """Exactly once per request, whatever happened: the access-log line, the
        request metrics and the span."""
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


async def _raise(error: BaseException) -> None:
    """A coroutine that fails with ``error``, for ``_guard`` to answer and log."""
    raise error
