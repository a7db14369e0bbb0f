"""Listening sockets: one server per listener port, and the live connections.

Cleartext ports (HTTP, HTTP2, GRPC) serve each connection with the HTTP/1.1 adapter,
which hands over to HTTP/2 on prior knowledge or an h2c upgrade. TLS ports (HTTPS,
TLS) accept the socket themselves, peek at the ClientHello without consuming it,
choose the Gateway server by SNI (``tls.py``) and then either terminate TLS with that
server's context — ALPN ``h2`` goes to ``H2Protocol``, ``http/1.1`` or no ALPN to
``HTTP1Connection`` — or, for PASSTHROUGH servers, splice the still-encrypted bytes
to the upstream a VirtualService ``tls[]`` route names, counting each spliced
connection in Istio's TCP metrics (``tcp_metrics``).

It owns binding (``SO_REUSEPORT``, so several worker processes can share a port),
the set of live connections (including the HTTP/2 protocol that takes a connection
over from HTTP/1.1), and the graceful stop: stop accepting, let each connection
finish the requests it is on (HTTP/2 gets GOAWAY), close idle ones, and after a
bounded drain abort whatever is left.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import random
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..memory import SWEEPER, MemorySweeper
from ..routing.table import Listener, SNIRoute
from .events import DownstreamStream, PeerIdentity, RequestHandler
from .http1 import HTTP1Connection
from .settings import ServerSettings
from .tls import (
    CertificateStore,
    ClientHello,
    NotTLS,
    PortTLS,
    ServerEntry,
    match_sni_route,
    parse_client_hello,
    peer_identity,
    xfcc_value,
)
from .tlsread import BufferedReads

if TYPE_CHECKING:
    from ..metrics import TcpMetrics

__all__ = [
    "CLEARTEXT_PROTOCOLS",
    "TLS_PROTOCOLS",
    "ListenerSet",
    "partition_listeners",
]

logger = logging.getLogger("meshgate.listeners")

# Listener protocols served over cleartext HTTP (HTTP/1.1, h2c upgrade or prior
# knowledge), and those whose connections start with a TLS handshake.
CLEARTEXT_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC"})
TLS_PROTOCOLS = frozenset({"HTTPS", "TLS"})

# How long a client may take to send its whole ClientHello, and the TLS handshake.
HELLO_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 10.0
# Envoy's default cluster connect timeout (Istio sets 10 s).
PASSTHROUGH_CONNECT_TIMEOUT_S = 10.0
# A partial ClientHello is re-peeked after this pause: the bytes stay in the socket
# (MSG_PEEK), so waiting for readability again would spin.
_REPEEK_DELAY_S = 0.005
_ACCEPT_BATCH = 64
_XFCC = "x-forwarded-client-cert"


class _Connection(Protocol):
    def shutdown(self) -> None: ...
    def abort(self) -> None: ...


def partition_listeners(
    listeners: Iterable[Listener],
) -> tuple[list[Listener], list[Listener]]:
    """(servable now, skipped): cleartext HTTP ports and TLS ports with TLS servers are
    served; plain TCP ports and anything else are skipped (the caller says so)."""
    served: list[Listener] = []
    skipped: list[Listener] = []
    for listener in listeners:
        protocol = listener.protocol.upper()
        ok = protocol in CLEARTEXT_PROTOCOLS or (
            protocol in TLS_PROTOCOLS and bool(listener.tls_servers)
        )
        (served if ok else skipped).append(listener)
    return served, skipped


@dataclass
class ListenerSet:
    """The servers of one worker process and their live connections."""

    handler: RequestHandler
    settings: ServerSettings
    address: str = "127.0.0.1"
    servers: list[Any] = field(default_factory=list)
    connections: set[Any] = field(default_factory=set)
    ports: list[int] = field(default_factory=list)
    # TLS: the certificates of every TLS port, and where passthrough finds clusters
    # (an object with ``.current``, the Snapshot new connections use).
    certificates: CertificateStore | None = None
    snapshot_ref: Any = None
    # Called as ``passthrough(sock, sni, route or None, port)`` for PASSTHROUGH
    # servers instead of the built-in splice; returns a coroutine (the egress gateway
    # decides by its registry, resolves names and logs the tunnel).
    passthrough: Any = None
    # Where the built-in splice counts its connections (Istio's TCP metrics) and
    # logs them (``gateway.stages.TunnelLog``: a line per connection).
    tcp_metrics: TcpMetrics | None = None
    tunnel_log: Any = None
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    # Runs gateway.memory.release_memory when the last connection has gone.
    sweeper: MemorySweeper = field(default_factory=lambda: SWEEPER)
    _stopping: bool = False
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.sweeper.watch(self._quiet)

    async def start(self, ports: Iterable[int], scheme: str = "http") -> list[int]:
        """Bind every cleartext port; returns the bound ports (useful when a port is 0)."""
        loop = asyncio.get_running_loop()
        bound_ports: list[int] = []
        for port in ports:
            server = await loop.create_server(
                lambda port=port: self._new_connection(port, scheme),
                self.address,
                port,
                reuse_port=True,
                backlog=4096,
            )
            self.servers.append(server)
            bound = server.sockets[0].getsockname()[1] if server.sockets else port
            self.ports.append(bound)
            bound_ports.append(bound)
        return bound_ports

    async def start_tls(self, listeners: Iterable[Listener]) -> list[int]:
        """Bind every TLS listener (its servers must be in ``certificates``)."""
        if self.certificates is None:
            raise RuntimeError("TLS listeners need a CertificateStore")
        bound_ports: list[int] = []
        for listener in listeners:
            port_tls = self.certificates.ports[listener.port]
            server = _TLSServer(self, port_tls)
            server.bind(self.address, listener.port)
            self.servers.append(server)
            self.ports.append(server.port)
            bound_ports.append(server.port)
        return bound_ports

    def close_port(self, port: int) -> None:
        """Stop accepting on ``port`` at once; its open connections finish the
        request they are on and are then closed (a reload removed the port)."""
        for server in list(self.servers):
            sockets = server.sockets or ()
            if any(s.getsockname()[1] == port for s in sockets):
                server.close()
                self.servers.remove(server)
        with contextlib.suppress(ValueError):
            self.ports.remove(port)
        for conn in list(self.connections):
            if getattr(conn, "port", None) == port:
                conn.shutdown()

    # -- connection tracking --------------------------------------------------------

    def _new_connection(self, port: int, scheme: str) -> HTTP1Connection:
        conn = HTTP1Connection(self.handler, self.settings, port, scheme, self._closed)
        conn.on_handover = self._handed_over
        self._track(conn)
        return conn

    def _track(self, conn: _Connection) -> None:
        self.connections.add(conn)
        self._idle.clear()

    def _handed_over(self, successor: Any) -> None:
        """HTTP/1.1 gave the connection to HTTP/2: keep draining it on stop."""
        successor.on_close = self._closed
        self._track(successor)
        if self._stopping:
            successor.shutdown()

    def _closed(self, conn: Any) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._idle.set()
            # The worker has just gone quiet: give back what the burst left (h2's
            # connection objects are cycles; the heap's free pages).
            self.sweeper.idle(self._quiet)

    def _quiet(self) -> bool:
        return not self.connections and not self._stopping

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, drain_s: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (at most ``drain_s``)."""
        self._stopping = True
        self.sweeper.forget(self._quiet)
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            try:
                async with asyncio.timeout(drain_s):
                    # A hand-over to HTTP/2 removes one connection and adds another;
                    # the event may fire in between, so look again.
                    while self.connections:
                        await self._idle.wait()
                        if self.connections:
                            self._idle.clear()
            except TimeoutError:
                pass
        for conn in list(self.connections):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()


