"""The HTTP/1.1 upstream client: one protocol object per connection, keep-alive pools
per endpoint, round-robin endpoint choice per cluster.

What it owns: opening connections (with a connect timeout), parsing responses with
httptools, flow control both ways (the upstream socket is paused while the response
body waits for a slow client; writers wait while the upstream is not reading), and
deciding whether a connection may be reused. What it leaves to the caller (the upstream
stage): building the request bytes, route timeouts, and what to tell the client.

One exchange at a time per connection; pipelining upstream is not used because one
slow response would hold up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

import httptools

from ..errors import (
    GatewayError,
    NoHealthyUpstream,
    UpstreamConnectFailure,
    UpstreamProtocolError,
    UpstreamReset,
)
from ..routing.table import Cluster, Endpoint
from ..writebatch import HeldWrites

__all__ = ["EndpointPool", "UpstreamConnection", "UpstreamPools"]

DEFAULT_CONNECT_TIMEOUT_S = 10.0  # Istio's default connectTimeout
_NO_BODY_STATUSES = frozenset({204, 304})
# What a closed connection's ``parser`` becomes: parses nothing, holds no protocol.
_CLOSED_PARSER: Any = httptools.HttpResponseParser(object())


class _Unsolicited(Exception):
    """Raised from the parser's callback: stops parsing a response nobody asked for."""


