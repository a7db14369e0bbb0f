"""The demo backend: a small, fast echo service for demos, tests and benchmarks.

``meshgate demo-backend --port PORT [--name NAME] [--address ADDR]`` answers every
HTTP/1.x request with a JSON description of what it received::

    {"service": NAME, "method": "GET", "path": "/a", "query": "x=1",
     "headers": {"host": "...", ...}, "body_bytes": 0, "body_sha256": "e3b0..."}

The request body is counted and hashed as it arrives and never kept, so uploads of
any size run in constant memory. Query parameters steer the answer, which is what
makes the service useful for testing a gateway:

=================  ==============================================================
``status=NNN``     answer with that status (200..599)
``delay_ms=N``     wait N milliseconds before answering (timeouts)
``bytes=N``        answer with N bytes of ``PATTERN`` instead of JSON, streamed in
                   chunks that respect the transport's flow control (downloads of
                   any size in constant memory)
``close=1``        reset the connection instead of answering (an upstream reset)
``header=n:v``     add a response header; may be repeated
=================  ==============================================================

Every response carries ``x-served-by: NAME``. Keep-alive, pipelining (answered in
order), chunked request bodies, ``Expect: 100-continue`` and HTTP/1.0 are handled.

It is built like the gateway's own HTTP/1.1 layer (uvloop, httptools, raw asyncio
protocols, no framework) so that it is never the bottleneck of what it measures.
It does not know about routes or configuration: it is a stand-alone program.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import cast
from urllib.parse import parse_qsl

import httptools
import uvloop

__all__ = ["PATTERN", "pattern_bytes", "serve"]

# The streamed body for ``bytes=N``: byte ``i`` is ``PATTERN[i % 64]``. Printable, so
# it reads well in a terminal, and a 64-byte period divides the chunk size, so every
# chunk is the same object and writing it costs no allocation.
PATTERN = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_CHUNK = PATTERN * 1024  # 64 KiB
# Pipelined requests are queued while an answer is delayed or streaming; past this
# many, reading is paused so a client cannot make the queue grow without bound.
_MAX_QUEUED = 16
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def pattern_bytes(n: int) -> bytes:
    """The first ``n`` bytes of what ``bytes=n`` streams (for clients that check it)."""
    whole, rest = divmod(n, len(PATTERN))
    return PATTERN * whole + PATTERN[:rest]


class _Request:
    """What one request asked for; filled in by parser callbacks."""

    __slots__ = (
        "body_bytes",
        "hasher",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "url",
    )

    def __init__(self) -> None:
        self.url = b""
        self.method = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body_bytes = 0
        self.hasher = hashlib.sha256()
        self.http_version = "1.1"
        self.keep_alive = True


class _Answer:
    """The response a request's query parameters call for."""

    __slots__ = ("close", "delay_s", "extra_headers", "status", "stream_bytes")

    def __init__(self) -> None:
        self.status = 200
        self.delay_s = 0.0
        self.stream_bytes: int | None = None
        self.close = False
        self.extra_headers: list[tuple[bytes, bytes]] = []


def _parse_controls(query: str) -> _Answer:
    """Query string -> the answer; raises ValueError naming the bad parameter."""
    answer = _Answer()
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "status":
            status = _int_param(key, value)
            if not 200 <= status <= 599:
                raise ValueError(f"status={value}: must be between 200 and 599")
            answer.status = status
        elif key == "delay_ms":
            answer.delay_s = _int_param(key, value) / 1000.0
        elif key == "bytes":
            answer.stream_bytes = _int_param(key, value)
        elif key == "close":
            answer.close = value not in ("", "0", "false")
        elif key == "header":
            name, sep, text = value.partition(":")
            if not sep or not name.strip():
                raise ValueError(f"header={value}: must be name:value")
            answer.extra_headers.append(
                (name.strip().lower().encode("latin-1"), text.strip().encode("latin-1"))
            )
    return answer


