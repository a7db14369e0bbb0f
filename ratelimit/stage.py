"""The rate-limit stage of the request pipeline: a thin shell around ``Limiter``.

It reads the limits the compiler attached to the matched route (``route.ratelimit``;
None costs one attribute read), asks the limiter, and turns the verdict into HTTP:
a 429 with ``retry-after`` (``RateLimited``), a 503 when a fail-closed limit's Redis
is unreachable (``RateLimitServiceError``), and the ``ratelimit-limit``,
``ratelimit-remaining`` and ``ratelimit-reset`` headers on every response of a
limited route (or ``x-ratelimit-*``, or none, as the policy's ``responseHeaders``
says), which ``gateway.stages.finish_response_headers`` adds from
``ctx.ratelimit_headers``.

When every limit of the route is local the stage answers synchronously; with a
Redis limit it returns a coroutine for the pipeline to await (``is_async``).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from gateway.errors import RateLimited, RateLimitServiceError

from .limiter import Limiter, Verdict
from .policy import RouteRateLimit

__all__ = ["RateLimitStage", "ratelimit_headers"]

_NAMES = {
    "ratelimit": ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"),
    "x-ratelimit": ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"),
}


def ratelimit_headers(style: str, verdict: Verdict) -> list[tuple[str, str]]:
    """The figures of ``verdict`` under the header names ``style`` picks."""
    names = _NAMES.get(style)
    if names is None or not verdict.limit:
        return []
    return [
        (names[0], str(verdict.limit)),
        (names[1], str(verdict.remaining)),
        (names[2], str(verdict.reset_s)),
    ]


class RateLimitStage:
    """Refuses requests over their route's limits; decorates the rest."""

    is_async = True  # only for routes with a Redis limit; see on_request

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    def on_request(self, ctx: Any) -> Coroutine[Any, Any, None] | None:
        route = ctx.route
        limits: RouteRateLimit | None = route.ratelimit if route is not None else None
        if limits is None:
            return None
        verdict = self.limiter.check(limits, ctx)
        if verdict.__class__ is Verdict:
            self._apply(ctx, limits, verdict)  # type: ignore[arg-type]
            return None
        return self._wait(ctx, limits, verdict)  # type: ignore[arg-type]

    async def _wait(self, ctx: Any, limits: RouteRateLimit, pending: Any) -> None:
        self._apply(ctx, limits, await pending)

    def _apply(self, ctx: Any, limits: RouteRateLimit, verdict: Verdict) -> None:
        if verdict.allowed:
            self.limiter.allowed += 1
            if verdict.limit and limits.headers != "none":
                ctx.ratelimit_headers = ratelimit_headers(limits.headers, verdict)
            return
        if verdict.error:
            self.limiter.failed += 1
            raise RateLimitServiceError(f"limit {verdict.limit_id}: redis unavailable")
        self.limiter.limited += 1
        headers = [("retry-after", str(verdict.retry_after_s))]
        headers += ratelimit_headers(limits.headers, verdict)
        raise RateLimited(f"over limit {verdict.limit_id}", tuple(headers))