# --------------------------------------------------------------------------- TLS ports


class _TLSServer:
    """A TLS port: its own accept loop, so each socket can be peeked at before the
    handshake. Duck-types the parts of ``asyncio.Server`` the listener set uses."""

    def __init__(self, owner: ListenerSet, port_tls: PortTLS) -> None:
        self.owner = owner
        self.port_tls = port_tls
        self.port = port_tls.listener.port
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self._pending: set[_HelloPeek] = set()

    def bind(self, address: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address, port))
            sock.listen(4096)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.loop.add_reader(sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next wake-up
                logger.warning("accept on port %d failed: %s", self.port, exc)
                return
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peek = _HelloPeek(self, conn)
            self._pending.add(peek)
            peek.start()

    def _refuse(self, conn: socket.socket, server_name: str | None) -> None:
        """No server or route for this SNI: closed, and logged with flag NR as Envoy's
        listener logs ``filter_chain_not_found``."""
        tunnel_log = self.owner.tunnel_log
        if tunnel_log is not None:
            tunnel_log.finish(tunnel_log.start(server_name, self.port, _peer_of(conn)), "NR")
        conn.close()

    def dispatch(self, conn: socket.socket, hello: ClientHello) -> None:
        """Choose the server for this ClientHello and serve the connection."""
        entry = self.port_tls.select(hello.server_name)
        if entry is None:
            # Envoy: no filter chain matches, the connection is closed (flag NR).
            logger.info(
                "port %d: no TLS server for SNI %r: connection closed (NR filter_chain_not_found)",
                self.port,
                hello.server_name,
            )
            self._refuse(conn, hello.server_name)
            return
        if entry.passthrough:
            route = match_sni_route(self.port_tls.listener.sni_routes, hello.server_name)
            hook = self.owner.passthrough
            if hook is not None:
                listener_port = self.port_tls.listener.port
                self.owner._spawn(hook(conn, hello.server_name, route, listener_port))
                return
            if route is None:
                logger.info("port %d: no tls route for SNI %r", self.port, hello.server_name)
                self._refuse(conn, hello.server_name)
                return
            self.owner._spawn(_passthrough(self.owner, conn, route, hello.server_name, self.port))
            return
        if entry.context is None:
            logger.info("port %d: TLS server not ready (%s)", self.port, entry.error)
            conn.close()
            return
        self.owner._spawn(self._terminate(conn, entry))

    async def _terminate(self, conn: socket.socket, entry: ServerEntry) -> None:
        context = entry.context
        assert context is not None
        try:
            await self.loop.connect_accepted_socket(
                lambda: _AlpnSwitch(self.owner, entry, self.port),
                conn,
                ssl=context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            # A client that does not trust us, offers no common version or cipher, or
            # sends no valid certificate to a MUTUAL server: nothing to answer.
            logger.debug("port %d: TLS handshake failed: %s", self.port, exc)
            with contextlib.suppress(OSError):
                conn.close()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self.sock is None else (self.sock,)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        for peek in list(self._pending):
            peek.cancel()

    async def wait_closed(self) -> None:
        return None


class _HelloPeek:
    """Waits until a socket holds a whole ClientHello, without reading it."""

    def __init__(self, server: _TLSServer, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.loop = server.loop
        self.fd = conn.fileno()
        self.reading = False
        self.timer: asyncio.TimerHandle | None = None
        self.retry: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.timer = self.loop.call_later(HELLO_TIMEOUT_S, self.cancel)
        self._watch()

    def _watch(self) -> None:
        self.retry = None
        self.reading = True
        self.loop.add_reader(self.fd, self._ready)

    def _ready(self) -> None:
        try:
            data = self.conn.recv(65536, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.cancel()
            return
        if not data:
            self.cancel()
            return
        try:
            hello = parse_client_hello(data)
        except NotTLS as exc:
            logger.debug("port %d: %s", self.server.port, exc)
            self.cancel()
            return
        if hello is None:
            # Partial: the data stays readable, so stop watching for a moment.
            self._unwatch()
            self.retry = self.loop.call_later(_REPEEK_DELAY_S, self._watch)
            return
        self._finish()
        self.server.dispatch(self.conn, hello)

    def _unwatch(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)

    def _finish(self) -> None:
        self._unwatch()
        for handle in (self.timer, self.retry):
            if handle is not None:
                handle.cancel()
        self.timer = self.retry = None
        self.server._pending.discard(self)

    def cancel(self) -> None:
        self._finish()
        with contextlib.suppress(OSError):
            self.conn.close()


class _AlpnSwitch(asyncio.Protocol):
    """Installed for the handshake; once it is done, hands the connection to the
    adapter ALPN chose, with the client's certificate identity attached."""

    def __init__(self, owner: ListenerSet, entry: ServerEntry, port: int) -> None:
        self.owner = owner
        self.entry = entry
        self.port = port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        identity: PeerIdentity | None = None
        server = self.entry.server
        if server.mode != "SIMPLE":
            identity = peer_identity(ssl_object)
            if server.subject_alt_names and not _san_allowed(identity, server.subject_alt_names):
                logger.info("port %d: client certificate SAN not allowed", self.port)
                transport.abort()  # type: ignore[attr-defined]
                return
        handler = _identified(self.owner.handler, identity)
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        owner = self.owner
        proto: Any
        if alpn == "h2":
            from .http2 import H2Protocol

            proto = H2Protocol(handler, owner.settings, self.port, "https", "")
            proto.on_close = owner._closed
        else:
            proto = HTTP1Connection(handler, owner.settings, self.port, "https", owner._closed)
            proto.on_handover = owner._handed_over
        owner._track(proto)
        # Decrypted bytes through one shared buffer, not a 256 KiB bytes per read.
        transport.set_protocol(BufferedReads(proto))  # type: ignore[attr-defined]
        proto.connection_made(transport)
        if owner._stopping:
            proto.shutdown()

    def data_received(self, data: bytes) -> None:  # pragma: no cover - replaced at once
        pass


def _san_allowed(identity: PeerIdentity | None, allowed: tuple[str, ...]) -> bool:
    if identity is None:
        return False
    names = set(identity.uris) | set(identity.dns)
    return any(name in names for name in allowed)


def _identified(handler: RequestHandler, identity: PeerIdentity | None) -> RequestHandler:
    """The request handler for one TLS connection: attaches the client identity and,
    as Envoy's ``SANITIZE_SET`` does on Istio gateways, replaces any
    ``x-forwarded-client-cert`` the client sent (with ours under mutual TLS)."""
    return _IdentifiedHandler(handler, identity)


class _IdentifiedHandler:
    """``_identified``'s handler; offers ``start`` (the pipeline's callback-driven
    lane) when the handler it wraps does."""

    def __init__(self, handler: RequestHandler, identity: PeerIdentity | None) -> None:
        self._handler = handler
        self._identity = identity
        self._xfcc = xfcc_value(identity) if identity is not None else None
        if getattr(handler, "start", None) is None:
            self.start = None  # the adapter then runs every request in a task

    def _prepare(self, stream: DownstreamStream) -> None:
        head = stream.head
        xfcc = self._xfcc
        if xfcc is not None or head.header(_XFCC) is not None:
            head.headers = [(n, v) for n, v in head.headers if n != _XFCC]
            if xfcc is not None:
                head.headers.append((_XFCC, xfcc))
            head.invalidate()
        head.peer_identity = self._identity

    async def __call__(self, stream: DownstreamStream) -> None:
        self._prepare(stream)
        await self._handler(stream)

    def start(self, stream: DownstreamStream) -> None:
        self._prepare(stream)
        self._handler.start(stream)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- passthrough


_rr = itertools.count()


async def _passthrough(
    owner: ListenerSet, conn: socket.socket, route: SNIRoute, server_name: str | None, port: int
) -> None:
    """Splice a TLS connection, ClientHello included, to the route's upstream.

    Counted in ``owner.tcp_metrics`` as Envoy's TCP proxy flags it: opened once both
    sides are connected, closed with its bytes when both have closed; no cluster
    (``NC``), a failed or timed-out upstream connect (``UF``) or a client gone before
    it was adopted (``DC``) is opened and closed at once. Each connection gets one
    access-log line (``owner.tunnel_log``) when it ends, with the same flag."""
    loop = asyncio.get_running_loop()
    metrics = owner.tcp_metrics
    tunnel_log = owner.tunnel_log
    ctx = tunnel_log.start(server_name, port, _peer_of(conn)) if tunnel_log else None
    snapshot = owner.snapshot_ref.current if owner.snapshot_ref is not None else None
    pick = route.destinations[0]
    if len(route.destinations) > 1:
        r = random.random() * route.total_weight
        pick = route.destinations[bisect.bisect_right(route.cumulative, r)]
    cluster = snapshot.clusters.get(pick.cluster) if snapshot is not None else None
    if cluster is None:
        logger.info("passthrough %s: no cluster %s", route.name, pick.cluster)
        conn.close()
        if metrics is not None:
            metrics.refused(pick.cluster, "NC")
        if ctx is not None:
            ctx.upstream_cluster = pick.cluster
            tunnel_log.finish(ctx, "NC")
        return
    if cluster.endpoints:
        endpoint = cluster.endpoints[next(_rr) % len(cluster.endpoints)]
        target = (endpoint.address, endpoint.port)
    else:
        target = (cluster.host, cluster.port)
    if ctx is not None:
        ctx.upstream_cluster = cluster.name
        ctx.upstream_host = f"{target[0]}:{target[1]}"
    downstream = _Splice()
    upstream = _Splice()
    try:
        async with asyncio.timeout(PASSTHROUGH_CONNECT_TIMEOUT_S):
            await loop.create_connection(lambda: upstream, *target)
    except (OSError, TimeoutError) as exc:
        logger.info("passthrough %s: upstream %s:%d failed: %s", route.name, *target, exc)
        conn.close()
        if metrics is not None:
            metrics.refused(cluster.name, "UF")
        if ctx is not None:
            tunnel_log.finish(ctx, "UF")
        return
    try:
        await loop.connect_accepted_socket(lambda: downstream, conn)
    except OSError:
        upstream.abort()
        conn.close()
        if metrics is not None:
            metrics.refused(cluster.name, "DC")
        if ctx is not None:
            tunnel_log.finish(ctx, "DC")
        return
    pair = _SplicePair(downstream, upstream)
    pair.on_close = owner._closed
    if metrics is not None:
        metrics.opened(cluster.name)
        pair.metrics, pair.cluster = metrics, cluster.name
    if ctx is not None:
        pair.log, pair.ctx = tunnel_log, ctx
    owner._track(pair)
    downstream.peer, upstream.peer = upstream, downstream
    downstream.pair = upstream.pair = pair
    downstream.flush_early()
    upstream.flush_early()
    if upstream.closed and downstream.transport is not None:
        # The upstream hung up before the client's side was adopted: nothing else
        # would end the client's connection.
        downstream.transport.close()


def _peer_of(conn: socket.socket) -> str:
    try:
        return str(conn.getpeername()[0])
    except OSError:
        return ""


class _Splice(asyncio.Protocol):
    """One side of a byte splice; writes go to ``peer``'s transport, and a peer that
    cannot keep up pauses our reading (back-pressure both ways)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Splice | None = None
        self.pair: _SplicePair | None = None
        self.early: list[bytes] = []
        self.early_eof = False
        self.eof = False  # this side's reader has ended
        self.closed = False
        self.received = 0  # bytes read on this side, for the TCP metrics

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        peer = self.peer
        if peer is None or peer.transport is None:
            # The other side is not connected yet: hold (bounded by the socket
            # buffer, since reading pauses).
            self.early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        peer.transport.write(data)

    def flush_early(self) -> None:
        early, self.early = self.early, []
        peer = self.peer
        assert peer is not None and peer.transport is not None
        for data in early:
            peer.transport.write(data)
        if self.early_eof:
            self._forward_eof()
        elif self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is None:
            self.early_eof = True
        else:
            self._forward_eof()
        return True  # keep our write side open: the other direction may go on

    def _forward_eof(self) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            return
        if peer.eof:
            # Both directions have ended: nothing more can flow, and neither
            # transport would report its loss by itself. Close both (each flushes
            # what it still holds first).
            peer.transport.close()
            if self.transport is not None:
                self.transport.close()
            return
        if peer.transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                peer.transport.write_eof()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.closed:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.close()  # flushes what is buffered first
        if self.pair is not None:
            self.pair.side_closed()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


class _SplicePair:
    """A passthrough connection as the listener set tracks it."""

    def __init__(self, downstream: _Splice, upstream: _Splice) -> None:
        self.sides = (downstream, upstream)
        self.on_close: Any = None
        self.metrics: TcpMetrics | None = None
        self.cluster = ""
        self.log: Any = None  # gateway.stages.TunnelLog, and the connection's context
        self.ctx: Any = None

    def side_closed(self) -> None:
        if all(side.closed for side in self.sides):
            on_close, self.on_close = self.on_close, None
            if on_close is not None:
                on_close(self)
            downstream, upstream = self.sides
            metrics, self.metrics = self.metrics, None
            if metrics is not None:
                metrics.closed(self.cluster, "", downstream.received, upstream.received)
            log, self.log = self.log, None
            if log is not None:
                ctx = self.ctx
                ctx.bytes_received, ctx.bytes_sent = downstream.received, upstream.received
                log.finish(ctx)

    def shutdown(self) -> None:
        # A byte stream has no graceful stop of its own: let it run until the drain
        # deadline, when ``abort`` ends it.
        return None

    def abort(self) -> None:
        for side in self.sides:
            side.abort()
