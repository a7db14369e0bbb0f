"""The request stages: one small class per concern, run in order by ``pipeline.py``.

Each stage has ``on_request(ctx)``. It returns ``None`` to let the request go on,
returns a ``LocalReply`` when the gateway answers by itself (redirect, direct
response, CORS preflight), or raises a ``GatewayError`` to refuse. The last stage,
``UpstreamStage``, is the only one that awaits: it forwards the request and streams
the response back.

Per-request state lives in one ``RequestContext``; stages read their settings from the
compiled route and never from configuration.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from operator import itemgetter
from time import perf_counter
from typing import Any

from .errors import (
    ClusterNotFound,
    NoHealthyUpstream,
    RouteNotFound,
    UpstreamReset,
    UpstreamTimeout,
)
from .routing.match import (
    find_virtual_host,
    match_route,
    pick_destination,
    replace_path_prefix,
    rewrite_path,
)
from .routing.table import (
    INVALID_BACKEND_PREFIX,
    CorsPolicy,
    DirectResponse,
    Forward,
    HeaderOps,
    Listener,
    Redirect,
    Route,
    Snapshot,
    VirtualHost,
    WeightedCluster,
)
from .server.altsvc import ADVERTISED, add_alt_svc, alt_svc_header
from .server.events import DownstreamStream, RequestHead, ResponseHead
from .traffic import TrafficForwarder, within_route_timeout
from .upstream.pool import EndpointPool, UpstreamConnection, UpstreamPools

__all__ = [
    "ActionStage",
    "CorsStage",
    "EdgeHeadersStage",
    "ForwardedHeadersStage",
    "HopByHopStage",
    "LocalReply",
    "RequestContext",
    "RequestIdStage",
    "RouteStage",
    "UpstreamStage",
    "apply_header_ops",
]


@dataclass(slots=True)
class LocalReply:
    """A response the gateway gives itself, without an upstream."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""


