"""Envoy's stream idle timeout in the HTTP/1.1 and HTTP/2 adapters, over real sockets.

A client that stops reading its response, or stops sending a body it announced, must
not hold its stream (and the upstream work behind it) for longer than
``stream_idle_timeout_s``. The handler here does with the adapters' errors what
``gateway.pipeline`` does: a ``GatewayError`` before the response head is answered
(``respond_to``), after it the stream is reset; ``StreamReset`` is the client having
left (DC). It records the flag the access log would show. Waiting is on events and
reads with deadlines; the only timed waits are the trickle that must *not* time out.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import replace
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from h2.errors import ErrorCodes

from gateway.errors import GatewayError, respond_to
from gateway.server.events import ResponseHead, StreamReset
from gateway.server.http1 import HTTP1Connection
from gateway.server.http2 import H2Protocol
from gateway.server.settings import ServerSettings

IDLE_S = 0.3
TIMEOUT_S = 10.0
CHUNK = b"x" * 65536


class Pipeline:
    """``/big?N``: a response of N bytes sent in 64 KiB chunks, as the pipeline
    relays an upstream's body; ``/upload``: reads the whole body, then answers 200;
    ``/small``: 204. ``flags`` holds what the access log would show per request."""

    def __init__(self) -> None:
        self.flags: list[str] = []
        self.errors: list[BaseException] = []
        self.done = asyncio.Event()

    async def __call__(self, stream: Any) -> None:
        started = False
        flag = "-"
        try:
            path = stream.head.path
            if path == "/big":
                await stream.send_head(ResponseHead(200, []), end_stream=False)
                started = True
                left = int(stream.head.query)
                while left > 0:
                    piece = CHUNK[: min(left, len(CHUNK))]
                    left -= len(piece)
                    await stream.send_body(piece, left == 0)
            elif path == "/upload":
                received = 0
                while chunk := await stream.read_body():
                    received += len(chunk)
                body = b"%d" % received
                await stream.send_response(
                    ResponseHead(200, [("content-length", str(len(body)))]), body
                )
            else:
                await stream.send_head(ResponseHead(204, []), end_stream=True)
        except GatewayError as exc:
            self.errors.append(exc)
            flag = exc.flag
            if started:
                stream.reset()
            else:
                head, body = respond_to(exc)
                try:
                    await stream.send_response(head, body)
                except StreamReset:
                    flag += ",DC"
        except (StreamReset, asyncio.CancelledError) as exc:
            self.errors.append(exc)
            flag = "DC"
        finally:
            self.flags.append(flag)
            self.done.set()


class Small(HTTP1Connection):
    """A small kernel send buffer, so a client that does not read fills ours fast."""

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        super().connection_made(transport)


class SmallH2(H2Protocol):
    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        super().connection_made(transport)


def settings(idle_s: float = IDLE_S) -> ServerSettings:
    return replace(ServerSettings(), stream_idle_timeout_s=idle_s, write_buffer_high_bytes=65536)


async def h1_server(pipeline: Pipeline, idle_s: float = IDLE_S) -> tuple[Any, int, list[Any]]:
    conns: list[Any] = []

    def factory() -> HTTP1Connection:
        conn = Small(pipeline, settings(idle_s), 8080)
        conns.append(conn)
        return conn

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], conns


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    data = bytearray()
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while chunk := await reader.read(1 << 20):
                data += chunk
    except ConnectionResetError:
        pass
    return bytes(data)


def run(scenario: Any) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


# -- HTTP/1.1 -------------------------------------------------------------------------


def test_h1_client_that_stops_reading_the_response_loses_the_connection_flag_si() -> None:
    async def scenario() -> None:
        pipeline = Pipeline()
        server, port, _ = await h1_server(pipeline)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        began = time.monotonic()
        writer.write(b"GET /big?200000000 HTTP/1.1\r\nHost: a\r\n\r\n")
        async with asyncio.timeout(TIMEOUT_S):
            await pipeline.done.wait()
        assert time.monotonic() - began >= IDLE_S
        assert pipeline.flags == ["SI"]
        (error,) = pipeline.errors
        assert error.status == 504  # the request was whole; the head was out anyway
        # Reset after the head: the connection is closed, far short of 200 MB.
        data = await read_until_closed(reader)
        assert data.startswith(b"HTTP/1.1 200 ")
        assert len(data) < 50_000_000
        writer.close()
        server.close()

    run(scenario)


def test_h1_body_that_stops_midway_gets_408_and_the_connection_closes() -> None:
    async def scenario() -> None:
        pipeline = Pipeline()
        server, port, _ = await h1_server(pipeline)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"y" * 50)
        data = await read_until_closed(reader)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert b"connection: close" in head
        assert body == b"stream timeout"
        assert pipeline.flags == ["SI"]
        writer.close()
        server.close()

    run(scenario)


def test_h1_body_trickling_slower_than_the_timeout_in_total_is_not_idle() -> None:
    async def scenario() -> None:
        pipeline = Pipeline()
        server, port, _ = await h1_server(pipeline, idle_s=0.6)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\n")
        began = time.monotonic()
        for _ in range(6):
            await asyncio.sleep(0.15)  # the pacing under test, not a synchronisation
            writer.write(b"z")
        reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n6"), TIMEOUT_S)
        assert time.monotonic() - began > 0.6  # longer than the timeout, in total
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert pipeline.flags == ["-"]
        writer.close()
        server.close()

    run(scenario)


def test_h1_zero_turns_the_stream_idle_timeout_off() -> None:
    async def scenario() -> None:
        pipeline = Pipeline()
        server, port, conns = await h1_server(pipeline, idle_s=0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nz")
        async with asyncio.timeout(TIMEOUT_S):
            while not conns or conns[0]._active is None or conns[0]._active._body_waiter is None:
                await asyncio.sleep(0.01)
        assert conns[0]._stall_timer is None  # the stall armed no timer
        writer.write(b"z")
        reply = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n2"), TIMEOUT_S)
        assert reply.startswith(b"HTTP/1.1 200 ")
        writer.close()
        server.close()

    run(scenario)


# -- HTTP/2 ---------------------------------------------------------------------------


class H2Client:
    """h2's client state machine over a real socket; it never sends WINDOW_UPDATE
    unless told to (h2 does not acknowledge received data by itself)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    def request(self, method: str, path: str, body: bytes | None = None, length: int = 0) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "a")]
        if length:
            headers.append(("content-length", str(length)))
        self.conn.send_headers(sid, headers, end_stream=body is None)
        if body:
            self.conn.send_data(sid, body)
        self.flush()
        return sid

    async def until(self, want: Any) -> list[Any]:
        """Events up to and including the first for which ``want`` is true."""
        seen: list[Any] = []
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                data = await self.reader.read(65536)
                assert data, f"connection closed; events so far: {seen}"
                for event in self.conn.receive_data(data):
                    seen.append(event)
                    if want(event):
                        self.flush()
                        return seen
                self.flush()