class UpstreamConnection(HeldWrites, asyncio.Protocol):
    """One TCP connection to an endpoint, carrying one exchange at a time.

    Life of an exchange: ``begin(head_only)``, ``write(...)``/``drain()`` for the
    request, ``read_head()``, ``read_body()`` until ``b""``, then ``finish()`` which
    returns the connection to its pool when it is clean, or closes it.
    """

    __slots__ = (
        "_body_waiter",
        "_drain_waiter",
        "_head_waiter",
        "_interim",
        "_out",
        "_reading_paused",
        "_write_paused",
        "buffered",
        "chunks",
        "close_delimited",
        "closed",
        "error",
        "exchanges",
        "expecting",
        "head_done",
        "head_only",
        "headers",
        "high_bytes",
        "keep_alive",
        "loop",
        "message_done",
        "notify",
        "parser",
        "pool",
        "received_any",
        "status",
        "transport",
    )

    def __init__(self, pool: EndpointPool, high_bytes: int) -> None:
        self.pool = pool
        self.high_bytes = high_bytes
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.exchanges = 0
        self.expecting = False  # a request is out and its final response not yet in
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self._reading_paused = False
        # Small writes held until the end of a busy loop turn (gateway.writebatch).
        self._out: list[bytes] | None = None
        self._reset_exchange(False)

    def _reset_exchange(self, head_only: bool) -> None:
        self.head_only = head_only
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.message_done = False
        self.keep_alive = False
        self.close_delimited = False
        # A connection only comes back for reuse with its body queue drained and
        # reading resumed (``finish``), so the queue and the flow-control state
        # carry over rather than being rebuilt for every exchange.
        if self.chunks:
            self.chunks.clear()
            self.buffered = 0
        self.error: GatewayError | None = None
        self.received_any = False
        self._interim = False
        self._head_waiter: asyncio.Future[None] | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        # The callback-driven exchange (``stages.UpstreamStage.start``): called once,
        # when the response head is in or the exchange has failed.
        self.notify: Callable[[], None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=self.high_bytes)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # On _Unsolicited, what the exchange awaited (if anything) is complete.
            cause = exc.__cause__ or exc.__context__
            what = "a response nobody asked for" if isinstance(cause, _Unsolicited) else exc
            self._fail(UpstreamProtocolError(f"unparsable response: {what}"))
            self.close()
        notify = self.notify
        if notify is not None and (self.head_done or self.error is not None):
            self.notify = None
            notify()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost does the bookkeeping

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        if self.head_done and self.close_delimited and not self.message_done:
            # A response without Content-Length or chunking ends when the server closes.
            self.message_done = True
            self._wake_body()
        elif not self.message_done:
            self._fail(UpstreamReset(f"upstream closed the connection: {exc or 'EOF'}"))
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        notify = self.notify
        if notify is not None:
            self.notify = None
            notify()
        # Break the cycles (parser -> self, transport <-> self) so that a closed
        # connection is freed by reference counting, not at the next full collection.
        self.parser = _CLOSED_PARSER
        self.transport = None
        self._out = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self.expecting:
            # A response nobody asked for: after the one the exchange awaited (in the
            # same read or later), or on an idle pooled connection. Parsed, it would
            # be taken for the next request's answer, perhaps another client's
            # (response desync); the connection is closed instead, as Envoy does.
            raise _Unsolicited

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim response (100 Continue, 103 Early Hints): the gateway answers
            # Expect itself, so these are dropped and the final response awaited.
            self._interim = True
            self.headers = []
            return
        self.status = status
        keep_alive = self.keep_alive = self.parser.should_keep_alive()
        if self.head_only:
            # httptools cannot be told the request was HEAD: it would wait for
            # Content-Length bytes that never come. The message ends here, and this
            # connection's parser is replaced before any reuse.
            self.message_done = True
            self.expecting = False
            self.parser = httptools.HttpResponseParser(self)
        elif not keep_alive and status not in _NO_BODY_STATUSES:
            # llhttp never calls a response keep-alive when its body runs to the
            # close, so only a response that is not keep-alive needs this scan.
            framed = False
            for name, value in self.headers:
                lname = name.lower()
                if lname == b"content-length" or (
                    lname == b"transfer-encoding" and b"chunked" in value.lower()
                ):
                    framed = True
                    break
            self.close_delimited = not framed
        self.head_done = True
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._interim or self.head_only:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > self.high_bytes and not self._reading_paused:
            # The client is slower than the upstream: stop reading the upstream
            # socket rather than buffer the difference.
            self._reading_paused = True
            if self.transport is not None:
                self.transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.head_only:
            return
        self.message_done = True
        self.expecting = False
        self._wake_body()

    # -- exchange API -----------------------------------------------------------------

    def begin(self, head_only: bool) -> None:
        """Start a new exchange; ``head_only`` for HEAD requests (no response body)."""
        self._reset_exchange(head_only)
        self.expecting = True
        self.exchanges += 1

    async def drain(self) -> None:
        """Wait while the upstream is not reading what was written."""
        if self._write_paused and not self.closed:
            waiter = self._drain_waiter
            if waiter is None:
                waiter = self._drain_waiter = self.loop.create_future()
            await waiter

    def head_waiter(self) -> asyncio.Future[None] | None:
        """A future to await before the response head is in; None when it is (or
        the exchange failed: ``read_head`` then raises). The caller awaits it
        directly, one coroutine frame fewer than ``read_head``."""
        if self.head_done or self.error is not None:
            return None
        waiter = self._head_waiter = self.loop.create_future()
        return waiter

    async def read_head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The response status and raw headers; raises UpstreamReset & co. on failure."""
        if not self.head_done:
            if self.error is None:
                waiter = self._head_waiter = self.loop.create_future()
                await waiter
            if not self.head_done:
                assert self.error is not None
                raise self.error
        return self.status, self.headers

    async def read_body(self) -> bytes:
        """Everything buffered of the response body; ``b""`` once it is complete."""
        while True:
            chunks = self.chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self.buffered = 0
                if self._reading_paused and not self.closed:
                    self._reading_paused = False
                    if self.transport is not None:
                        self.transport.resume_reading()
                return data
            if self.message_done:
                return b""
            if self.error is not None:
                raise self.error
            waiter = self._body_waiter = self.loop.create_future()
            await waiter

    def take_body(self) -> bytes:
        """Everything buffered of the response body, without waiting (the whole
        body once ``message_done``)."""
        chunks = self.chunks
        if not chunks:
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._reading_paused and not self.closed:
            self._reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()
        return data

    def finish(self) -> None:
        """End the exchange: back to the idle pool when clean, else close."""
        if (
            self.message_done
            and self.keep_alive
            and not self.closed
            and self.error is None
            and not self.chunks
        ):
            self.pool.put_idle(self)
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- internals --------------------------------------------------------------------

    def _fail(self, error: GatewayError) -> None:
        if self.error is None:
            self.error = error
        for waiter in (self._head_waiter, self._body_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None:
            self._body_waiter = None
            if not waiter.done():
                waiter.set_result(None)


class EndpointPool:
    """Idle keep-alive connections to one ``address:port``, most recently used first."""

    __slots__ = ("address", "connections_opened", "host_label", "idle", "max_idle", "port")

    def __init__(self, address: str, port: int, max_idle: int) -> None:
        self.address = address
        self.port = port
        self.host_label = f"{address}:{port}"  # access-log upstream_host
        self.idle: list[UpstreamConnection] = []
        self.max_idle = max_idle
        self.connections_opened = 0

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if not conn.closed and transport is not None and not transport.is_closing():
                return conn
        return None

    def put_idle(self, conn: UpstreamConnection) -> None:
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.close()

    def discard(self, conn: UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def close(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


class UpstreamPools:
    """Every endpoint pool of one worker process, plus round-robin state per cluster."""

    def __init__(
        self,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_idle_per_endpoint: int = 1024,
        write_buffer_high_bytes: int = 256 * 1024,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_idle_per_endpoint = max_idle_per_endpoint
        self.write_buffer_high_bytes = write_buffer_high_bytes
        self._pools: dict[tuple[str, int], EndpointPool] = {}
        # id(endpoint) -> (endpoint, pool): one probe per request instead of building
        # an (address, port) key; the endpoint is kept so a reused id cannot mislead.
        self._by_endpoint: dict[int, tuple[Endpoint, EndpointPool]] = {}
        self._next: dict[str, int] = {}

    def pick_endpoint(self, cluster: Cluster) -> Endpoint:
        """Round robin over the cluster's endpoints: the lean path's balancer, for a
        cluster without a traffic policy, whose endpoint weights are all equal. Weighted
        and configured balancers are ``gateway.upstream.lb``'s (``TrafficForwarder``)."""
        endpoints = cluster.endpoints
        if not endpoints:
            raise NoHealthyUpstream(f"cluster {cluster.name} has no endpoints")
        count = len(endpoints)
        if count == 1:
            return endpoints[0]
        index = self._next.get(cluster.name, 0)
        self._next[cluster.name] = index + 1 if index + 1 < count else 0
        return endpoints[index % count]

    def pool_for(self, endpoint: Endpoint) -> EndpointPool:
        cached = self._by_endpoint.get(id(endpoint))
        if cached is not None and cached[0] is endpoint:
            return cached[1]
        key = (endpoint.address, endpoint.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = EndpointPool(
                endpoint.address, endpoint.port, self.max_idle_per_endpoint
            )
        if len(self._by_endpoint) >= 4096:
            self._by_endpoint.clear()  # endpoints of old snapshots
        self._by_endpoint[id(endpoint)] = (endpoint, pool)
        return pool

    async def connect(self, pool: EndpointPool) -> tuple[UpstreamConnection, bool]:
        """An idle connection (``reused`` True) or a new one; raises UpstreamConnectFailure."""
        conn = pool.take_idle()
        if conn is not None:
            return conn, True
        return await self.open(pool), False

    async def open(self, pool: EndpointPool) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        high = self.write_buffer_high_bytes
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(pool, high), pool.address, pool.port
                )
        except TimeoutError as exc:
            raise UpstreamConnectFailure(f"connect to {pool.host_label} timed out") from exc
        except OSError as exc:
            raise UpstreamConnectFailure(f"connect to {pool.host_label}: {exc}") from exc
        pool.connections_opened += 1
        return conn

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