class RequestContext:
    """Everything one request accumulates on its way through the stages."""

    __slots__ = (
        "auth",  # authn.jwt.VerifiedToken of the request's valid JWT, or None
        "authority",
        "authz",  # the authorization decision for the access log, "" when none ran
        "bytes_received",
        "bytes_sent",
        "cors_headers",
        "destination",
        "flags",
        "forward",
        "head",
        "method",
        "path",
        "ratelimit_headers",  # ratelimit-* response headers of a limited route, or None
        "request_id",
        "response_started",
        "route",
        "snapshot",
        "start",
        "start_wall",
        "status",
        "stream",
        "trace",  # gateway.tracing.Span; set by TraceStage only when it runs
        "trace_headers",  # False once EdgeHeadersStage saw no trace header (fast path)
        "upstream_cluster",
        "upstream_host",
        "upstream_ms",
        "user_agent",
        "xff",
    )

    def __init__(
        self, stream: DownstreamStream, snapshot: Snapshot | None, start: float, wall: float
    ) -> None:
        head = stream.head
        self.stream = stream
        self.head = head
        self.snapshot = snapshot
        self.start = start
        self.start_wall = wall
        # What the access log shows: the request as received, before any rewrite.
        self.method = head.method
        self.path = head.path + "?" + head.query if head.query else head.path
        self.authority = head.authority
        self.request_id = ""
        self.xff = ""
        self.user_agent = "-"
        self.route: Route | None = None
        self.forward: Forward | None = None
        self.destination: WeightedCluster | None = None
        self.cors_headers: list[tuple[str, str]] | None = None
        self.ratelimit_headers: list[tuple[str, str]] | None = None
        self.status = 0
        self.flags = ""
        self.response_started = False
        self.bytes_received = 0
        self.bytes_sent = 0
        self.upstream_cluster = ""
        self.upstream_host = ""
        self.upstream_ms: float | None = None
        self.auth: Any = None
        self.authz = ""
        # True means "not looked at": TraceStage then scans the headers itself.
        self.trace_headers = True

    def add_flag(self, flag: str) -> None:
        if flag and flag not in self.flags.split(","):
            self.flags = f"{self.flags},{flag}" if self.flags else flag

    async def send_head(self, head: ResponseHead, end_stream: bool) -> None:
        self.status = head.status
        self.response_started = True
        if ADVERTISED:  # an HTTP/3 listener is up in this process
            add_alt_svc(self.head, head)
        await self.stream.send_head(head, end_stream)

    async def send_body(self, data: bytes, end_stream: bool) -> None:
        await self.stream.send_body(data, end_stream)
        self.bytes_sent += len(data)

    async def send_whole(self, head: ResponseHead, body: bytes, advertise: bool = True) -> None:
        """A response whose body is all here: in one write when the adapter can.
        ``advertise=False``: ``alt-svc`` is in ``head`` already (``write_whole``)."""
        self.status = head.status
        self.response_started = True
        if ADVERTISED and advertise:
            add_alt_svc(self.head, head)
        send_response = getattr(self.stream, "send_response", None)
        if send_response is not None:
            await send_response(head, body)
        else:
            await self.stream.send_head(head, False)
            await self.stream.send_body(body, True)
        self.bytes_sent += len(body)

    def write_raw(self, status: int, lines: bytes, has_length: bool, body: bytes) -> None:
        """``write_whole`` for header lines already in HTTP/1.1 wire form."""
        self.status = status
        self.response_started = True
        self.stream.write_raw_response(status, lines, has_length, body)  # type: ignore[attr-defined]
        self.bytes_sent += len(body)

    def write_fields(self, status: int, fields: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """``write_whole`` for an HTTP/2 head already in byte fields (``alt-svc``
        included); False, having sent nothing, when the stream cannot take it now."""
        if not self.stream.write_fields(status, fields, body):  # type: ignore[attr-defined]
            return False
        self.status = status
        self.response_started = True
        self.bytes_sent += len(body)
        return True

    def write_whole(self, head: ResponseHead, body: bytes) -> bool:
        """``send_whole`` without a coroutine, on a stream that has
        ``write_response`` (the callback-driven exchange only). False when the
        stream cannot take it all now (an HTTP/2 window): nothing was sent, and
        ``send_whole(head, body, advertise=False)`` is what sends it."""
        if ADVERTISED:
            add_alt_svc(self.head, head)
        if not self.stream.write_response(head, body):  # type: ignore[attr-defined]
            return False
        self.status = head.status
        self.response_started = True
        self.bytes_sent += len(body)
        return True


@dataclass
class TunnelStream:
    """Just enough of a downstream stream for a ``RequestContext`` to describe a TCP
    tunnel (TLS passthrough, ingress or egress) in the access log."""

    head: RequestHead
    tunnel: Any = None
    opened: bool = False  # spliced to the upstream, counted as opened


def tunnel_context(
    server_name: str, port: int, peer: str, snapshot: Any
) -> tuple[RequestContext, TunnelStream]:
    """The context of one passthrough connection: its access-log line has method,
    path and protocol ``-``, the SNI and port as authority, status 0, the flags,
    cluster, upstream host and bytes of the connection."""
    head = RequestHead(
        method="-",
        path="-",
        query="",
        authority=f"{server_name}:{port}",
        scheme="https",
        headers=[],
        http_version="-",
        port=port,
        peer=peer,
    )
    stream = TunnelStream(head)
    return RequestContext(stream, snapshot, perf_counter(), time.time()), stream


class TunnelLog:
    """The access-log lines of the TCP tunnels a listener splices itself (ingress TLS
    PASSTHROUGH), one per connection, in the access log's own format: the listener
    holds one (``ListenerSet.tunnel_log``) without depending on the pipeline."""

    def __init__(self, access_log: Any, snapshots: Any) -> None:
        self.access_log = access_log
        self.snapshots = snapshots  # anything with ``.current``

    def start(self, server_name: str | None, port: int, peer: str) -> RequestContext:
        """The context of a connection whose ClientHello has just been read."""
        return tunnel_context((server_name or "").lower(), port, peer, self.snapshots.current)[0]

    def finish(self, ctx: RequestContext, flag: str = "") -> None:
        """Write the line: ``flag`` for a connection refused or failed (NR, NC, UF, DC)."""
        if flag:
            ctx.add_flag(flag)
        self.access_log.log(ctx, perf_counter())


def apply_header_ops(headers: list[tuple[str, str]], ops: HeaderOps) -> list[tuple[str, str]]:
    """Envoy's order: removals, then overwrites, then appends."""
    drop = set(ops.remove)
    drop.update(name for name, _ in ops.set)
    if drop:
        headers = [(n, v) for n, v in headers if n not in drop]
    headers.extend(ops.set)
    headers.extend(ops.add)
    return headers


def _replace_header(head: RequestHead, name: str, value: str) -> None:
    headers = [(n, v) for n, v in head.headers if n != name]
    headers.append((name, value))
    head.headers = headers


# 1 ---------------------------------------------------------------------------------


class RequestIdStage:
    """Keeps the client's ``x-request-id``, or makes one: 128 random bits in hex.

    ``random.getrandbits`` rather than ``uuid4``: a request id needs uniqueness, not
    secrecy, and it costs a tenth of ``uuid4`` (measured: ~0.2 us against ~2 us).
    The same scan picks up ``user-agent`` for the access log; a linear scan of a
    dozen headers is cheaper than building the header index before the next stages
    edit the list anyway."""

    def on_request(self, ctx: RequestContext) -> None:
        head = ctx.head
        request_id = ""
        for name, value in head.headers:
            if name == "x-request-id":
                request_id = value
            elif name == "user-agent":
                ctx.user_agent = value
        if not request_id:
            request_id = random.getrandbits(128).to_bytes(16).hex()
            head.headers.append(("x-request-id", request_id))
            head.invalidate()
        ctx.request_id = request_id


# 2 ---------------------------------------------------------------------------------


class ForwardedHeadersStage:
    """``x-forwarded-for``/``-proto``/``-host`` as Envoy sets them at the edge.

    Envoy with ``use_remote_address: true`` (what Istio configures on gateways)
    appends the address of the peer it accepted the connection from to
    ``x-forwarded-for`` and overwrites ``x-forwarded-proto`` with the scheme of that
    connection, so a client cannot claim it came over TLS. ``x-forwarded-host``
    carries the authority the client asked for, before any rewrite.
    """

    def on_request(self, ctx: RequestContext) -> None:
        head = ctx.head
        prior: list[str] = []
        headers = []
        for item in head.headers:
            name = item[0]
            if name[:12] == "x-forwarded-":
                if name == "x-forwarded-for":
                    prior.append(item[1])
                    continue
                if name == "x-forwarded-proto" or name == "x-forwarded-host":
                    continue
            headers.append(item)
        xff = f"{', '.join(prior)}, {head.peer}" if prior else head.peer
        headers.append(("x-forwarded-for", xff))
        headers.append(("x-forwarded-proto", head.scheme))
        if head.authority:
            headers.append(("x-forwarded-host", head.authority))
        head.headers = headers
        head.invalidate()
        ctx.xff = xff


# 3 ---------------------------------------------------------------------------------


class HopByHopStage:
    """Drops headers that describe this connection, not the request (RFC 9110 7.6.1).

    ``Expect`` goes too: the downstream adapter answers ``100-continue`` itself, as
    Envoy does by default, so the upstream never sees it."""

    _always = frozenset(
        {
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
            "expect",
            "http2-settings",
            "te",
        }
    )

    def on_request(self, ctx: RequestContext) -> None:
        head = ctx.head
        always = self._always
        for name, _ in head.headers:
            if name in always:
                break
        else:
            return  # the common case: nothing to strip, no new list
        headers, keep_te = _strip_hop_by_hop(head.headers)
        if keep_te:
            headers.append(("te", "trailers"))
        head.headers = headers
        head.invalidate()


def _strip_hop_by_hop(headers: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], bool]:
    """The headers without the hop-by-hop ones (and those ``Connection`` names), and
    whether ``TE: trailers`` is to be passed on."""
    drop = set(HopByHopStage._always)
    keep_te = False
    for name, value in headers:
        if name == "connection":
            drop.update(t.strip().lower() for t in value.split(","))
        elif name == "te":
            keep_te = keep_te or "trailers" in value.lower()
    return [(n, v) for n, v in headers if n not in drop], keep_te


