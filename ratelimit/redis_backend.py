"""The global limiter's store: GCRA buckets in Redis, one Lua script per decision.

    backend = RedisBackend(url, timeout_s=0.1)
    result = backend.take(bucket, interval_us, burst)  # Outcome | None | Future[Outcome | None]
    await backend.close()

**One atomic script.** ``GCRA_SCRIPT`` reads the key's TAT, decides with the same
integer-microsecond arithmetic as ``local.gcra``, writes the new TAT with an expiry
equal to the time until the bucket is full again (so idle keys vanish on their own)
and returns ``allowed, remaining, reset_us, retry_after_us``. Its clock is Redis'
``TIME``: every gateway replica asks the same clock, so replicas whose own clocks
disagree still agree on every bucket. The script is sent by SHA (``EVALSHA``); the
first ``NOSCRIPT`` reply (a fresh or restarted Redis) loads it with ``SCRIPT LOAD``
and the calls are sent again.

**Batching.** One EVALSHA round trip on loopback costs ~80 us and ~30 us of client
CPU, more than the rest of a fast proxy path. Decisions asked for in the same
event-loop tick are therefore queued and sent together as one pipelined round trip
(``transaction=False``): each is still its own script call, so each is exact. While
``max_inflight`` batches are on the wire, new decisions wait for the next one, which
makes batches grow with load instead of connections.

**Failures.** Every round trip is bounded by ``timeout_s``. A failure (refused, timed
out, reset) answers ``None`` for the whole batch (the limiter applies each limit's
failureMode) and opens a short circuit: for ``retry_after_s`` decisions answer
``None`` at once without touching the network, then the next batch probes Redis
again. redis-py reconnects by itself, so limits resume when Redis is back, without
a restart.

**Keys.** ``meshgate:rl:{<limit id><sep><key>}``: the braces are a Cluster hash tag,
so each bucket lives on one slot (the script touches one key). Long or brace-holding
keys are replaced by a BLAKE2b digest so that a client cannot make keys arbitrarily
large or split the hash tag.

**Pre-check.** A key Redis refused is remembered locally until its retry time
(measured on the local monotonic clock, so skew does not matter): until then it is
refused without a round trip. A refusal stays valid that long whatever other
replicas do, since the TAT only moves forward. The memory is bounded (oldest
entries dropped).

URLs: ``redis://``, ``rediss://``, ``unix://`` (one server); ``redis+cluster://host:port``
(``rediss+cluster://``) for Redis Cluster; ``redis+sentinel://[:password@]host:port
[,host:port...]/service[/db]`` for Sentinel.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from .local import Outcome

__all__ = [
    "GCRA_SCRIPT",
    "RedisBackend",
    "RedisURLError",
    "parse_redis_url",
    "redis_key",
]

log = logging.getLogger("meshgate.ratelimit.redis")

# KEYS[1]: the bucket. ARGV[1]: emission interval (us). ARGV[2]: burst.
# Returns {allowed, remaining, reset_us, retry_after_us}. Numbers stay below 2^53
# (microsecond timestamps, validated rates), so Lua's doubles hold them exactly.
GCRA_SCRIPT = """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local ahead = new_tat - now
local capacity = interval * burst
if ahead <= capacity then
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil(ahead / 1000))
  return {1, math.floor((capacity - ahead) / interval), ahead, 0}
end
return {0, 0, tat - now, ahead - capacity}
"""
_SCRIPT_SHA = hashlib.sha1(GCRA_SCRIPT.encode()).hexdigest()
_UP = float("-inf")  # _down_until while Redis is answering
_KEY_PREFIX = "meshgate:rl:"
_MAX_RAW_KEY = 200


class RedisURLError(ValueError):
    """A ``--redis-url`` meshgate cannot use; the message says why."""


def redis_key(bucket: str) -> str:
    """The Redis key of a bucket, hash-tagged so that it maps to one Cluster slot."""
    if len(bucket) > _MAX_RAW_KEY or "{" in bucket or "}" in bucket:
        digest = hashlib.blake2b(bucket.encode("utf-8", "surrogatepass"), digest_size=16)
        limit_id = bucket.split("\x1f", 1)[0].replace("{", "").replace("}", "")[:100]
        bucket = f"{limit_id}#{digest.hexdigest()}"
    return f"{_KEY_PREFIX}{{{bucket}}}"


def parse_redis_url(url: str) -> tuple[str, dict[str, Any]]:
    """``(mode, details)``: mode is ``single``, ``cluster`` or ``sentinel``."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise RedisURLError(f"{url!r} is not a URL; expected redis://host:port/db")
    scheme = scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return "single", {"url": url}
    if scheme in ("redis+cluster", "rediss+cluster"):
        return "cluster", {"url": scheme.replace("+cluster", "") + url[len(scheme) :]}
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        parts = urlsplit(url)
        netloc = parts.netloc
        password = None
        if "@" in netloc:
            auth, netloc = netloc.rsplit("@", 1)
            password = unquote(auth.partition(":")[2]) or None
        sentinels = []
        for item in filter(None, netloc.split(",")):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit():
                raise RedisURLError(f"sentinel address {item!r} must be host:port")
            sentinels.append((host.strip("[]"), int(port)))
        path = [p for p in parts.path.split("/") if p]
        if not sentinels or not path:
            raise RedisURLError(
                f"{url!r}: expected redis+sentinel://host:port[,host:port]/service[/db]"
            )
        db = path[1] if len(path) > 1 else "0"
        if not db.isdigit():
            raise RedisURLError(f"{url!r}: database {db!r} is not a number")
        return "sentinel", {
            "sentinels": sentinels,
            "service": path[0],
            "db": int(db),
            "password": password,
            "ssl": scheme.startswith("rediss"),
        }
    raise RedisURLError(
        f"unsupported scheme {scheme!r}; use redis://, rediss://, unix://, "
        "redis+cluster:// or redis+sentinel://"
    )