async def h2_client(pipeline: Pipeline) -> tuple[Any, H2Client]:
    factory = lambda: SmallH2(pipeline, settings(), 8080, "http", "")  # noqa: E731
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    return server, H2Client(reader, writer)


def test_h2_client_keeping_a_zero_window_has_its_stream_reset_and_the_connection_stays() -> None:
    async def scenario() -> None:
        pipeline = Pipeline()
        server, client = await h2_client(pipeline)
        began = time.monotonic()
        sid = client.request("GET", "/big?1000000")
        events = await client.until(lambda e: isinstance(e, h2.events.StreamReset))
        assert time.monotonic() - began >= IDLE_S
        assert any(isinstance(e, h2.events.ResponseReceived) for e in events)
        reset = events[-1]
        assert reset.stream_id == sid and reset.error_code == ErrorCodes.NO_ERROR
        received = sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived))
        assert received <= 65535  # the window, never more
        async with asyncio.timeout(TIMEOUT_S):
            await pipeline.done.wait()
        assert pipeline.flags == ["SI"]
        # The connection carries on: another request is answered.
        second = client.request("GET", "/small")
        events = await client.until(
            lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == second
        )
        (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert dict(response.headers)[":status"] == "204"
        client.writer.close()
        server.close()

    run(scenario)


def test_h2_body_that_stops_midway_gets_408_on_that_stream() -> None:
    async def scenario() -> None:
        pipeline = Pipeline()
        server, client = await h2_client(pipeline)
        sid = client.request("POST", "/upload", b"y" * 50, length=100)
        events = await client.until(
            lambda e: (
                isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid
            )
        )
        (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert dict(response.headers)[":status"] == "408"
        body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
        assert body == b"stream timeout"
        assert pipeline.flags == ["SI"]
        server.close()
        client.writer.close()

    run(scenario)


def test_h2_streams_making_progress_are_left_alone_beside_a_stalled_one() -> None:
    async def scenario() -> None:
        pipeline = Pipeline()
        server, client = await h2_client(pipeline)
        stalled = client.request("POST", "/upload", b"y", length=10)
        # The other stream's body trickles in, each piece within the timeout.
        moving = client.request("POST", "/upload", b"", length=5)
        for _ in range(5):
            await asyncio.sleep(IDLE_S / 2)  # the pacing under test
            client.conn.send_data(moving, b"z", end_stream=False)
            client.flush()
        client.conn.end_stream(moving)
        client.flush()
        events = await client.until(
            lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == moving
        )
        statuses = {
            e.stream_id: dict(e.headers)[":status"]
            for e in events
            if isinstance(e, h2.events.ResponseReceived)
        }
        assert statuses == {stalled: "408", moving: "200"}
        server.close()
        client.writer.close()

    run(scenario)


def test_stream_idle_timeout_default_is_envoys_five_minutes() -> None:
    assert ServerSettings().stream_idle_timeout_s == 300.0


def test_h2_timed_out_stream_whose_408_is_not_taken_either_is_reset() -> None:
    async def scenario() -> None:
        pipeline = Pipeline()
        server, client = await h2_client(pipeline)
        # A window of 0: the 408's head goes out (HEADERS are not flow-controlled),
        # its body cannot.
        client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        client.flush()
        sid = client.request("POST", "/upload", b"y" * 5, length=100)
        events = await client.until(
            lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == sid
        )
        (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert dict(response.headers)[":status"] == "408"
        assert events[-1].error_code == ErrorCodes.CANCEL
        async with asyncio.timeout(TIMEOUT_S):
            await pipeline.done.wait()
        assert pipeline.flags == ["SI,DC"]
        server.close()
        client.writer.close()

    run(scenario)
