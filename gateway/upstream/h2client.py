"""HTTP/2 to upstreams, on the ``h2`` library over a raw asyncio transport.

Used for clusters whose port protocol is ``HTTP2``/``GRPC`` or whose DestinationRule
sets ``h2UpgradePolicy: UPGRADE`` (cleartext: prior knowledge, as Envoy does; over
TLS: ALPN ``h2``). One ``H2UpstreamConnection`` per endpoint carries many concurrent
``H2UpstreamStream``s, up to the server's SETTINGS_MAX_CONCURRENT_STREAMS.

Flow control both ways: a stream's ``send_data`` waits for window; received DATA is
acknowledged only when ``read_body`` hands it on, so a slow downstream client slows
the upstream through HTTP/2's own windows instead of growing a buffer. Trailers
(``grpc-status`` and friends) are kept on the stream for the caller to pass on.

Errors are ours: a stream reset becomes ``UpstreamReset`` (with ``refused`` set for
REFUSED_STREAM, which is always safe to retry), a dead connection ``UpstreamReset``,
an h2 protocol violation ``UpstreamProtocolError``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from ..errors import GatewayError, UpstreamProtocolError, UpstreamReset

__all__ = ["H2UpstreamConnection", "H2UpstreamStream", "refused", "request_headers"]

# Headers HTTP/2 forbids (RFC 9113 8.2.2); ``te`` is allowed only as "trailers".
_CONNECTION_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host"}
)
_WINDOW = 1 << 20  # per-stream receive window we advertise


def refused(error: GatewayError) -> bool:
    """True for a stream the server refused before doing any work (REFUSED_STREAM)."""
    return bool(getattr(error, "refused", False))


class H2UpstreamStream:
    """One request/response exchange on an upstream HTTP/2 connection."""

    __slots__ = (
        "_body_waiter",
        "_head_waiter",
        "_window_waiter",
        "chunks",
        "conn",
        "done",
        "error",
        "head_done",
        "headers",
        "pending_ack",
        "pump",
        "status",
        "stream_id",
        "trailers",
    )

    def __init__(self, conn: H2UpstreamConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[str, str]] | None = None
        self.head_done = False
        self.done = False
        self.error: GatewayError | None = None
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.pending_ack = 0
        # The task sending a request body that was still arriving, if any.
        self.pump: asyncio.Task[None] | None = None
        self._head_waiter: asyncio.Future[None] | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._window_waiter: asyncio.Future[None] | None = None

    # -- request ---------------------------------------------------------------------

    async def send_data(self, data: bytes, end_stream: bool) -> None:
        conn = self.conn
        view = memoryview(data)
        while view:
            if self.error is not None:
                raise self.error
            window = conn.h2.local_flow_control_window(self.stream_id)
            size = min(window, conn.h2.max_outbound_frame_size, len(view))
            if size <= 0:
                self._window_waiter = conn.loop.create_future()
                await self._window_waiter
                continue
            last = size == len(view)
            conn.h2.send_data(self.stream_id, bytes(view[:size]), end_stream=end_stream and last)
            conn.flush()
            view = view[size:]
            await conn.drain()
        if not data and end_stream:
            conn.h2.end_stream(self.stream_id)
            conn.flush()

    # -- response --------------------------------------------------------------------

    async def read_head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            self._head_waiter = self.conn.loop.create_future()
            await self._head_waiter
        return self.status, self.headers

    async def read_body(self) -> bytes:
        """Buffered response body; ``b""`` once the stream has ended."""
        while True:
            if self.chunks:
                parts = []
                acked = 0
                while self.chunks:
                    data, flow = self.chunks.popleft()
                    parts.append(data)
                    acked += flow
                self.conn.acknowledge(self.stream_id, acked)
                return b"".join(parts)
            if self.done:
                return b""
            if self.error is not None:
                raise self.error
            self._body_waiter = self.conn.loop.create_future()
            await self._body_waiter

    def reset(self) -> None:
        """Abandon the exchange (the client went away, or a retry gave up on it)."""
        pump, self.pump = self.pump, None
        if pump is not None and pump is not asyncio.current_task():
            pump.cancel()
        self.conn.reset_stream(self)

    close = reset  # the name the forwarding loop uses for either protocol

    # -- internals -------------------------------------------------------------------

    def wake(self) -> None:
        for waiter in (self._head_waiter, self._body_waiter, self._window_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._head_waiter = self._body_waiter = self._window_waiter = None

    def fail(self, error: GatewayError) -> None:
        if self.error is None and not self.done:
            self.error = error
        self.wake()


class H2UpstreamConnection(asyncio.Protocol):
    """A client HTTP/2 connection multiplexing streams to one endpoint."""

    def __init__(self, host_label: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.host_label = host_label
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2UpstreamStream] = {}
        self.closed = False
        self.going_away = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.on_lost: Callable[[], None] | None = None  # connection accounting

    @property
    def usable(self) -> bool:
        """Open, not told to go away, and with room for one more stream."""
        if self.closed or self.going_away:
            return False
        limit = self.h2.remote_settings.max_concurrent_streams
        return len(self.streams) < limit

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.h2.local_settings.initial_window_size = _WINDOW
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_WINDOW * 4)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail_all(UpstreamProtocolError(f"{self.host_label}: HTTP/2 error: {exc}"))
            self.close()
            return
        for event in events:
            self._on_event(event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.on_lost is not None:
            self.on_lost()
            self.on_lost = None
        self._fail_all(UpstreamReset(f"{self.host_label}: connection closed: {exc or 'EOF'}"))
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- events ------------------------------------------------------------------------

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                return
            status = 0
            headers = []
            for name, value in event.headers:
                if name == b":status":
                    status = int(value)
                elif not name.startswith(b":"):
                    headers.append((name, value))
            if 100 <= status < 200:
                return  # interim: wait for the final head
            stream.status = status
            stream.headers = headers
            stream.head_done = True
            stream.wake()
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            stream.chunks.append((event.data, event.flow_controlled_length))
            stream.wake()
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = [
                    (n.decode("latin-1"), v.decode("latin-1"))
                    for n, v in event.headers
                    if not n.startswith(b":")
                ]
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream.done = True
                stream.wake()
            if self.going_away and not self.streams:
                self.close()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                error = UpstreamReset(f"{self.host_label}: stream reset ({event.error_code!r})")
                if event.error_code == ErrorCodes.REFUSED_STREAM:
                    error.refused = True  # type: ignore[attr-defined]
                stream.fail(error)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.wake()
            else:
                for stream in self.streams.values():
                    stream.wake()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.going_away = True
            last = event.last_stream_id or 0
            for stream_id in [s for s in self.streams if s > last]:
                error = UpstreamReset(f"{self.host_label}: GOAWAY before stream {stream_id}")
                # Streams above last_stream_id were never processed: safe to retry.
                error.refused = True  # type: ignore[attr-defined]
                self.streams.pop(stream_id).fail(error)
            if not self.streams:
                self.close()

    # -- API ---------------------------------------------------------------------------

    def open_stream(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> H2UpstreamStream:
        stream_id = self.h2.get_next_available_stream_id()
        stream = H2UpstreamStream(self, stream_id)
        self.streams[stream_id] = stream
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        self.flush()
        return stream

    def acknowledge(self, stream_id: int, size: int) -> None:
        if size and not self.closed:
            with contextlib.suppress(h2.exceptions.StreamClosedError, KeyError):
                self.h2.acknowledge_received_data(size, stream_id)
            self.flush()

    def reset_stream(self, stream: H2UpstreamStream) -> None:
        if self.streams.pop(stream.stream_id, None) is not None and not self.closed:
            with contextlib.suppress(h2.exceptions.StreamClosedError, KeyError):
                self.h2.reset_stream(stream.stream_id, ErrorCodes.CANCEL)
            self.flush()
        if self.going_away and not self.streams:
            self.close()

    def retire(self) -> None:
        """No new streams; close once the ones in flight are done."""
        self.going_away = True
        if not self.streams:
            self.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            with contextlib.suppress(Exception):
                self.h2.close_connection()
                self.flush()
            self.transport.close()
        self.closed = True

    def _fail_all(self, error: GatewayError) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.fail(error)


def request_headers(
    method: str,
    scheme: str,
    authority: str,
    target: str,
    headers: list[tuple[str, str]],
    length: int | None,
) -> list[tuple[bytes, bytes]]:
    """An HTTP/2 request head from the pipeline's request."""
    out = [
        (b":method", method.encode("latin-1")),
        (b":scheme", scheme.encode("latin-1")),
        (b":authority", authority.encode("latin-1")),
        (b":path", target.encode("latin-1")),
    ]
    grpc = False
    for name, value in headers:
        if name in _CONNECTION_HEADERS or name == "content-length" or name == "te":
            continue
        if name == "content-type" and value.startswith("application/grpc"):
            grpc = True
        out.append((name.encode("latin-1"), value.encode("latin-1")))
    if length is not None:
        out.append((b"content-length", str(length).encode()))
    if grpc:
        # gRPC servers insist on "te: trailers", which hop-by-hop cleaning removed.
        out.append((b"te", b"trailers"))
    return out
