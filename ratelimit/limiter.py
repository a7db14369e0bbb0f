"""The decision API the rate-limit stage calls.

    limiter = Limiter(local=LocalBuckets(...), redis=RedisBackend(...) | None)
    verdict = limiter.check(route_limits, ctx)   # Verdict, or an awaitable of one

A route's limits are all asked; the request passes only if every one allows it (a
token spent on one limit is not given back when another refuses, as in Envoy).
When every limit of a route is local, ``check`` answers synchronously and the
request never yields to the event loop; with a Redis limit it returns a coroutine.

The verdict carries what the response headers show: the most restrictive limit's
figures (the refusing one with the longest wait, or else the one with the fewest
requests left).

A Redis limit whose store cannot answer follows its ``failureMode``: ``open`` lets
the request through (and that limit adds no headers), ``closed`` refuses it with
``Verdict.error`` set, which the gateway answers 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from .local import LocalBuckets, Outcome
from .policy import Limit, RequestFacts, RouteRateLimit
from .redis_backend import RedisBackend

__all__ = [
    "Limiter",
    "LimiterSettings",
    "RedisNotConfigured",
    "Verdict",
    "snapshot_problem",
    "start_limiter",
    "uses_redis",
]


@dataclass(slots=True)
class Verdict:
    """What the stage does with a request; seconds rounded up for the headers."""

    allowed: bool
    limit: int = 0  # bucket capacity (burst) of the reported limit; 0: no figures
    remaining: int = 0
    reset_s: int = 0
    retry_after_s: int = 0
    error: bool = False  # a fail-closed limit's store did not answer
    limit_id: str = ""


ALLOW = Verdict(True)


class RedisNotConfigured(RuntimeError):
    """A route has a Redis limit but the gateway was started without ``--redis-url``."""


def _ceil_s(us: int) -> int:
    return -(-us // 1_000_000)


class _Tally:
    """Folds per-limit outcomes into one verdict."""

    __slots__ = ("best", "best_limit", "error_limit")

    def __init__(self) -> None:
        self.best: Outcome | None = None
        self.best_limit: Limit | None = None
        self.error_limit: Limit | None = None

    def add(self, limit: Limit, outcome: Outcome | None) -> None:
        if outcome is None:
            if not limit.fail_open and self.error_limit is None:
                self.error_limit = limit
            return
        best = self.best
        if best is None:
            replace = True
        elif outcome.allowed != best.allowed:
            replace = not outcome.allowed
        elif outcome.allowed:
            replace = outcome.remaining < best.remaining
        else:
            replace = outcome.retry_after_us > best.retry_after_us
        if replace:
            self.best = outcome
            self.best_limit = limit

    def verdict(self, burst_of: dict[str, int]) -> Verdict:
        best, limit = self.best, self.best_limit
        if best is not None and not best.allowed and limit is not None:
            return Verdict(
                False,
                burst_of.get(limit.id, 0),
                0,
                _ceil_s(best.reset_us),
                max(1, _ceil_s(best.retry_after_us)),
                False,
                limit.id,
            )
        if self.error_limit is not None:
            return Verdict(False, error=True, retry_after_s=1, limit_id=self.error_limit.id)
        if best is None or limit is None:
            return ALLOW
        return Verdict(
            True,
            burst_of.get(limit.id, 0),
            best.remaining,
            _ceil_s(best.reset_us),
            0,
            False,
            limit.id,
        )


class Limiter:
    """Holds the stores; compiled limits come with each request's route."""

    def __init__(
        self, local: LocalBuckets | None = None, redis: RedisBackend | None = None
    ) -> None:
        self.local = local if local is not None else LocalBuckets()
        self.redis = redis
        # What the stage did with the verdicts, for /metrics.
        self.allowed = 0
        self.limited = 0
        self.failed = 0

    def status(self) -> dict[str, Any]:
        """This process's counters (``ratelimit.stats`` renders them)."""
        local = self.local
        out: dict[str, Any] = {
            "requests": {"allowed": self.allowed, "limited": self.limited, "failed": self.failed},
            "local": {
                "slots": local.slots,
                "memory_bytes": local.memory_bytes,
                "decisions": local.decisions,
                "evictions": local.evictions,
                "lock_timeouts": local.lock_timeouts,
            },
            "redis": None,
        }
        redis = self.redis
        if redis is not None:
            out["redis"] = {
                "available": redis.available,
                "round_trips": redis.round_trips,
                "decisions": redis.decisions,
                "failures": redis.failures,
                "script_loads": redis.script_loads,
                "prechecked": redis.prechecked,
            }
        return out

    def check(
        self, route_limits: RouteRateLimit, ctx: RequestFacts
    ) -> Verdict | Awaitable[Verdict]:
        limit = route_limits.single
        if limit is not None:
            # The common case: one local limit with one key part and nothing
            # conditional. Its bucket is known by a memoised hash, so no key string
            # is built or hashed per request, and there is no tally.
            value = ctx.head.peer or None if limit.by_peer else limit.extract(ctx)
            h = limit.hashes.get(value)
            if h is None:
                h = limit.key_hash(value)
            rate = limit.rate
            burst = rate.burst
            o = self.local.take_hash(h, rate.interval_us, burst)
        elif len(route_limits.limits) == 1 and route_limits.local_only:
            # One local limit, but with overrides, several key parts or a host check.
            limit = route_limits.limits[0]
            found = limit.bucket(ctx)
            if found is None:
                return ALLOW
            bucket, rate = found
            burst = rate.burst
            o = self.local.take(bucket, rate.interval_us, burst)
        else:
            return self._check_all(route_limits, ctx)
        if o.allowed:
            return Verdict(True, burst, o.remaining, -(-o.reset_us // 1_000_000), 0, False, "")
        return Verdict(
            False,
            burst,
            0,
            _ceil_s(o.reset_us),
            max(1, _ceil_s(o.retry_after_us)),
            False,
            limit.id,
        )

    def _check_all(
        self, route_limits: RouteRateLimit, ctx: RequestFacts
    ) -> Verdict | Awaitable[Verdict]:
        """Several limits, or a Redis one: every limit asked, the verdicts folded."""
        tally = _Tally()
        burst_of: dict[str, int] = {}
        waiting: list[tuple[Limit, asyncio.Future[Outcome | None]]] | None = None
        local = self.local
        for limit in route_limits.limits:
            found = limit.bucket(ctx)
            if found is None:
                continue
            bucket, rate = found
            burst_of[limit.id] = rate.burst
            if limit.backend == "local":
                tally.add(limit, local.take(bucket, rate.interval_us, rate.burst))
                continue
            redis = self.redis
            if redis is None:
                raise RedisNotConfigured(f"limit {limit.id} uses Redis; start with --redis-url")
            result = redis.take(bucket, rate.interval_us, rate.burst)
            if result is None or isinstance(result, Outcome):
                tally.add(limit, result)
            else:
                if waiting is None:
                    waiting = []
                waiting.append((limit, result))
        if waiting is None:
            return tally.verdict(burst_of)
        return self._finish(tally, burst_of, waiting)

    async def _finish(
        self,
        tally: _Tally,
        burst_of: dict[str, int],
        waiting: list[tuple[Limit, asyncio.Future[Outcome | None]]],
    ) -> Verdict:
        for limit, future in waiting:
            tally.add(limit, await future)
        return tally.verdict(burst_of)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()


@dataclass(frozen=True, slots=True)
class LimiterSettings:
    """The gateway's rate-limit settings (``meshgate run`` flags)."""

    redis_url: str | None = None  # --redis-url / MESHGATE_REDIS_URL
    redis_timeout_s: float = 0.1  # one decision's round trip, at most
    local_slots: int = 65536  # the local table's size (16 bytes a slot)


def uses_redis(snapshot: Any) -> list[str]:
    """The ids of the Redis limits any route of ``snapshot`` carries."""
    found: set[str] = set()
    for listener in snapshot.listeners.values():
        vhosts = [*listener.virtual_hosts.values(), *listener.wildcard_hosts.values()]
        if listener.catch_all is not None:
            vhosts.append(listener.catch_all)
        for vhost in vhosts:
            for route in vhost.routes:
                limits = route.ratelimit
                if limits is not None and not limits.local_only:
                    found.update(lim.id for lim in limits.limits if lim.backend == "redis")
    # An egress gateway limits the routes its registry makes with these policies too.
    for policy in getattr(getattr(snapshot, "egress", None), "ratelimits", ()):
        found.update(lim.id for lim in policy.limits if lim.backend == "redis")
    return sorted(found)


def snapshot_problem(snapshot: Any, settings: LimiterSettings) -> str | None:
    """Why the gateway cannot enforce ``snapshot``'s limits with ``settings``, or None."""
    if settings.redis_url:
        return None
    ids = uses_redis(snapshot)
    if not ids:
        return None
    return (
        f"rate limit {ids[0]}{f' (and {len(ids) - 1} more)' if len(ids) > 1 else ''} "
        "uses backend: redis, but no Redis is configured; "
        "start with --redis-url redis://host:port/db or set MESHGATE_REDIS_URL"
    )


async def start_limiter(settings: LimiterSettings | None, local: LocalBuckets | None) -> Limiter:
    """The Limiter of one worker process: the (possibly shared) local table, and a
    Redis backend connected ahead of the first request when a URL is set."""
    settings = settings or LimiterSettings()
    redis = None
    if settings.redis_url:
        redis = RedisBackend(settings.redis_url, timeout_s=settings.redis_timeout_s)
        await redis.start()
    return Limiter(local if local is not None else LocalBuckets(settings.local_slots), redis)
