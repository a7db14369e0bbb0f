"""The HTTP/3 downstream adapter and the QUIC listener, on aioquic.

Serves every QUIC connection from clients (``H3Protocol``) on the UDP socket of an
HTTPS listener port, which ``gateway.server.quicports`` binds and hands over with
its first datagram (``QuicListener.attach``). Each request stream becomes a
``RequestHead`` plus an ``H3Stream`` (a ``DownstreamStream``) handed to the request
pipeline exactly as the HTTP/1.1 and HTTP/2 adapters do (a bodiless request through
its callback-driven entry, ``Pipeline.start``; others in a task of their own), so
routing and policy never see an aioquic object.

What this module does:

- flow control both ways, as far as aioquic lets an application steer it: a request
  stream's receive window is moved forward only as the pipeline reads its body
  (aioquic on its own doubles the window whenever data *arrives*), and a response
  body waits while more than ``write_buffer_high_bytes`` of it is unacknowledged;
- the limits of ``ServerSettings``: concurrent streams (QUIC's MAX_STREAMS credit),
  header section size (advertised as SETTINGS_MAX_FIELD_SECTION_SIZE) and count
  (431), body size (413), idle time (QUIC's idle timeout); a refused or malformed
  request reaches the pipeline only as a stream whose ``rejection`` is set, to be
  answered, logged and counted like any other;
- the certificate by SNI when several Gateway servers share the port;
- graceful shutdown: GOAWAY on the control stream, streams already received finish,
  later ones are refused with H3_REQUEST_REJECTED;
- withdrawing the port's ``alt-svc`` advertisement (``gateway.server.altsvc``) when
  the listener stops.

What it leaves to others: routing and error pages (the pipeline), the TCP side of the
same port (the TLS listeners), binding the UDP socket, advertising it and loading
this module on first use (``gateway.server.quicports``), reading certificate files
from Gateway settings (the caller hands ``QuicCertificate`` objects in).

aioquic private parts used, all in one section of ``H3Protocol`` and pinned by the
``aioquic`` version range in ``pyproject.toml``: the per-connection stream-count limit,
the stream receive-window writer (and the receiver's final size, known once the client
has sent FIN or reset the stream), the sender's unacknowledged byte count, the TLS
context's ClientHello handler (to read SNI before the certificate is chosen), and the
TLS output buffers (freed once the handshake is complete), and the HTTP/3 layer's
per-stream frame state and QPACK decoder (a HEADERS frame still being buffered is
looked at, and refused when too long; the decoder is made without a dynamic table).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import pylsqpack
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection, Setting, encode_frame
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.tls import AlertHandshakeFailure, pull_client_hello
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import BadRequest, BodyTooLarge, GatewayError, HeadersTooLarge
from ..memory import SWEEPER
from . import altsvc
from .events import RequestHandler, RequestHead, ResponseHead, StreamReset
from .h2fields import target_problem
from .settings import ServerSettings

__all__ = [
    "H3Protocol",
    "H3Stream",
    "QuicCertificate",
    "QuicListener",
    "choose_certificate",
    "load_quic_certificate",
    "quic_certificate_from_pem",
    "quic_configuration",
]

logger = logging.getLogger(__name__)

# HTTP/3 error codes (RFC 9114 §8.1).
H3_NO_ERROR = 0x100
H3_INTERNAL_ERROR = 0x102
H3_EXCESSIVE_LOAD = 0x107
H3_REQUEST_REJECTED = 0x10B
H3_REQUEST_CANCELLED = 0x10C
H3_MESSAGE_ERROR = 0x10E

# How much request body one stream may have received and not yet handed to the
# pipeline. The same figure as HTTP/2's stream window.
STREAM_WINDOW_BYTES = 256 * 1024
# The connection's initial receive window; aioquic grows it as data is received, the
# per-stream windows above are what bound memory (streams x window).
CONNECTION_WINDOW_BYTES = 1024 * 1024

# How long a QUIC listener stays without connections before the worker collects the
# ended ones' memory (``QuicListener._closed``).
SWEEP_AFTER_S = 0.5

# Response fields HTTP/3 forbids (RFC 9114 §4.2), dropped if the pipeline passes them.
_CONNECTION_FIELDS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _encode_varint(value: int) -> bytes:
    buf = Buffer(capacity=8)
    buf.push_uint_var(value)
    return buf.data


def _response_headers(response: ResponseHead) -> list[tuple[bytes, bytes]]:
    """``:status`` plus the pipeline's headers, lower-cased, connection fields dropped."""
    out = [(b":status", str(response.status).encode("ascii"))]
    nominated: frozenset[str] = frozenset()
    for name, value in response.headers:
        if name.lower() == "connection":
            nominated = nominated | {t.strip().lower() for t in value.split(",")}
    for name, value in response.headers:
        lowered = name.lower()
        if lowered in _CONNECTION_FIELDS or lowered in nominated or lowered[:1] == ":":
            continue
        out.append((lowered.encode("latin-1"), value.encode("latin-1")))
    return out


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class QuicCertificate:
    """A server certificate for the QUIC side of one listener port.

    ``hosts`` are the Gateway server's host names: exact, ``*.suffix`` or ``*``. The
    certificate for a connection is chosen from its SNI the way the TLS side (and
    Envoy's filter-chain match) does: an exact name, then the longest wildcard, then
    ``*``; a name nothing covers is refused in the handshake."""

    hosts: tuple[str, ...]
    certificate: Any  # cryptography x509.Certificate
    chain: tuple[Any, ...]
    private_key: Any

    def rank(self, server_name: str | None) -> int:
        """How well this certificate's hosts cover ``server_name``: -1 not at all."""
        best = -1
        for host in self.hosts:
            if host == "*":
                rank = 0
            elif server_name is None:
                rank = -1
            elif host.startswith("*."):
                suffix = host[1:]
                covered = server_name.endswith(suffix) and len(server_name) > len(suffix)
                rank = len(suffix) if covered else -1
            else:
                rank = 1_000_000 if host == server_name else -1
            best = max(best, rank)
        return best