def _int_param(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{key}={value}: not a whole number") from None
    if number < 0:
        raise ValueError(f"{key}={value}: must not be negative")
    return number


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and answers them in arrival order.

    Simple answers are written synchronously from the parser callback (the fast path,
    no task and no timer); delayed and streamed answers make the connection *busy*, and
    requests pipelined behind them wait in ``queue``.
    """

    def __init__(self, name: str, served_by: bytes, connections: set[_Connection]) -> None:
        self.name = name
        self.served_by = served_by
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.request = _Request()
        self.queue: deque[_Request] = deque()
        self.busy = False
        self.reading_paused = False
        self.write_paused = False
        self.stream_left = 0
        self.stream_done: Callable[[], None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    # ------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.connections.discard(self)
        self.queue.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed request: {exc}")

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.stream_left:
            self._pump()

    # ------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        self.request = _Request()

    def on_url(self, url: bytes) -> None:
        self.request.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.request.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        request = self.request
        request.method = self.parser.get_method()
        request.http_version = self.parser.get_http_version()
        request.keep_alive = self.parser.should_keep_alive()
        # curl sends Expect: 100-continue before large uploads and waits (1 s) for it.
        if request.http_version == "1.1" and any(
            n == b"expect" and v.lower() == b"100-continue" for n, v in request.headers
        ):
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        request = self.request
        request.body_bytes += len(body)
        request.hasher.update(body)

    def on_message_complete(self) -> None:
        if self.busy:
            self.queue.append(self.request)
            if len(self.queue) >= _MAX_QUEUED and not self.reading_paused:
                self.reading_paused = True
                self._transport().pause_reading()
        else:
            self._start(self.request)

    # ------------------------------------------------------------ answering

    def _start(self, request: _Request) -> None:
        url = httptools.parse_url(request.url)
        query = (url.query or b"").decode("latin-1")
        try:
            answer = _parse_controls(query)
        except ValueError as exc:
            self._finish_simple(request, 400, _json_body({"error": str(exc)}), ())
            return
        if answer.delay_s > 0:
            self.busy = True
            self.timer = asyncio.get_running_loop().call_later(
                answer.delay_s, self._after_delay, request, answer
            )
            return
        self._answer(request, answer)

    def _after_delay(self, request: _Request, answer: _Answer) -> None:
        self.timer = None
        if not self.closed:
            self._answer(request, answer)

    def _answer(self, request: _Request, answer: _Answer) -> None:
        if answer.close:
            self._reset()
            return
        if answer.stream_bytes is not None:
            self._start_stream(request, answer)
            return
        url = httptools.parse_url(request.url)
        headers: dict[str, str] = {}
        for name, value in request.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            # Repeated fields are joined the way RFC 9110 section 5.3 allows.
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        document = {
            "service": self.name,
            "method": request.method.decode("latin-1"),
            "path": (url.path or b"").decode("latin-1"),
            "query": (url.query or b"").decode("latin-1"),
            "headers": headers,
            "body_bytes": request.body_bytes,
            "body_sha256": request.hasher.hexdigest(),
        }
        self._finish_simple(request, answer.status, _json_body(document), answer.extra_headers)

    def _head(
        self,
        request: _Request,
        status: int,
        length: int,
        extra: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]],
        content_type: bytes,
    ) -> bytes:
        parts = [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")),
            b"content-type: ",
            content_type,
            b"\r\ncontent-length: %d\r\nx-served-by: " % length,
            self.served_by,
            b"\r\n",
        ]
        for name, value in extra:
            parts += (name, b": ", value, b"\r\n")
        if not request.keep_alive:
            parts.append(b"connection: close\r\n")
        elif request.http_version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _finish_simple(
        self,
        request: _Request,
        status: int,
        body: bytes,
        extra: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]],
    ) -> None:
        head = self._head(request, status, len(body), extra, b"application/json")
        if request.method == b"HEAD":
            self._write(head)
        else:
            self._write(head + body)
        self._done(request)

    def _start_stream(self, request: _Request, answer: _Answer) -> None:
        size = answer.stream_bytes or 0
        self._write(
            self._head(
                request, answer.status, size, answer.extra_headers, b"application/octet-stream"
            )
        )
        if request.method == b"HEAD" or size == 0:
            self._done(request)
            return
        self.busy = True
        self.stream_left = size
        self.stream_done = lambda: self._done(request)
        self._pump()

    def _pump(self) -> None:
        """Write pattern chunks until the body is out or the transport asks us to stop.

        ``write`` calls ``pause_writing`` synchronously once the transport's buffer
        passes its high-water mark, which ends this loop; ``resume_writing`` calls
        back in here when the buffer has drained. So the buffer holds at most a
        high-water mark plus one chunk, whatever the body's size."""
        transport = self._transport()
        while self.stream_left and not self.write_paused and not self.closed:
            if self.stream_left >= len(_CHUNK):
                transport.write(_CHUNK)
                self.stream_left -= len(_CHUNK)
            else:
                transport.write(_CHUNK[: self.stream_left])
                self.stream_left = 0
        if not self.stream_left and self.stream_done is not None:
            done, self.stream_done = self.stream_done, None
            done()

    def _done(self, request: _Request) -> None:
        """One answer is out: close, or go on with the next pipelined request."""
        self.busy = False
        if self.closed:
            return
        if not request.keep_alive:
            self._transport().close()
            return
        if self.queue:
            self._start(self.queue.popleft())
        elif self.reading_paused:
            self.reading_paused = False
            self._transport().resume_reading()

    def _fail(self, status: int, message: str) -> None:
        if self.closed:
            return
        body = _json_body({"error": message})
        self._write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"x-served-by: %s\r\nconnection: close\r\n\r\n%s"
            % (status, _REASONS[status], len(body), self.served_by, body)
        )
        self._transport().close()

    def _reset(self) -> None:
        """Close with a TCP RST rather than a FIN, as a crashed upstream would."""
        transport = self._transport()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def _write(self, data: bytes) -> None:
        if not self.closed:
            self._transport().write(data)

    def _transport(self) -> asyncio.Transport:
        assert self.transport is not None  # set in connection_made, before any callback
        return self.transport


def _json_body(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode() + b"\n"


async def _main(port: int, name: str, address: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    connections: set[_Connection] = set()
    served_by = name.encode("latin-1")
    server = await loop.create_server(
        lambda: _Connection(name, served_by, connections),
        address,
        port,
        backlog=4096,
        reuse_address=True,
    )
    bound_port = server.sockets[0].getsockname()[1]
    print(f"demo-backend {name} listening on {address}:{bound_port}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        for connection in list(connections):
            if connection.transport is not None:
                connection.transport.close()
        await server.wait_closed()


def serve(port: int, name: str = "demo", address: str = "127.0.0.1") -> None:
    """Run the demo backend until SIGTERM or SIGINT. ``port=0`` picks a free port,
    and the line printed to stderr names the one bound."""
    uvloop.run(_main(port, name, address))
