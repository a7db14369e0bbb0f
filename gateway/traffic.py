"""The upstream path for routes and clusters that carry traffic policy.

``UpstreamStage`` (in ``stages.py``) keeps its lean path for the common case: no
retries, faults or mirrors on the route and a cluster at its default policy. Anything
else comes here, to ``TrafficForwarder.forward``, which does, in this order:

1. ``fault``: delay (flag ``DI``), then abort (flag ``FI``) — before any upstream work,
   as Envoy's fault filter sits ahead of its router;
2. request body: kept in memory up to the retry buffer limit when a retry or a mirror
   may need it again; a longer body is streamed once and its request is not retried
   (and not mirrored);
3. ``mirror``/``mirrors``: a copy of the request, authority suffixed ``-shadow``, sent
   in a task of its own; its answer is read and dropped and never holds up the client;
4. the attempt loop: pick an endpoint (the cluster's balancer over the endpoints
   outlier detection has not ejected, avoiding the previous attempt's host when
   another is available), take a pooled or new connection within the circuit-breaker
   limits (overflow: 503 ``UO``), TLS origination when configured, send, await the
   head within ``perTryTimeout``; a retriable failure or status goes round again
   while attempts remain (with Envoy's jittered exponential back-off, 25 ms base);
   the whole loop runs within the route ``timeout``;
5. the response is streamed back; outlier detection sees every outcome.

``ClusterState`` holds what one worker knows of one cluster across requests and
reloads: endpoint states (``healthy``, ``ejected_until``, ``active_requests``, read by
the admin ``/clusters`` page through ``TrafficForwarder.clusters``), the balancer,
the outlier detector, connection counts and the TLS context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .errors import (
    GatewayError,
    NoHealthyUpstream,
    UpstreamConnectFailure,
    UpstreamOverflow,
    UpstreamReset,
    UpstreamTimeout,
)
from .policy import ClusterTraffic, ConnectionLimits, RetryPolicy, RouteTraffic
from .routing.table import Cluster
from .server.events import RequestHead, ResponseHead
from .server.tlsread import BufferedReads
from .upstream.h2client import H2UpstreamConnection, H2UpstreamStream, refused, request_headers
from .upstream.lb import Balancer, hash_key, make_balancer
from .upstream.outlier import EndpointState, OutlierDetector
from .upstream.pool import EndpointPool, UpstreamConnection, UpstreamPools
from .upstream.tls import (
    TLSOriginationError,
    client_context,
    server_hostname_for,
    verify_subject_alt_names,
)
from .upstream.websocket import UpstreamHandshake, splice

if TYPE_CHECKING:
    from .stages import RequestContext, UpstreamStage

__all__ = ["ClusterState", "TrafficForwarder"]

log = logging.getLogger("meshgate.traffic")

_DEFAULT_TRAFFIC = ClusterTraffic()
_RETRY_BASE_S = 0.025  # Envoy's default base interval; the cap is ten times it
_MAX_MIRRORS_IN_FLIGHT = 256
_MIRROR_TIMEOUT_S = 10.0
_FAULT_ABORT_BODY = b"fault filter abort"


async def within_route_timeout(
    step: Coroutine[Any, Any, None], ctx: RequestContext, started: float
) -> None:
    """Run ``step``, the rest of a response after its head, within what is left of
    the route ``timeout`` that began at ``started`` (``perf_counter``).

    Envoy's route timeout lasts until the whole response has been received, not
    just its head: a body still arriving when the time is up is cut off (the
    client's stream is reset, since its head is out) and logged ``UT``."""
    forward = ctx.forward
    timeout_s = forward.timeout_s if forward is not None else None
    if not timeout_s:
        await step
        return
    budget = asyncio.timeout(max(0.0, timeout_s - (perf_counter() - started)))
    try:
        async with budget:
            await step
    except TimeoutError as exc:
        if not budget.expired():
            raise
        raise UpstreamTimeout(f"response not complete within {timeout_s}s") from exc


class _ClusterPool(EndpointPool):
    """An endpoint pool that also keeps its cluster's connection count, closes
    connections idle for idleTimeout and retires them after maxRequestsPerConnection."""

    __slots__ = ("cluster", "idle_timers", "state", "tls")

    def __init__(self, cluster: ClusterState, state: EndpointState) -> None:
        super().__init__(state.address, state.port, 1024)
        self.cluster = cluster
        self.state = state
        self.host_label = state.host_label
        # id(connection) -> the timer that closes it once idle for idleTimeout.
        self.idle_timers: dict[int, asyncio.TimerHandle] = {}

    def take_idle(self) -> UpstreamConnection | None:
        conn = super().take_idle()
        if conn is not None and self.idle_timers:
            timer = self.idle_timers.pop(id(conn), None)
            if timer is not None:
                timer.cancel()
        return conn

    def put_idle(self, conn: UpstreamConnection) -> None:
        limit = self.cluster.max_requests_per_connection
        if limit and conn.exchanges >= limit:
            conn.close()
            return
        super().put_idle(conn)
        idle_timeout = self.cluster.idle_timeout_s
        if idle_timeout and not conn.closed:
            # Envoy closes an upstream connection that has had no active request for
            # idle_timeout (Istio's connectionPool.http.idleTimeout), rather than
            # keeping the socket open until it is next wanted.
            self.idle_timers[id(conn)] = conn.loop.call_later(idle_timeout, self._close_idle, conn)
        self.cluster.wake_one()

    def _close_idle(self, conn: UpstreamConnection) -> None:
        self.idle_timers.pop(id(conn), None)
        if conn in self.idle:
            conn.close()  # connection_lost takes it out of the pool and the count

    def discard(self, conn: UpstreamConnection) -> None:
        # connection_lost calls this exactly once per connection.
        super().discard(conn)
        timer = self.idle_timers.pop(id(conn), None)
        if timer is not None:
            timer.cancel()
        self.cluster.connections -= 1
        self.cluster.wake_one()

    def close(self) -> None:
        for timer in self.idle_timers.values():
            timer.cancel()
        self.idle_timers.clear()
        super().close()


class ClusterState:
    """One cluster as one worker sees it; survives reloads while its name lives."""

    def __init__(self, cluster: Cluster, credentials_dir: str | None) -> None:
        self.name = cluster.name
        self.cluster = cluster
        self.credentials_dir = credentials_dir
        self.endpoints: list[EndpointState] = []
        self.pools: dict[str, _ClusterPool] = {}
        self.h2conns: dict[str, H2UpstreamConnection] = {}
        self.connections = 0
        self.active_requests = 0
        self.pending = 0
        self.overflows = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.ssl_context: Any = None
        self.tls_error: str | None = None
        self.balancer: Balancer
        self.detector: OutlierDetector | None = None
        self.traffic = _DEFAULT_TRAFFIC
        self.update(cluster)

    # Read on every request; copied out of ``traffic.limits`` so the checks are flat.
    max_connections: int | None = None
    max_pending: int | None = None
    max_requests: int | None = None
    max_requests_per_connection: int | None = None
    idle_timeout_s: float | None = None
    connect_timeout_s: float | None = None

    def update(self, cluster: Cluster) -> None:
        """Adopt a (possibly reloaded) cluster: endpoint states are kept by
        ``address:port`` so health and counters survive a reload."""
        traffic = getattr(cluster, "traffic", None) or _DEFAULT_TRAFFIC
        old = {e.key: e for e in self.endpoints}
        endpoints = []
        for endpoint in cluster.endpoints:
            key = f"{endpoint.address}:{endpoint.port}"
            state = old.get(key)
            if state is None:
                state = EndpointState(endpoint)
            else:
                state.endpoint = endpoint
                state.weight = max(endpoint.weight, 1)
            endpoints.append(state)
        for key in old.keys() - {e.key for e in endpoints}:
            pool = self.pools.pop(key, None)
            if pool is not None:
                pool.close()
        self.endpoints = endpoints
        if traffic != self.traffic or not hasattr(self, "balancer"):
            if traffic.tls != self.traffic.tls or traffic.http2 != self.traffic.http2:
                self.close()
                self.ssl_context = None
                self.tls_error = None
            self.balancer = make_balancer(traffic.lb)
        self.traffic = traffic
        self.cluster = cluster
        limits = traffic.limits or ConnectionLimits()
        self.max_connections = limits.max_connections
        self.max_pending = limits.max_pending
        self.max_requests = limits.max_requests
        self.max_requests_per_connection = limits.max_requests_per_connection
        self.idle_timeout_s = limits.idle_timeout_s
        self.connect_timeout_s = limits.connect_timeout_s
        if traffic.outlier is not None:
            if self.detector is None:
                self.detector = OutlierDetector(traffic.outlier, endpoints)
            else:
                self.detector.policy = traffic.outlier
                self.detector.endpoints = endpoints
                self.detector.version += 1
        else:
            self.detector = None
            for state in endpoints:
                state.healthy = True
                state.ejected_until = 0.0

    # -- endpoint choice --------------------------------------------------------------

    def pick(self, key: int | None, avoid: EndpointState | None) -> EndpointState:
        endpoints = self.endpoints
        if not endpoints:
            raise NoHealthyUpstream(f"cluster {self.name} has no endpoints")
        detector = self.detector
        version = 0
        healthy: list[EndpointState] = endpoints
        if detector is not None:
            detector.refresh(time.monotonic())
            version = detector.version
            healthy = [e for e in endpoints if e.healthy]
            panic = detector.policy.min_health_percent
            if panic and len(healthy) * 100 < len(endpoints) * panic:
                # Envoy's panic mode (Istio's minHealthPercent is its
                # healthy_panic_threshold): too few healthy endpoints, so balance over
                # all of them, ejected or not.
                healthy = endpoints
                version = -2 - version  # another set than any healthy one
            elif not healthy:
                # Istio's default minHealthPercent, 0, turns panic mode off: with every
                # endpoint ejected there is nobody to send to.
                raise NoHealthyUpstream(f"every endpoint of {self.name} is ejected")
        if avoid is not None and len(healthy) > 1 and not self.balancer.needs_key:
            # Istio's default retry host predicate: not the host that just failed. It
            # leaves it out for consistent hashing, where a retry goes to the key's
            # endpoint again (DefaultConsistentHashPolicy).
            others = [e for e in healthy if e is not avoid]
            return self.balancer.pick(others, key, version + 1_000_003)
        return self.balancer.pick(healthy, key, version)

    def pool_for(self, state: EndpointState) -> _ClusterPool:
        pool = self.pools.get(state.key)
        if pool is None:
            pool = self.pools[state.key] = _ClusterPool(self, state)
        return pool

    # -- circuit breakers -------------------------------------------------------------

    def wake_one(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def connection(
        self, pool: _ClusterPool, pools: UpstreamPools
    ) -> tuple[UpstreamConnection, bool]:
        """An idle connection, a new one within maxConnections, or a wait in the
        pending queue within http1MaxPendingRequests (beyond it: 503 UO)."""
        while True:
            conn = pool.take_idle()
            if conn is not None:
                return conn, True
            limit = self.max_connections
            if limit is None or self.connections < limit:
                return await self.open(pool, pools), False
            if self.max_pending is not None and self.pending >= self.max_pending:
                self.overflows += 1
                raise UpstreamOverflow(f"{self.name}: {self.pending} requests already pending")
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self.pending += 1
            try:
                await waiter
            finally:
                self.pending -= 1
                if not waiter.done():
                    waiter.cancel()

    async def open(self, pool: _ClusterPool, pools: UpstreamPools) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        high = pools.write_buffer_high_bytes
        tls = self.traffic.tls
        ssl_context = None
        server_hostname = None
        if tls is not None:
            ssl_context = self._ssl_context()
            server_hostname = server_hostname_for(tls, self.cluster.host)
        timeout_s = self.connect_timeout_s or pools.connect_timeout_s
        self.connections += 1
        try:
            async with asyncio.timeout(timeout_s):
                transport, made = await loop.create_connection(
                    _tls_reads(lambda: UpstreamConnection(pool, high), ssl_context),
                    pool.address,
                    pool.port,
                    ssl=ssl_context,
                    server_hostname=server_hostname,
                )
            conn = _unwrapped(made)
        except TimeoutError as exc:
            self.connections -= 1
            raise UpstreamConnectFailure(f"connect to {pool.host_label} timed out") from exc
        except (OSError, ValueError) as exc:
            # ssl.SSLError is an OSError: a failed handshake is a connect failure (UF).
            self.connections -= 1
            raise UpstreamConnectFailure(f"connect to {pool.host_label}: {exc}") from exc
        if (
            tls is not None
            and tls.subject_alt_names
            and not tls.insecure_skip_verify
            and not verify_subject_alt_names(
                transport.get_extra_info("ssl_object"), tls.subject_alt_names
            )
        ):
            conn.close()  # connection_lost will give the count back
            raise UpstreamConnectFailure(
                f"{pool.host_label}: certificate carries none of {tls.subject_alt_names}"
            )
        pool.connections_opened += 1
        return conn

    async def connect_raw(
        self, endpoint: EndpointState, factory: Callable[[], Any], pools: UpstreamPools
    ) -> tuple[Any, Any]:
        """A connection of its own to ``endpoint`` (TLS as configured), outside the
        pools and the connection count: an upgraded connection is never shared."""
        loop = asyncio.get_running_loop()
        tls = self.traffic.tls
        ssl_context = self._ssl_context() if tls is not None else None
        server_hostname = server_hostname_for(tls, self.cluster.host) if tls else None
        try:
            async with asyncio.timeout(self.connect_timeout_s or pools.connect_timeout_s):
                return await loop.create_connection(
                    factory,
                    endpoint.address,
                    endpoint.port,
                    ssl=ssl_context,
                    server_hostname=server_hostname,
                )
        except TimeoutError as exc:
            raise UpstreamConnectFailure(f"connect to {endpoint.host_label} timed out") from exc
        except (OSError, ValueError) as exc:
            raise UpstreamConnectFailure(f"connect to {endpoint.host_label}: {exc}") from exc

    async def h2_connection(
        self, endpoint: EndpointState, pools: UpstreamPools
    ) -> H2UpstreamConnection:
        """The endpoint's HTTP/2 connection while it has room, else a new one."""
        conn = self.h2conns.get(endpoint.key)
        if conn is not None and conn.usable:
            return conn
        limit = self.max_connections
        if limit is not None and self.connections >= limit:
            self.overflows += 1
            raise UpstreamOverflow(f"{self.name}: {self.connections} connections open")
        loop = asyncio.get_running_loop()
        tls = self.traffic.tls
        ssl_context = self._ssl_context() if tls is not None else None
        server_hostname = server_hostname_for(tls, self.cluster.host) if tls else None
        timeout_s = self.connect_timeout_s or pools.connect_timeout_s
        self.connections += 1
        try:
            async with asyncio.timeout(timeout_s):
                transport, made = await loop.create_connection(
                    _tls_reads(lambda: H2UpstreamConnection(endpoint.host_label), ssl_context),
                    endpoint.address,
                    endpoint.port,
                    ssl=ssl_context,
                    server_hostname=server_hostname,
                )
            conn = _unwrapped(made)
        except TimeoutError as exc:
            self.connections -= 1
            raise UpstreamConnectFailure(f"connect to {endpoint.host_label} timed out") from exc
        except (OSError, ValueError) as exc:
            self.connections -= 1
            raise UpstreamConnectFailure(f"connect to {endpoint.host_label}: {exc}") from exc

        def lost() -> None:
            self.connections -= 1
            if self.h2conns.get(endpoint.key) is conn:
                del self.h2conns[endpoint.key]

        conn.on_lost = lost
        if conn.closed:  # lost during the handshake already
            lost()
            raise UpstreamReset(f"{endpoint.host_label}: closed while connecting")
        if (
            tls is not None
            and tls.subject_alt_names
            and not tls.insecure_skip_verify
            and not verify_subject_alt_names(
                transport.get_extra_info("ssl_object"), tls.subject_alt_names
            )
        ):
            conn.close()
            raise UpstreamConnectFailure(
                f"{endpoint.host_label}: certificate carries none of {tls.subject_alt_names}"
            )
        self.h2conns[endpoint.key] = conn
        return conn

    def _ssl_context(self) -> Any:
        if self.ssl_context is None:
            tls = self.traffic.tls
            assert tls is not None
            alpn = ("h2",) if self.traffic.http2 else ("http/1.1",)
            try:
                self.ssl_context = client_context(tls, self.credentials_dir, alpn)
            except TLSOriginationError as exc:
                self.tls_error = str(exc)
                raise UpstreamConnectFailure(f"{self.name}: {exc}") from exc
        return self.ssl_context

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
        for conn in list(self.h2conns.values()):
            conn.close()
        self.h2conns.clear()

    def retire(self) -> None:
        """The cluster left the configuration: close what is idle, let streams in
        flight finish (their HTTP/2 connections close once empty)."""
        for pool in self.pools.values():
            pool.close()  # idle connections only; busy ones close when they finish
        for conn in list(self.h2conns.values()):
            conn.retire()
        self.h2conns.clear()


# --------------------------------------------------------------------------- requests


class _Body:
    """The request body as the attempts need it: buffered when it fits the limit."""

    __slots__ = ("chunks", "complete", "replayable", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False
        self.replayable = True


async def _buffer_body(ctx: RequestContext, limit: int) -> _Body:
    body = _Body()
    stream = ctx.stream
    if stream.body_complete():
        body.complete = True
        return body
    while True:
        data = await stream.read_body()
        if data:
            body.chunks.append(data)
            body.size += len(data)
            ctx.bytes_received += len(data)
        if body.size > limit:
            # Too big to keep for a replay (even if it all came at once).
            body.replayable = False
            body.complete = stream.body_complete()
            return body
        if not data or stream.body_complete():
            body.complete = True
            return body


def _request_head_bytes(
    head: RequestHead, authority: str, length: int | None, chunked: bool
) -> bytes:
    target = f"{head.path}?{head.query}" if head.query else head.path
    parts = [f"{head.method} {target} HTTP/1.1\r\nhost: {authority}\r\n"]
    for name, value in head.headers:
        if name in ("content-length", "transfer-encoding"):
            continue
        parts.append(f"{name}: {value}\r\n")
    if length is not None:
        parts.append(f"content-length: {length}\r\n")
    elif chunked:
        parts.append("transfer-encoding: chunked\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


def _shadow_authority(authority: str) -> str:
    """Envoy's mirror host: ``-shadow`` appended to the host name, port kept."""
    if authority.startswith("["):
        return authority  # an IP literal has no name to suffix
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit():
        return f"{host}-shadow:{port}"
    return f"{authority}-shadow"


def _cookie(head: RequestHead, name: str) -> str | None:
    raw = head.header("cookie")
    if not raw:
        return None
    for part in raw.replace(",", ";").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


def _query_param(query: str, name: str) -> str | None:
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == name:
            return value
    return None


class TrafficForwarder:
    """Forwards requests whose route or cluster carries traffic policy."""

    def __init__(
        self,
        stage: UpstreamStage,
        pools: UpstreamPools,
        *,
        credentials_dir: str | None = None,
        rnd: random.Random | None = None,
    ) -> None:
        self.stage = stage
        self.pools = pools
        self.credentials_dir = credentials_dir
        self.rnd = rnd or random.Random()
        # Cluster name -> state; read by the admin /clusters page.
        self.clusters: dict[str, ClusterState] = {}
        self.mirrors_in_flight = 0
        self._mirror_tasks: set[asyncio.Task[None]] = set()
        self._snapshot: Any = None

    def _prune(self, snapshot: Any) -> None:
        """After a reload, forget clusters the new snapshot no longer has (their
        idle connections are closed; requests still on them keep their objects)."""
        self._snapshot = snapshot
        names = snapshot.clusters
        for name in [n for n in self.clusters if n not in names]:
            self.clusters.pop(name).retire()

    def state_for(self, cluster: Cluster) -> ClusterState:
        state = self.clusters.get(cluster.name)
        if state is None:
            state = self.clusters[cluster.name] = ClusterState(cluster, self.credentials_dir)
        elif state.cluster is not cluster:
            state.update(cluster)
        return state

    # -- the request ------------------------------------------------------------------

    async def forward(self, ctx: RequestContext, cluster: Cluster) -> None:
        route = ctx.route
        assert route is not None and ctx.forward is not None
        snapshot = ctx.snapshot
        if snapshot is not self._snapshot and snapshot is not None:
            self._prune(snapshot)
        if getattr(ctx.stream, "tunnel", None) is not None:
            await self._forward_upgrade(ctx, cluster)
            return
        traffic: RouteTraffic | None = getattr(route, "traffic", None)
        fault = traffic.fault if traffic is not None else None
        if fault is not None and await self._fault(ctx, fault):
            return
        state = self.state_for(cluster)
        retry = traffic.retry if traffic is not None else None
        mirrors = traffic.mirrors if traffic is not None else ()
        body: _Body | None = None
        if retry is not None or mirrors:
            limit = retry.buffer_limit_bytes if retry is not None else 64 * 1024
            body = await _buffer_body(ctx, limit)
        if mirrors:
            self._mirror(ctx, mirrors, body)
        timeout_s = ctx.forward.timeout_s
        started = perf_counter()
        if timeout_s:
            # The endpoint of the try under way, for outlier detection: Envoy counts
            # the route timeout cutting a try short as that endpoint's local-origin
            # timeout, like a per-try timeout.
            trying: list[EndpointState] | None = [] if state.detector is not None else None
            try:
                async with asyncio.timeout(timeout_s):
                    conn, endpoint = await self._attempts(ctx, state, retry, body, trying)
            except TimeoutError as exc:
                if trying and state.detector is not None:
                    state.detector.record_local_failure(trying[0], time.monotonic())
                raise UpstreamTimeout(f"no response head within {timeout_s}s") from exc
        else:
            conn, endpoint = await self._attempts(ctx, state, retry, body)
        ctx.upstream_ms = (perf_counter() - started) * 1000.0
        try:
            await within_route_timeout(self._respond(ctx, state, conn), ctx, started)
        finally:
            endpoint.active_requests -= 1
            state.active_requests -= 1

    async def _fault(self, ctx: RequestContext, fault: Any) -> bool:
        """Delay and/or abort; True when the request was answered here."""
        rnd = self.rnd.random
        if fault.delay_fraction and rnd() < fault.delay_fraction:
            ctx.add_flag("DI")
            await asyncio.sleep(fault.delay_s)
        if fault.abort_fraction and rnd() < fault.abort_fraction:
            ctx.add_flag("FI")
            from .stages import finish_response_headers

            if fault.abort_grpc_status is not None:
                headers = [
                    ("content-type", "application/grpc"),
                    ("grpc-status", str(fault.abort_grpc_status)),
                    ("grpc-message", "fault filter abort"),
                    ("content-length", "0"),
                ]
                await ctx.send_head(ResponseHead(200, finish_response_headers(ctx, headers)), True)
            else:
                headers = [
                    ("content-type", "text/plain"),
                    ("content-length", str(len(_FAULT_ABORT_BODY))),
                ]
                head = ResponseHead(fault.abort_status, finish_response_headers(ctx, headers))
                await ctx.send_whole(head, _FAULT_ABORT_BODY)
            return True
        return False

    def _hash(self, ctx: RequestContext, state: ClusterState) -> tuple[int | None, str | None]:
        """The consistent-hash key, and a cookie to set when one was generated."""
        lb = state.traffic.lb
        head = ctx.head
        if lb.hash_header is not None:
            value = head.header(lb.hash_header)
            return (hash_key(value) if value is not None else None), None
        if lb.hash_cookie is not None:
            value = _cookie(head, lb.hash_cookie)
            if value is not None:
                return hash_key(value), None
            if lb.hash_cookie_ttl_s is None:
                return None, None
            # Envoy: with a ttl and no cookie, make one so the client sticks from
            # its next request on; ttl 0 makes it a session cookie.
            value = secrets.token_hex(8)
            cookie = f"{lb.hash_cookie}={value}"
            if lb.hash_cookie_ttl_s:
                cookie += f"; Max-Age={int(lb.hash_cookie_ttl_s)}"
            if lb.hash_cookie_path:
                cookie += f"; Path={lb.hash_cookie_path}"
            return hash_key(value), cookie + "; HttpOnly"
        if lb.hash_source_ip:
            return hash_key(head.peer), None
        if lb.hash_query is not None:
            value = _query_param(head.query, lb.hash_query)
            return (hash_key(value) if value is not None else None), None
        return None, None

    async def _attempts(
        self,
        ctx: RequestContext,
        state: ClusterState,
        retry: RetryPolicy | None,
        body: _Body | None,
        trying: list[EndpointState] | None = None,
    ) -> tuple[Any, EndpointState]:
        """Pick, send, await the head; again while the retry policy allows. ``trying``,
        when given, holds the endpoint of the try under way (empty between tries)."""
        key: int | None = None
        cookie: str | None = None
        if state.balancer.needs_key:
            key, cookie = self._hash(ctx, state)
        if cookie is not None:
            extra = ctx.cors_headers or []
            extra.append(("set-cookie", cookie))
            ctx.cors_headers = extra
        retries_left = retry.attempts if retry is not None else 0
        per_try = retry.per_try_timeout_s if retry is not None else None
        previous: EndpointState | None = None
        attempt = 0
        ctx.upstream_cluster = state.name
        while True:
            if state.max_requests is not None and state.active_requests >= state.max_requests:
                state.overflows += 1
                raise UpstreamOverflow(f"{state.name}: {state.active_requests} requests active")
            endpoint = state.pick(key, previous)
            pool = state.pool_for(endpoint)
            ctx.upstream_host = pool.host_label
            endpoint.active_requests += 1
            state.active_requests += 1
            if trying is not None:
                trying.append(endpoint)
            replayable = body is None or (body.replayable and body.complete)
            try:
                exchange = self._exchange_h2 if state.traffic.http2 else self._exchange
                if per_try:
                    try:
                        async with asyncio.timeout(per_try):
                            conn = await exchange(ctx, state, pool, body)
                    except TimeoutError as exc:
                        raise UpstreamTimeout(f"no response head within {per_try}s") from exc
                else:
                    conn = await exchange(ctx, state, pool, body)
            except GatewayError as error:
                endpoint.active_requests -= 1
                state.active_requests -= 1
                if trying:
                    trying.clear()  # counted here, if at all
                is_refused = refused(error)
                if error.flag in ("UF", "UR", "UT") and not is_refused and state.detector:
                    state.detector.record_local_failure(endpoint, time.monotonic())
                if (
                    retry is not None
                    and retries_left > 0
                    and replayable
                    and retry.retry_on_error("REFUSED" if is_refused else error.flag)
                ):
                    retries_left -= 1
                    attempt += 1
                    previous = endpoint if retry.ignore_previous_hosts else None
                    await asyncio.sleep(self._backoff(attempt, retry.backoff_s))
                    continue
                if retry is not None and retries_left == 0 and attempt:
                    ctx.add_flag("URX")
                raise
            except BaseException:
                endpoint.active_requests -= 1
                state.active_requests -= 1
                raise
            status = conn.status
            if state.detector is not None:
                state.detector.record_status(endpoint, status, time.monotonic())
            if trying:
                trying.clear()  # its answer is in: counted above
            if retry is not None and retry.retry_on_status(status):
                if retries_left > 0 and replayable:
                    conn.close()
                    endpoint.active_requests -= 1
                    state.active_requests -= 1
                    retries_left -= 1
                    attempt += 1
                    previous = endpoint if retry.ignore_previous_hosts else None
                    await asyncio.sleep(self._backoff(attempt, retry.backoff_s))
                    continue
                if attempt:
                    ctx.add_flag("URX")
            return conn, endpoint

    def _backoff(self, attempt: int, base_s: float = _RETRY_BASE_S) -> float:
        # Envoy: "given a base interval B and retry number N, the back-off for the retry
        # is in the range [0, (2^N-1)B)", the bound capped at ten times the base (its
        # default max_interval). B is Istio's retries.backoff, 25 ms when not given.
        ceiling = min(base_s * (2**attempt - 1), base_s * 10)
        return self.rnd.uniform(0, ceiling)

    async def _exchange(
        self, ctx: RequestContext, state: ClusterState, pool: _ClusterPool, body: _Body | None
    ) -> UpstreamConnection:
        head = ctx.head
        stream = ctx.stream
        head_only = head.method == "HEAD"
        if body is None:
            no_body = stream.body_complete()
            length: int | None = None
            if not no_body:
                declared = head.header("content-length")
                length = int(declared) if declared is not None and declared.isdigit() else None
            chunked = not no_body and length is None
        else:
            no_body = body.complete and not body.size
            if body.complete:
                length = body.size
            else:
                # Too big to keep: the rest is streamed, in the framing the client
                # gave it (its Content-Length when it sent one, as Envoy keeps it).
                declared = head.header("content-length")
                length = int(declared) if declared is not None and declared.isdigit() else None
            chunked = not no_body and length is None
            if no_body and head.header("content-length") is not None:
                length = 0
        request = _request_head_bytes(head, head.authority, length, chunked)
        for attempt in (0, 1):
            conn, reused = await state.connection(pool, self.pools)
            try:
                conn.begin(head_only)
                conn.write(request)
                if body is not None:
                    for chunk in body.chunks:
                        conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    await conn.drain()
                    if not body.complete:
                        await self._stream_rest(ctx, conn, chunked)
                    elif chunked:
                        conn.write(b"0\r\n\r\n")
                elif not no_body:
                    await self.stage._send_body(ctx, conn, chunked)
                if not conn.head_done:
                    await conn.read_head()
            except UpstreamReset:
                conn.close()
                # An idle pooled connection closed under us: the request never got
                # there, so a fresh connection may be tried once (as the lean path does),
                # but only with a body meshgate holds whole. A streamed body has been
                # read from the client by now and cannot be sent again.
                replayable = no_body or (body is not None and body.complete)
                if attempt == 0 and reused and replayable and not conn.received_any:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return conn
        raise AssertionError("unreachable")

    async def _exchange_h2(
        self, ctx: RequestContext, state: ClusterState, pool: _ClusterPool, body: _Body | None
    ) -> H2UpstreamStream:
        """Open a stream on the endpoint's HTTP/2 connection, send the request and
        wait for the response head. A body still arriving is pumped by a task of its
        own, so a bidirectional gRPC stream can answer before the request ends."""
        head = ctx.head
        stream = ctx.stream
        if body is None:
            no_body = stream.body_complete()
            declared = head.header("content-length")
            length = int(declared) if declared is not None and declared.isdigit() else None
        else:
            no_body = body.complete and not body.size
            length = body.size if body.complete else None
        conn = await state.h2_connection(pool.state, self.pools)
        target = f"{head.path}?{head.query}" if head.query else head.path
        scheme = "https" if state.traffic.tls is not None else "http"
        headers = request_headers(
            head.method, scheme, head.authority, target, head.headers, None if no_body else length
        )
        h2s = conn.open_stream(headers, end_stream=no_body)
        try:
            if not no_body:
                if body is not None:
                    for chunk in body.chunks:
                        await h2s.send_data(chunk, False)
                if body is not None and body.complete:
                    await h2s.send_data(b"", True)
                else:
                    h2s.pump = asyncio.get_running_loop().create_task(self._pump(ctx, h2s))
            await h2s.read_head()
        except BaseException:
            h2s.reset()  # cancels the pump too
            raise
        return h2s

    async def _pump(self, ctx: RequestContext, h2s: H2UpstreamStream) -> None:
        stream = ctx.stream
        try:
            while True:
                data = await stream.read_body()
                if data:
                    ctx.bytes_received += len(data)
                ended = not data or stream.body_complete()
                await h2s.send_data(data, ended)
                if ended:
                    h2s.pump = None
                    return
        except BaseException:
            # Cancelled with its exchange, or the client went away mid-body: either
            # way the upstream stream is abandoned; nobody awaits this task.
            h2s.reset()

    async def _stream_rest(
        self, ctx: RequestContext, conn: UpstreamConnection, chunked: bool
    ) -> None:
        stream = ctx.stream
        while True:
            data = await stream.read_body()
            if data:
                ctx.bytes_received += len(data)
                conn.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
                await conn.drain()
            if not data or stream.body_complete():
                if chunked:
                    conn.write(b"0\r\n\r\n")
                return

    async def _respond(self, ctx: RequestContext, state: ClusterState, conn: Any) -> None:
        if isinstance(conn, H2UpstreamStream):
            await self._respond_h2(ctx, conn)
            return
        head_only = ctx.head.method == "HEAD"
        status = conn.status
        response = ResponseHead(status, self.stage._response_headers(ctx, conn.headers))
        try:
            if head_only or status in (204, 304) or conn.message_done:
                data = b"" if head_only else conn.take_body()
                if data:
                    await ctx.send_whole(response, data)
                else:
                    await ctx.send_head(response, True)
            else:
                await self.stage._relay(ctx, conn, response)
            if ctx.stream.body_complete():
                conn.finish()
            else:
                conn.close()
        except BaseException:
            conn.close()
            raise

    async def _respond_h2(self, ctx: RequestContext, h2s: H2UpstreamStream) -> None:
        """Stream an HTTP/2 response back; trailers go to clients that can take them
        (HTTP/2 and HTTP/3 streams have ``send_trailers``), else they are dropped."""
        response = ResponseHead(h2s.status, self.stage._response_headers(ctx, h2s.headers))
        try:
            if ctx.head.method == "HEAD" or (h2s.done and not h2s.chunks and not h2s.trailers):
                data = await h2s.read_body() if h2s.chunks else b""
                if data:
                    await ctx.send_whole(response, data)
                else:
                    await ctx.send_head(response, True)
                return
            await ctx.send_head(response, False)
            while True:
                data = await h2s.read_body()
                if not data:
                    break
                await ctx.send_body(data, False)
            send_trailers = getattr(ctx.stream, "send_trailers", None)
            if h2s.trailers and send_trailers is not None:
                await send_trailers(h2s.trailers)
            else:
                await ctx.send_body(b"", True)
            if h2s.pump is not None:
                # The upstream answered in full before the request body ended.
                h2s.reset()
        except BaseException:
            h2s.reset()
            raise

    # -- upgrades -----------------------------------------------------------------------

    async def _forward_upgrade(self, ctx: RequestContext, cluster: Cluster) -> None:
        """A WebSocket upgrade: its own upstream connection, the handshake within
        the route timeout, then (on 101) a byte tunnel for as long as both sides
        keep it open. Retries, faults and mirrors do not apply to tunnels."""
        state = self.state_for(cluster)
        ctx.upstream_cluster = state.name
        key = None
        if state.balancer.needs_key:
            key, _ = self._hash(ctx, state)
        endpoint = state.pick(key, None)
        ctx.upstream_host = endpoint.host_label
        head = ctx.head
        request = _request_head_bytes(head, head.authority, None, False)
        # Hop-by-hop cleaning removed them; the upstream must see the upgrade asked.
        request = request[:-2] + b"connection: upgrade\r\nupgrade: websocket\r\n\r\n"
        timeout_s = ctx.forward.timeout_s if ctx.forward is not None else None
        started = perf_counter()
        endpoint.active_requests += 1
        state.active_requests += 1
        try:
            async with asyncio.timeout(timeout_s):
                transport, handshake = await state.connect_raw(
                    endpoint, lambda: UpstreamHandshake(endpoint.host_label), self.pools
                )
                try:
                    transport.write(request)
                    await handshake.head
                    if handshake.status != 101:
                        await handshake.body_done
                except BaseException:
                    transport.close()
                    raise
        except TimeoutError as exc:
            raise UpstreamTimeout(f"no upgrade answer within {timeout_s}s") from exc
        finally:
            endpoint.active_requests -= 1
            state.active_requests -= 1
        ctx.upstream_ms = (perf_counter() - started) * 1000.0
        if state.detector is not None:
            state.detector.record_status(endpoint, handshake.status, time.monotonic())
        if handshake.status != 101:
            transport.close()
            headers = [
                (n, v)
                for n, v in handshake.headers
                if n not in (b"content-length", b"transfer-encoding")
            ]
            body = handshake.take_rest()
            if handshake.content_length is not None:
                body = body[: handshake.content_length]
            headers.append((b"content-length", str(len(body)).encode()))
            response = ResponseHead(handshake.status, self.stage._response_headers(ctx, headers))
            await ctx.send_whole(response, body)
            return
        # 101: the head goes to the client as the upstream wrote it (upgrade and
        # connection included: they are the point), then the bytes flow.
        from .stages import finish_response_headers

        extra = finish_response_headers(ctx, [])
        lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        lines += [b"%s: %s\r\n" % (n, v) for n, v in handshake.headers]
        lines += [f"{n}: {v}\r\n".encode("latin-1") for n, v in extra]
        lines.append(b"\r\n")
        down, down_rest = ctx.stream.take_over()  # type: ignore[attr-defined]
        ctx.status = 101
        ctx.response_started = True
        down.write(b"".join(lines))
        sent_up, sent_down = await splice(down, down_rest, transport, handshake.take_rest())
        ctx.bytes_received += sent_up
        ctx.bytes_sent += sent_down

    # -- mirrors ----------------------------------------------------------------------

    def _mirror(self, ctx: RequestContext, mirrors: Any, body: _Body | None) -> None:
        snapshot = ctx.snapshot
        if snapshot is None:
            return
        if body is not None and not (body.complete and body.replayable):
            return  # a streamed body cannot be sent twice
        for mirror in mirrors:
            if mirror.fraction < 1.0 and self.rnd.random() >= mirror.fraction:
                continue
            cluster = snapshot.clusters.get(mirror.cluster)
            if cluster is None or not cluster.endpoints:
                continue
            if self.mirrors_in_flight >= _MAX_MIRRORS_IN_FLIGHT:
                return  # shed shadow traffic rather than pile it up
            head = ctx.head
            copy = RequestHead(
                head.method,
                head.path,
                head.query,
                _shadow_authority(head.authority),
                head.scheme,
                list(head.headers),
                head.http_version,
                head.port,
                head.peer,
            )
            payload = b"".join(body.chunks) if body is not None else b""
            task = asyncio.get_running_loop().create_task(
                self._send_mirror(self.state_for(cluster), copy, payload)
            )
            self.mirrors_in_flight += 1
            self._mirror_tasks.add(task)
            task.add_done_callback(self._mirror_done)

    def _mirror_done(self, task: asyncio.Task[None]) -> None:
        self.mirrors_in_flight -= 1
        self._mirror_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("mirror failed: %r", task.exception())

    async def _send_mirror(self, state: ClusterState, head: RequestHead, payload: bytes) -> None:
        """Send the copy, read the whole answer, drop it. Failures are only counted."""
        conn: UpstreamConnection | None = None
        with contextlib.suppress(GatewayError, OSError, TimeoutError):
            async with asyncio.timeout(_MIRROR_TIMEOUT_S):
                pool = state.pool_for(state.pick(None, None))
                conn, _ = await state.connection(pool, self.pools)
                conn.begin(head.method == "HEAD")
                length = len(payload) if payload or head.header("content-length") else None
                conn.write(_request_head_bytes(head, head.authority, length, False))
                if payload:
                    conn.write(payload)
                await conn.read_head()
                while await conn.read_body():
                    pass
                conn.finish()
                conn = None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for task in list(self._mirror_tasks):
            task.cancel()
        for state in self.clusters.values():
            state.close()


def _tls_reads(factory: Callable[[], Any], ssl_context: ssl.SSLContext | None) -> Callable[[], Any]:
    """Over TLS, the protocol behind ``BufferedReads``: the event loop's TLS
    transport then reads into one shared buffer instead of allocating 256 KiB per
    read (see ``gateway.server.tlsread``), as downstream TLS connections do."""
    if ssl_context is None:
        return factory
    return lambda: BufferedReads(factory())


def _unwrapped(protocol: Any) -> Any:
    return protocol.protocol if isinstance(protocol, BufferedReads) else protocol