# 1-3 in one pass ---------------------------------------------------------------------


class EdgeHeadersStage:
    """``HopByHopStage``, ``RequestIdStage`` and ``ForwardedHeadersStage`` in one pass
    over the headers and one new list: what the pipeline runs.

    Every request pays for these three, so they share a single scan rather than
    three (measured with ``loadtest/bench_hotpath.py``). The result is the same as
    running the three in sequence, except that the hop-by-hop headers go first: a
    header the client names in ``Connection`` is gone before the request id and
    forwarded headers are worked out (as Envoy strips them in its codec, before its
    connection manager adds its own), so a client cannot use ``Connection`` to
    remove the ``x-forwarded-for`` or ``x-request-id`` the gateway sets."""

    def on_request(self, ctx: RequestContext) -> None:
        head = ctx.head
        client = head.headers
        keep_te = False
        hop = HopByHopStage._always
        for name, _ in client:
            if name in hop:
                client, keep_te = _strip_hop_by_hop(client)
                break
        request_id = ""
        prior: list[str] | None = None
        # Whether any trace header (traceparent, b3, x-b3-*) is present, noted on the
        # way so that TraceStage can skip its own scan in the usual case of none.
        traced = False
        headers = []
        for item in client:
            name = item[0]
            if name[:2] == "x-":
                if name == "x-request-id":
                    request_id = item[1]
                elif name[:12] == "x-forwarded-":
                    if name == "x-forwarded-for":
                        if prior is None:
                            prior = [item[1]]
                        else:
                            prior.append(item[1])
                        continue
                    if name == "x-forwarded-proto" or name == "x-forwarded-host":
                        continue
                elif name[:5] == "x-b3-":
                    traced = True
            elif name == "user-agent":
                ctx.user_agent = item[1]
            elif name == "traceparent" or name == "b3":
                traced = True
            headers.append(item)
        ctx.trace_headers = traced
        if not request_id:
            request_id = random.getrandbits(128).to_bytes(16).hex()
            headers.append(("x-request-id", request_id))
        ctx.request_id = request_id
        peer = head.peer
        xff = f"{', '.join(prior)}, {peer}" if prior else peer
        ctx.xff = xff
        headers.append(("x-forwarded-for", xff))
        headers.append(("x-forwarded-proto", head.scheme))
        if head.authority:
            headers.append(("x-forwarded-host", head.authority))
        if keep_te:
            headers.append(("te", "trailers"))
        head.headers = headers
        head._index = None  # what head.invalidate() does, without the call


# 4 ---------------------------------------------------------------------------------


_MISS: Any = object()


