"""The HTTP/2 adapter against hostile clients, over real sockets on 127.0.0.1.

Each test writes raw frames (built here, so nothing in a client library smooths them
over) to an ``H2Protocol`` listening on a real socket, and reads what it answers.
Beside each case is what Envoy does (``http2_protocol_options``), whose limits and
defaults the adapter follows. Waiting is on frames, events and EOF with a deadline;
nothing sleeps.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hpack import Decoder, Encoder

from gateway.server.events import ResponseHead, StreamReset
from gateway.server.http2 import H2Protocol
from gateway.server.settings import ServerSettings

TIMEOUT_S = 5.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0,
    0x1,
    0x2,
    0x3,
    0x4,
    0x6,
    0x7,
    0x8,
    0x9,
)
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return struct.pack(">HBBBL", size >> 8, size & 0xFF, kind, flags, stream_id) + payload


def request_block(path: str = "/", extra: list[tuple[str, str]] | None = None) -> bytes:
    fields = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "x")]
    return Encoder().encode(fields + (extra or []), huffman=False)


def split_block(stream_id: int, block: bytes, end_stream: bool = True) -> bytes:
    """A header block as HEADERS plus CONTINUATION frames of 16 KiB."""
    chunks = [block[i : i + 16384] for i in range(0, len(block), 16384)]
    out = []
    for i, chunk in enumerate(chunks):
        flags = (END_HEADERS if i == len(chunks) - 1 else 0) | (
            END_STREAM if i == 0 and end_stream else 0
        )
        out.append(frame(HEADERS if i == 0 else CONTINUATION, flags, stream_id, chunk))
    return b"".join(out)


class Backend:
    """The pipeline: records what reached it. ``/wait`` holds until ``gate``; ``/read``
    reads the body then answers 204; ``/big?n`` sends n bytes."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.bodies: dict[int, bytes] = {}
        self.resets: list[int] = []
        self.gate = asyncio.Event()
        self.running = 0
        self.idle = asyncio.Event()  # set whenever no handler is running

    async def __call__(self, stream: Any) -> None:
        self.paths.append(stream.head.path)
        self.running += 1
        self.idle.clear()
        try:
            if stream.rejection is not None:
                await stream.send_head(ResponseHead(stream.rejection.status, []), end_stream=True)
                return
            path = stream.head.path
            if path == "/wait":
                await self.gate.wait()
            elif path == "/big":
                await stream.send_head(ResponseHead(200, []), end_stream=False)
                await stream.send_body(b"x" * int(stream.head.query), end_stream=True)
                return
            body = bytearray()
            while chunk := await stream.read_body():
                body += chunk
            self.bodies[stream.stream_id] = bytes(body)
            await stream.send_head(ResponseHead(204 if path == "/read" else 200, []), True)
        except StreamReset:
            self.resets.append(stream.stream_id)
            raise
        finally:
            self.running -= 1
            if not self.running:
                self.idle.set()


class Server:
    """``H2Protocol`` on a real listening socket; ``sndbuf`` shrinks the kernel's send
    buffer of accepted sockets, so a client that does not read fills ours quickly."""

    def __init__(self, settings: ServerSettings, sndbuf: int | None = None) -> None:
        self.settings = settings
        self.sndbuf = sndbuf
        self.backend = Backend()
        self.protos: list[H2Protocol] = []
        self.paused = asyncio.Event()  # the first protocol's write buffer went over high
        self.lost = asyncio.Event()  # the first protocol's connection_lost ran
        self.server: asyncio.Server | None = None
        self.port = 0

    def _factory(self) -> H2Protocol:
        outer = self

        class Watched(H2Protocol):
            def connection_made(self, transport: Any) -> None:
                if outer.sndbuf is not None:
                    sock = transport.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, outer.sndbuf)
                super().connection_made(transport)

            def pause_writing(self) -> None:
                outer.paused.set()
                super().pause_writing()

            def connection_lost(self, exc: Exception | None) -> None:
                outer.lost.set()
                super().connection_lost(exc)

        proto = Watched(self.backend, self.settings, self.port, "http", "")
        self.protos.append(proto)
        return proto

    async def __aenter__(self) -> Server:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._factory, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for proto in self.protos:
            proto.abort()


