"""The HTTP/2 downstream adapter: h2 (sans-IO) on a raw asyncio transport.

Owns one client connection speaking HTTP/2, whichever way it got there: an h2-only
listener (this class is the protocol factory; the same class serves TLS with ALPN
``h2``), prior knowledge detected by the HTTP/1.1 adapter
(``take_over_prior_knowledge``), or an ``Upgrade: h2c`` request
(``take_over_upgrade``). Each stream becomes a ``RequestHead`` plus a
``DownstreamStream`` handed to the request pipeline in a task of its own; the
pipeline never sees an h2 object.

What this module does:

- flow control both ways: request DATA is acknowledged to the client only as the
  pipeline reads it (so a slow upstream slows the client down and memory stays
  bounded by the windows below), and response bodies wait for the client's window
  and for the transport's write buffer to drain;
- the limits of ``ServerSettings``: concurrent streams (advertised, and refused per
  stream beyond), header list size and count (431), body size (413), idle time;
- protection against rapid reset (CVE-2023-44487): a client that resets too many
  unanswered streams, or makes the server reset them ("MadeYouReset"), is sent GOAWAY
  ENHANCE_YOUR_CALM;
- protection against frame floods, with Envoy's limits (``_H2Connection``): empty DATA
  frames, PRIORITY and WINDOW_UPDATE floods, and header blocks (HEADERS plus
  CONTINUATION frames) that grow past the decoder's ceiling before they end, all closed
  with GOAWAY ENHANCE_YOUR_CALM; a closing connection whose client reads nothing is
  dropped after ``h2_delayed_close_timeout_s``;
- Envoy's stream idle timeout (``stream_idle_timeout_s``): a stream that waits on its
  client (request DATA, or window and buffer room for its response) without progress
  is answered 408/504 before its response head and reset (RST_STREAM NO_ERROR, as
  Envoy's local reset) after it, logged with flag SI; the connection stays. One timer
  per connection, armed only while some stream waits;
- refusals (a malformed block, 431, 413) reach the pipeline only as a stream whose
  ``rejection`` is set, so they are answered, logged and counted like any request; a
  malformed block then ends the connection (GOAWAY PROTOCOL_ERROR);
- graceful shutdown (``close(graceful=True)``): GOAWAY, then open streams finish.

What it leaves to others: routing, header rewriting and error pages (the pipeline),
the listening socket and TLS (the listeners), detecting the preface or an upgrade
request on a plaintext port (the HTTP/1.1 adapter).

h2 configuration, chosen for the hot path:

- ``header_encoding=None``: header blocks stay ``bytes``; we decode them once, as
  latin-1, while building the ``RequestHead``.
- ``validate_inbound_headers=False``: the same RFC 9113 checks (upper-case names,
  control characters, connection-specific fields, bad pseudo-headers: what must never
  be forwarded into an HTTP/1.1 upstream) are made in one pass by ``h2fields``,
  cheaper than h2's chain of generators.
- ``normalize_inbound_headers=False``: its only job is joining cookie crumbs, which
  we do in the same pass that builds the head.
- ``validate_outbound_headers=False``, ``normalize_outbound_headers=False``: the
  response headers come from our pipeline; ``_response_headers`` lower-cases them and
  drops connection-specific fields itself, in one pass instead of h2's chain of
  generators.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.connection import ConnectionInputs
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from h2.stream import StreamInputs
from hpack import Decoder
from hpack.exceptions import HPACKDecodingError, OversizedHeaderListError
from hpack.table import HeaderTable
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import ContinuationFrame, Frame, GoAwayFrame, HeadersFrame

from ..errors import BadRequest, BodyTooLarge, GatewayError, HeadersTooLarge, StreamIdleTimeout
from .events import RequestHandler, RequestHead, ResponseHead, StreamReset
from .h2fields import request_problem, target_problem, trailers_problem
from .hpackenc import ResponseEncoder
from .settings import ServerSettings

__all__ = ["H2Protocol", "H2Stream", "take_over_prior_knowledge", "take_over_upgrade"]

logger = logging.getLogger(__name__)

# Receive windows. A stream may have at most this much request body buffered and
# unacknowledged; the connection window caps the sum over all its streams, so the
# memory one client can make us hold is bounded by the connection window.
STREAM_WINDOW_BYTES = 256 * 1024
CONNECTION_WINDOW_BYTES = 1024 * 1024
_PROTOCOL_DEFAULT_WINDOW = 65_535

# Fields that describe one hop of an HTTP/1.1 connection; RFC 9113 §8.2.2 forbids
# them in HTTP/2, so they are dropped if the pipeline passes them along.
_CONNECTION_FIELDS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
# What an h2c upgrade request carries for the upgrade itself (RFC 7540 §3.2).
_UPGRADE_FIELDS = _CONNECTION_FIELDS | {"http2-settings", "te"}


class _AdvertisedSettings(h2.settings.Settings):
    """Local settings that advertise our limits while h2 enforces a looser ceiling.

    h2 answers a client going over MAX_CONCURRENT_STREAMS with a connection error;
    RFC 9113 §5.1.2 allows (and clients expect) refusing just the extra stream with
    REFUSED_STREAM, which we do ourselves. h2 keeps a ceiling above ours as a
    backstop."""

    def __init__(self, ceiling_streams: int, **kwargs: Any) -> None:
        self._ceiling_streams = ceiling_streams
        super().__init__(**kwargs)

    @property
    def max_concurrent_streams(self) -> int:
        return self._ceiling_streams

    @max_concurrent_streams.setter
    def max_concurrent_streams(self, value: int) -> None:
        self[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = value


# Frame types and flags (RFC 9113 §6) for the frames ``send_whole_response`` writes.
_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9
_END_STREAM, _END_HEADERS = 0x1, 0x4
_FRAME_HEAD = struct.Struct(">HBBBL")


def _frame_head(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    """The 9-octet frame header: 24-bit length, type, flags, 31-bit stream id."""
    return _FRAME_HEAD.pack(length >> 8, length & 0xFF, kind, flags, stream_id)


def _header_ceiling_bytes(settings: ServerSettings) -> int:
    """How large a header block may get before it is an attack rather than a request
    to answer 431: the HPACK decoder's ceiling, and the bound on the encoded block."""
    return max(settings.max_request_header_bytes * 4, 64 * 1024)