class RouteStage:
    """Listener by port, virtual host by authority, then the first matching route.

    The virtual host an authority resolves to is remembered per listener (the same
    few authorities arrive over and over), so the usual request costs one dict probe
    instead of parsing the authority and probing exact and wildcard hosts. The memo
    belongs to the listener object, so a reload (new listeners) starts afresh, and it
    stops growing at 1024 authorities per listener."""

    def __init__(self) -> None:
        # id(listener) -> (listener, {authority: vhost or None}); the listener is
        # kept so that an id reused after a reload can never serve a stale entry.
        self._hosts: dict[int, tuple[Listener, dict[str, VirtualHost | None]]] = {}

    def on_request(self, ctx: RequestContext) -> None:
        snapshot = ctx.snapshot
        if snapshot is None:
            raise RouteNotFound("no configuration loaded")
        head = ctx.head
        listener = snapshot.listeners.get(head.port)
        if listener is None:
            raise RouteNotFound(f"no listener on port {head.port}")
        entry = self._hosts.get(id(listener))
        if entry is None or entry[0] is not listener:
            if len(self._hosts) >= 64:
                self._hosts.clear()  # listeners of old snapshots
            entry = self._hosts[id(listener)] = (listener, {})
        hosts = entry[1]
        authority = head.authority
        vhost = hosts.get(authority, _MISS)
        if vhost is _MISS:
            vhost = find_virtual_host(listener, authority)
            if len(hosts) < 1024:
                hosts[authority] = vhost
        if vhost is None:
            raise RouteNotFound(f"no virtual host for {head.authority!r}")
        auth = ctx.auth
        route = match_route(vhost, head, auth.claims if auth is not None else None)
        if route is None:
            raise RouteNotFound(f"no route in {vhost.name} for {head.path!r}")
        ctx.route = route


# 5 ---------------------------------------------------------------------------------


def _cors_origin_allowed(policy: CorsPolicy, origin: str) -> bool:
    return any(matcher.matches(origin) for matcher in policy.allow_origins)


class CorsStage:
    """Envoy's CORS filter: answers preflights at the gateway, decorates responses.

    A preflight is an OPTIONS request carrying ``Origin`` and
    ``Access-Control-Request-Method``. From an allowed origin it is answered here
    (200, the policy's headers, no body). From any other origin it goes upstream
    when the policy forwards unmatched preflights (Istio's default), else it is
    answered 200 without CORS headers so the browser refuses the real request.
    On other requests from an allowed origin, the response gets
    ``access-control-allow-origin`` (and credentials / exposed headers)."""

    def on_request(self, ctx: RequestContext) -> LocalReply | None:
        route = ctx.route
        policy = route.cors if route is not None else None
        if policy is None:
            return None
        head = ctx.head
        origin = head.header("origin")
        if not origin:
            return None
        allowed = _cors_origin_allowed(policy, origin)
        if head.method == "OPTIONS" and head.header("access-control-request-method"):
            if allowed:
                headers = [("access-control-allow-origin", origin)]
                if policy.allow_methods:
                    headers.append(("access-control-allow-methods", policy.allow_methods))
                if policy.allow_headers:
                    headers.append(("access-control-allow-headers", policy.allow_headers))
                if policy.max_age:
                    headers.append(("access-control-max-age", policy.max_age))
                if policy.allow_credentials:
                    headers.append(("access-control-allow-credentials", "true"))
                headers.append(("content-length", "0"))
                return LocalReply(200, headers)
            if not policy.forward_unmatched_preflights:
                return LocalReply(200, [("content-length", "0")])
            return None
        if allowed:
            extra = [("access-control-allow-origin", origin)]
            if policy.allow_credentials:
                extra.append(("access-control-allow-credentials", "true"))
            if policy.expose_headers:
                extra.append(("access-control-expose-headers", policy.expose_headers))
            ctx.cors_headers = extra
        return None


# 6 ---------------------------------------------------------------------------------


_DEFAULT_PORTS = {"http": 80, "https": 443}


def redirect_location(redirect: Redirect, head: RequestHead) -> str:
    """The ``location`` Envoy builds for an Istio HTTPRedirect.

    Scheme: the redirect's, else the request's. Host: the redirect's authority, else
    the request's. Port: an explicit ``port`` wins; ``FROM_PROTOCOL_DEFAULT`` drops it
    (the scheme's default); ``FROM_REQUEST_PORT`` keeps the port the request came in
    on; otherwise the authority's own port, if any, is kept. A default port for the
    scheme is never written. Path: the redirect's ``uri`` or the request's; the query
    string is kept unless the new uri brings its own.
    """
    scheme = redirect.scheme or head.scheme
    authority = redirect.authority or head.authority
    host, port_text = _split_authority(authority)
    port: int | None
    if redirect.port is not None:
        port = redirect.port
    elif redirect.derive_port == "FROM_PROTOCOL_DEFAULT":
        port = None
    elif redirect.derive_port == "FROM_REQUEST_PORT":
        port = head.port or None
    elif port_text:
        port = int(port_text)
    else:
        port = None
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    if redirect.uri is not None:
        path = redirect.uri
        if "?" not in path and head.query:
            path = f"{path}?{head.query}"
    elif redirect.replace_prefix is not None:
        path = replace_path_prefix(head.path, redirect.prefix, redirect.replace_prefix)
        if head.query:
            path = f"{path}?{head.query}"
    else:
        path = f"{head.path}?{head.query}" if head.query else head.path
    return f"{scheme}://{host}{path}"


def _split_authority(authority: str) -> tuple[str, str]:
    if authority.startswith("["):  # IPv6 literal
        end = authority.find("]")
        rest = authority[end + 1 :]
        return authority[: end + 1], rest[1:] if rest.startswith(":") else ""
    host, _, port = authority.partition(":")
    return host, port if port.isdigit() else ""