def choose_certificate(
    certificates: Sequence[QuicCertificate], server_name: str | None
) -> QuicCertificate | None:
    """The best certificate for ``server_name`` (the first declared wins a tie)."""
    best: QuicCertificate | None = None
    best_rank = -1
    for certificate in certificates:
        rank = certificate.rank(server_name)
        if rank > best_rank:
            best, best_rank = certificate, rank
    return best


def quic_certificate_from_pem(
    hosts: Sequence[str], cert_pem: bytes, key_pem: bytes
) -> QuicCertificate:
    """A certificate (with its chain) and key from PEM bytes; ValueError when invalid."""
    certificates = x509.load_pem_x509_certificates(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    return QuicCertificate(
        hosts=tuple(h.lower() for h in hosts),
        certificate=certificates[0],
        chain=tuple(certificates[1:]),
        private_key=key,
    )


def load_quic_certificate(
    certfile: str, keyfile: str, hosts: Sequence[str] = ("*",)
) -> QuicCertificate:
    """Read a PEM certificate chain and key (raises OSError / ValueError when unreadable)."""
    holder = QuicConfiguration(is_client=False)
    holder.load_cert_chain(certfile, keyfile)
    return QuicCertificate(
        hosts=tuple(h.lower() for h in hosts),
        certificate=holder.certificate,
        chain=tuple(holder.certificate_chain),
        private_key=holder.private_key,
    )


def quic_configuration(
    certificates: Sequence[QuicCertificate], settings: ServerSettings
) -> QuicConfiguration:
    """The server-side aioquic configuration for one listener."""
    if not certificates:
        raise ValueError("a QUIC listener needs at least one certificate")
    default = certificates[0]
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=list(H3_ALPN),
        idle_timeout=settings.idle_timeout_s,
        max_data=CONNECTION_WINDOW_BYTES,
        max_stream_data=STREAM_WINDOW_BYTES,
    )
    config.certificate = default.certificate
    config.certificate_chain = list(default.chain)
    config.private_key = default.private_key
    return config


# --------------------------------------------------------------------------- H3 layer


class _H3Connection(H3Connection):
    """aioquic's HTTP/3 layer, advertising our header limit in SETTINGS, and a QPACK
    decoder without a dynamic table.

    A dynamic table lets one 1-byte field line stand for a 4 KiB entry: a 20 KB
    header block decoded to 80 MB of fields (166 MB peak, 3 s of CPU) before any
    limit could look at it, since pylsqpack hands back the whole list. With a table
    capacity of 0 (SETTINGS_QPACK_MAX_TABLE_CAPACITY = 0, RFC 9204 §3.2.3) a field
    line can only name a static-table entry (at most about 100 bytes), the client's
    encoder stream may carry no insertions (any is QPACK_ENCODER_STREAM_ERROR) and
    no stream can be blocked (SETTINGS_QPACK_BLOCKED_STREAMS = 0). The cost: requests
    compress less (static table and Huffman only)."""

    def __init__(self, quic: Any, max_field_section_bytes: int) -> None:
        self._max_field_section_bytes = max_field_section_bytes
        super().__init__(quic)
        # aioquic fixes its decoder's table in ``__init__`` (4 KiB, 16 blocked
        # streams); SETTINGS, sent from there too, already said 0 (below).
        self._max_table_capacity = self._blocked_streams = 0
        self._decoder = pylsqpack.Decoder(0, 0)

    def _get_local_settings(self) -> dict[int, int]:
        local = super()._get_local_settings()
        local[Setting.MAX_FIELD_SECTION_SIZE] = self._max_field_section_bytes
        local[Setting.QPACK_MAX_TABLE_CAPACITY] = 0
        local[Setting.QPACK_BLOCKED_STREAMS] = 0
        return local

    def send_goaway(self, stream_id: int) -> None:
        """GOAWAY on our control stream: streams from ``stream_id`` on are not processed."""
        control = self._local_control_stream_id
        if control is not None:
            self._quic.send_stream_data(
                control, encode_frame(FrameType.GOAWAY, _encode_varint(stream_id))
            )