class _HeaderBlockBuffer(FrameBuffer):
    """h2's frame buffer, with a bound on a header block still waiting for its
    END_HEADERS (CONTINUATION flood, CVE-2024-27316 class).

    h2 buffers the HEADERS frame and its CONTINUATION frames until the last one
    arrives, and only counts frames: 64 of them, up to 1 MiB at the default frame size
    (and twice that while it joins them), before anything is decoded or checked against
    a limit. Here the block's encoded bytes are counted as each frame arrives, and a
    block past the decoder's ceiling (``_header_ceiling_bytes``) is refused at once: an
    encoded block is never much larger than what it decodes to, so such a block could
    only have been refused after decoding. Two empty CONTINUATION frames in a row are a
    flood as Envoy counts one (``h2_max_consecutive_empty_frames``). Both raise h2's
    ``DenialOfServiceError``: GOAWAY ENHANCE_YOUR_CALM."""

    def __init__(self, max_block_bytes: int, max_empty_frames: int) -> None:
        super().__init__(server=True)
        self._max_block_bytes = max_block_bytes
        self._max_empty_frames = max_empty_frames
        self._block_bytes = 0
        self._empty_frames = 0

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if self._headers_buffer:
            if isinstance(f, ContinuationFrame):  # anything else: h2 raises below
                size = len(f.data)
                self._block_bytes += size
                if self._block_bytes > self._max_block_bytes:
                    msg = f"header block over {self._max_block_bytes} bytes before its end"
                    raise h2.exceptions.DenialOfServiceError(msg)
                self._empty_frames = 0 if size else self._empty_frames + 1
                if self._empty_frames > self._max_empty_frames:
                    msg = f"{self._empty_frames} empty CONTINUATION frames in a row"
                    raise h2.exceptions.DenialOfServiceError(msg)
        elif type(f) is HeadersFrame:
            self._block_bytes = len(f.data)
            self._empty_frames = 0
        return super()._update_header_buffer(f)