class ActionStage:
    """The route's action: redirect, direct response, or prepare to forward.

    For a forward it applies the rewrite, picks a destination by weight, and runs the
    request header edits: the route's first, then the destination's (more specific
    last, so it wins)."""

    def __init__(self, rnd: random.Random | None = None) -> None:
        self.rnd = rnd or random.Random()

    def on_request(self, ctx: RequestContext) -> LocalReply | None:
        route = ctx.route
        assert route is not None  # RouteStage ran
        action = route.action
        head = ctx.head
        if isinstance(action, Forward):
            if route.rewrite is not None:
                head.path = rewrite_path(route, head.path)
                if route.rewrite.authority is not None:
                    head.authority = route.rewrite.authority
            destination = pick_destination(action, self.rnd.random())
            ctx.forward = action
            ctx.destination = destination
            ops = route.request_headers
            if not ops.empty:
                head.headers = apply_header_ops(head.headers, ops)
                head.invalidate()
            ops = destination.request_headers
            if not ops.empty:
                head.headers = apply_header_ops(head.headers, ops)
                head.invalidate()
            return None
        if isinstance(action, Redirect):
            location = redirect_location(action, head)
            return LocalReply(action.code, [("location", location), ("content-length", "0")])
        if isinstance(action, DirectResponse):
            body = action.body
            headers = [("content-length", str(len(body)))]
            if body:
                headers.insert(0, ("content-type", "text/plain"))
            return LocalReply(action.status, headers, body)
        raise TypeError(f"unknown route action {type(action).__name__}")


# 7 ---------------------------------------------------------------------------------

_RESPONSE_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
    }
)

# Upstream response header names as received -> lower-case str. The same few dozen
# names recur on every response, so each is decoded and lower-cased once.
_RESPONSE_NAMES: dict[bytes, str] = {}