class H3Stream:
    """One HTTP/3 request stream as a ``DownstreamStream`` (``gateway.server.events``).

    Request body chunks wait in a small deque until ``read_body`` takes them; the
    stream's receive window only moves forward as they are taken. ``send_body`` queues
    response data with aioquic and then waits while too much of it is unacknowledged."""

    __slots__ = (
        "_body_error",
        "_buffered_bytes",
        "_chunks",
        "_declared_length",
        "_local_ended",
        "_proto",
        "_read_waiter",
        "_received_bytes",
        "_remote_ended",
        "_reset_code",
        "_response_started",
        "_send_waiter",
        "_stop_code",
        "_task",
        "canceller",
        "head",
        "rejection",
        "stream_id",
        "trailers",
    )

    def __init__(self, proto: H3Protocol, stream_id: int, head: RequestHead) -> None:
        self.head = head
        self.stream_id = stream_id
        # A request the adapter refuses is still handed to the pipeline, so that it
        # is answered, logged (flag DPE) and counted like any other.
        self.rejection: GatewayError | None = None
        # Raised by ``read_body`` once the body broke a rule midway.
        self._body_error: GatewayError | None = None
        # STOP_SENDING code for a request body still coming after the response.
        self._stop_code = H3_NO_ERROR
        self.trailers: list[tuple[str, str]] | None = None
        self._proto = proto
        self._chunks: deque[bytes] = deque()
        self._buffered_bytes = 0  # body received and not yet read by the pipeline
        self._received_bytes = 0
        # The request's Content-Length, held to as the body arrives (None: none sent).
        self._declared_length: int | None = None
        self._remote_ended = False
        self._local_ended = False
        self._response_started = False
        self._reset_code: int | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._send_waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        # Set while the pipeline's callback-driven exchange waits on the upstream
        # with no task of its own: called if the stream dies meanwhile.
        self.canceller: Callable[[], None] | None = None

    # The response cannot take an upstream's HTTP/1.1 header lines as they are.
    raw_lines = False
    # No Upgrade tunnel over HTTP/3 (``UpstreamStage.start`` asks).
    tunnel = None

    # -- the callback-driven exchange (``Pipeline.start``) ------------------------------

    def run(self, step: Coroutine[Any, Any, None]) -> None:
        """Run the rest of this request's handling in a task."""
        proto = self._proto
        self._task = proto._loop.create_task(proto._run(self, step))

    def write_response(self, response: ResponseHead, body: bytes) -> bool:
        """The whole response now, without a coroutine, when it is small enough to
        queue at once; False, having sent nothing, otherwise. A stream written here
        is finished here."""
        return self._write_now(_response_headers(response), body)

    def write_fields(self, status: int, fields: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """``write_response`` for a head already in lower-case byte fields, free of
        connection-specific ones (an upstream's, passed through)."""
        return self._write_now([(b":status", str(status).encode("ascii")), *fields], body)

    def _write_now(self, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        proto = self._proto
        if self._reset_code is not None or len(body) > proto._settings.write_buffer_high_bytes:
            return False
        try:
            proto._h3.send_headers(self.stream_id, headers, end_stream=not body)
            self._response_started = True
            if body:
                proto._h3.send_data(self.stream_id, body, end_stream=True)
        except Exception as exc:  # aioquic: stream finished, reset or in a wrong state
            raise StreamReset(f"stream {self.stream_id} cannot send: {exc}") from exc
        self._local_ended = True
        proto._transmit_soon()
        proto._finish(self)
        return True

    # -- the DownstreamStream interface ---------------------------------------------

    async def read_body(self) -> bytes:
        """Next chunk of the request body; ``b""`` once it has ended."""
        while True:
            if self._reset_code is not None:
                raise StreamReset(f"stream {self.stream_id} was reset", self._reset_code)
            if self._body_error is not None:
                raise self._body_error
            if self._chunks:
                data = self._chunks.popleft()
                self._buffered_bytes -= len(data)
                self._proto._window_opened(self)
                return data
            if self._remote_ended:
                return b""
            waiter = self._proto._loop.create_future()
            self._read_waiter = waiter
            try:
                await waiter
            finally:
                self._read_waiter = None

    def body_complete(self) -> bool:
        return self._remote_ended and not self._chunks

    async def send_head(self, response: ResponseHead, end_stream: bool) -> None:
        self._check_open()
        try:
            self._proto._h3.send_headers(
                self.stream_id, _response_headers(response), end_stream=end_stream
            )
        except Exception as exc:  # aioquic: stream finished, reset or in a wrong state
            raise StreamReset(f"stream {self.stream_id} cannot send: {exc}") from exc
        if response.status >= 200:
            self._response_started = True
        if end_stream:
            self._local_ended = True
        self._proto._transmit_soon()

    async def send_response(self, response: ResponseHead, body: bytes) -> None:
        """A whole response in one go (the pipeline's fast path for small bodies)."""
        self._check_open()
        proto = self._proto
        try:
            proto._h3.send_headers(self.stream_id, _response_headers(response), end_stream=False)
            self._response_started = True
            proto._h3.send_data(self.stream_id, body, end_stream=True)
        except Exception as exc:
            raise StreamReset(f"stream {self.stream_id} cannot send: {exc}") from exc
        self._local_ended = True
        proto._transmit_soon()
        if len(body) > proto._settings.write_buffer_high_bytes:
            await self._wait_acknowledged()

    async def send_body(self, data: bytes, end_stream: bool) -> None:
        """Queue ``data``; awaits while more than the high-water mark is unacknowledged."""
        self._check_open()
        proto = self._proto
        high = proto._settings.write_buffer_high_bytes
        total = len(data)
        offset = 0
        try:
            if total == 0:
                if end_stream:
                    proto._h3.send_data(self.stream_id, b"", end_stream=True)
                    self._local_ended = True
                    proto._transmit_soon()
                return
            view = memoryview(data)
            while offset < total:
                self._check_open()
                end = min(total, offset + high)
                last = end == total
                proto._h3.send_data(
                    self.stream_id, bytes(view[offset:end]), end_stream=end_stream and last
                )
                offset = end
                proto._transmit_soon()
                if proto._unacknowledged(self.stream_id) > high:
                    await self._wait_acknowledged()
        except StreamReset:
            raise
        except Exception as exc:
            raise StreamReset(f"stream {self.stream_id} cannot send: {exc}") from exc
        if end_stream:
            self._local_ended = True

    async def send_trailers(self, headers: list[tuple[str, str]]) -> None:
        """End the response with trailers (gRPC status travels this way)."""
        self._check_open()
        fields = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers]
        try:
            self._proto._h3.send_headers(self.stream_id, fields, end_stream=True)
        except Exception as exc:
            raise StreamReset(f"stream {self.stream_id} cannot send: {exc}") from exc
        self._local_ended = True
        self._proto._transmit_soon()

    def reset(self, error_code: int = H3_INTERNAL_ERROR) -> None:
        """Abort the exchange (RESET_STREAM and STOP_SENDING); other streams go on."""
        if self._reset_code is None:
            self._proto._reset_stream(self, error_code)

    # -- called by H3Protocol ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._reset_code is not None:
            raise StreamReset(f"stream {self.stream_id} was reset", self._reset_code)

    def _abort(self, error_code: int) -> None:
        if self._reset_code is None:
            self._reset_code = error_code
        self._chunks.clear()
        self._buffered_bytes = 0
        _wake(self._read_waiter)
        _wake(self._send_waiter)
        canceller = self.canceller
        if canceller is not None:
            # The callback-driven exchange: no task will see the reset, so the
            # exchange ends here (flag DC, upstream connection closed) and so does
            # the stream.
            self.canceller = None
            canceller()
            self._proto._finish(self)

    async def _wait_acknowledged(self) -> None:
        proto = self._proto
        low = proto._settings.write_buffer_high_bytes // 4
        while proto._unacknowledged(self.stream_id) > low:
            self._check_open()
            waiter = proto._loop.create_future()
            self._send_waiter = waiter
            proto._send_blocked.add(self)
            try:
                await waiter
            finally:
                self._send_waiter = None
                proto._send_blocked.discard(self)
        self._check_open()


class H3Protocol(QuicConnectionProtocol):
    """One downstream QUIC connection carrying HTTP/3.

    Created by aioquic's ``QuicServer`` for each new connection (``QuicListener``),
    with the meshgate arguments bound by ``functools.partial``."""

    def __init__(
        self,
        quic: Any,
        stream_handler: Any = None,
        *,
        handler: RequestHandler,
        settings: ServerSettings,
        port: int,
        certificates: Sequence[QuicCertificate] = (),
        on_close: Callable[[H3Protocol], None] | None = None,
    ) -> None:
        super().__init__(quic, stream_handler)
        self._handler = handler
        # The pipeline's callback-driven entry (``Pipeline.start``), when it has one.
        self._fast_start = getattr(handler, "start", None)
        self._settings = settings
        self._port = port
        self._certificates = tuple(certificates)
        self.on_close = on_close
        self._h3: _H3Connection = None  # type: ignore[assignment]  # set on ALPN h3
        self._streams: dict[int, H3Stream] = {}
        self._send_blocked: set[H3Stream] = set()
        self._going_away = False
        self._goaway_stream_id = 0
        self._highest_stream_id = -4
        self._terminated = False
        self._peer = ""
        # Request streams refused before their head was decoded: what still arrives
        # on them is dropped before aioquic's HTTP/3 layer sees it.
        self._discarded: set[int] = set()
        # The rapid-reset guard's window (``_count_client_reset``).
        self._reset_window_start = 0.0
        self._window_resets = 0
        self._window_streams = 0
        self._tune(quic)

    # -- aioquic private parts, in one place ------------------------------------------

    def _tune(self, quic: Any) -> None:
        """The three places where aioquic offers no public knob; see the module notes."""
        # Streams a client may have open at once: QUIC's MAX_STREAMS credit, which
        # aioquic raises by one as each stream is fully closed.
        limit = quic._local_max_streams_bidi
        limit.value = limit.sent = self._settings.max_concurrent_streams
        # Receive windows that follow what the pipeline has read.
        original_limits = quic._write_stream_limits

        def write_stream_limits(builder: Any, space: Any, stream: Any) -> None:
            if stream.receiver._final_size is not None or not stream.max_stream_data_local:
                # The client has sent FIN (or a reset): it can send nothing more, so
                # more credit is useless, and RFC 9000 13.3 says to stop sending
                # MAX_STREAM_DATA. Without this, every bodiless request cost a frame
                # in the response's packet and an ack to track. No local window at
                # all: one of our own unidirectional streams, which the client never
                # sends on (aioquic's writer does nothing for those either). Tested
                # first, because aioquic calls this for every stream it still holds
                # on each packet it builds, and a finished request's stream stays
                # until the client has acknowledged the whole response: most calls
                # are for those.
                return
            h3_stream = self._streams.get(stream.stream_id)
            if h3_stream is not None:
                # What the client may send: everything received so far, less what
                # still waits to be read, plus one window.
                wanted = (
                    stream.receiver.highest_offset - h3_stream._buffered_bytes + STREAM_WINDOW_BYTES
                )
                if wanted > stream.max_stream_data_local:
                    stream.max_stream_data_local = wanted
                if stream.max_stream_data_local_sent == stream.max_stream_data_local:
                    return
                # aioquic only doubles the window when it is half used; ours has just
                # been set past that, so the original writer sends it unchanged.
                saved_highest = stream.receiver.highest_offset
                try:
                    stream.receiver.highest_offset = min(
                        saved_highest, stream.max_stream_data_local // 2
                    )
                    original_limits(builder=builder, space=space, stream=stream)
                finally:
                    stream.receiver.highest_offset = saved_highest
                return
            if stream.stream_id % 4 == 0:
                # A request stream whose HEADERS frame has not arrived whole (or
                # whose pipeline is done, and STOP_SENDING is on its way): it keeps
                # its first window. aioquic would double it as the partial frame
                # fills it, and buffers the frame until it is complete.
                return
            original_limits(builder=builder, space=space, stream=stream)

        quic._write_stream_limits = write_stream_limits
        # Always: even one certificate refuses a name it does not cover, like TCP.
        original_initialize = quic._initialize

        def initialize(peer_cid: bytes) -> None:
            original_initialize(peer_cid)
            self._choose_certificate_by_sni(quic.tls)

        quic._initialize = initialize

    def _choose_certificate_by_sni(self, tls: Any) -> None:
        original_hello = tls._server_handle_hello
        certificates = self._certificates

        def server_handle_hello(input_buf: Buffer, initial_buf: Buffer, hs_buf: Buffer) -> None:
            start = input_buf.tell()
            try:
                server_name = pull_client_hello(input_buf).server_name
            except Exception:  # malformed: the real handler reports it
                server_name = None
            input_buf.seek(start)
            chosen = choose_certificate(certificates, server_name.lower() if server_name else None)
            if chosen is None:
                # No Gateway server for this name: Envoy finds no filter chain and
                # refuses the connection; so does the TCP side of the port.
                raise AlertHandshakeFailure(f"no certificate for server name {server_name!r}")
            tls.certificate = chosen.certificate
            tls.certificate_chain = list(chosen.chain)
            tls.certificate_private_key = chosen.private_key
            original_hello(input_buf, initial_buf, hs_buf)

        tls._server_handle_hello = server_handle_hello

    def _drop_handshake_buffers(self) -> None:
        """Free aioquic's three TLS output buffers (16 KiB each, otherwise kept for
        the connection's life) once the handshake is complete: 48 KiB a connection.

        On a server, aioquic reports completion after the client's Finished has been
        handled and what TLS wrote in reply (the session ticket, at 1-RTT) has been
        moved into the crypto streams, which keep it for retransmission. From then on
        aioquic's TLS state machine writes nothing: a later handshake message is
        refused with an alert before any buffer is looked at. The buffers are only
        iterated, so an empty mapping is all aioquic needs."""
        self._quic._crypto_buffers = {}

    def _window_opened(self, stream: H3Stream) -> None:
        """The pipeline read body: when that frees a good part of a window, send the
        MAX_STREAM_DATA soon rather than with the next datagram, since a client that
        has used up its window sends nothing that would make us transmit."""
        quic_stream = self._quic._streams.get(stream.stream_id)
        if quic_stream is None:
            return
        wanted = quic_stream.receiver.highest_offset - stream._buffered_bytes + STREAM_WINDOW_BYTES
        if wanted - quic_stream.max_stream_data_local_sent >= STREAM_WINDOW_BYTES // 4:
            self._transmit_soon()

    def _unacknowledged(self, stream_id: int) -> int:
        """Response bytes queued with aioquic and not yet acknowledged by the client."""
        stream = self._quic._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    # -- asyncio / aioquic hooks --------------------------------------------------------

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not self._peer and isinstance(addr, tuple):
            self._peer = str(addr[0])
        self._quic.receive_datagram(data, addr, now=self._loop.time())
        self._process_events()
        # aioquic transmits after every datagram; a busy connection receives several
        # per event-loop turn, and one transmit after them all builds fewer, fuller
        # packets (one ACK for the lot, responses coalesced).
        self._transmit_soon()

    def transmit(self) -> None:
        super().transmit()
        if self._going_away and not self._streams and not self._terminated:
            self._close_when_delivered()
        if self._send_blocked:
            # Acknowledgements arrive with datagrams, and every datagram ends in a
            # transmit: the place to let waiting senders go on.
            low = self._settings.write_buffer_high_bytes // 4
            for stream in tuple(self._send_blocked):
                if stream._reset_code is not None or self._unacknowledged(stream.stream_id) <= low:
                    _wake(stream._send_waiter)

    def quic_event_received(self, event: quic_events.QuicEvent) -> None:
        if isinstance(event, quic_events.ProtocolNegotiated):
            if event.alpn_protocol in H3_ALPN and self._h3 is None:
                self._h3 = _H3Connection(self._quic, self._settings.max_request_header_bytes)
            return
        if isinstance(event, quic_events.ConnectionTerminated):
            self._connection_gone()
            return
        if isinstance(event, quic_events.HandshakeCompleted):
            self._drop_handshake_buffers()
        if isinstance(event, quic_events.StreamReset):
            self._discarded.discard(event.stream_id)
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                if not stream._local_ended:
                    # Our half must end too, or the QUIC stream (and the client's
                    # stream credit) is held until the connection ends: RFC 9114
                    # §4.1.1, a cancelled request's response is reset.
                    with contextlib.suppress(Exception):
                        self._quic.reset_stream(event.stream_id, H3_REQUEST_CANCELLED)
                    self._count_client_reset()
                stream._abort(event.error_code)
        elif isinstance(event, quic_events.StopSendingReceived):
            # The client will not read the response: aioquic resets our side.
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._abort(event.error_code)
        if self._h3 is None:
            return
        discarded = self._discarded
        if discarded and getattr(event, "stream_id", None) in discarded:
            if isinstance(event, quic_events.StreamDataReceived) and event.end_stream:
                discarded.discard(event.stream_id)
            return
        for h3_event in self._h3.handle_event(event):
            if isinstance(h3_event, DataReceived):
                self._on_data(h3_event)
            elif isinstance(h3_event, HeadersReceived):
                self._on_headers(h3_event)
        if (
            type(event) is quic_events.StreamDataReceived
            and event.stream_id % 4 == 0
            and event.stream_id not in self._streams
        ):
            self._check_partial_head(event.stream_id)

    def _check_partial_head(self, stream_id: int) -> None:
        """A request stream whose HEADERS frame aioquic is still buffering (it decodes
        a header block only once the whole frame is in): refused with
        H3_EXCESSIVE_LOAD once the frame says it is longer than the ceiling HTTP/2's
        decoder has (4 x ``max_request_header_bytes``, at least 64 KiB), without
        waiting for it. An encoder writes a field line in fewer bytes than the 32 +
        name + value it counts for (RFC 9114 §4.2.2), so such a block can only decode
        to a section over the limit; a smaller one over it still gets its 431 (Envoy
        resets a stream whose headers pass its limit). Runs only for a stream
        whose head has not been decoded: a request that fits in one packet, the
        usual case, costs one dictionary look-up here."""
        h3_stream = self._h3._stream.get(stream_id)
        if (
            h3_stream is None
            or h3_stream.frame_type != FrameType.HEADERS
            or h3_stream.frame_size is None
            or h3_stream.frame_size <= max(4 * self._settings.max_request_header_bytes, 65536)
        ):
            return
        logger.info(
            "refusing HTTP/3 stream %d from %s: HEADERS frame of %d bytes",
            stream_id,
            self._peer,
            h3_stream.frame_size,
        )
        del self._h3._stream[stream_id]
        if not h3_stream.receiving_ended:
            self._discarded.add(stream_id)
        self._refuse(stream_id, H3_EXCESSIVE_LOAD)

    def _count_client_reset(self) -> None:
        """Rapid reset guard (CVE-2023-44487), as over HTTP/2 and with its settings:
        a request reset by the client before its response ended cost a task and
        perhaps an upstream request, and QUIC hands the stream credit back as soon
        as both halves are closed. Within ``h2_reset_window_s``, more such resets
        than ``h2_max_premature_resets`` and more than half the streams opened
        close the connection with H3_EXCESSIVE_LOAD."""
        now = self._loop.time()
        settings = self._settings
        if now - self._reset_window_start > settings.h2_reset_window_s:
            self._reset_window_start = now
            self._window_resets = 0
            self._window_streams = 0
        self._window_resets += 1
        if (
            self._window_resets > settings.h2_max_premature_resets
            and self._window_resets * 2 > self._window_streams
        ):
            logger.warning(
                "closing HTTP/3 connection from %s: %d stream resets in %.0f s",
                self._peer,
                self._window_resets,
                settings.h2_reset_window_s,
            )
            self._connection_gone()
            self.close(H3_EXCESSIVE_LOAD)

    # -- requests -----------------------------------------------------------------------

    def _on_headers(self, event: HeadersReceived) -> None:
        stream_id = event.stream_id
        stream = self._streams.get(stream_id)
        if stream is not None:
            # A second HEADERS frame on a request stream carries trailers.
            stream.trailers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
            if event.stream_ended:
                self._remote_end(stream)
            return
        if stream_id > self._highest_stream_id:
            self._highest_stream_id = stream_id
        self._window_streams += 1
        if self._going_away and stream_id >= self._goaway_stream_id:
            self._refuse(stream_id, H3_REQUEST_REJECTED)
            return

        settings = self._settings
        method = path = authority = scheme = host = None
        host_count = 1
        content_length: bytes | None = None
        fields: list[tuple[str, str]] = []
        cookies: list[bytes] | None = None
        cookie_at = 0
        section_bytes = 0
        for name, value in event.headers:
            # RFC 9114 §4.2.2: a field counts its name, its value and 32 octets.
            section_bytes += len(name) + len(value) + 32
            if name[:1] == b":":  # aioquic has checked which pseudo-headers may appear
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                elif name == b":scheme":
                    scheme = value
            elif name == b"host":
                # Becomes the request's authority when :authority is absent; never
                # forwarded as a field of its own (the upstream head has one Host,
                # written from the authority, as for HTTP/1.1 clients).
                if host is not None:
                    host_count = 2
                host = value
            elif name == b"cookie":
                # RFC 9114 §4.2.1: crumbs are joined with "; " for HTTP/1.1 upstreams.
                if cookies is None:
                    cookies = []
                    cookie_at = len(fields)
                cookies.append(value)
            else:
                if name == b"content-length":
                    content_length = value
                fields.append((name.decode("latin-1"), value.decode("latin-1")))
        if cookies is not None:
            fields.insert(cookie_at, ("cookie", b"; ".join(cookies).decode("latin-1")))
        rejection: GatewayError | None = None
        problem = target_problem(method, path, authority)
        if problem is None and host is not None:
            # RFC 9114 §4.3.1: both present, they must agree (and Host only once).
            if host_count > 1:
                problem = "more than one host field"
            elif authority is not None and authority != host:
                problem = "host and :authority differ"
        if problem is not None:
            # Malformed (RFC 9114 §4.1.2): no route, no upstream; the pipeline answers
            # 400 (as §4.1.2 allows) and logs it, and the rest of the request is
            # refused with H3_MESSAGE_ERROR. No field but the pseudo-headers is kept.
            rejection = BadRequest(problem)
            fields = []
        elif (
            section_bytes > settings.max_request_header_bytes
            or len(fields) > settings.max_request_headers
        ):
            rejection = HeadersTooLarge(f"{len(fields)} fields, {section_bytes} bytes")
            fields = []
        elif (
            content_length is not None
            and content_length.isdigit()
            and int(content_length) > settings.max_request_body_bytes
        ):
            rejection = BodyTooLarge(f"content-length {int(content_length)}")

        raw_path = path.decode("latin-1") if path is not None else ""
        path_only, _, query = raw_path.partition("?")
        if authority is not None:
            authority_text = authority.decode("latin-1")
        else:
            authority_text = host.decode("latin-1") if host is not None else ""
        head = RequestHead(
            method=method.decode("latin-1") if method is not None else "",
            path=path_only,
            query=query,
            authority=authority_text,
            scheme=scheme.decode("latin-1") if scheme is not None else "https",
            headers=fields,
            http_version="3",
            port=self._port,
            peer=self._peer,
        )
        stream = H3Stream(self, stream_id, head)
        if content_length is not None and content_length.isdigit():
            stream._declared_length = int(content_length)
        if event.stream_ended:
            stream._remote_ended = True
        if rejection is not None:
            stream.rejection = stream._body_error = rejection
            if isinstance(rejection, BadRequest):
                stream._stop_code = H3_MESSAGE_ERROR
        self._streams[stream_id] = stream
        fast_start = self._fast_start
        if fast_start is not None and stream._remote_ended:
            # A request without a body: the pipeline runs it from callbacks and makes
            # a task only for what must wait (see ``Pipeline.start``).
            fast_start(stream)
            return
        stream._task = self._loop.create_task(self._run(stream, self._handler(stream)))

    def _on_data(self, event: DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream._reset_code is not None or stream._body_error is not None:
            return  # refused, answered or aborted: nobody reads it
        data = event.data
        if data:
            stream._received_bytes += len(data)
            declared = stream._declared_length
            if declared is not None and stream._received_bytes > declared:
                # More DATA than the Content-Length said (RFC 9114 §4.1.2: malformed).
                # aioquic checks only once the stream ends, after handing the data
                # over; a body forwarded with that Content-Length must never carry
                # the excess to the upstream, where it would read as another request.
                self._fail_body(stream, BadRequest("body longer than content-length"))
                return
            if stream._received_bytes > self._settings.max_request_body_bytes:
                self._reject_body(stream)
                return
            stream._chunks.append(data)
            stream._buffered_bytes += len(data)
        if event.stream_ended:
            self._remote_end(stream)
        else:
            _wake(stream._read_waiter)

    def _remote_end(self, stream: H3Stream) -> None:
        stream._remote_ended = True
        _wake(stream._read_waiter)

    async def _run(self, stream: H3Stream, step: Coroutine[Any, Any, None]) -> None:
        try:
            await step
        except StreamReset:
            pass
        except Exception:
            # The pipeline maps its own errors to responses; this is the backstop.
            logger.exception("request pipeline failed on HTTP/3 stream %d", stream.stream_id)
            if not self._terminated and stream._reset_code is None:
                if stream._response_started:
                    self._reset_stream(stream, H3_INTERNAL_ERROR)
                else:
                    self._respond_locally(stream.stream_id, 500, b"internal error\n")
                    stream._local_ended = True
                    stream._abort(H3_NO_ERROR)
        finally:
            self._finish(stream)

    def _finish(self, stream: H3Stream) -> None:
        self._streams.pop(stream.stream_id, None)
        self._send_blocked.discard(stream)
        if not self._terminated:
            if stream._reset_code is None:
                if not stream._local_ended:
                    # The pipeline returned without completing the response.
                    self._reset_stream(stream, H3_INTERNAL_ERROR)
                elif not stream._remote_ended:
                    # RFC 9114 §4.1: after a complete response the server may ask the
                    # client to stop sending the rest of the request (without error,
                    # unless the request was malformed).
                    self._stop_receiving(stream.stream_id, stream._stop_code)
            self._transmit_soon()

    def _reset_stream(self, stream: H3Stream, error_code: int) -> None:
        if not self._terminated:
            with contextlib.suppress(Exception):
                self._quic.reset_stream(stream.stream_id, error_code)
            self._stop_receiving(stream.stream_id, error_code)
            self._transmit_soon()
        stream._abort(error_code)

    def _stop_receiving(self, stream_id: int, error_code: int) -> None:
        # ValueError: the stream is already gone on aioquic's side.
        with contextlib.suppress(ValueError):
            self._quic.stop_stream(stream_id, error_code)

    def _refuse(self, stream_id: int, error_code: int) -> None:
        with contextlib.suppress(Exception):
            self._quic.reset_stream(stream_id, error_code)
        self._stop_receiving(stream_id, error_code)
        self._transmit_soon()

    def _reject_body(self, stream: H3Stream) -> None:
        """The body grew past ``max_request_body_bytes``."""
        limit = self._settings.max_request_body_bytes
        self._fail_body(stream, BodyTooLarge(f"body over {limit}"))

    def _fail_body(self, stream: H3Stream, error: GatewayError) -> None:
        """The body broke a rule midway: the pipeline's next read raises ``error``,
        which it answers (and logs) if its response has not begun; a response under
        way is reset instead. The rest of the body is refused."""
        malformed = isinstance(error, BadRequest)
        if stream._response_started or stream._local_ended:
            self._reset_stream(stream, H3_MESSAGE_ERROR if malformed else H3_REQUEST_CANCELLED)
            return
        stream._body_error = error
        if malformed:
            stream._stop_code = H3_MESSAGE_ERROR
        stream._chunks.clear()
        stream._buffered_bytes = 0
        _wake(stream._read_waiter)

    def _respond_locally(self, stream_id: int, status: int, body: bytes) -> None:
        """A short plain-text answer from the adapter itself; the rest of the request
        is refused with STOP_SENDING."""
        headers = [
            (b":status", str(status).encode("ascii")),
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
        try:
            self._h3.send_headers(stream_id, headers, end_stream=False)
            self._h3.send_data(stream_id, body, end_stream=True)
        except Exception:  # the stream is already finished or reset
            pass
        self._stop_receiving(stream_id, H3_NO_ERROR)
        self._transmit_soon()

    # -- closing ------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Graceful stop: GOAWAY naming the first stream we will not process; the
        streams already received finish, then the connection closes."""
        if self._terminated:
            return
        if not self._going_away:
            self._going_away = True
            self._goaway_stream_id = self._highest_stream_id + 4
            if self._h3 is not None:
                self._h3.send_goaway(self._goaway_stream_id)
            self.transmit()
        self._close_when_delivered()

    def _close_when_delivered(self) -> None:
        """After GOAWAY: close once no stream runs and every response has been
        acknowledged (CONNECTION_CLOSE discards whatever is still unsent)."""
        if self._streams or self._terminated:
            return
        for stream_id, quic_stream in self._quic._streams.items():
            if stream_id % 4 == 0 and not quic_stream.sender.is_finished:
                return
        self._connection_gone()  # first: close() transmits, which would come back here
        self.close(H3_NO_ERROR)

    def abort(self) -> None:
        """Stop now: CONNECTION_CLOSE, every stream's pipeline sees StreamReset."""
        if self._terminated:
            return
        self._connection_gone()
        self.close(H3_NO_ERROR)

    @property
    def active_streams(self) -> int:
        """Streams whose pipeline task is still running."""
        return len(self._streams)

    def _connection_gone(self) -> None:
        if self._terminated:
            return
        self._terminated = True
        for stream in tuple(self._streams.values()):
            stream._abort(H3_REQUEST_CANCELLED)
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close(self)


# --------------------------------------------------------------------------- listener


class QuicListener:
    """One UDP socket serving HTTP/3, and its live connections."""

    def __init__(
        self,
        handler: RequestHandler,
        settings: ServerSettings,
        certificates: Sequence[QuicCertificate],
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.certificates = tuple(certificates)
        self.configuration = quic_configuration(self.certificates, settings)
        self.port = 0
        self.server: QuicServer | None = None
        self.connections: set[H3Protocol] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._advertised = False
        self._stopped = False
        self.sweeper = SWEEPER
        self.sweep_after_s = SWEEP_AFTER_S
        self.sweeper.watch(self._quiet)

    def _create_protocol(self, quic: Any, stream_handler: Any = None) -> H3Protocol:
        """aioquic's ``create_protocol``: one ``H3Protocol`` per new connection."""
        proto = H3Protocol(
            quic,
            stream_handler,
            handler=self.handler,
            settings=self.settings,
            port=self.port,
            certificates=self.certificates,
            on_close=self._closed,
        )
        self.connections.add(proto)
        self._idle.clear()
        return proto

    def _closed(self, proto: H3Protocol) -> None:
        self.connections.discard(proto)
        if not self.connections:
            self._idle.set()
            # aioquic's connection objects are reference cycles (its loss recovery
            # holds a bound method of the connection): without a full collection the
            # memory of every QUIC connection that has ended stays, and the next
            # ones grow past it. Once the listener has had no connection for a
            # moment, collect and trim.
            self.sweeper.idle(self._quiet, self.sweep_after_s)

    def _quiet(self) -> bool:
        return not self.connections and not self._stopped

    def attach(self, transport: asyncio.DatagramTransport) -> None:
        """Serve on a socket bound already (``gateway.server.quicports``): from now on
        its datagrams go to this listener's QUIC server."""
        server = QuicServer(configuration=self.configuration, create_protocol=self._create_protocol)
        server.connection_made(transport)
        transport.set_protocol(server)
        self.server = server

    def update_certificates(self, certificates: Sequence[QuicCertificate]) -> None:
        """New connections use these (a certificate rotated on disk); open ones keep theirs."""
        if not certificates:
            raise ValueError("a QUIC listener needs at least one certificate")
        default = certificates[0]
        # aioquic's server hands this same configuration object to every new connection.
        self.configuration.certificate = default.certificate
        self.configuration.certificate_chain = list(default.chain)
        self.configuration.private_key = default.private_key
        self.certificates = tuple(certificates)

    async def stop(self, drain_s: float = 5.0) -> None:
        """Stop advertising, send GOAWAY, let streams finish (at most ``drain_s``),
        then close whatever is left and the socket."""
        if self._stopped:
            return
        self._stopped = True
        self.sweeper.forget(self._quiet)
        if self._advertised:
            self._advertised = False
            altsvc.withdraw(self.port)
        for proto in tuple(self.connections):
            proto.shutdown()
        if self.connections:
            try:
                async with asyncio.timeout(drain_s):
                    await self._idle.wait()
            except TimeoutError:
                pass
        for proto in tuple(self.connections):
            proto.abort()
        if self.server is not None:
            # Sends CONNECTION_CLOSE for whatever it still tracks, closes the socket.
            self.server.close()