def _connect(url: str, timeout_s: float, max_connections: int) -> Any:
    """A redis-py asyncio client for ``url``; no I/O happens until the first command."""
    # redis-py is about 7 MB of a worker's memory: loaded only when a Redis URL is set.
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel
    from redis.backoff import NoBackoff

    mode, details = parse_redis_url(url)
    # No client-side retries: a decision has one timeout, and the circuit decides
    # when to try again.
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }
    if mode == "single":
        pool = BlockingConnectionPool.from_url(
            details["url"], max_connections=max_connections, timeout=timeout_s, **common
        )
        return Redis(connection_pool=pool)
    if mode == "cluster":
        return RedisCluster.from_url(details["url"], max_connections=max_connections, **common)
    sentinel = Sentinel(
        details["sentinels"],
        sentinel_kwargs={"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s},
        password=details["password"],
        ssl=details["ssl"],
        **common,
    )
    return sentinel.master_for(details["service"], db=details["db"])


class RedisBackend:
    """Decisions against one Redis deployment, batched per event-loop tick."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.1,
        max_connections: int = 8,
        max_inflight: int = 4,
        retry_after_s: float = 0.25,
        precheck_max_keys: int = 10000,
        clock: Callable[[], float] = time.monotonic,
        client: Any = None,
    ) -> None:
        parse_redis_url(url)  # refuse a bad URL at start-up, not at the first request
        self.url = url
        self.timeout_s = timeout_s
        self.max_inflight = max_inflight
        self.retry_after_s = retry_after_s
        self.precheck_max_keys = precheck_max_keys
        self.clock = clock
        self._client = client
        self._max_connections = max_connections
        if client is None:
            # redis-py is loaded now, not by the first decision, whose deadline
            # would otherwise include importing it.
            import redis.asyncio  # noqa: F401
        self._sha = _SCRIPT_SHA
        self._pending: list[tuple[str, int, int, asyncio.Future[Outcome | None]]] = []
        self._scheduled = False
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # -inf, not 0: a monotonic clock may read below zero (the tests skew it).
        self._down_until = _UP
        self._denied: dict[str, tuple[float, float]] = {}  # bucket -> (until, reset_at)
        # Counters for metrics and tests.
        self.round_trips = 0
        self.decisions = 0
        self.failures = 0
        self.script_loads = 0
        self.prechecked = 0

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _connect(self.url, self.timeout_s, self._max_connections)
        return self._client

    async def start(self) -> None:
        """Connect and load the script ahead of the first request; a Redis that is
        down now is not an error (decisions follow failureMode until it answers)."""
        try:
            async with asyncio.timeout(max(self.timeout_s, 1.0)):
                self._sha = await self.client.script_load(GCRA_SCRIPT)
                self.script_loads += 1
        except Exception as exc:
            log.warning("redis at %s not reachable at start-up: %r", self.url, exc)

    @property
    def available(self) -> bool:
        """False while the circuit is open after a failure."""
        return self.clock() >= self._down_until

    def take(
        self, bucket: str, interval_us: int, burst: int
    ) -> Outcome | asyncio.Future[Outcome | None] | None:
        """Spend a token of ``bucket``: an Outcome now (pre-check), None now (Redis
        known down), or a future resolved when the batch's round trip returns."""
        now = self.clock()
        denied = self._denied.get(bucket)
        if denied is not None:
            until, reset_at = denied
            if now < until:
                self.prechecked += 1
                return Outcome(
                    False, 0, int((reset_at - now) * 1e6), max(1, int((until - now) * 1e6))
                )
            del self._denied[bucket]
        if now < self._down_until:
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome | None] = loop.create_future()
        self._pending.append((bucket, interval_us, burst, future))
        if not self._scheduled and self._inflight < self.max_inflight:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        self._inflight += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[str, int, int, asyncio.Future[Outcome | None]]]) -> None:
        try:
            try:
                async with asyncio.timeout(self.timeout_s):
                    replies = await self._execute(batch)
            except Exception as exc:  # redis errors, OSError, TimeoutError alike
                self._fail(batch, exc)
                return
            if self._down_until != _UP:
                log.warning("redis at %s answers again; global limits resume", self.url)
                self._down_until = _UP
            now = self.clock()
            for (bucket, _, _, future), reply in zip(batch, replies, strict=True):
                if future.done():
                    continue
                if isinstance(reply, Exception) or not isinstance(reply, list):
                    self.failures += 1
                    future.set_result(None)
                    continue
                outcome = Outcome(bool(reply[0]), int(reply[1]), int(reply[2]), int(reply[3]))
                if not outcome.allowed:
                    self._remember_denial(bucket, outcome, now)
                future.set_result(outcome)
        finally:
            # Whatever happened, no request waits on a future nobody will resolve.
            for *_, future in batch:
                if not future.done():
                    future.set_result(None)
            self._inflight -= 1
            if self._pending and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def _execute(self, batch: list[tuple[str, int, int, Any]]) -> list[Any]:
        from redis.exceptions import NoScriptError

        client = self.client
        replies = await self._pipeline(client, batch)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            # A fresh or restarted Redis: load the script once, resend those calls.
            self._sha = await client.script_load(GCRA_SCRIPT)
            self.script_loads += 1
            again = await self._pipeline(client, [batch[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, client: Any, batch: list[tuple[str, int, int, Any]]) -> list[Any]:
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            return await self._pipeline_direct(pool, batch)
        # Redis Cluster: redis-py's cluster pipeline routes each call to its slot.
        pipe = client.pipeline(transaction=False)
        sha = self._sha
        for bucket, interval_us, burst, _ in batch:
            pipe.evalsha(sha, 1, redis_key(bucket), interval_us, burst)
        self.round_trips += 1
        self.decisions += len(batch)
        return list(await pipe.execute(raise_on_error=False))

    async def _pipeline_direct(
        self, pool: Any, batch: list[tuple[str, int, int, Any]]
    ) -> list[Any]:
        """The same pipelined EVALSHA calls on one pooled connection, packed here.

        Measured on the 2-core CI machine, redis-py's generic pipeline spent ~55 us a
        command packing arguments and more parsing replies line by line; the calls
        here are one fixed shape, so they are packed with one format each and the
        replies read with the connection's parser (hiredis when installed)."""
        from redis.exceptions import ResponseError

        sha = self._sha.encode()
        parts = []
        for bucket, interval_us, burst, _ in batch:
            key = redis_key(bucket).encode("utf-8", "surrogatepass")
            a = b"%d" % interval_us
            b = b"%d" % burst
            parts.append(
                b"*6\r\n$7\r\nEVALSHA\r\n$%d\r\n%b\r\n$1\r\n1\r\n$%d\r\n%b\r\n"
                b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(sha), sha, len(key), key, len(a), a, len(b), b)
            )
        self.round_trips += 1
        self.decisions += len(batch)
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(b"".join(parts), check_health=False)
            replies: list[Any] = []
            for _ in batch:
                try:
                    replies.append(await conn.read_response(disable_decoding=True))
                except ResponseError as exc:  # NOSCRIPT and script errors: per call
                    replies.append(exc)
        except BaseException:
            # Timed out or cut mid-reply: the connection's framing is lost.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)
        return replies

    def _fail(self, batch: list[tuple[str, int, int, Any]], exc: BaseException) -> None:
        if self._down_until == _UP:
            log.warning(
                "redis at %s failed (%s); applying each limit's failureMode",
                self.url,
                type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}",
            )
        self._down_until = self.clock() + self.retry_after_s
        self.failures += len(batch)
        for _, _, _, future in batch:
            if not future.done():
                future.set_result(None)

    def _remember_denial(self, bucket: str, outcome: Outcome, now: float) -> None:
        denied = self._denied
        if self.precheck_max_keys <= 0:
            return
        if len(denied) >= self.precheck_max_keys:
            # Drop the oldest entry: dicts keep insertion order.
            del denied[next(iter(denied))]
        denied[bucket] = (now + outcome.retry_after_us / 1e6, now + outcome.reset_us / 1e6)

    async def close(self) -> None:
        """Wait for batches on the wire (bounded by the timeout), then close the pool."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        client = self._client
        self._client = None
        if client is not None:
            close = getattr(client, "aclose", None) or client.close
            try:
                await close()
            except Exception as exc:  # closing a dead connection may itself fail
                log.debug("closing redis client: %r", exc)