class UpstreamStage:
    """Forwards the request on a pooled HTTP/1.1 connection and streams the answer.

    Failures before the response head become a local reply (UH, UF, UT, UR);
    after it, the pipeline can only reset the downstream."""

    def __init__(self, pools: UpstreamPools) -> None:
        self.pools = pools
        # Routes with retries/faults/mirrors and clusters with a DestinationRule policy
        # go through the forwarder; everything else stays on the lean path below.
        self.traffic = TrafficForwarder(
            self, pools, credentials_dir=getattr(pools, "credentials_dir", None)
        )

    def start(
        self,
        ctx: RequestContext,
        complete: Callable[[RequestContext], None],
        resume: Callable[[RequestContext, Coroutine[Any, Any, None]], None],
    ) -> bool:
        """The callback-driven exchange, for the common case: no request body, a lean
        route and cluster, an idle pooled connection. The request is written now and
        the response is answered from the upstream's ``data_received``: no task, no
        future, no coroutine frames. Whatever needs to wait differently (a new
        connection, a streamed response body, a failure, a timeout) continues as a
        coroutine through ``resume(ctx, coroutine)``; ``complete(ctx)`` is called
        when the exchange ended here. Returns False, having done nothing, when the
        request needs ``forward`` from the start."""
        cluster = ctx.snapshot.clusters.get(ctx.destination.cluster)  # type: ignore[union-attr]
        stream = ctx.stream
        if (
            cluster is None
            or cluster.traffic is not None
            or ctx.route.traffic is not None  # type: ignore[union-attr]
            or not stream.body_complete()
            or getattr(stream, "tunnel", None) is not None
        ):
            return False
        pools = self.pools
        pool = pools.pool_for(pools.pick_endpoint(cluster))
        conn = pool.take_idle()
        if conn is None:
            resume(ctx, UpstreamStage.forward(self, ctx, pool))
            return True
        ctx.upstream_cluster = cluster.name
        ctx.upstream_host = pool.host_label
        head = ctx.head
        head_only = head.method == "HEAD"
        exchange = _Exchange(self, ctx, conn, pool, head_only, complete, resume)
        conn.begin(head_only)
        conn.notify = exchange.on_upstream
        stream.canceller = exchange.on_client_gone  # type: ignore[attr-defined]
        timeout_s = ctx.forward.timeout_s  # type: ignore[union-attr]
        if timeout_s:
            exchange.timer = conn.loop.call_later(timeout_s, exchange.on_timeout)
        conn.write(_request_bytes(head, True))
        return True

    async def forward(
        self, ctx: RequestContext, pool: EndpointPool | None = None, retry: bool = True
    ) -> None:
        """The general exchange. ``pool``: the endpoint already chosen (``start``
        handing over); ``retry`` False when a stale pooled connection has already
        had its one retry."""
        snapshot = ctx.snapshot
        destination = ctx.destination
        assert snapshot is not None and destination is not None and ctx.forward is not None
        cluster = snapshot.clusters.get(destination.cluster)
        if cluster is None:
            if destination.cluster.startswith(INVALID_BACKEND_PREFIX):
                raise ClusterNotFound(destination.cluster)
            raise NoHealthyUpstream(f"no cluster {destination.cluster}")
        if (
            cluster.traffic is not None
            or ctx.route.traffic is not None  # type: ignore[union-attr]
            # A WebSocket upgrade (HTTP/1.1 only) becomes a tunnel after a 101.
            or (ctx.head.http_version == "1.1" and getattr(ctx.stream, "tunnel", None) is not None)
        ):
            return await self.traffic.forward(ctx, cluster)
        ctx.upstream_cluster = cluster.name
        pools = self.pools
        if pool is None:
            pool = pools.pool_for(pools.pick_endpoint(cluster))
        ctx.upstream_host = pool.host_label
        head = ctx.head
        head_only = head.method == "HEAD"
        started = perf_counter()
        timeout_s = ctx.forward.timeout_s
        conn: UpstreamConnection | None = None
        try:
            if timeout_s:
                try:
                    async with asyncio.timeout(timeout_s):
                        conn, sent_all = await self._exchange(ctx, pool, head, head_only, retry)
                except TimeoutError as exc:
                    raise UpstreamTimeout(f"no response head within {timeout_s}s") from exc
            else:
                conn, sent_all = await self._exchange(ctx, pool, head, head_only, retry)
            status = conn.status
            ctx.upstream_ms = (perf_counter() - started) * 1000.0
            response = ResponseHead(status, self._response_headers(ctx, conn.headers))
            if head_only or status in (204, 304) or conn.message_done:
                if head_only:
                    body = b""
                elif conn.message_done:
                    body = conn.take_body()  # all here: no await, no coroutine
                else:
                    body = await conn.read_body()
                if body:
                    await ctx.send_whole(response, body)
                else:
                    await ctx.send_head(response, True)
            else:
                await within_route_timeout(self._relay(ctx, conn, response), ctx, started)
            if sent_all:
                conn.finish()
            else:
                conn.close()  # the upstream answered before the request body ended
            conn = None
        finally:
            if conn is not None:
                conn.close()

    async def _relay(
        self, ctx: RequestContext, conn: UpstreamConnection, response: ResponseHead
    ) -> None:
        """The response head, then its body as the upstream delivers it."""
        await ctx.send_head(response, False)
        while True:
            data = await conn.read_body()
            done = conn.message_done and not conn.chunks
            if not data:
                await ctx.send_body(b"", True)
                break
            await ctx.send_body(data, done)
            if done:
                break

    async def _relay_rest(
        self,
        ctx: RequestContext,
        conn: UpstreamConnection,
        response: ResponseHead,
        started: float,
    ) -> None:
        """The rest of a callback-driven exchange whose body is still coming;
        ``started``: when the exchange began (``perf_counter``)."""
        try:
            await within_route_timeout(self._relay(ctx, conn, response), ctx, started)
            conn.finish()
            conn = None  # type: ignore[assignment]
        finally:
            if conn is not None:
                conn.close()

    async def _exchange(
        self,
        ctx: RequestContext,
        pool: object,
        head: RequestHead,
        head_only: bool,
        retry: bool = True,
    ) -> tuple[UpstreamConnection, bool]:
        """Connect (or reuse), send the request, wait for the response head."""
        pools = self.pools
        stream = ctx.stream
        no_body = stream.body_complete()
        request = _request_bytes(head, no_body)
        chunked = not no_body and head.header("content-length") is None
        for attempt in (0, 1) if retry else (1,):
            # An idle pooled connection is taken without a coroutine hop; only a new
            # connection needs to await.
            conn = pool.take_idle()  # type: ignore[attr-defined]
            reused = conn is not None
            if conn is None:
                conn = await pools.open(pool)  # type: ignore[arg-type]
            try:
                conn.begin(head_only)
                conn.write(request)
                sent_all = True
                if not no_body:
                    sent_all = await self._send_body(ctx, conn, chunked)
                waiter = conn.head_waiter()
                if waiter is not None:
                    await waiter
                if not conn.head_done:
                    raise conn.error or UpstreamReset("no response head")
            except UpstreamReset:
                conn.close()
                # A pooled connection the upstream closed while idle: the request
                # never reached it, so one retry on a fresh connection is safe.
                if attempt == 0 and reused and no_body and not conn.received_any:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return conn, sent_all
        raise AssertionError("unreachable")

    async def _send_body(
        self, ctx: RequestContext, conn: UpstreamConnection, chunked: bool
    ) -> bool:
        """Stream the request body upstream; False if the upstream answered first."""
        stream = ctx.stream
        while True:
            if conn.head_done or conn.closed:
                return stream.body_complete()
            data = await stream.read_body()
            if data:
                ctx.bytes_received += len(data)
                if chunked:
                    conn.write(b"%x\r\n%b\r\n" % (len(data), data))
                else:
                    conn.write(data)
                await conn.drain()
            if not data or stream.body_complete():
                if chunked:
                    conn.write(b"0\r\n\r\n")
                return True

    def _response_headers(
        self, ctx: RequestContext, raw: list[tuple[bytes, bytes]]
    ) -> list[tuple[str, str]]:
        hop = _RESPONSE_HOP
        names = _RESPONSE_NAMES
        headers = []
        named: set[str] | None = None  # extra names listed in Connection
        for raw_name, raw_value in raw:
            name = names.get(raw_name)
            if name is None:
                name = raw_name.decode("latin-1").lower()
                if len(names) < 1024:
                    names[raw_name] = name
            if name in hop:
                if name == "connection":
                    for token in raw_value.decode("latin-1").split(","):
                        token = token.strip().lower()
                        if token and token not in hop:
                            named = named or set()
                            named.add(token)
                continue
            headers.append((name, raw_value.decode("latin-1")))
        if named:
            headers = [item for item in headers if item[0] not in named]
        return finish_response_headers(ctx, headers)


