"""The HTTP/1.1 adapter, fed bytes through an in-memory transport (no sockets)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.errors import BadRequest, BodyTooLarge, respond_to
from gateway.server.events import DownstreamStream, ResponseHead
from gateway.server.http1 import H2_PREFACE, HTTP1Connection
from gateway.server.settings import ServerSettings


class MemoryTransport:
    """The parts of an asyncio transport the adapter uses, recording what it does."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.eof_written = False
        self.paused = False
        self.protocol: Any = None
        self.wrote = asyncio.Event()
        self.closed_event = asyncio.Event()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.1.2.3", 5555) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.out += data
        self.wrote.set()

    def writelines(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.write(piece)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.closed_event.set()
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    abort = close

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol


Handler = Callable[[DownstreamStream], Awaitable[None]]


async def echo_handler(stream: DownstreamStream) -> None:
    """Answers with the request line it saw and the body length, like a tiny app."""
    rejection = getattr(stream, "rejection", None)
    if rejection is not None:
        head, body = respond_to(rejection)
        await stream.send_head(head, False)
        await stream.send_body(body, True)
        return
    total = 0
    while True:
        try:
            chunk = await stream.read_body()
        except (BadRequest, BodyTooLarge) as error:
            head, body = respond_to(error)
            await stream.send_head(head, False)
            await stream.send_body(body, True)
            return
        if not chunk:
            break
        total += len(chunk)
    h = stream.head
    text = f"{h.method} {h.path} {h.query} {h.authority} {h.http_version} {total}".encode()
    await stream.send_head(ResponseHead(200, [("content-length", str(len(text)))]), False)
    await stream.send_body(text, True)


async def _wait_for(transport: MemoryTransport, needle: bytes, count: int = 1) -> bytes:
    async with asyncio.timeout(5):
        while transport.out.count(needle) < count:
            transport.wrote.clear()
            await transport.wrote.wait()
    return bytes(transport.out)


def _connection(
    handler: Handler = echo_handler, settings: ServerSettings | None = None
) -> tuple[HTTP1Connection, MemoryTransport]:
    conn = HTTP1Connection(handler, settings or ServerSettings(), 8080, "http")
    transport = MemoryTransport()
    transport.protocol = conn
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))  # type: ignore[arg-type]


def test_get_becomes_a_request_head_without_host_header() -> None:
    seen = []

    async def handler(stream: DownstreamStream) -> None:
        seen.append(stream.head)
        await echo_handler(stream)

    async def main() -> None:
        conn, transport = _connection(handler)
        conn.data_received(b"GET /a/b?x=1 HTTP/1.1\r\nHost: shop.example\r\nX-Thing: v\r\n\r\n")
        out = await _wait_for(transport, b"\r\n\r\n")
        await _wait_for(transport, b"GET /a/b x=1")
        assert out.startswith(b"HTTP/1.1 200 OK\r\n")
        head = seen[0]
        assert (head.method, head.path, head.query, head.authority) == (
            "GET",
            "/a/b",
            "x=1",
            "shop.example",
        )
        assert head.headers == [("x-thing", "v")]
        assert head.peer == "10.1.2.3" and head.port == 8080
        assert not transport.closed

    run(main())


