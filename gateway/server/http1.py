"""The HTTP/1.1 protocol adapter: httptools on a raw asyncio transport.

It owns the wire: parsing requests (with the head/body limits of ``ServerSettings``),
framing responses (Content-Length, chunked or close-delimited), keep-alive,
pipelining (answered strictly in order), ``Expect: 100-continue``, flow control in both
directions, the slow-header, idle and stream-idle timers, and handing a connection over to the
HTTP/2 adapter (prior-knowledge preface or ``Upgrade: h2c``).

It knows nothing of routes. Each request becomes an ``H1Stream`` (a
``DownstreamStream``) handed to the request handler in a task of its own. A request
the adapter refuses itself (bad framing, head too large, header timeout) is still
handed to the handler, as a stream whose ``rejection`` is set, so that the answer is
written in order and logged like every other request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import httptools

from ..errors import (
    BadRequest,
    BodyTooLarge,
    GatewayError,
    HeadersTooLarge,
    RequestHeaderTimeout,
    StreamIdleTimeout,
)
from ..writebatch import HeldWrites
from .events import RequestHandler, RequestHead, ResponseHead, StreamReset
from .settings import ServerSettings

__all__ = ["H1Stream", "HTTP1Connection", "status_line"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_MAX_QUEUED = 16  # pipelined requests parsed ahead of the one being answered
_LINGER_S = 2.0  # how long to drain an unread request body before closing
_REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_STATUS_LINES = {code: f"HTTP/1.1 {code} {reason}\r\n" for code, reason in _REASONS.items()}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_SWITCHING_H2C = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"

# Header names as received -> lower-case str; the same few dozen names recur.
_NAMES: dict[bytes, str] = {}

# What a closed connection's ``parser`` becomes: parses nothing, holds no protocol.
_CLOSED_PARSER: Any = httptools.HttpRequestParser(object())

# Response body framing modes.
_FIXED, _CHUNKED, _UNTIL_CLOSE, _NONE = 0, 1, 2, 3


def status_line(status: int) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
    return line


_STATUS_LINE_BYTES: dict[int, bytes] = {}


def status_line_bytes(status: int) -> bytes:
    line = _STATUS_LINE_BYTES.get(status)
    if line is None:
        line = _STATUS_LINE_BYTES[status] = status_line(status).encode("latin-1")
    return line


class _Stop(Exception):
    """Raised from a parser callback to stop parsing; the reason is in ``_error``."""


class H1Stream:
    """One request/response exchange on an HTTP/1.1 connection."""

    __slots__ = (
        "_body_waiter",
        "_pending",
        "body_done",
        "body_error",
        "buffered",
        "canceller",
        "chunks",
        "close_after",
        "conn",
        "continue_sent",
        "expect_continue",
        "head",
        "keep_alive",
        "mode",
        "received_bytes",
        "rejection",
        "response_done",
        "response_started",
        "task",
        "tunnel",
    )

    def __init__(self, conn: HTTP1Connection, head: RequestHead, keep_alive: bool) -> None:
        self.conn = conn
        self.head = head
        self.keep_alive = keep_alive
        self.rejection: GatewayError | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.received_bytes = 0
        self.body_done = False
        self.body_error: GatewayError | None = None
        self.expect_continue = False
        self.continue_sent = False
        self.response_started = False
        self.response_done = False
        self.close_after = False
        self.mode = _NONE
        self._pending: bytes | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        # Set while a callback-driven exchange (no task) waits on the upstream:
        # called when the client goes away, as cancelling the task would be.
        self.canceller: Callable[[], None] | None = None
        # An Upgrade (WebSocket) request: the bytes read after its head, kept for the
        # tunnel. None for every other request.
        self.tunnel: bytearray | None = None

    # The callback-driven exchange may hand an upstream's header lines through as
    # they are (``write_raw_response``).
    raw_lines = True

    # -- request body (fed by the connection) -------------------------------------

    def _feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        self._wake()

    def _end(self, error: GatewayError | None = None) -> None:
        if error is not None and self.body_error is None and not self.body_done:
            self.body_error = error
        self.body_done = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._body_waiter
        if waiter is not None:
            self._body_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- DownstreamStream ---------------------------------------------------------

    async def read_body(self) -> bytes:
        conn = self.conn
        while True:
            chunks = self.chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self.buffered = 0
                if conn.reading_paused:
                    conn.update_reading()
                return data
            if self.body_error is not None:
                raise self.body_error
            if self.body_done:
                return b""
            if conn.closed:
                raise StreamReset("client closed the connection mid-body")
            if self.expect_continue and not self.continue_sent and not self.response_started:
                # Answer Expect: 100-continue only once someone wants the body, so a
                # request refused early (404, 413) never has its body sent at all.
                self.continue_sent = True
                conn.write(_CONTINUE)
            waiter = self._body_waiter = conn.loop.create_future()
            conn.stalled()
            await waiter

    def body_complete(self) -> bool:
        return self.body_done and not self.chunks

    async def send_head(self, response: ResponseHead, end_stream: bool) -> None:
        data = self._encode_head(response, end_stream)
        conn = self.conn
        if end_stream:
            conn.write(data)
            self._complete()
        else:
            # Held for one loop tick so that a body chunk sent right away leaves in
            # the same write (one syscall for the common small response).
            self._pending = data
            conn.loop.call_soon(self._flush_pending)

    async def send_response(self, response: ResponseHead, body: bytes) -> None:
        """Head and whole body at once: one write, no deferred flush (fast path
        used by the pipeline when the upstream's body is already complete)."""
        self.write_response(response, body)

    def write_response(self, response: ResponseHead, body: bytes) -> bool:
        """``send_response`` without a coroutine, for the callback-driven exchange;
        an empty ``body`` is a response without one. Always written: True."""
        if not body:
            self.conn.write(self._encode_head(response, True))
            self._complete()
            return True
        self._write_whole(self._encode_head(response, False), body)
        return True

    def write_raw_response(self, status: int, lines: bytes, has_length: bool, body: bytes) -> None:
        """``write_response`` for header lines already in wire form (lower-case
        ``name: value`` lines, each ending in CRLF): an upstream's headers passed
        through untouched, without decoding them only to encode them again."""
        head = self._frame(status, lines, has_length, not body)
        if not body:
            self.conn.write(head)
            self._complete()
            return
        self._write_whole(head, body)

    def _write_whole(self, data: bytes, body: bytes) -> None:
        if self.mode == _CHUNKED:
            data += b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
        elif self.mode != _NONE:
            data += body
        self.conn.write(data)
        self._complete()

    def _encode_head(self, response: ResponseHead, end_stream: bool) -> bytes:
        has_length = False
        lines = []
        for name, value in response.headers:
            if name == "content-length":
                has_length = True
            lines.append(f"{name}: {value}\r\n")
        return self._frame(
            response.status, "".join(lines).encode("latin-1"), has_length, end_stream
        )

    def _frame(self, status: int, lines: bytes, has_length: bool, end_stream: bool) -> bytes:
        """The response head: status line, header lines, then what the framing
        and the connection's fate add."""
        conn = self.conn
        if conn.closed:
            raise StreamReset("client closed the connection")
        if self.response_started:
            raise RuntimeError("response head already sent")
        self.response_started = True
        extra = b""
        if self.head.method == "HEAD" or status in (204, 304) or status < 200:
            self.mode = _NONE
        elif has_length:
            self.mode = _FIXED
        elif end_stream:
            extra = b"content-length: 0\r\n"
            self.mode = _FIXED
        elif self.head.http_version == "1.1":
            extra = b"transfer-encoding: chunked\r\n"
            self.mode = _CHUNKED
        else:
            # An HTTP/1.0 client cannot read chunks: the body ends when we close.
            self.mode = _UNTIL_CLOSE
            self.keep_alive = False
        if not self.body_done or self.body_error is not None:
            # Unread request body left on the wire: the connection cannot be reused.
            self.keep_alive = False
        elif conn.must_close and not conn._queue:
            # Closing (a refused request, a half-close, a graceful stop): requests
            # already parsed behind this one are still answered, the refusal among
            # them, and only the last response says close.
            self.keep_alive = False
        if not self.keep_alive:
            extra += b"connection: close\r\n"
        elif self.head.http_version == "1.0":
            extra += b"connection: keep-alive\r\n"
        return b"%b%b%b\r\n" % (status_line_bytes(status), lines, extra)

    def _flush_pending(self) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            self.conn.write(pending)

    async def send_body(self, data: bytes, end_stream: bool) -> None:
        conn = self.conn
        if conn.closed:
            raise StreamReset("client closed the connection")
        if not self.response_started:
            raise RuntimeError("send_head must come first")
        if self.response_done:
            raise RuntimeError("response already complete")
        pieces: list[bytes] = []
        pending = self._pending
        if pending is not None:
            self._pending = None
            pieces.append(pending)
        mode = self.mode
        if mode == _CHUNKED:
            if data:
                pieces += (b"%x\r\n" % len(data), data, b"\r\n")
            if end_stream:
                pieces.append(b"0\r\n\r\n")
        elif mode != _NONE and data:
            pieces.append(data)
        if pieces:
            if len(pieces) == 1:
                conn.write(pieces[0])
            elif len(data) < 65536:
                # Small: one joined buffer is one send(); cheaper than writelines.
                conn.write(b"".join(pieces))
            else:
                conn.writelines(pieces)
        if end_stream:
            self._complete()
        elif conn.write_paused:
            await conn.drain()

    def reset(self) -> None:
        self._pending = None
        self.response_done = True
        self.conn.abort()

    def take_over(self) -> tuple[asyncio.Transport, bytes]:
        """For an upgrade the upstream accepted (101): the raw connection and the
        bytes already read after the request head. The connection stops being HTTP:
        its timers stop and this adapter lets go of it (as for an h2c hand-over)."""
        conn = self.conn
        self.response_started = self.response_done = True
        conn._hand_over()
        transport = conn.transport
        assert transport is not None
        return transport, bytes(self.tunnel or b"")

    # -- completion ---------------------------------------------------------------

    def run(self, handler: Coroutine[Any, Any, None]) -> None:
        """Run (the rest of) this request's handling in a task of its own."""
        task = self.task = self.conn.loop.create_task(handler)
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        # Safety net: a handler that returned (or died) without finishing its
        # response must not leave the connection hanging.
        if not self.response_done:
            self.reset()

    def _complete(self) -> None:
        self.response_done = True
        self.conn.response_complete(self)


class HTTP1Connection(HeldWrites, asyncio.Protocol):
    """One downstream HTTP/1.1 connection."""

    def __init__(
        self,
        handler: RequestHandler,
        settings: ServerSettings,
        port: int,
        scheme: str = "http",
        on_close: Any = None,
    ) -> None:
        self.handler = handler
        # A handler that can also run a request without a task of its own (the
        # pipeline's callback-driven lane) offers ``start(stream)``.
        self._fast_start = getattr(handler, "start", None)
        self.settings = settings
        self.port = port
        self.scheme = scheme
        self.on_close = on_close  # called with self when the connection ends
        # Called with the H2Protocol that takes the connection over (prior knowledge or
        # h2c upgrade), so the listener set keeps tracking it for a graceful stop.
        self.on_handover: Any = None
        self.loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self.closed = False
        self.must_close = False  # stop after the current responses (error, shutdown)
        self.reading_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._sniffing = True
        self._sniffed = b""
        self._active: H1Stream | None = None
        self._queue: deque[H1Stream] = deque()
        self._body_target: H1Stream | None = None
        self._resume_target: H1Stream | None = None
        self._error: GatewayError | None = None
        self._upgrade: tuple[RequestHead, str] | None = None
        self._upgrade_body: tuple[H1Stream, bytes] | None = None
        self._tunnel: H1Stream | None = None  # the WebSocket upgrade being answered
        self._discarding = False
        self._in_head = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        # Stream idle timeout: when the current wait on the client (request body, or
        # a drain of the response) began, and the one timer watching it, armed only
        # while something waits. Every wake-up of those waits is progress (bytes
        # arrived, the buffer drained), so each wait simply restamps.
        self._stalled_at = 0.0
        self._stall_timer: asyncio.TimerHandle | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        # Small writes held until the end of a busy loop turn (gateway.writebatch).
        self._out: list[bytes] | None = None

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=self.settings.write_buffer_high_bytes)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = peer[0]
        self._last_activity = self.loop.time()
        self._idle_timer = self.loop.call_later(self.settings.idle_timeout_s, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        self._last_activity = self.loop.time()
        if self._sniffing:
            data = self._sniff(data)
            if not data:
                return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._after_upgrade(data[exc.args[0] :] if exc.args else b"")
        except httptools.HttpParserCallbackError:
            self._parse_failed(self._error or BadRequest("callback error"))
        except httptools.HttpParserError as exc:
            self._parse_failed(BadRequest(str(exc)))
        else:
            if self._in_head and self._head_timer is None:
                # Only a head split over several reads needs a timer: a whole head in
                # one read (the usual case) costs no timer at all.
                self._head_timer = self.loop.call_later(
                    self.settings.request_header_timeout_s, self._head_timed_out
                )

    def eof_received(self) -> bool:
        # A half-close from the client: answer what is in flight, then close.
        self.must_close = True
        if self._active is None and not self._queue:
            self.close()
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for timer in (self._head_timer, self._idle_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        active = self._active
        if active is not None:
            active._wake()
            task = active.task
            if not active.response_done and task is not None and not task.done():
                # The pipeline may be waiting on the upstream: cancelling is how it
                # learns the client is gone (it logs DC and releases the upstream).
                task.cancel("downstream disconnected")
            canceller = active.canceller
            if canceller is not None and not active.response_done:
                active.canceller = None
                canceller()
        self._queue.clear()
        if self.on_close is not None:
            self.on_close(self)
        # Break the reference cycles (parser -> self, transport <-> self, stream <->
        # self) now, so that a closed connection, and the TLS state its transport
        # holds, is freed at once rather than at the next full garbage collection:
        # under a stream of short TLS connections that difference is tens of MB.
        self.parser = _CLOSED_PARSER
        self.transport = None
        self._out = None
        self._active = self._body_target = self._resume_target = None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- httptools callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._resume_target is not None:
            return
        self._in_head = True
        self._url = b""
        self._headers = []
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        if self._resume_target is not None:
            return
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self.settings.max_request_header_bytes:
            self._error = HeadersTooLarge("request line too long")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._resume_target is not None:
            return
        headers = self._headers
        headers.append((name, value))
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.settings.max_request_header_bytes:
            self._error = HeadersTooLarge("request head too large")
            raise _Stop
        if len(headers) > self.settings.max_request_headers:
            self._error = HeadersTooLarge("too many request headers")
            raise _Stop

    def on_headers_complete(self) -> None:
        resume = self._resume_target
        if resume is not None:
            # The synthetic head re-framing a declined upgrade's body (see
            # _after_upgrade): the body that follows belongs to that request.
            self._resume_target = None
            self._body_target = resume
            return
        timer = self._head_timer
        if timer is not None:
            self._head_timer = None
            timer.cancel()
        head, content_length, chunked, upgrade, connection = self._build_head()
        self._in_head = False
        stream = H1Stream(self, head, self.parser.should_keep_alive())
        self._body_target = stream
        max_body = self.settings.max_request_body_bytes
        if content_length is not None and content_length > max_body:
            # Refused before a byte of the body is read; the body is never forwarded.
            stream.rejection = BodyTooLarge(f"content-length {content_length} > {max_body}")
            stream.body_done = True
            self._body_target = None
            self._dispatch(stream)
            self._stop_reading()
            raise _Stop
        has_body = chunked or bool(content_length)
        if not has_body:
            stream.body_done = True
        else:
            expect = head.header("expect")
            stream.expect_continue = expect is not None and expect.lower() == "100-continue"
        if upgrade is not None and "upgrade" in connection:
            settings_value = head.header("http2-settings")
            if (
                upgrade.lower() == "h2c"
                and settings_value is not None
                and "http2-settings" in connection
                and not has_body
                and self._active is None
                and not self._queue
            ):
                self._upgrade = (head, settings_value)
                return
            if not has_body and upgrade.lower() == "websocket":
                # llhttp stops after this head; what follows is the tunnel's if the
                # upstream answers 101, and nothing is parsed on this connection
                # after it either way.
                stream.tunnel = bytearray()
                self._tunnel = stream
                self.must_close = True
            if has_body:
                # llhttp stops at the end of an upgrade request's head; its body is
                # re-framed by hand once the parser gives control back.
                framing = (
                    b"transfer-encoding: chunked\r\n"
                    if chunked
                    else b"content-length: %d\r\n" % content_length
                )
                self._upgrade_body = (stream, framing)
        elif head.path == "" and head.method == "CONNECT":
            # llhttp stops after a CONNECT head as after an upgrade; what follows is
            # the tunnel's once the handler has opened it (see take_over).
            stream.tunnel = bytearray()
            self._tunnel = stream
            self.must_close = True
        self._dispatch(stream)

    def on_body(self, body: bytes) -> None:
        stream = self._body_target
        if stream is None or stream.body_done:
            return
        stream.received_bytes += len(body)
        if stream.received_bytes > self.settings.max_request_body_bytes:
            self._error = BodyTooLarge("request body over the limit")
            raise _Stop
        stream._feed(body)
        if stream.buffered > self.settings.write_buffer_high_bytes and not self.reading_paused:
            self.update_reading()

    def on_message_complete(self) -> None:
        stream = self._body_target
        if stream is None:
            return
        if self._upgrade_body is not None and self._upgrade_body[0] is stream:
            return  # the body comes after the upgrade hand-back
        self._body_target = None
        stream._end()

    # -- request heads --------------------------------------------------------------

    def _build_head(self) -> tuple[RequestHead, int | None, bool, str | None, str]:
        parser = self.parser
        authority: str | None = None
        headers: list[tuple[str, str]] = []
        content_length: int | None = None
        chunked = False
        upgrade: str | None = None
        connection = ""
        names = _NAMES
        for raw_name, raw_value in self._headers:
            name = names.get(raw_name)
            if name is None:
                name = raw_name.decode("latin-1").lower()
                if len(names) < 1024:
                    names[raw_name] = name
            # llhttp drops the whitespace before a value but keeps what follows it,
            # which RFC 9110 5.5 says is not part of the value (Envoy drops it too).
            # Kept, "admin " would slip past a policy or route written for "admin"
            # and still reach an upstream that reads "admin".
            value = raw_value.decode("latin-1").rstrip(" \t")
            if name == "host":
                if authority is not None:
                    self._error = BadRequest("multiple Host headers")
                    raise _Stop
                if " " in value or "\t" in value:
                    # The only characters outside an authority that llhttp lets
                    # through (it refuses the other controls); refused as the HTTP/2
                    # and HTTP/3 adapters refuse them in :authority.
                    self._error = BadRequest("invalid Host header")
                    raise _Stop
                authority = value
                continue
            if name == "content-length":
                content_length = int(value)  # llhttp has checked the digits
            elif name == "transfer-encoding":
                # RFC 9112 6.3: in a request, chunked must be the final (here: the
                # only) coding, or the length cannot be known. Anything else, or a
                # second Transfer-Encoding line, is refused rather than guessed at:
                # two parties guessing differently is how requests get smuggled.
                if chunked or value.lower() != "chunked":
                    self._error = BadRequest(f"unsupported transfer-encoding {value!r}")
                    raise _Stop
                chunked = True
            elif name == "upgrade":
                upgrade = value
            elif name == "connection":
                connection = value.lower()
            headers.append((name, value))
        url = self._url
        if b"#" in url:
            # A fragment is never part of a request target (RFC 9112 3.2). Kept in
            # the path, "/admin#x" would miss a rule for "/admin" at the gateway and
            # reach an upstream that drops the fragment as "/admin"; Envoy refuses
            # it for that reason (CVE-2021-32779).
            self._error = BadRequest("fragment in request target")
            raise _Stop
        if url[:1] == b"/":
            path, _, query = url.partition(b"?")
        elif url == b"*":
            # Asterisk form is for OPTIONS only (RFC 9112 3.2.4).
            if parser.get_method() != b"OPTIONS":
                self._error = BadRequest("asterisk-form target on a method other than OPTIONS")
                raise _Stop
            path, query = url, b""
        elif self.settings.allow_connect and parser.get_method() == b"CONNECT":
            # Authority-form (RFC 9112 3.2.3): the target is the tunnel's host:port.
            path, query = b"", b""
            authority = url.decode("latin-1")
        else:
            # Absolute form (a proxy-style request): its authority wins over Host.
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError as exc:
                self._error = BadRequest(f"invalid request target: {exc}")
                raise _Stop from exc
            path = parsed.path or b"/"
            query = parsed.query or b""
            if parsed.host:
                authority = parsed.host.decode("latin-1")
                if parsed.port:
                    authority = f"{authority}:{parsed.port}"
        version = parser.get_http_version()
        if version != "1.1":
            if version != "1.0":
                # llhttp also lets "HTTP/0.9" and "HTTP/2.0" request lines through
                # (with headers); neither is HTTP/1.x framing.
                self._error = BadRequest(f"unsupported HTTP version {version}")
                raise _Stop
            if chunked:
                # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message means its
                # framing is faulty. An HTTP/1.0 hop in front would have read no
                # body and taken the chunks for the next request.
                self._error = BadRequest("transfer-encoding in an HTTP/1.0 request")
                raise _Stop
        if authority is None:
            if version != "1.0":
                self._error = BadRequest("missing Host header")
                raise _Stop
            authority = ""
        head = RequestHead(
            method=parser.get_method().decode("ascii"),
            path=path.decode("latin-1"),
            query=query.decode("latin-1"),
            authority=authority,
            scheme=self.scheme,
            headers=headers,
            http_version=version,
            port=self.port,
            peer=self.peer,
        )
        return head, content_length, chunked, upgrade, connection

    def _partial_head(self) -> RequestHead:
        """What is known of a request refused before its head was complete."""
        try:
            method = self.parser.get_method().decode("ascii")
        except Exception:
            method = "-"
        path, _, query = self._url.partition(b"?")
        authority = ""
        for name, value in self._headers:
            if name.lower() == b"host":
                authority = value.decode("latin-1")
                break
        return RequestHead(
            method=method,
            path=path.decode("latin-1") or "-",
            query=query.decode("latin-1"),
            authority=authority,
            scheme=self.scheme,
            headers=[(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in self._headers],
            http_version="1.1",
            port=self.port,
            peer=self.peer,
        )

    # -- dispatch and ordering ------------------------------------------------------

    def _dispatch(self, stream: H1Stream) -> None:
        if self._active is None:
            self._start(stream)
        else:
            self._queue.append(stream)
            if len(self._queue) >= _MAX_QUEUED:
                self.update_reading()

    def _start(self, stream: H1Stream) -> None:
        self._active = stream
        fast_start = self._fast_start
        if fast_start is not None and stream.body_done:
            # The pipeline runs the request from callbacks, and makes a task only
            # for what must wait (see ``Pipeline.start``). Not for a request with
            # a body: its task starts on the next loop tick, after the rest of this
            # read is parsed, so a framing error in the body is seen before
            # anything is forwarded.
            fast_start(stream)
            return
        # The handler's coroutine is the task itself (no wrapping coroutine whose
        # frame every suspension and resumption would pass through); the safety
        # net runs as a done callback instead.
        stream.run(self.handler(stream))  # type: ignore[arg-type]

    def response_complete(self, stream: H1Stream) -> None:
        """Called by the stream when its last byte has been written."""
        if stream is not self._active:
            return
        self._active = None
        if self.closed:
            return
        if not stream.keep_alive or stream.mode == _UNTIL_CLOSE:
            if stream.body_done and stream.body_error is None and not self._discarding:
                self.close()
            else:
                self._linger()
            return
        if self._queue:
            following = self._queue.popleft()
            if self.reading_paused:
                self.update_reading()
            self._start(following)
        elif self.must_close:
            self.close()

    def _reject(self, error: GatewayError) -> None:
        """Answer a request the adapter refuses, in order, then close."""
        self.must_close = True
        if self._discarding:
            return
        head = self._partial_head() if self._in_head else None
        self._in_head = False
        stream = self._body_target
        if head is not None or stream is None:
            stream = H1Stream(self, head or self._partial_head(), False)
            stream.rejection = error
            stream.body_done = True
            self._dispatch(stream)
        else:
            # The head was fine but the body is not: the pipeline, reading the body,
            # gets the error (and answers it if no response has started yet). When
            # the error came in the same read as the head, the handler has not run
            # yet: it then refuses at once and nothing reaches an upstream.
            stream.rejection = error
            stream._end(error)
        self._body_target = None
        self._stop_reading()

    def _stop_reading(self) -> None:
        # Nothing after a refused request can be trusted: no more requests are read.
        self.must_close = True
        self._discarding = True
        if self.transport is not None and not self.reading_paused and not self.closed:
            self.transport.pause_reading()
            self.reading_paused = True

    def _parse_failed(self, error: GatewayError) -> None:
        self._error = None
        if self._discarding:
            return  # already refused (an over-long Content-Length, say)
        self._reject(error)

    # -- HTTP/2 hand-off and upgrades -----------------------------------------------

    def _sniff(self, data: bytes) -> bytes:
        """Look for the HTTP/2 preface at the start of the connection."""
        if self._sniffed:
            data = self._sniffed + data
            self._sniffed = b""
        if len(data) >= 24:
            self._sniffing = False
            if data[:24] == H2_PREFACE:
                self._take_over_prior_knowledge(data)
                return b""
            return data
        if H2_PREFACE.startswith(data):
            self._sniffed = data
            return b""
        self._sniffing = False
        return data

    def _take_over_prior_knowledge(self, data: bytes) -> None:
        http2 = _http2_module()
        if http2 is None:
            self.close()
            return
        self._hand_over()
        successor = http2.take_over_prior_knowledge(
            self.transport, self.handler, self.settings, self.port, self.scheme, self.peer, data
        )
        if self.on_handover is not None:
            self.on_handover(successor)

    def _after_upgrade(self, rest: bytes) -> None:
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None and tunnel.tunnel is not None:
            tunnel.tunnel.extend(rest)
            # Hold the client's next bytes in the socket until the upstream answers.
            self._stop_reading()
            return
        upgrade, self._upgrade = self._upgrade, None
        if upgrade is not None:
            http2 = _http2_module()
            if http2 is not None:
                head, settings_value = upgrade
                head.headers = [
                    (n, v)
                    for n, v in head.headers
                    if n not in ("upgrade", "http2-settings", "connection")
                ]
                head.invalidate()
                self.write(_SWITCHING_H2C)
                self._hand_over()
                transport = self.transport
                assert transport is not None
                successor = http2.take_over_upgrade(
                    transport,
                    self.handler,
                    self.settings,
                    self.port,
                    self.scheme,
                    self.peer,
                    head,
                    settings_value,
                    rest,
                )
                if self.on_handover is not None:
                    self.on_handover(successor)
                return
            # No HTTP/2 adapter in this build: answer the request as HTTP/1.1.
            stream = H1Stream(self, upgrade[0], self.parser.should_keep_alive())
            stream.body_done = True
            self._dispatch(stream)
        # A declined upgrade is served as plain HTTP/1.1; llhttp refuses to go on
        # after one, so parsing continues with a fresh parser.
        self.parser = httptools.HttpRequestParser(self)
        pending, self._upgrade_body = self._upgrade_body, None
        if pending is not None:
            stream, framing = pending
            self._resume_target = stream
            rest = b"POST / HTTP/1.1\r\n" + framing + b"\r\n" + rest
        if rest:
            self._feed(rest)

    def _hand_over(self) -> None:
        """This protocol object stops handling the connection."""
        self.flush()  # what this adapter wrote goes before what the next one writes
        for timer in (self._head_timer, self._idle_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = self._stall_timer = None
        self._discarding = True
        if self.on_close is not None:
            self.on_close(self)
            self.on_close = None

    # -- timers ---------------------------------------------------------------------

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.closed:
            self._reject(RequestHeaderTimeout("request head not complete in time"))

    def _check_idle(self) -> None:
        if self.closed:
            return
        idle_s = self.settings.idle_timeout_s
        elapsed = self.loop.time() - self._last_activity
        if self._active is None and not self._queue and not self._in_head and elapsed >= idle_s:
            self.close()
            return
        self._idle_timer = self.loop.call_later(max(idle_s - elapsed, 0.05), self._check_idle)

    def stalled(self) -> None:
        """The active stream starts waiting on the client (slow path only: the fast
        request never waits on it, and so never pays for this)."""
        self._stalled_at = self.loop.time()
        if self._stall_timer is None:
            timeout_s = self.settings.stream_idle_timeout_s
            if timeout_s > 0:
                self._stall_timer = self.loop.call_later(timeout_s, self._check_stall)

    def _check_stall(self) -> None:
        """Envoy's stream_idle_timeout. The error goes to the pipeline through the
        wait itself, so that it answers 408 (before the response head) or resets
        (after it: the connection is closed) and logs flag SI; a cancelled task
        would read as the client having left (DC)."""
        self._stall_timer = None
        stream = self._active
        if self.closed or stream is None:
            return
        body_waiter = stream._body_waiter
        drain_waiter = self._drain_waiter
        if body_waiter is None and drain_waiter is None:
            return  # nothing waits on the client now; the next wait re-arms
        timeout_s = self.settings.stream_idle_timeout_s
        left = self._stalled_at + timeout_s - self.loop.time()
        if left > 0:
            self._stall_timer = self.loop.call_later(left, self._check_stall)
            return
        if body_waiter is not None:
            stream._body_waiter = None
            waiter = body_waiter
            error = StreamIdleTimeout(f"no request body for {timeout_s}s")
        else:
            self._drain_waiter = None
            waiter = drain_waiter  # type: ignore[assignment]
            error = StreamIdleTimeout(
                f"response not taken for {timeout_s}s", request_complete=stream.body_done
            )
        if not waiter.done():
            waiter.set_exception(error)

    # -- output and flow control ----------------------------------------------------

    def writelines(self, pieces: list[bytes]) -> None:
        if self.closed or self.transport is None:
            return
        if self._out is not None:
            self.flush()
        self.transport.writelines(pieces)

    async def drain(self) -> None:
        if self.write_paused and not self.closed:
            waiter = self._drain_waiter
            if waiter is None:
                waiter = self._drain_waiter = self.loop.create_future()
            self.stalled()
            await waiter
        if self.closed:
            raise StreamReset("client closed the connection")

    def update_reading(self) -> None:
        """Pause reading while a body or the pipelined queue is over its bound."""
        transport = self.transport
        if transport is None or self.closed or self._discarding:
            return
        target = self._body_target
        over = len(self._queue) >= _MAX_QUEUED or (
            target is not None and target.buffered > self.settings.write_buffer_high_bytes
        )
        if over and not self.reading_paused:
            self.reading_paused = True
            transport.pause_reading()
        elif not over and self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()

    def _linger(self) -> None:
        """Close without resetting: stop sending, drop what the client still sends.

        Closing with unread bytes in the socket makes the kernel send RST, which can
        destroy the response the client has not read yet (a 413, say)."""
        transport = self.transport
        if transport is None or self.closed:
            return
        self._discarding = True
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        self.flush()
        with contextlib.suppress(Exception):
            if transport.can_write_eof():
                transport.write_eof()
        self.loop.call_later(_LINGER_S, self.close)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        self.must_close = True
        self._out = None  # a reset drops what was not sent
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def shutdown(self) -> None:
        """Graceful stop: finish what is in flight, take no new requests."""
        self.must_close = True
        if self._active is None and not self._queue:
            self.close()


def _http2_module() -> Any:
    try:
        from . import http2
    except ImportError:
        import sys

        print(
            "meshgate: HTTP/2 requested but gateway.server.http2 is not available; "
            "serving HTTP/1.1 only",
            file=sys.stderr,
        )
        return None
    return http2