class _Exchange:
    """One callback-driven upstream exchange (``UpstreamStage.start``)."""

    __slots__ = (
        "complete",
        "conn",
        "ctx",
        "head_only",
        "pool",
        "resume",
        "stage",
        "started",
        "timer",
    )

    def __init__(
        self,
        stage: UpstreamStage,
        ctx: RequestContext,
        conn: UpstreamConnection,
        pool: EndpointPool,
        head_only: bool,
        complete: Callable[[RequestContext], None],
        resume: Callable[[RequestContext, Coroutine[Any, Any, None]], None],
    ) -> None:
        self.stage = stage
        self.ctx = ctx
        self.conn = conn
        self.pool = pool
        self.head_only = head_only
        self.complete = complete
        self.resume = resume
        self.started = perf_counter()
        self.timer: asyncio.TimerHandle | None = None

    def on_upstream(self) -> None:
        """The response head is in, or the exchange failed before it."""
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        ctx = self.ctx
        conn = self.conn
        ctx.stream.canceller = None  # type: ignore[attr-defined]
        if not conn.head_done:
            conn.close()
            if not conn.received_any:
                # A pooled connection the upstream had closed while idle: the request
                # never reached it, so it gets one retry, as ``_exchange`` gives.
                self.resume(ctx, UpstreamStage.forward(self.stage, ctx, self.pool, retry=False))
            else:
                self.resume(ctx, _raise(conn.error or UpstreamReset("no response head")))
            return
        raw: tuple[bytes, bool] | None = None
        fields: list[tuple[bytes, bytes]] | None = None
        try:
            ctx.upstream_ms = (perf_counter() - self.started) * 1000.0
            status = conn.status
            if not (self.head_only or conn.message_done):
                response = ResponseHead(status, self.stage._response_headers(ctx, conn.headers))
                self.resume(ctx, self.stage._relay_rest(ctx, conn, response, self.started))
                return
            body = b"" if self.head_only else conn.take_body()
            route = ctx.route
            if (
                route.response_headers.empty  # type: ignore[union-attr]
                and ctx.destination.response_headers.empty  # type: ignore[union-attr]
            ):
                # No route edits the response head: the upstream's header lines go
                # out as they came, less the hop-by-hop ones, followed by what the
                # gateway appends (CORS, rate-limit figures, alt-svc), in the order
                # the general path appends them; as wire lines for HTTP/1.1, as
                # byte fields for HTTP/2.
                appends = bool(ctx.cors_headers or ctx.ratelimit_headers or ADVERTISED)
                if ctx.stream.raw_lines:  # type: ignore[attr-defined]
                    raw = _passthrough_lines(conn.headers)
                    if raw is not None and appends:
                        raw = (raw[0] + _appended_lines(ctx, status), raw[1])
                else:
                    fields = _passthrough_fields(conn.headers)
                    if fields is not None and appends:
                        fields += _appended_fields(ctx, status)
            if raw is None and fields is None:
                response = ResponseHead(status, self.stage._response_headers(ctx, conn.headers))
        except Exception as exc:  # a bug: the pipeline answers 500 and logs it
            conn.close()
            self.resume(ctx, _raise(exc))
            return
        conn.finish()  # first: a pipelined request started by the write can reuse it
        try:
            if fields is not None:
                if not ctx.write_fields(status, fields, body):
                    # The client's HTTP/2 window is short: wait for it in a task.
                    headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in fields]
                    response = ResponseHead(status, headers)
                    self.resume(ctx, ctx.send_whole(response, body, advertise=False))
                    return
            elif raw is None:
                if not ctx.write_whole(response, body):
                    self.resume(ctx, ctx.send_whole(response, body, advertise=False))
                    return
            else:
                ctx.write_raw(status, raw[0], raw[1], body)
        except Exception as exc:  # the client went away (StreamReset)
            self.resume(ctx, _raise(exc))
            return
        self.complete(ctx)

    def on_timeout(self) -> None:
        self.timer = None
        conn = self.conn
        conn.notify = None
        conn.close()
        ctx = self.ctx
        ctx.stream.canceller = None  # type: ignore[attr-defined]
        timeout_s = ctx.forward.timeout_s  # type: ignore[union-attr]
        self.resume(ctx, _raise(UpstreamTimeout(f"no response head within {timeout_s}s")))

    def on_client_gone(self) -> None:
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        conn = self.conn
        conn.notify = None
        conn.close()
        self.ctx.add_flag("DC")
        self.complete(self.ctx)


# Upstream response header-name sequences -> how to pass such a head through as bytes:
# (picks the kept (name, value) pairs, their lower-case names, whether Content-Length
# is among them, the index of a Connection header or -1), or None when the head has
# something that needs the general path. Upstreams send the same few name sequences
# over and over, so each is worked out once.
_Plan = tuple[Callable[[list[tuple[bytes, bytes]]], Any], tuple[bytes, ...], bool, int]
_PLANS: dict[tuple[bytes, ...], _Plan | None] = {}
_HOP_BYTES = frozenset(name.encode() for name in _RESPONSE_HOP)
_FIRST_ITEM = itemgetter(0)
_SECOND_ITEM = itemgetter(1)
_COLON_JOIN_BYTES = b": ".join