class _H2Connection(h2.connection.H2Connection):
    """h2's connection with a shorter memory of closed streams, and Envoy's guards
    against frame floods.

    h2 remembers how each of the last 65,536 closed streams of a connection was
    closed, to tell a late frame on a stream it reset (answered with RST_STREAM) from
    a protocol error. That record is about 230 bytes a stream: 14.8 MB for one busy
    long-lived connection once it has carried 65,536 requests. Late frames can only
    be those in flight when the stream closed, and a client has at most
    ``max_concurrent_streams`` streams open, so ten times that (at least 1,024)
    is plenty.

    The flood guards count frames that cost a client nine octets each and us a trip
    through h2 (Envoy's ``http2_protocol_options`` of the same names, with its
    defaults; ``ServerSettings.h2_max_*``). They count frames as they arrive, before h2
    looks up their stream, so frames on closed streams count too:

    - consecutive DATA frames with no payload and no END_STREAM (a non-empty DATA
      frame, or a request or trailer block, starts the count again);
    - PRIORITY frames: at most ``h2_max_priority_frames_per_stream`` per stream opened,
      plus one stream's worth;
    - WINDOW_UPDATE frames: at most 5 + 2 * (streams opened + ``h2_max_window_updates_
      per_data_frame`` * DATA frames sent): a client acknowledges what it is sent, and
      has nothing else to acknowledge.

    Going over one raises h2's ``DenialOfServiceError``: h2 queues GOAWAY
    ENHANCE_YOUR_CALM and the adapter closes the connection. ``streams_opened`` is
    counted by the adapter, once per request block."""

    def __init__(
        self,
        config: h2.config.H2Configuration,
        max_concurrent_streams: int,
        settings: ServerSettings | None = None,
    ) -> None:
        self.MAX_CLOSED_STREAMS = max(1024, 10 * max_concurrent_streams)
        super().__init__(config)
        settings = settings or ServerSettings()
        self._max_empty_frames = settings.h2_max_consecutive_empty_frames
        self._max_priority_per_stream = settings.h2_max_priority_frames_per_stream
        self._max_updates_per_data = settings.h2_max_window_updates_per_data_frame
        self.empty_frames = 0
        self.priority_frames = 0
        self.window_updates = 0
        self.streams_opened = 0
        self.data_frames_sent = 0
        if not config.client_side:
            self.incoming_buffer = _HeaderBlockBuffer(
                _header_ceiling_bytes(settings), self._max_empty_frames
            )

    @classmethod
    def for_server(
        cls, max_concurrent_streams: int, settings: ServerSettings | None = None
    ) -> _H2Connection:
        """The server side as the adapter runs it: header blocks stay bytes, h2's
        field checks and normalisation are off (the same checks are made in one pass
        by ``_on_request`` / ``_on_trailers``), and responses are HPACK-encoded by
        ``ResponseEncoder`` (the same HPACK, cheaper)."""
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        conn = cls(config, max_concurrent_streams, settings)
        conn.encoder = ResponseEncoder()  # type: ignore[assignment]
        return conn

    # -- flood guards (see the class docstring) -----------------------------------------

    def _receive_data_frame(self, frame: Any) -> Any:
        if frame.data:  # the payload without its padding
            self.empty_frames = 0
        elif "END_STREAM" not in frame.flags:
            self.empty_frames += 1
            if self.empty_frames > self._max_empty_frames:
                msg = f"{self.empty_frames} empty DATA frames in a row"
                raise h2.exceptions.DenialOfServiceError(msg)
        return super()._receive_data_frame(frame)

    def _receive_priority_frame(self, frame: Any) -> Any:
        # h2 also comes here for a HEADERS frame carrying priority; that frame opens a
        # stream, which raises the limit far more than it counts.
        self.priority_frames += 1
        if self.priority_frames > self._max_priority_per_stream * (1 + self.streams_opened):
            msg = f"{self.priority_frames} PRIORITY frames for {self.streams_opened} streams"
            raise h2.exceptions.DenialOfServiceError(msg)
        return super()._receive_priority_frame(frame)

    def _receive_window_update_frame(self, frame: Any) -> Any:
        self.window_updates += 1
        if self.window_updates > 5 + 2 * (
            self.streams_opened + self._max_updates_per_data * self.data_frames_sent
        ):
            msg = (
                f"{self.window_updates} WINDOW_UPDATE frames for "
                f"{self.data_frames_sent} DATA frames sent"
            )
            raise h2.exceptions.DenialOfServiceError(msg)
        return super()._receive_window_update_frame(frame)

    def send_data(
        self,
        stream_id: int,
        data: bytes | memoryview,
        end_stream: bool = False,
        pad_length: Any = None,
    ) -> None:
        self.data_frames_sent += 1
        super().send_data(stream_id, data, end_stream, pad_length)

    def send_whole_response(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """What ``send_headers`` and then ``send_data(..., end_stream=True)`` do (or
        ``send_headers(..., end_stream=True)`` alone for an empty body), for a final
        response whose body the caller has checked fits the stream's window and one
        frame: the same state-machine inputs in the same order, the same HPACK
        encoding, frames and window accounting, without h2's per-call header
        re-encoding, validation flags and frame objects (about a sixth of an
        HTTP/2 request's instructions). ``headers`` are lower-case bytes, ``:status``
        first and not 1xx, as ``H2Stream`` builds them. A property test holds the
        bytes and state to h2's own two calls."""
        stream = self._get_stream_by_id(stream_id)  # StreamClosedError as h2 raises it
        size = len(body)
        self.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
        machine = stream.state_machine
        machine.process_input(StreamInputs.SEND_HEADERS)
        block = self.encoder.encode(headers)
        if not size:
            machine.process_input(StreamInputs.SEND_END_STREAM)
        max_frame = self.max_outbound_frame_size
        flags = _END_HEADERS | (0 if size else _END_STREAM)
        if len(block) <= max_frame:
            out = [_frame_head(len(block), _HEADERS, flags, stream_id), block]
        else:
            # HEADERS then CONTINUATION frames; END_STREAM on the first, END_HEADERS
            # on the last (RFC 9113 §6.2, §6.10).
            chunks = [block[i : i + max_frame] for i in range(0, len(block), max_frame)]
            last = len(chunks) - 1
            out = []
            for i, chunk in enumerate(chunks):
                kind = _HEADERS if i == 0 else _CONTINUATION
                bits = (_END_HEADERS if i == last else 0) | (
                    _END_STREAM if i == 0 and not size else 0
                )
                out.append(_frame_head(len(chunk), kind, bits, stream_id))
                out.append(chunk)
        if size:
            self.state_machine.process_input(ConnectionInputs.SEND_DATA)
            machine.process_input(StreamInputs.SEND_DATA)
            machine.process_input(StreamInputs.SEND_END_STREAM)
            stream.outbound_flow_control_window -= size
            self.data_frames_sent += 1
            out.append(_frame_head(size, _DATA, _END_STREAM, stream_id))
            out.append(body)
            self.outbound_flow_control_window -= size
        self._data_to_send += b"".join(out)


# hpack's static table by HPACK index (1-based; index 0 is never looked up here).
_STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = ((b"", b""), *HeaderTable.STATIC_TABLE)
_STATIC_LENGTH = len(HeaderTable.STATIC_TABLE)


class _CeilingDecoder(Decoder):
    """An HPACK decoder whose list-size limit stays at a fixed ceiling.

    h2 sets the decoder's limit to the advertised MAX_HEADER_LIST_SIZE once the client
    acknowledges it, and going over it then kills the connection. We would rather
    answer 431 on the one stream (the decoder state is intact after a complete block),
    so the decoder only stops blocks far beyond the advertised size: those are HPACK
    bombs and do get GOAWAY ENHANCE_YOUR_CALM."""

    def __init__(self, ceiling_bytes: int) -> None:
        self._ceiling_bytes = ceiling_bytes
        super().__init__(ceiling_bytes)

    @property  # type: ignore[override]
    def max_header_list_size(self) -> int:
        return self._ceiling_bytes

    @max_header_list_size.setter
    def max_header_list_size(self, value: int) -> None:
        pass  # the advertised value is enforced per stream, in H2Protocol._on_request

    def decode(self, data: bytes, raw: bool = False) -> list[Any]:  # type: ignore[override]
        """hpack's ``decode`` (h2 calls it with ``raw=True``), with a shortcut for the
        commonest field of a request block: one indexed by a single octet (a client's
        repeated ``:method``, ``:path``, ``:authority``, ``user-agent``...), looked up
        directly instead of through hpack's integer decoder, a memoryview slice, a
        HeaderTuple and two debug-log calls. Every other representation goes
        through hpack's own methods, in the same order and with the same checks and
        errors as its ``decode``; a property test holds the two to the same fields,
        table state and errors. Indexed fields come back as plain tuples."""
        if not raw:
            return list(super().decode(data, raw))
        headers: list[Any] = []
        static = _STATIC_TABLE
        lookup = self.header_table.get_by_index
        limit = self.max_header_list_size
        inflated = 0
        at = 0
        end = len(data)
        view: memoryview | None = None
        while at < end:
            first = data[at]
            if 0x80 < first < 0xFF:
                index = first & 0x7F
                header = static[index] if index <= _STATIC_LENGTH else lookup(index)
                at += 1
            else:
                if view is None:
                    view = memoryview(data)
                if first & 0x80:  # 0x80 (index 0, an error) or an index of several octets
                    header, consumed = self._decode_indexed(view[at:])
                elif first & 0x40:
                    header, consumed = self._decode_literal_index(view[at:])
                elif first & 0x20:
                    if headers:
                        msg = "Table size update not at the start of the block"
                        raise HPACKDecodingError(msg)
                    at += self._update_encoding_context(view[at:])
                    continue
                else:
                    header, consumed = self._decode_literal_no_index(view[at:])
                at += consumed
            headers.append(header)
            inflated += 32 + len(header[0]) + len(header[1])
            if inflated > limit:
                msg = f"A header list larger than {limit} has been received"
                raise OversizedHeaderListError(msg)
        self._assert_valid_table_size()
        return headers


# What a stream's ``_idle_error`` becomes once the pipeline has been told.
_IDLE_DELIVERED = StreamIdleTimeout("stream idle timeout already reported")


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


_LOGGED_PSEUDO = frozenset((b":method", b":path", b":authority"))

_STATUS = {code: str(code).encode("ascii") for code in range(200, 600)}


def _response_headers(response: ResponseHead) -> list[tuple[bytes, bytes]]:
    """``:status`` plus the pipeline's headers, lower-cased, connection fields dropped."""
    out = [(b":status", str(response.status).encode("ascii"))]
    nominated: frozenset[str] = frozenset()
    for name, value in response.headers:
        lowered = name.lower()
        if lowered == "connection":
            # Fields the upstream named in Connection are hop-by-hop too.
            nominated = nominated | {t.strip().lower() for t in value.split(",")}
    for name, value in response.headers:
        lowered = name.lower()
        if lowered in _CONNECTION_FIELDS or lowered in nominated or lowered[:1] == ":":
            continue
        out.append((lowered.encode("latin-1"), value.encode("latin-1")))
    return out


class H2Stream:
    """One HTTP/2 stream as a ``DownstreamStream`` (see ``gateway.server.events``).

    Request DATA sits in a small per-stream deque until ``read_body`` takes it; only
    then is it acknowledged, which is what lets the client send more. ``send_body``
    cuts the response into frames that fit the peer's window and max frame size."""

    __slots__ = (
        "_body_error",
        "_chunks",
        "_idle_error",
        "_local_ended",
        "_proto",
        "_read_waiter",
        "_received_bytes",
        "_remote_ended",
        "_reset_code",
        "_response_started",
        "_send_waiter",
        "_stalled_at",
        "_task",
        "_unacked_bytes",
        "canceller",
        "head",
        "rejection",
        "stream_id",
        "trailers",
    )

    def __init__(self, proto: H2Protocol, stream_id: int, head: RequestHead) -> None:
        self.head = head
        self.stream_id = stream_id
        # Read by ``Pipeline.start``: a request the adapter refuses is still handed
        # over, so that it is answered, logged (flag DPE) and counted like any other.
        self.rejection: GatewayError | None = None
        # Raised by ``read_body`` once the body broke a rule midway (too large).
        self._body_error: GatewayError | None = None
        self.trailers: list[tuple[str, str]] | None = None  # request trailers, if any
        self._proto = proto
        self._chunks: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length)
        self._unacked_bytes = 0  # flow-controlled bytes held in _chunks
        self._received_bytes = 0
        self._remote_ended = False
        self._local_ended = False
        self._response_started = False  # a final (non-1xx) head went out
        self._reset_code: int | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._send_waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        # Stream idle timeout: when the current wait on the client began (0.0: not
        # waiting on it); once it timed out, the error the next wake-up raises, then
        # ``_IDLE_DELIVERED``. Two stores: all a stream that never waits pays.
        self._stalled_at = 0.0
        self._idle_error: StreamIdleTimeout | None = None
        # Set while the pipeline's callback-driven exchange waits on the upstream
        # with no task of its own: called if the stream dies meanwhile.
        self.canceller: Callable[[], None] | None = None

    # The response cannot take an upstream's HTTP/1.1 header lines as they are.
    raw_lines = False
    # No Upgrade tunnel over HTTP/2 (``UpstreamStage.start`` asks).
    tunnel = None

    # -- the DownstreamStream interface ---------------------------------------------

    async def read_body(self) -> bytes:
        """Next chunk of the request body; ``b""`` once it has ended.

        Raises ``StreamReset`` if the stream was reset or the connection went away."""
        while True:
            if self._reset_code is not None:
                raise StreamReset(f"stream {self.stream_id} was reset", self._reset_code)
            if self._body_error is not None:
                raise self._body_error
            if self._chunks:
                data, flow_bytes = self._chunks.popleft()
                self._unacked_bytes -= flow_bytes
                self._proto._acknowledge(self.stream_id, flow_bytes)
                return data
            if self._remote_ended:
                return b""
            waiter = self._proto._loop.create_future()
            self._read_waiter = waiter
            # Every wake-up of a read is progress (data, its end, a reset): restamp.
            self._stall()
            try:
                await waiter
            finally:
                self._read_waiter = None
                self._stalled_at = 0.0
            self._raise_if_idle()

    def body_complete(self) -> bool:
        return self._remote_ended and not self._chunks

    def run(self, step: Coroutine[Any, Any, None]) -> None:
        """Run the rest of this request's handling in a task (``Pipeline.start``)."""
        proto = self._proto
        self._task = proto._loop.create_task(proto._run(self, step))

    def write_response(self, response: ResponseHead, body: bytes) -> bool:
        """The whole response now, without a coroutine, when the client's window and
        the transport let it go in one go; False, having sent nothing, otherwise (the
        caller then sends it with ``send_response``). For the callback-driven
        exchange, which has no task: a stream written here is finished here."""
        return self._write_now(_response_headers(response), body)

    def write_fields(self, status: int, fields: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """``write_response`` for a head already in lower-case byte fields, free of
        connection-specific ones (an upstream's, passed through)."""
        code = _STATUS.get(status)
        if code is None:
            code = str(status).encode("ascii")
        return self._write_now([(b":status", code), *fields], body)

    def _write_now(self, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        if not self._send_now(headers, body):
            return False
        self._proto._finish(self)
        return True

    def _send_now(self, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """Head and whole body in one go, if the windows and the transport allow."""
        proto = self._proto
        if self._reset_code is not None or proto._write_paused:
            return False
        conn = proto._conn
        stream_id = self.stream_id
        size = len(body)
        if size and (
            size > conn.local_flow_control_window(stream_id) or size > conn.max_outbound_frame_size
        ):
            return False
        try:
            conn.send_whole_response(stream_id, headers, body)
            if size:
                proto._queued(size)
        except h2.exceptions.StreamClosedError as exc:
            raise StreamReset(f"stream {stream_id} is closed", self._code()) from exc
        self._response_started = True
        self._local_ended = True
        proto._schedule_flush()
        return True

    async def send_response(self, response: ResponseHead, body: bytes) -> None:
        """Head and whole body (``RequestContext.send_whole``)."""
        if response.status >= 200 and self._send_now(_response_headers(response), body):
            return
        await self.send_head(response, not body)
        if body:
            await self.send_body(body, True)

    async def send_head(self, response: ResponseHead, end_stream: bool) -> None:
        """Send response headers (a 1xx may come before the final head)."""
        self._check_open()
        proto = self._proto
        if proto._write_paused:
            self._stall()
            await self._wait_writable()
            self._stalled_at = 0.0
            self._check_open()
        try:
            proto._conn.send_headers(
                self.stream_id, _response_headers(response), end_stream=end_stream
            )
        except h2.exceptions.StreamClosedError as exc:
            raise StreamReset(f"stream {self.stream_id} is closed", self._code()) from exc
        if response.status >= 200:
            self._response_started = True
        if end_stream:
            self._local_ended = True
        proto._schedule_flush()

    async def send_body(self, data: bytes, end_stream: bool) -> None:
        """Send ``data`` in frames the client's window allows; awaits window updates
        and a drained transport buffer, so memory stays bounded while it is slow."""
        self._check_open()
        proto = self._proto
        conn = proto._conn
        stream_id = self.stream_id
        total = len(data)
        try:
            if total == 0:
                if end_stream:
                    conn.end_stream(stream_id)
                    self._local_ended = True
                    proto._schedule_flush()
                return
            view = memoryview(data)
            offset = 0
            # A stall lasts until a frame goes out: a wake-up that brings no room (a
            # WINDOW_UPDATE for the connection or another stream) is not progress.
            stalled = False
            while offset < total:
                if self._reset_code is not None:
                    raise StreamReset(f"stream {stream_id} was reset", self._reset_code)
                if proto._write_paused:
                    if not stalled:
                        stalled = self._stall()
                    await self._wait_writable()
                    continue
                window = conn.local_flow_control_window(stream_id)
                if window <= 0:
                    if not stalled:
                        stalled = self._stall()
                    await self._wait_window()
                    continue
                size = min(total - offset, window, conn.max_outbound_frame_size)
                end = offset + size
                conn.send_data(stream_id, view[offset:end], end_stream=end_stream and end == total)
                offset = end
                proto._queued(size)
                if stalled:
                    stalled = False
                    self._stalled_at = 0.0
        except h2.exceptions.StreamClosedError as exc:
            raise StreamReset(f"stream {stream_id} is closed", self._code()) from exc
        if end_stream:
            self._local_ended = True

    async def send_trailers(self, headers: list[tuple[str, str]]) -> None:
        """End the response with trailers (gRPC status travels this way)."""
        self._check_open()
        fields = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers]
        try:
            self._proto._conn.send_headers(self.stream_id, fields, end_stream=True)
        except h2.exceptions.StreamClosedError as exc:
            raise StreamReset(f"stream {self.stream_id} is closed", self._code()) from exc
        self._local_ended = True
        self._proto._schedule_flush()

    def reset(self, error_code: int = ErrorCodes.INTERNAL_ERROR) -> None:
        """Abort the exchange with RST_STREAM; other streams carry on."""
        if self._reset_code is not None:
            return
        self._proto._reset_stream(self, error_code)

    # -- called by H2Protocol ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._reset_code is not None:
            raise StreamReset(f"stream {self.stream_id} was reset", self._reset_code)

    def _code(self) -> int:
        return self._reset_code if self._reset_code is not None else ErrorCodes.STREAM_CLOSED

    def _abort(self, error_code: int) -> None:
        """Mark the stream dead and wake whoever waits on it (they raise StreamReset)."""
        if self._reset_code is None:
            self._reset_code = error_code
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

    async def _wait_window(self) -> None:
        proto = self._proto
        waiter = proto._loop.create_future()
        self._send_waiter = waiter
        proto._window_blocked.add(self)
        try:
            await waiter
        finally:
            self._send_waiter = None
            proto._window_blocked.discard(self)
        self._raise_if_idle()

    async def _wait_writable(self) -> None:
        """Wait for the transport to drain; as ``_send_waiter``, so that the stream
        idle timeout can wake this stream alone."""
        proto = self._proto
        waiter = proto._loop.create_future()
        self._send_waiter = waiter
        proto._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            self._send_waiter = None
        self._raise_if_idle()

    def _stall(self) -> bool:
        """This stream starts waiting on the client (slow path only)."""
        proto = self._proto
        self._stalled_at = proto._loop.time()
        if proto._stall_handle is None:
            proto._watch_stalls()
        return True

    def _raise_if_idle(self) -> None:
        error = self._idle_error
        if error is not None and error is not _IDLE_DELIVERED:
            self._idle_error = _IDLE_DELIVERED
            raise error


class H2Protocol(asyncio.Protocol):
    """One downstream HTTP/2 connection.

    Usable directly as the protocol factory of an h2-only listener (plaintext prior
    knowledge or TLS with ALPN ``h2``), or handed a connection by the HTTP/1.1 adapter
    through ``take_over_prior_knowledge`` / ``take_over_upgrade``."""

    def __init__(
        self,
        handler: RequestHandler,
        settings: ServerSettings,
        port: int,
        scheme: str,
        peer: str,
    ) -> None:
        self._handler = handler
        self._fast_start = getattr(handler, "start", None)
        self._settings = settings
        self._port = port
        self._scheme = scheme
        self._peer = peer
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, H2Stream] = {}
        self._window_blocked: set[H2Stream] = set()
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._write_paused = False
        self._flush_scheduled = False
        self._queued_bytes = 0
        self._closed = False  # the transport is closed or closing
        self._going_away = False  # GOAWAY sent or received: no new streams
        # The stream whose header block was malformed: once its 400 is out, the
        # connection ends (GOAWAY PROTOCOL_ERROR); nothing after it is read.
        self._fatal_stream: H2Stream | None = None
        self._last_stream_id = 0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._stall_handle: asyncio.TimerHandle | None = None  # stream idle timeout
        self._closed_future: asyncio.Future[None] | None = None
        # Rapid-reset accounting, over a window that restarts once it has elapsed.
        self._reset_window_start = 0.0
        self._window_resets = 0
        self._window_streams = 0
        self.client_resets = 0  # premature client resets over the connection's life
        # Called once when the connection is gone, for whoever tracks live connections
        # (the listener set, for its graceful stop).
        self.on_close: Callable[[H2Protocol], None] | None = None

        max_streams = settings.max_concurrent_streams
        header_bytes = settings.max_request_header_bytes
        conn = _H2Connection.for_server(max_streams, settings)
        codes = h2.settings.SettingCodes
        conn.local_settings = _AdvertisedSettings(
            ceiling_streams=max_streams * 2 + 16,
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: max_streams,
                codes.MAX_HEADER_LIST_SIZE: header_bytes,
                codes.INITIAL_WINDOW_SIZE: STREAM_WINDOW_BYTES,
                codes.ENABLE_PUSH: 0,
            },
        )
        conn.decoder = _CeilingDecoder(_header_ceiling_bytes(settings))
        self._conn = conn
        self._on: dict[type, Callable[[Any], None]] = {
            h2.events.RequestReceived: self._on_request,
            h2.events.DataReceived: self._on_data,
            h2.events.StreamEnded: self._on_stream_ended,
            h2.events.StreamReset: self._on_stream_reset,
            h2.events.WindowUpdated: self._on_window_updated,
            h2.events.RemoteSettingsChanged: self._on_window_updated,
            h2.events.TrailersReceived: self._on_trailers,
            h2.events.ConnectionTerminated: self._on_goaway,
        }

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._attach(transport)
        self._conn.initiate_connection()
        self._open_connection_window()
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self._closed or self._fatal_stream is not None:
            return
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.DenialOfServiceError as exc:
            # A flood guard (``_H2Connection``, ``_HeaderBlockBuffer``) or an HPACK bomb:
            # h2 has queued GOAWAY ENHANCE_YOUR_CALM.
            logger.warning("closing HTTP/2 connection from %s: %s", self._peer, exc)
            self._abort_connection(ErrorCodes.ENHANCE_YOUR_CALM, goaway_queued=True)
            return
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued GOAWAY with the matching error code (PROTOCOL_ERROR,
            # FLOW_CONTROL_ERROR, ...).
            logger.debug("HTTP/2 protocol error from %s: %s", self._peer, exc)
            self._abort_connection(ErrorCodes.PROTOCOL_ERROR, goaway_queued=True)
            return
        on = self._on
        for event in events:
            handle = on.get(type(event))
            if handle is not None:
                handle(event)
                if self._closed:
                    return
                if self._fatal_stream is not None:
                    break  # nothing after a malformed block is trusted
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._transport_gone()
        # Break the reference cycles (the event table's bound methods -> self,
        # transport <-> self, blocked streams <-> self) now, so that a closed
        # connection and the TLS state its transport holds are freed at once rather
        # than at the next full garbage collection (as HTTP/1.1 does).
        self._transport = None
        self._on = {}
        self._window_blocked.clear()

    def pause_writing(self) -> None:
        # Stop reading too: control frames (PING, SETTINGS) make h2 queue replies, and a
        # client that never reads would otherwise grow our write buffer without bound.
        self._write_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            _wake(waiter)

    # -- public control -----------------------------------------------------------------

    def close(self, graceful: bool = True) -> None:
        """Send GOAWAY. Graceful: streams already received finish, then the connection
        closes; later streams are refused. Otherwise: close now, resetting every stream.

        The GOAWAY is written by hand: h2 stops sending anything once it has sent one,
        which would strand the responses RFC 9113 §6.8 lets us finish."""
        if self._closed or self._transport is None:
            return
        if not graceful:
            self._abort_connection(ErrorCodes.NO_ERROR)
            return
        if not self._going_away:
            self._going_away = True
            self._last_stream_id = self._conn.highest_inbound_stream_id
            self._flush()  # frames already queued by h2 go before the GOAWAY
            frame = GoAwayFrame(0)
            frame.last_stream_id = self._last_stream_id
            frame.error_code = ErrorCodes.NO_ERROR
            self._transport.write(frame.serialize())
        if not self._streams:
            self._close_transport()

    def shutdown(self) -> None:
        """Graceful stop, under the name the listener set uses for every connection."""
        self.close(graceful=True)

    def abort(self) -> None:
        """Stop now: GOAWAY, close, reset whatever is still running."""
        self.close(graceful=False)

    async def wait_closed(self) -> None:
        """Return once the connection is closed."""
        if self._closed_future is not None:
            await asyncio.shield(self._closed_future)

    @property
    def active_streams(self) -> int:
        """Streams whose pipeline task is still running."""
        return len(self._streams)

    # -- connection set-up ------------------------------------------------------------

    def _attach(self, transport: asyncio.BaseTransport) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport = transport  # type: ignore[assignment]
        self._closed_future = self._loop.create_future()
        if not self._peer:
            peername = transport.get_extra_info("peername")
            if peername:
                self._peer = str(peername[0])
        high = self._settings.write_buffer_high_bytes
        set_limits = getattr(transport, "set_write_buffer_limits", None)
        if set_limits is not None:
            set_limits(high=high, low=high // 4)
        self._arm_idle_timer()

    def _open_connection_window(self) -> None:
        # The connection window starts at 64 KiB whatever SETTINGS say; widen it so
        # several streams can upload at once.
        self._conn.increment_flow_control_window(CONNECTION_WINDOW_BYTES - _PROTOCOL_DEFAULT_WINDOW)

    def _start_upgrade(self, transport: asyncio.BaseTransport, head: RequestHead, b64: str) -> None:
        self._attach(transport)
        # HTTP2-Settings is base64url without padding (RFC 7540 §3.2.1); Python's
        # decoder wants the padding back.
        padded = (b64.strip() + "=" * (-len(b64.strip()) % 4)).encode("ascii", "replace")
        try:
            self._conn.initiate_upgrade_connection(padded)
        except (binascii.Error, ValueError, h2.exceptions.H2Error, HyperframeError) as exc:
            logger.debug("bad HTTP2-Settings from %s: %s", self._peer, exc)
            self._flush()
            frame = GoAwayFrame(0)
            frame.error_code = ErrorCodes.PROTOCOL_ERROR
            self._transport.write(frame.serialize())  # type: ignore[union-attr]
            self._close_transport()
            return
        self._open_connection_window()
        # The upgrade request was HTTP/1.1: drop what only served that hop and the
        # upgrade itself, so the pipeline sees the request the client meant.
        nominated = {
            t.strip().lower() for t in (head.header("connection") or "").split(",") if t.strip()
        }
        head.headers = [
            (n, v) for n, v in head.headers if n not in _UPGRADE_FIELDS and n not in nominated
        ]
        head.invalidate()
        stream = H2Stream(self, 1, head)
        stream._remote_ended = True  # RFC 7540 §3.2: stream 1 is half-closed (remote)
        self._roll_reset_window()
        self._window_streams += 1
        self._dispatch(stream)
        self._flush()

    # -- h2 events --------------------------------------------------------------------

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        conn = self._conn
        settings = self._settings
        # For the flood guards: a request block is not an empty frame, and each stream
        # opened allows more PRIORITY and WINDOW_UPDATE frames.
        conn.empty_frames = 0
        conn.streams_opened += 1
        if self._going_away or len(self._streams) >= settings.max_concurrent_streams:
            # The client may have reset it already, in the same read (h2 has then
            # closed it): refusing a closed stream must not take the connection down.
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        problem = request_problem(event.headers)
        if problem is not None:
            self._malformed(stream_id, event.headers, problem)
            return
        self._roll_reset_window()
        self._window_streams += 1

        method = path = authority = scheme = host = None
        content_length: bytes | None = None
        fields: list[tuple[str, str]] = []
        cookies: list[bytes] | None = None
        cookie_at = 0
        list_bytes = 0
        for name, value in event.headers:
            # RFC 9113 §6.5.2: each field counts its name, value and 32 octets.
            list_bytes += len(name) + len(value) + 32
            if name[0] == 0x3A:  # ":" — h2 has already checked which ones may appear
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
                host = value
            elif name == b"cookie":
                # RFC 9113 §8.2.3: crumbs are joined with "; " before going further.
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
        problem = target_problem(method, path, authority)
        if problem is not None:
            self._malformed(stream_id, event.headers, problem)
            return

        rejection: GatewayError | None = None
        if (
            list_bytes > settings.max_request_header_bytes
            or len(fields) > settings.max_request_headers
        ):
            rejection = HeadersTooLarge(f"{len(fields)} fields, {list_bytes} bytes")
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
            scheme=scheme.decode("latin-1") if scheme is not None else self._scheme,
            headers=fields,
            http_version="2",
            port=self._port,
            peer=self._peer,
        )
        stream = H2Stream(self, stream_id, head)
        if event.stream_ended:
            stream._remote_ended = True
        if rejection is not None:
            # Answered 431/413 by the pipeline; whatever body follows is dropped.
            stream.rejection = stream._body_error = rejection
        self._dispatch(stream)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        flow_bytes = event.flow_controlled_length
        stream = self._streams.get(event.stream_id)
        if stream is None or stream._reset_code is not None or stream._body_error is not None:
            # Nobody will read it (refused, answered, aborted or over the body limit):
            # hand the connection window back at once.
            if flow_bytes:
                self._conn.acknowledge_received_data(flow_bytes, event.stream_id)
            return
        data = event.data
        stream._received_bytes += len(data)
        if stream._received_bytes > self._settings.max_request_body_bytes:
            self._conn.acknowledge_received_data(flow_bytes, event.stream_id)
            self._reject_body(stream)
            return
        if not data:
            # Padding only, or an empty frame carrying END_STREAM: nothing to read.
            if flow_bytes:
                self._conn.acknowledge_received_data(flow_bytes, event.stream_id)
        else:
            stream._chunks.append((data, flow_bytes))
            stream._unacked_bytes += flow_bytes
        _wake(stream._read_waiter)

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream._remote_ended = True
            _wake(stream._read_waiter)

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        self._conn.empty_frames = 0
        problem = trailers_problem(event.headers)
        stream = self._streams.get(event.stream_id)
        if problem is not None:
            logger.debug("HTTP/2 malformed trailers from %s: %s", self._peer, problem)
            if stream is None or stream._reset_code is not None:
                self._abort_connection(ErrorCodes.PROTOCOL_ERROR)
                return
            # The request was malformed after all: its pipeline's next read raises
            # BadRequest (400, flag DPE, if no response has begun), then the
            # connection ends as for a malformed request block.
            if stream._body_error is None:
                stream._body_error = BadRequest(problem)
            self._release_window(stream)
            self._stop_reading_after(stream)
            _wake(stream._read_waiter)
            return
        if stream is not None:
            stream.trailers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        premature = not stream._local_ended
        stream._abort(event.error_code)
        self._release_window(stream)
        if premature:
            # The client's RST_STREAM, or h2's own reset of a stream the client broke (a
            # frame after END_STREAM, a window pushed past 2^31-1): "MadeYouReset"
            # (CVE-2025-8671) gets the server to cancel the work as cheaply as a rapid
            # reset does, so it counts the same, as Envoy counts every premature reset.
            self._count_client_reset()

    def _on_window_updated(self, event: object) -> None:
        stream_id = getattr(event, "stream_id", 0)
        if stream_id:
            stream = self._streams.get(stream_id)
            if stream is not None:
                _wake(stream._send_waiter)
            return
        # The connection window (or the initial window, via SETTINGS) moved: every
        # stream waiting for room may go on.
        for stream in tuple(self._window_blocked):
            _wake(stream._send_waiter)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self._going_away = True
        if event.error_code != ErrorCodes.NO_ERROR or not self._streams:
            self._abort_connection(ErrorCodes.NO_ERROR, goaway_queued=True)
            return
        # A graceful GOAWAY from the client still lets us answer the streams it sent
        # (RFC 9113 §6.8), but h2 moves to CLOSED on any GOAWAY and would refuse to
        # send those answers; put its state machine back to open.
        self._conn.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN

    # -- streams ----------------------------------------------------------------------

    def _dispatch(self, stream: H2Stream) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        self._streams[stream.stream_id] = stream
        fast_start = self._fast_start
        if fast_start is not None and stream._remote_ended:
            # A request without a body: the pipeline runs it from callbacks and makes
            # a task only for what must wait (see ``Pipeline.start``).
            fast_start(stream)
            return
        stream._task = self._loop.create_task(self._run(stream, self._handler(stream)))

    async def _run(self, stream: H2Stream, step: Coroutine[Any, Any, None]) -> None:
        try:
            await step
        except StreamReset:
            pass
        except Exception:
            # The pipeline maps its own errors to responses; this is the backstop.
            logger.exception("request pipeline failed on HTTP/2 stream %d", stream.stream_id)
            if not self._closed and stream._reset_code is None:
                if stream._response_started:
                    self._reset_stream(stream, ErrorCodes.INTERNAL_ERROR)
                else:
                    self._respond_locally(stream.stream_id, 500, b"internal error\n")
                    stream._local_ended = True
                    stream._abort(ErrorCodes.NO_ERROR)
        finally:
            self._finish(stream)

    def _finish(self, stream: H2Stream) -> None:
        if stream is self._fatal_stream:
            # Its 400 is queued: the connection ends after it (``_malformed``).
            self._streams.pop(stream.stream_id, None)
            self._abort_connection(ErrorCodes.PROTOCOL_ERROR)
            return
        self._streams.pop(stream.stream_id, None)
        self._window_blocked.discard(stream)
        if not self._closed:
            if stream._reset_code is None:
                if not stream._local_ended:
                    # The pipeline returned without completing the response.
                    self._reset_stream(stream, ErrorCodes.INTERNAL_ERROR)
                elif not stream._remote_ended:
                    # RFC 9113 §8.1: after a complete response the server may ask the
                    # client to stop sending the rest of the request, without error.
                    self._reset_stream(stream, ErrorCodes.NO_ERROR)
            self._release_window(stream)
            self._schedule_flush()
        if not self._streams:
            if self._going_away:
                self._flush()
                self._close_transport()
            else:
                self._arm_idle_timer()

    def _release_window(self, stream: H2Stream) -> None:
        """Give back connection window held by body nobody is going to read."""
        if stream._unacked_bytes and not self._closed:
            self._conn.acknowledge_received_data(stream._unacked_bytes, stream.stream_id)
        stream._unacked_bytes = 0
        stream._chunks.clear()

    def _reset_stream(self, stream: H2Stream, error_code: int) -> None:
        if not self._closed:
            # StreamClosedError: both sides had already ended it.
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self._conn.reset_stream(stream.stream_id, error_code)
            self._schedule_flush()
        stream._abort(error_code)

    def _reject_body(self, stream: H2Stream) -> None:
        """The body went over ``max_request_body_bytes``: the pipeline's next read
        raises ``BodyTooLarge``, which it answers 413 (flag DPE) if its response has
        not begun; a response under way is reset instead. The rest of the body is
        dropped, its window handed back."""
        if stream._response_started or stream._local_ended:
            self._reset_stream(stream, ErrorCodes.CANCEL)
        else:
            stream._body_error = BodyTooLarge(f"body over {self._settings.max_request_body_bytes}")
            _wake(stream._read_waiter)
        self._release_window(stream)

    def _respond_locally(self, stream_id: int, status: int, body: bytes) -> None:
        """A short plain-text answer from the adapter itself, then stop the request."""
        conn = self._conn
        headers = [
            (b":status", str(status).encode("ascii")),
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
        try:
            if conn.local_flow_control_window(stream_id) >= len(body):
                conn.send_headers(stream_id, headers, end_stream=False)
                conn.send_data(stream_id, body, end_stream=True)
            else:
                conn.send_headers(stream_id, headers[:2], end_stream=True)
            if conn.streams[stream_id].open:
                conn.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        except (h2.exceptions.StreamClosedError, KeyError):
            pass
        self._schedule_flush()

    def _count_client_reset(self) -> None:
        """Rapid reset (CVE-2023-44487) guard: opening a stream and resetting it at once,
        or making the server reset it, costs the client nothing and us a task. Within a
        window, more premature resets than the limit, and more than half the streams
        opened, close the connection."""
        self.client_resets += 1
        self._roll_reset_window()
        self._window_resets += 1
        settings = self._settings
        if (
            self._window_resets > settings.h2_max_premature_resets
            and self._window_resets * 2 > self._window_streams
        ):
            logger.warning(
                "closing HTTP/2 connection from %s: %d stream resets in %.0f s",
                self._peer,
                self._window_resets,
                settings.h2_reset_window_s,
            )
            self._abort_connection(ErrorCodes.ENHANCE_YOUR_CALM)

    def _roll_reset_window(self) -> None:
        now = self._loop.time()
        if now - self._reset_window_start > self._settings.h2_reset_window_s:
            self._reset_window_start = now
            self._window_resets = 0
            self._window_streams = 0

    # -- writing and closing ----------------------------------------------------------

    def _acknowledge(self, stream_id: int, flow_bytes: int) -> None:
        if flow_bytes and not self._closed:
            self._conn.acknowledge_received_data(flow_bytes, stream_id)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        # Everything the streams queue during one event-loop tick goes out in one write.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _queued(self, size: int) -> None:
        self._queued_bytes += size
        if self._queued_bytes >= self._settings.write_buffer_high_bytes:
            # A large body in one send_body call: hand it to the transport now, so that
            # pause_writing can stop the loop before memory grows.
            self._flush()
        else:
            self._schedule_flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._queued_bytes = 0
        data = self._conn.data_to_send()
        if data and not self._closed and self._transport is not None:
            self._transport.write(data)

    def _arm_idle_timer(self) -> None:
        if self._idle_handle is None and not self._closed:
            self._idle_handle = self._loop.call_later(self._settings.idle_timeout_s, self._on_idle)

    def _on_idle(self) -> None:
        self._idle_handle = None
        if not self._streams:
            self.close(graceful=True)

    def _watch_stalls(self) -> None:
        timeout_s = self._settings.stream_idle_timeout_s
        if timeout_s > 0 and not self._closed:
            self._stall_handle = self._loop.call_later(timeout_s, self._check_stalls)

    def _check_stalls(self) -> None:
        """The one stream-idle timer of the connection: end the streams stalled on the
        client for ``stream_idle_timeout_s``, re-arm for the earliest other stall."""
        self._stall_handle = None
        if self._closed:
            return
        timeout_s = self._settings.stream_idle_timeout_s
        now = self._loop.time()
        earliest = 0.0
        for stream in tuple(self._streams.values()):
            stalled_at = stream._stalled_at
            if not stalled_at:
                continue
            if now - stalled_at >= timeout_s:
                self._stream_idle(stream, timeout_s)
            elif not earliest or stalled_at < earliest:
                earliest = stalled_at
        if earliest and not self._closed:
            self._stall_handle = self._loop.call_later(
                earliest + timeout_s - now, self._check_stalls
            )

    def _stream_idle(self, stream: H2Stream, timeout_s: float) -> None:
        """The pipeline learns of it from the wait itself, as ``StreamIdleTimeout``
        (flag SI): before the response head it answers 408 (504 if the request was
        whole); after it, the stream is reset here first, with NO_ERROR as Envoy's
        local reset, and the pipeline's own reset is then a no-op. A stream that
        stalls again once timed out (its 408 not taken) is reset."""
        stream._stalled_at = 0.0
        if stream._idle_error is not None or stream._reset_code is not None:
            self._reset_stream(stream, ErrorCodes.CANCEL)
            return
        stream._idle_error = StreamIdleTimeout(
            f"stream {stream.stream_id} stalled on the client for {timeout_s}s",
            request_complete=stream._remote_ended,
        )
        if stream._response_started:
            self._reset_stream(stream, ErrorCodes.NO_ERROR)  # wakes the waits
            self._release_window(stream)
            return
        _wake(stream._read_waiter)
        _wake(stream._send_waiter)

    def _malformed(self, stream_id: int, headers: list[tuple[bytes, bytes]], problem: str) -> None:
        """A malformed header block (RFC 9113 §8.1.1). Nothing of it reaches a route or
        an upstream: the pipeline answers the stream 400 and logs it (flag DPE), as
        RFC 9113 lets a server do, then the connection ends with GOAWAY
        PROTOCOL_ERROR (``_finish``), as Envoy ends it by default. Nothing after the
        block is read."""
        logger.debug("HTTP/2 malformed header block from %s: %s", self._peer, problem)
        stream = H2Stream(self, stream_id, self._logged_head(headers))
        stream.rejection = BadRequest(problem)
        stream._remote_ended = True  # no body of it is read
        self._stop_reading_after(stream)
        self._dispatch(stream)

    def _stop_reading_after(self, stream: H2Stream) -> None:
        """Read nothing more; end the connection once ``stream`` has been answered."""
        self._fatal_stream = stream
        if self._transport is not None:
            self._transport.pause_reading()

    def _logged_head(self, headers: list[tuple[bytes, bytes]]) -> RequestHead:
        """What the access log shows of a malformed request: its pseudo-header fields
        as far as they go (the log escapes them); no other field is kept."""
        pseudo: dict[bytes, str] = {}
        for name, value in headers:
            if name in _LOGGED_PSEUDO and name not in pseudo:
                pseudo[name] = value.decode("latin-1")
        path, _, query = pseudo.get(b":path", "-").partition("?")
        return RequestHead(
            method=pseudo.get(b":method", "-"),
            path=path,
            query=query,
            authority=pseudo.get(b":authority", ""),
            scheme=self._scheme,
            headers=[],
            http_version="2",
            port=self._port,
            peer=self._peer,
        )

    def _abort_connection(self, error_code: int, goaway_queued: bool = False) -> None:
        """GOAWAY with ``error_code`` (unless h2 queued one already), then close."""
        if self._closed:
            return
        if not goaway_queued:
            # ProtocolError: h2 already considers the connection closed.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._conn.close_connection(error_code=error_code)
        self._flush()
        self._close_transport()

    def _close_transport(self) -> None:
        if self._closed:
            return
        self._closed = True
        transport = self._transport
        if transport is not None:
            transport.close()
            # close() waits for the write buffer to drain, however long that takes: a
            # client that reads nothing would keep the socket and its buffer forever.
            buffered = getattr(transport, "get_write_buffer_size", None)
            pending = buffered() if buffered is not None else 0
            if pending:
                self._loop.call_later(
                    self._settings.h2_delayed_close_timeout_s,
                    self._drop_if_stalled,
                    transport,
                    pending,
                )
        self._transport_gone()

    def _drop_if_stalled(self, transport: asyncio.Transport, pending_before: int) -> None:
        """Envoy's delayed close: a closing connection whose client has read nothing of
        what is left for ``h2_delayed_close_timeout_s`` is dropped (the timer starts again
        whenever some of it is read)."""
        if self._transport is not transport:
            return  # connection_lost came: it closed in time
        pending = transport.get_write_buffer_size()
        if pending and pending < pending_before:
            self._loop.call_later(
                self._settings.h2_delayed_close_timeout_s, self._drop_if_stalled, transport, pending
            )
            return
        logger.debug("dropping HTTP/2 connection from %s: %d bytes unread", self._peer, pending)
        transport.abort()

    def _transport_gone(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        if self._stall_handle is not None:
            self._stall_handle.cancel()
            self._stall_handle = None
        for stream in tuple(self._streams.values()):
            stream._abort(ErrorCodes.CANCEL)
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            _wake(waiter)
        if self._closed_future is not None and not self._closed_future.done():
            self._closed_future.set_result(None)
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close(self)


def take_over_prior_knowledge(
    transport: asyncio.Transport,
    handler: RequestHandler,
    settings: ServerSettings,
    port: int,
    scheme: str,
    peer: str,
    data: bytes,
) -> H2Protocol:
    """The connection began with the HTTP/2 preface; ``data`` is everything read so far
    (the preface included). Installs an ``H2Protocol`` on ``transport`` and feeds it."""
    proto = H2Protocol(handler, settings, port, scheme, peer)
    transport.set_protocol(proto)
    proto.connection_made(transport)
    if data:
        proto.data_received(data)
    return proto


def take_over_upgrade(
    transport: asyncio.Transport,
    handler: RequestHandler,
    settings: ServerSettings,
    port: int,
    scheme: str,
    peer: str,
    head: RequestHead,
    http2_settings: str,
    data: bytes = b"",
) -> H2Protocol:
    """h2c upgrade (RFC 7540 §3.2), after the HTTP/1.1 side wrote ``101``.

    ``http2_settings`` is the HTTP2-Settings header value (base64url). The upgrading
    request, which has no body, becomes stream 1 and goes to ``handler``. ``data`` is
    anything the HTTP/1.1 side read past the request (usually the client's preface)."""
    proto = H2Protocol(handler, settings, port, scheme, peer)
    transport.set_protocol(proto)
    proto._start_upgrade(transport, head, http2_settings)
    if data and not proto._closed:
        proto.data_received(data)
    return proto