class RawClient:
    """Writes raw frames, reads and parses the server's frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = b""
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.eof = False
        self._decoder = Decoder()  # response blocks, decoded in order as they come
        self.statuses: dict[int, int] = {}

    @classmethod
    async def connect(cls, port: int, rcvbuf: int | None = None) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        client = cls(reader, writer)
        client.send(PREFACE + frame(SETTINGS, 0, 0))
        return client

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def of(self, kind: int, stream_id: int | None = None) -> list[tuple[int, int, int, bytes]]:
        return [f for f in self.frames if f[0] == kind and stream_id in (None, f[2])]

    def goaway_code(self) -> int | None:
        goaways = self.of(GOAWAY)
        return struct.unpack(">L", goaways[0][3][4:8])[0] if goaways else None

    def status(self, stream_id: int) -> int:
        return self.statuses[stream_id]

    async def read_until(self, predicate: Callable[[], bool], what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT_S
        while not predicate():
            if self.eof:
                raise AssertionError(f"connection closed before {what}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            try:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
            except TimeoutError:
                raise AssertionError(f"timed out waiting for {what}") from None
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                continue
            self.buffer += data
            self._parse()

    async def read_to_eof(self) -> None:
        """Read until the server closes (a reset counts: it closed with unread input)."""
        await self.read_until(lambda: self.eof, "the connection to close")

    def _parse(self) -> None:
        buf = self.buffer
        at = 0
        while at + 9 <= len(buf):
            size = int.from_bytes(buf[at : at + 3], "big")
            if at + 9 + size > len(buf):
                break
            kind, flags = buf[at + 3], buf[at + 4]
            stream_id = int.from_bytes(buf[at + 5 : at + 9], "big") & 0x7FFFFFFF
            payload = buf[at + 9 : at + 9 + size]
            self.frames.append((kind, flags, stream_id, payload))
            if kind == HEADERS:  # the server's blocks fit one frame here
                fields = dict(self._decoder.decode(payload))
                self.statuses.setdefault(stream_id, int(fields[":status"]))
            at += 9 + size
        self.buffer = buf[at:]

    async def ping_acked(self, tag: bytes) -> bool:
        """Send PING ``tag``; True once it is acknowledged, False if the server closes
        first. The server answers in order, so everything before the PING was read."""
        self.send(frame(PING, 0, 0, tag))

        def acked() -> bool:
            return any(f[1] & ACK and f[3] == tag for f in self.of(PING))

        try:
            await self.read_until(lambda: acked() or self.eof, "the PING's ACK")
        except AssertionError:
            if not self.eof:
                raise
        return acked()

    def close(self) -> None:
        self.writer.close()


async def closed_with(client: RawClient, code: int) -> None:
    await client.read_to_eof()
    assert client.goaway_code() == code


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


# -- header blocks ------------------------------------------------------------------


def test_continuation_flood_is_closed_once_the_block_passes_the_ceiling() -> None:
    """CVE-2024-27316 class. h2 alone buffers 64 frames (1 MiB) and waits for more;
    the block is now refused as soon as it passes the decoder's ceiling (4 x 60 KiB),
    without waiting for END_HEADERS. Envoy resets once its header limits are passed
    (CVE-2024-27919 fix) and caps CONTINUATION frames (nghttp2, 512)."""

    async def scenario() -> None:
        async with Server(ServerSettings()) as server:
            client = await RawClient.connect(server.port)
            block = request_block(extra=[("x-filler", "v" * 16000)])
            client.send(frame(HEADERS, END_STREAM, 1, block[:16000]))
            # 16 x 16,000 = 256,000 bytes: past the 245,760-byte ceiling, and far fewer
            # than h2's 64 frames; never END_HEADERS.
            for _ in range(16):
                client.send(frame(CONTINUATION, 0, 1, b"a" * 16000))
            await closed_with(client, ErrorCodes.ENHANCE_YOUR_CALM)
            assert server.backend.paths == []
            client.close()

    run(scenario)


def test_empty_continuation_frames_in_a_row_close_the_connection() -> None:
    """Empty CONTINUATION frames are empty frames to Envoy too: two in a row is a
    flood (max_consecutive_inbound_frames_with_empty_payload, 1)."""

    async def scenario() -> None:
        async with Server(ServerSettings()) as server:
            client = await RawClient.connect(server.port)
            client.send(frame(HEADERS, END_STREAM, 1, request_block()))
            client.send(frame(CONTINUATION, 0, 1) * 2)
            await closed_with(client, ErrorCodes.ENHANCE_YOUR_CALM)
            assert server.backend.paths == []
            client.close()

    run(scenario)


def test_one_empty_continuation_and_a_large_split_block_are_still_served() -> None:
    """The header-block bound must not touch an ordinary client: one empty
    CONTINUATION, and a block of 1,500 small fields (64 KB encoded, over the 60 KiB
    list limit, under the ceiling) split over CONTINUATION frames, which gets 431 on its
    own stream while the connection carries on."""

    async def scenario() -> None:
        async with Server(ServerSettings()) as server:
            client = await RawClient.connect(server.port)
            block = request_block()
            client.send(frame(HEADERS, END_STREAM, 1, block) + frame(CONTINUATION, END_HEADERS, 1))
            many = request_block(extra=[(f"x-{i:04d}", "v" * 40) for i in range(1500)])
            assert len(many) > 60 * 1024
            client.send(split_block(3, many))
            await client.read_until(
                lambda: bool(client.of(HEADERS, 1)) and bool(client.of(HEADERS, 3)), "answers"
            )
            assert client.status(1) == 200
            assert client.status(3) == 431
            assert await client.ping_acked(b"still-up")
            assert client.goaway_code() is None
            client.close()

    run(scenario)


# -- frame floods -------------------------------------------------------------------


def test_two_empty_data_frames_in_a_row_close_the_connection() -> None:
    """CVE-2019-9518: empty DATA frames cost nine octets each and a wake-up of the
    stream's reader. Envoy's max_consecutive_inbound_frames_with_empty_payload is 1."""

    async def scenario() -> None:
        async with Server(ServerSettings()) as server:
            client = await RawClient.connect(server.port)
            client.send(frame(HEADERS, END_HEADERS, 1, request_block("/read")))
            assert await client.ping_acked(b"started!")
            client.send(frame(DATA, 0, 1) * 2)
            await closed_with(client, ErrorCodes.ENHANCE_YOUR_CALM)
            # The request had begun; the connection's end reset it in the pipeline.
            await asyncio.wait_for(server.protos[0].wait_closed(), TIMEOUT_S)
            assert server.backend.paths == ["/read"]
            await asyncio.wait_for(server.backend.idle.wait(), TIMEOUT_S)
            assert server.backend.resets == [1]
            client.close()

    run(scenario)


def test_empty_data_frames_between_real_ones_are_allowed() -> None:
    async def scenario() -> None:
        async with Server(ServerSettings()) as server:
            client = await RawClient.connect(server.port)
            client.send(frame(HEADERS, END_HEADERS, 1, request_block("/read")))
            client.send(frame(DATA, 0, 1) + frame(DATA, 0, 1, b"ab"))
            client.send(frame(DATA, 0, 1) + frame(DATA, 0, 1, b"cd"))
            client.send(frame(DATA, 0, 1) + frame(DATA, END_STREAM, 1))
            await client.read_until(lambda: bool(client.of(HEADERS, 1)), "the answer")
            assert client.status(1) == 204
            assert server.backend.bodies == {1: b"abcd"}
            assert client.goaway_code() is None
            client.close()

    run(scenario)


def test_priority_flood_closes_the_connection() -> None:
    """CVE-2019-9513. Envoy's max_inbound_priority_frames_per_stream is 100, allowed
    per stream opened plus one stream's worth: 100 PRIORITY frames before any stream
    pass, the 101st does not."""

    async def scenario() -> None:
        async with Server(ServerSettings()) as server:
            client = await RawClient.connect(server.port)
            priority = struct.pack(">LB", 0, 15)
            client.send(b"".join(frame(PRIORITY, 0, 2 * i + 1, priority) for i in range(100)))
            assert await client.ping_acked(b"prio-100")
            client.send(frame(PRIORITY, 0, 201, priority))
            await closed_with(client, ErrorCodes.ENHANCE_YOUR_CALM)
            client.close()

    run(scenario)


def test_window_update_flood_closes_the_connection() -> None:
    """CVE-2019-9511. Envoy allows 5 + 2 * (streams opened + 10 * DATA frames sent)
    WINDOW_UPDATE frames (max_inbound_window_update_frames_per_data_frame_sent, 10);
    with nothing sent, the sixth is a flood."""

    async def scenario() -> None:
        async with Server(ServerSettings()) as server:
            client = await RawClient.connect(server.port)
            update = frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1))
            client.send(update * 5)
            assert await client.ping_acked(b"wu-five!")
            client.send(update)
            await closed_with(client, ErrorCodes.ENHANCE_YOUR_CALM)
            client.close()

    run(scenario)


def test_a_client_acknowledging_every_data_frame_is_not_a_window_update_flood() -> None:
    """An ordinary download, acknowledged frame by frame on the stream and the
    connection (two WINDOW_UPDATE frames per DATA frame, as h2-based clients do)."""

    async def scenario() -> None:
        async with Server(ServerSettings()) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            conn = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True, header_encoding="latin-1")
            )
            conn.initiate_connection()
            for _ in range(3):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(
                    sid,
                    [
                        (":method", "GET"),
                        (":path", "/big?300000"),
                        (":scheme", "http"),
                        (":authority", "x"),
                    ],
                    end_stream=True,
                )
            writer.write(conn.data_to_send())
            ended: set[int] = set()
            terminated = False
            for _ in range(10_000):
                if len(ended) == 3 or terminated:
                    break
                data = await asyncio.wait_for(reader.read(65536), TIMEOUT_S)
                assert data, "the server closed the connection"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        ended.add(event.stream_id)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        terminated = True
                writer.write(conn.data_to_send())
            assert not terminated
            assert ended == {1, 3, 5}
            writer.close()

    run(scenario)


# -- resets ---------------------------------------------------------------------------


def test_made_you_reset_counts_toward_the_rapid_reset_guard() -> None:
    """MadeYouReset (CVE-2025-8671): a DATA frame after END_STREAM makes the server
    reset the stream (STREAM_CLOSED) while the pipeline is already running it; the
    client never sends RST_STREAM, so a guard counting only those never trips. Envoy
    counts every premature reset, and so does the adapter now."""

    async def scenario() -> None:
        async with Server(ServerSettings(h2_max_premature_resets=20)) as server:
            client = await RawClient.connect(server.port)
            for i in range(60):
                sid = 2 * i + 1
                client.send(frame(HEADERS, END_STREAM | END_HEADERS, sid, request_block("/wait")))
                client.send(frame(DATA, 0, sid, b"x"))
            await closed_with(client, ErrorCodes.ENHANCE_YOUR_CALM)
            proto = server.protos[0]
            assert proto.client_resets == 21
            # Every stream the pipeline had was reset with the connection.
            await asyncio.wait_for(proto.wait_closed(), TIMEOUT_S)
            assert len(server.backend.paths) <= 60
            client.close()

    run(scenario)


# -- stream identifiers and body length ---------------------------------------------

_CL3 = [("content-length", "3")]


@pytest.mark.parametrize(
    ("frames", "may_reach"),
    [
        # Stream ids must grow, and be odd from a client (RFC 9113 §5.1.1).
        (frame(HEADERS, 5, 5, request_block()) + frame(HEADERS, 5, 3, request_block()), True),
        (frame(HEADERS, 5, 2, request_block()), False),
        # DATA on a stream never opened (§5.1: idle).
        (frame(DATA, 0, 7, b"abc"), False),
        # A body longer or shorter than its content-length (§8.1.1): h2 checks every
        # frame; nothing past the declared length is handed over.
        (frame(HEADERS, 4, 1, request_block("/read", _CL3)) + frame(DATA, 1, 1, b"abcdef"), False),
        (
            frame(HEADERS, 4, 1, request_block("/read", [("content-length", "9")]))
            + frame(DATA, 1, 1, b"abc"),
            False,
        ),
    ],
    ids=[
        "stream-id-backwards",
        "even-stream-id",
        "data-on-idle-stream",
        "data-over-cl",
        "data-under-cl",
    ],
)
def test_stream_and_length_violations_end_the_connection(frames: bytes, may_reach: bool) -> None:
    """Connection errors, GOAWAY PROTOCOL_ERROR, as nghttp2 (Envoy's codec) answers."""

    async def scenario() -> None:
        async with Server(ServerSettings()) as server:
            client = await RawClient.connect(server.port)
            client.send(frames)
            await closed_with(client, ErrorCodes.PROTOCOL_ERROR)
            await asyncio.wait_for(server.protos[0].wait_closed(), TIMEOUT_S)
            # Stream 5, valid, may have reached the pipeline if it came in a read of its
            # own; the frame that broke the rule never did, nor any body.
            assert server.backend.paths in ([["/"]] if may_reach else []) + [[]]
            assert server.backend.bodies == {}
            client.close()

    run(scenario)


def test_data_past_content_length_never_reaches_the_pipeline() -> None:
    """The declared bytes are handed over as they come; the frame that runs past the
    content-length ends the connection before any of it is, and the pipeline's read
    raises StreamReset (so the upstream request is abandoned, not completed)."""

    async def scenario() -> None:
        async with Server(ServerSettings()) as server:
            client = await RawClient.connect(server.port)
            client.send(frame(HEADERS, END_HEADERS, 1, request_block("/read", _CL3)))
            client.send(frame(DATA, 0, 1, b"abc"))
            assert await client.ping_acked(b"cl-three")
            client.send(frame(DATA, END_STREAM, 1, b"GET /smuggled HTTP/1.1\r\n\r\n"))
            await closed_with(client, ErrorCodes.PROTOCOL_ERROR)
            await asyncio.wait_for(server.protos[0].wait_closed(), TIMEOUT_S)
            assert server.backend.paths == ["/read"]
            await asyncio.wait_for(server.backend.idle.wait(), TIMEOUT_S)
            assert server.backend.bodies == {}
            assert server.backend.resets == [1]
            client.close()

    run(scenario)


# -- a client that does not read ------------------------------------------------------


def test_a_client_that_never_reads_cannot_keep_a_closed_connection_open() -> None:
    """A PING flood from a client that reads nothing fills the write buffer; the
    adapter then stops reading (memory stays bounded). Closing such a connection used to
    wait for that buffer to drain, that is forever; now it is dropped once the client
    has read nothing for h2_delayed_close_timeout_s (Envoy's delayed_close_timeout).
    Envoy closes a connection over max_outbound_control_frames (1,000) at once."""

    async def scenario() -> None:
        settings = ServerSettings(h2_delayed_close_timeout_s=0.2)
        async with Server(settings, sndbuf=4096) as server:
            client = await RawClient.connect(server.port, rcvbuf=4096)
            pings = frame(PING, 0, 0, b"flooding") * 4096
            for _ in range(200):
                if server.paused.is_set():
                    break
                client.send(pings)
                drained = asyncio.ensure_future(client.writer.drain())
                paused = asyncio.ensure_future(server.paused.wait())
                await asyncio.wait(
                    {drained, paused}, timeout=TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
                )
                drained.cancel()
                paused.cancel()
            assert server.paused.is_set(), "the write buffer never filled"
            proto = server.protos[0]
            transport = proto._transport
            assert transport is not None
            # Bounded: the high-water mark plus what one read's PINGs produced.
            assert transport.get_write_buffer_size() < 4 * settings.write_buffer_high_bytes
            proto.close(graceful=True)
            await asyncio.wait_for(server.lost.wait(), TIMEOUT_S)
            client.writer.transport.abort()

    run(scenario)


def test_a_closing_connection_is_flushed_to_a_client_that_reads() -> None:
    """The drop is only for a client that reads nothing. Here the client reads only
    once the server has closed the connection with 4 MB of a response still to send,
    through small socket buffers, so draining takes many timer periods: each finds
    progress, and the client gets the whole body, the GOAWAY, and a clean end."""

    async def scenario() -> None:
        settings = ServerSettings(h2_delayed_close_timeout_s=0.1)
        size = 4_000_000
        async with Server(settings, sndbuf=4096) as server:
            client = await RawClient.connect(server.port, rcvbuf=4096)
            # Windows wide enough for the whole body: only the socket holds it back.
            client.send(frame(SETTINGS, 0, 0, struct.pack(">HL", 4, 0x7FFFFFFF)))
            client.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 0x7FFFFFFF - 65535)))
            client.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, request_block(f"/big?{size}")))
            await asyncio.wait_for(server.paused.wait(), TIMEOUT_S)
            server.protos[0].close(graceful=True)
            await client.read_to_eof()
            assert sum(len(f[3]) for f in client.of(DATA, 1)) == size
            assert client.of(DATA, 1)[-1][1] & END_STREAM
            assert client.goaway_code() == ErrorCodes.NO_ERROR
            client.close()

    run(scenario)