def _plan(names: tuple[bytes, ...]) -> _Plan | None:
    lowered = [name.lower() for name in names]
    if lowered.count(b"connection") > 1:
        return None
    keep = [index for index, name in enumerate(lowered) if name not in _HOP_BYTES]
    kept_names = tuple(lowered[index] for index in keep)
    if any(name[:1] == b":" for name in kept_names):
        return None  # not a field an HTTP/2 head may carry: the general path decides
    if len(keep) == 1:
        only = keep[0]

        def pick(raw: list[tuple[bytes, bytes]]) -> Any:
            return (raw[only],)

    elif not keep:

        def pick(raw: list[tuple[bytes, bytes]]) -> Any:
            return ()

    else:
        pick = itemgetter(*keep)
    connection = lowered.index(b"connection") if b"connection" in lowered else -1
    return pick, kept_names, b"content-length" in kept_names, connection


def _plan_of(raw: list[tuple[bytes, bytes]]) -> _Plan | None:
    """How to pass this upstream head through as bytes, or None when the general
    path must decide (a Connection header that names other headers, say)."""
    names = tuple(map(_FIRST_ITEM, raw))
    plan = _PLANS.get(names, False)
    if plan is False:
        plan = _plan(names)
        if len(_PLANS) < 256:
            _PLANS[names] = plan
    if plan is None:
        return None
    connection = plan[3]
    if connection >= 0:
        # Connection may name further headers to drop; the usual values do not.
        token = raw[connection][1].lower()
        if token != b"keep-alive" and token != b"close":
            return None
    return plan


def _passthrough_lines(raw: list[tuple[bytes, bytes]]) -> tuple[bytes, bool] | None:
    """The upstream's response header lines for an HTTP/1.1 client, in wire form
    (lower-case names, hop-by-hop headers dropped), and whether Content-Length is
    among them; None when the general path must decide."""
    plan = _plan_of(raw)
    if plan is None:
        return None
    pick, kept_names, has_length, _ = plan
    if not kept_names:
        return b"", False
    pairs = zip(kept_names, map(_SECOND_ITEM, pick(raw)), strict=True)
    return b"\r\n".join(map(_COLON_JOIN_BYTES, pairs)) + b"\r\n", has_length


def _passthrough_fields(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]] | None:
    """The upstream's response fields for an HTTP/2 client, as bytes (lower-case
    names, hop-by-hop fields dropped); None when the general path must decide."""
    plan = _plan_of(raw)
    if plan is None:
        return None
    pick, kept_names, _, _ = plan
    if not kept_names:
        return []
    return list(zip(kept_names, map(_SECOND_ITEM, pick(raw)), strict=True))


def _appended_lines(ctx: RequestContext, status: int) -> bytes:
    """The header lines the gateway adds after the upstream's: CORS, the rate-limit
    figures (``finish_response_headers``), then ``alt-svc`` (``add_alt_svc``)."""
    extra = _appended(ctx, status)
    if not extra:
        return b""
    return f"{_CRLF_JOIN(map(_COLON_JOIN, extra))}\r\n".encode("latin-1")


def _appended_fields(ctx: RequestContext, status: int) -> list[tuple[bytes, bytes]]:
    """``_appended_lines`` as HTTP/2 fields."""
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in _appended(ctx, status)]


def _appended(ctx: RequestContext, status: int) -> list[tuple[str, str]]:
    extra: list[tuple[str, str]] = []
    if ctx.cors_headers:
        extra += ctx.cors_headers
    if ctx.ratelimit_headers:
        extra += ctx.ratelimit_headers
    head = ctx.head
    if ADVERTISED and status >= 200 and head.scheme == "https":
        value = alt_svc_header(head.port, head.http_version)
        if value is not None:
            extra.append(("alt-svc", value))
    return extra


async def _raise(error: BaseException) -> None:
    """A coroutine that fails with ``error``: hands a failure met in a callback to
    the pipeline's coroutine path, which answers and logs it."""
    raise error


def finish_response_headers(
    ctx: RequestContext, headers: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Response header edits (route, then destination), the CORS headers and the
    rate-limit figures of a limited route."""
    route = ctx.route
    if route is not None and not route.response_headers.empty:
        headers = apply_header_ops(headers, route.response_headers)
    destination = ctx.destination
    if destination is not None and not destination.response_headers.empty:
        headers = apply_header_ops(headers, destination.response_headers)
    if ctx.cors_headers:
        headers.extend(ctx.cors_headers)
    if ctx.ratelimit_headers:
        headers.extend(ctx.ratelimit_headers)
    return headers


# Serialising a header list: "name: value" lines joined in C (see _request_bytes).
_COLON_JOIN = ": ".join
_CRLF_JOIN = "\r\n".join
_FIRST = itemgetter(0)


def _request_bytes(head: RequestHead, no_body: bool) -> bytes:
    """The upstream request head in one buffer (one write on the fast path)."""
    target = f"{head.path}?{head.query}" if head.query else head.path
    headers = head.headers
    text = f"{head.method} {target} HTTP/1.1\r\nhost: {head.authority}\r\n"
    if headers:
        # ": ".join over the (name, value) tuples and one "\r\n".join run in C: no
        # per-header f-string, list append or tuple unpacking in Python.
        text = f"{text}{_CRLF_JOIN(map(_COLON_JOIN, headers))}\r\n"
    if not no_body and "content-length" not in map(_FIRST, headers):
        text += "transfer-encoding: chunked\r\n"
    return f"{text}\r\n".encode("latin-1")