def test_pipelined_requests_are_answered_in_order() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        slow_started = asyncio.Event()

        async def handler(stream: DownstreamStream) -> None:
            if stream.head.path == "/slow":
                slow_started.set()
                await gate.wait()
            await echo_handler(stream)

        conn, transport = _connection(handler)
        conn.data_received(
            b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\nGET /fast HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        async with asyncio.timeout(5):
            await slow_started.wait()
        assert b"/fast" not in transport.out
        gate.set()
        out = await _wait_for(transport, b"HTTP/1.1 200", 2)
        await _wait_for(transport, b"GET /fast")
        out = bytes(transport.out)
        assert out.index(b"GET /slow") < out.index(b"GET /fast")

    run(main())


def test_chunked_request_body_is_read_and_unframed_response_is_chunked() -> None:
    async def handler(stream: DownstreamStream) -> None:
        body = b""
        while chunk := await stream.read_body():
            body += chunk
        await stream.send_head(ResponseHead(200, []), False)
        await stream.send_body(body.upper(), False)
        await stream.send_body(b"", True)

    async def main() -> None:
        conn, transport = _connection(handler)
        conn.data_received(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        out = await _wait_for(transport, b"0\r\n\r\n")
        assert b"transfer-encoding: chunked\r\n" in out
        assert out.endswith(b"\r\n\r\n5\r\nABCDE\r\n0\r\n\r\n")

    run(main())


def test_content_length_with_transfer_encoding_is_refused_and_never_handled() -> None:
    async def main() -> None:
        conn, transport = _connection()
        conn.data_received(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        out = await _wait_for(transport, b"bad request")
        assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b"connection: close" in out
        assert b"POST" not in out  # the echo handler never saw it as a request

    run(main())


def test_duplicate_differing_content_length_is_refused() -> None:
    async def main() -> None:
        conn, transport = _connection()
        conn.data_received(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
        )
        out = await _wait_for(transport, b"bad request")
        assert out.startswith(b"HTTP/1.1 400 ")

    run(main())


def test_too_many_headers_get_431() -> None:
    async def main() -> None:
        conn, transport = _connection(settings=ServerSettings(max_request_headers=5))
        extra = b"".join(b"X-%d: v\r\n" % i for i in range(6))
        conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n")
        out = await _wait_for(transport, b"too large")
        assert out.startswith(b"HTTP/1.1 431 ")

    run(main())


def test_head_over_the_byte_limit_gets_431() -> None:
    async def main() -> None:
        conn, transport = _connection(settings=ServerSettings(max_request_header_bytes=200))
        conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 300 + b"\r\n\r\n")
        out = await _wait_for(transport, b"too large")
        assert out.startswith(b"HTTP/1.1 431 ")

    run(main())


def test_declared_body_over_the_limit_gets_413_before_reading_it() -> None:
    async def main() -> None:
        conn, transport = _connection(settings=ServerSettings(max_request_body_bytes=10))
        conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n")
        out = await _wait_for(transport, b"payload too large")
        assert out.startswith(b"HTTP/1.1 413 ")

    run(main())


def test_chunked_body_growing_over_the_limit_gets_413() -> None:
    async def main() -> None:
        conn, transport = _connection(settings=ServerSettings(max_request_body_bytes=10))
        conn.data_received(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n"
        )
        out = await _wait_for(transport, b"payload too large")
        assert out.startswith(b"HTTP/1.1 413 ")

    run(main())


def test_slow_head_gets_408() -> None:
    async def main() -> None:
        conn, transport = _connection(settings=ServerSettings(request_header_timeout_s=0.05))
        conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n")
        out = await _wait_for(transport, b"request timeout")
        assert out.startswith(b"HTTP/1.1 408 ")

    run(main())


def test_http10_response_without_length_is_delimited_by_close() -> None:
    async def handler(stream: DownstreamStream) -> None:
        await stream.send_head(ResponseHead(200, []), False)
        await stream.send_body(b"hello", True)

    async def main() -> None:
        conn, transport = _connection(handler)
        conn.data_received(b"GET / HTTP/1.0\r\n\r\n")
        out = await _wait_for(transport, b"hello")
        assert b"transfer-encoding" not in out
        assert b"connection: close\r\n" in out
        async with asyncio.timeout(5):
            await transport.closed_event.wait()
        assert transport.closed

    run(main())


def test_expect_continue_is_answered_when_the_body_is_read() -> None:
    async def main() -> None:
        conn, transport = _connection()
        conn.data_received(
            b"PUT /u HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        await _wait_for(transport, b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.data_received(b"data")
        out = await _wait_for(transport, b"PUT /u")
        assert out.index(b"100 Continue") < out.index(b"200 OK")
        assert out.endswith(b" 4")

    run(main())


def test_head_response_carries_no_body() -> None:
    async def handler(stream: DownstreamStream) -> None:
        await stream.send_head(ResponseHead(200, [("content-length", "5")]), False)
        await stream.send_body(b"hello", True)

    async def main() -> None:
        conn, transport = _connection(handler)
        conn.data_received(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        conn.data_received(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        out = await _wait_for(transport, b"HTTP/1.1 200", 2)
        first = out[: out.index(b"HTTP/1.1 200", 1)]
        assert b"content-length: 5\r\n" in first
        assert first.endswith(b"\r\n\r\n")  # no body after the HEAD response's head

    run(main())


def test_missing_host_on_http11_is_a_bad_request() -> None:
    async def main() -> None:
        conn, transport = _connection()
        conn.data_received(b"GET / HTTP/1.1\r\n\r\n")
        out = await _wait_for(transport, b"bad request")
        assert out.startswith(b"HTTP/1.1 400 ")

    run(main())


def test_http2_preface_hands_the_connection_over() -> None:
    async def main() -> None:
        conn, transport = _connection()
        conn.data_received(H2_PREFACE[:10])
        assert transport.protocol is conn  # still waiting for the rest of the preface
        conn.data_received(H2_PREFACE[10:])
        assert transport.protocol is not conn
        assert type(transport.protocol).__name__ == "H2Protocol"

    run(main())


def test_declined_upgrade_with_body_is_served_as_http11() -> None:
    async def main() -> None:
        conn, transport = _connection()
        conn.data_received(
            b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"
            b"Content-Length: 3\r\n\r\nabc"
            b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        out = await _wait_for(transport, b"GET /next")
        assert b"101" not in out
        assert b"POST /up  a 1.1 3" in out

    run(main())


def test_large_body_pauses_reading_until_the_handler_reads() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def handler(stream: DownstreamStream) -> None:
            await release.wait()
            await echo_handler(stream)

        settings = ServerSettings(write_buffer_high_bytes=1024)
        conn, transport = _connection(handler, settings)
        conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4096\r\n\r\n")
        conn.data_received(os.urandom(2048))
        assert transport.paused
        release.set()
        async with asyncio.timeout(5):
            while transport.paused:
                await asyncio.sleep(0)
        conn.data_received(os.urandom(2048))
        out = await _wait_for(transport, b" 4096")
        assert out.startswith(b"HTTP/1.1 200")

    run(main())


def test_connect_is_a_bad_request_when_tunnels_are_not_allowed() -> None:
    async def main() -> None:
        conn, transport = _connection()
        conn.data_received(b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        out = await _wait_for(transport, b"bad request")
        assert out.startswith(b"HTTP/1.1 400 ")

    run(main())


def test_connect_becomes_a_tunnel_request_with_the_bytes_after_its_head() -> None:
    async def main() -> None:
        handed: asyncio.Future[tuple[Any, Any, bytes]] = asyncio.get_running_loop().create_future()

        async def tunnel_handler(stream: DownstreamStream) -> None:
            raw, rest = stream.take_over()  # type: ignore[attr-defined]
            handed.set_result((stream.head, raw, rest))

        conn, transport = _connection(tunnel_handler, ServerSettings(allow_connect=True))
        conn.data_received(
            b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n"
            b"\x16\x03\x01early-client-hello"
        )
        head, raw, rest = await handed
        assert head.method == "CONNECT" and head.path == ""
        assert head.authority == "api.example.test:443"
        assert raw is transport and rest == b"\x16\x03\x01early-client-hello"
        assert transport.paused  # nothing more is read until the tunnel takes it

    run(main())
