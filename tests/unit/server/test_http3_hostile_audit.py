"""Hostile HTTP/3 clients against the HTTP/3 adapter, driven without sockets.

Each test scripts a misbehaving client on top of the in-memory ``Pair`` of
``test_http3`` (a real aioquic client joined to meshgate's ``QuicListener``), writing
raw HTTP/3 frames and QPACK instructions where the client library would not, and
asserts what the server does: which error closes the connection or resets the
stream, whether the request reached the pipeline, and what stays held.
``docs/security.md`` ("Hostile HTTP/3 clients") has the full table, with Envoy's
behaviour beside it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aioquic.buffer import encode_uint_var
from aioquic.h3.connection import FrameType, Setting, StreamType, encode_frame
from aioquic.quic.logger import QuicLogger

from gateway.server.events import DownstreamStream
from gateway.server.http3 import H3_EXCESSIVE_LOAD, STREAM_WINDOW_BYTES
from gateway.server.settings import ServerSettings

from .test_http3 import TIMEOUT_S, Authority, Pair, ca, echo, run

__all__ = ["ca"]  # the module-scoped certificate authority fixture, shared

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":authority", b"example.com"),
    (b":path", b"/"),
]


def _qpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An RFC 9204 §4.1.1 prefixed integer."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A field line with a literal name and value, no Huffman (RFC 9204 §4.5.6)."""
    return _qpack_int(len(name), 3, 0x20) + name + _qpack_int(len(value), 7) + value


class Counting:
    """The echo pipeline, counting the requests that reach it."""

    def __init__(self) -> None:
        self.heads = 0
        self.started = asyncio.Event()

    async def __call__(self, stream: DownstreamStream) -> None:
        self.heads += 1
        self.started.set()
        await echo(stream)


def _client_frames(logger: QuicLogger) -> list[dict[str, Any]]:
    (trace,) = logger.to_dict()["traces"]
    return [
        frame
        for event in trace["events"]
        if event["name"] == "transport:packet_received"
        for frame in event["data"]["frames"]
    ]


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.create_task(event.wait()) for event in events]
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _closed_with(pair: Pair) -> int:
    async with asyncio.timeout(TIMEOUT_S):
        await pair.client.terminated.wait()
    return pair.client._quic._close_event.error_code


def test_qpack_dynamic_table_is_off_so_a_reference_bomb_never_decodes(ca: Authority) -> None:
    # One 4 KB entry in the dynamic table, then a header block of 20,000 one-byte
    # references to it: 80 MB of fields from 20 KB. With a table, pylsqpack decoded
    # it all (166 MB peak, 3 s) before any limit could count. meshgate advertises a
    # capacity of 0, so the first insertion is an encoder-stream error.
    async def main() -> None:
        handler = Counting()
        pair = Pair(handler, [ca.quic_certificate("example.com")], ca.pem)
        await pair.connect()
        client = pair.client
        async with asyncio.timeout(TIMEOUT_S):
            await pair.to_client.watch(lambda: client.h3._received_settings is not None).wait()
        settings = client.h3._received_settings
        assert settings[Setting.QPACK_MAX_TABLE_CAPACITY] == 0
        assert settings[Setting.QPACK_BLOCKED_STREAMS] == 0
        value = b"a" * 4000
        insert = (
            _qpack_int(4096, 5, 0x20)
            + _qpack_int(5, 5, 0x40)
            + b"x-big"
            + _qpack_int(len(value), 7)
            + value
        )
        client._quic.send_stream_data(client.h3._local_encoder_stream_id, insert)
        stream_id = client._quic.get_next_available_stream_id()
        block = bytes([2, 0]) + b"".join(_literal(n, v) for n, v in REQUEST) + b"\x80" * 20_000
        client._quic.send_stream_data(
            stream_id, encode_frame(FrameType.HEADERS, block), end_stream=True
        )
        client.transmit()
        assert await _closed_with(pair) == 0x201  # QPACK_ENCODER_STREAM_ERROR
        assert handler.heads == 0

    run(main())


def test_headers_frame_longer_than_the_header_limit_is_refused_before_it_arrives_whole(
    ca: Authority,
) -> None:
    # aioquic buffers a HEADERS frame until it is complete; a client declaring a huge
    # one and trickling it in held that buffer (and aioquic doubled the window as it
    # filled). The frame's declared length is enough to refuse the stream.
    async def main() -> None:
        handler = Counting()
        logger = QuicLogger()
        pair = Pair(handler, [ca.quic_certificate("example.com")], ca.pem, quic_logger=logger)
        await pair.connect()
        client = pair.client
        stream_id = client._quic.get_next_available_stream_id()
        frame_head = encode_uint_var(FrameType.HEADERS) + encode_uint_var(1 << 30)
        client._quic.send_stream_data(stream_id, frame_head + b"\x00" * 8000)
        client.transmit()

        def reset_seen() -> bool:
            return any(
                f["frame_type"] == "reset_stream" and f["stream_id"] == stream_id
                for f in _client_frames(logger)
            )

        async with asyncio.timeout(TIMEOUT_S):
            await pair.to_client.watch(reset_seen).wait()
        (reset,) = [f for f in _client_frames(logger) if f["frame_type"] == "reset_stream"]
        assert reset["error_code"] == H3_EXCESSIVE_LOAD
        # Nothing of the frame is kept, and the connection serves on.
        assert stream_id not in pair.protocol._h3._stream
        response = await pair.request("GET", "example.com", "/")
        assert response.status == 200
        assert handler.heads == 1

    run(main())


def test_partial_headers_frame_keeps_the_first_stream_window(ca: Authority) -> None:
    # Under the limit (here raised to 1 MiB) the frame is waited for, but its stream's
    # window does not grow while aioquic holds the unfinished frame.
    async def main() -> None:
        handler = Counting()
        settings = ServerSettings(max_request_header_bytes=1024 * 1024)
        pair = Pair(handler, [ca.quic_certificate("example.com")], ca.pem, settings=settings)
        await pair.connect()
        client = pair.client
        stream_id = client._quic.get_next_available_stream_id()
        frame_head = encode_uint_var(FrameType.HEADERS) + encode_uint_var(900 * 1024)
        client._quic.send_stream_data(stream_id, frame_head + b"\x00" * (800 * 1024))
        client.transmit()
        proto = pair.protocol

        def window_used() -> bool:
            qs = proto._quic._streams.get(stream_id)
            return qs is not None and qs.receiver.highest_offset >= STREAM_WINDOW_BYTES - 1024

        async with asyncio.timeout(TIMEOUT_S):
            await pair.to_server.watch(window_used).wait()
        # One more round trip, in which aioquic would have sent a doubled window.
        assert (await pair.request("GET", "example.com", "/")).status == 200
        quic_stream = proto._quic._streams[stream_id]
        assert quic_stream.max_stream_data_local == STREAM_WINDOW_BYTES
        assert len(proto._h3._stream[stream_id].buffer) <= STREAM_WINDOW_BYTES
        assert handler.heads == 1

    run(main())


def test_client_reset_ends_the_server_half_and_returns_the_stream_credit(
    ca: Authority,
) -> None:
    # Before, the server's half of a reset request stream stayed open: the QUIC
    # stream was held until the connection ended, and so was the client's credit
    # (after max_concurrent_streams cancelled requests the connection was stuck).
    async def main() -> None:
        started = asyncio.Event()

        async def hold(stream: DownstreamStream) -> None:
            if stream.head.method == "GET":
                await echo(stream)
                return
            started.set()
            await stream.read_body()

        pair = Pair(hold, [ca.quic_certificate("example.com")], ca.pem)
        await pair.connect()
        client = pair.client
        proto = pair.protocol
        stream_id = client._quic.get_next_available_stream_id()
        client.h3.send_headers(stream_id, REQUEST, end_stream=False)
        client.transmit()
        async with asyncio.timeout(TIMEOUT_S):
            await started.wait()
        client._quic.reset_stream(stream_id, 0x10C)
        client.transmit()
        # The server's half is reset too (H3_REQUEST_CANCELLED), so the QUIC stream
        # closes once the client acknowledges that, and its credit comes back.
        async with asyncio.timeout(TIMEOUT_S):
            await pair.to_client.watch(
                lambda: (
                    proto._quic._streams.get(stream_id) is None
                    or proto._quic._streams[stream_id].sender.is_finished
                    or proto._quic._streams[stream_id].sender._reset_error_code is not None
                )
            ).wait()
        assert (await pair.request("GET", "example.com", "/")).status == 200
        assert not proto._streams

    run(main())


def test_rapid_reset_closes_the_connection_with_excessive_load(ca: Authority) -> None:
    # CVE-2023-44487 over QUIC: each request reaches the pipeline, is reset by the
    # client at once, and its credit comes back; the HTTP/2 guard's limit applies.
    async def main() -> None:
        handler = Counting()
        settings = ServerSettings(h2_max_premature_resets=5)
        pair = Pair(handler, [ca.quic_certificate("example.com")], ca.pem, settings=settings)
        await pair.connect()
        client = pair.client
        for _ in range(20):
            if client.terminated.is_set():
                break
            handler.started.clear()
            stream_id = client._quic.get_next_available_stream_id()
            client.h3.send_headers(stream_id, REQUEST, end_stream=False)
            client.transmit()
            await _first(handler.started, client.terminated)
            if client.terminated.is_set():
                break
            client._quic.reset_stream(stream_id, 0x10C)
            client.transmit()
        assert await _closed_with(pair) == H3_EXCESSIVE_LOAD
        assert handler.heads == 6

    run(main())


def test_a_few_client_resets_leave_the_connection_up(ca: Authority) -> None:
    async def main() -> None:
        handler = Counting()
        settings = ServerSettings(h2_max_premature_resets=5)
        pair = Pair(handler, [ca.quic_certificate("example.com")], ca.pem, settings=settings)
        await pair.connect()
        client = pair.client
        for _ in range(5):
            handler.started.clear()
            stream_id = client._quic.get_next_available_stream_id()
            client.h3.send_headers(stream_id, REQUEST, end_stream=False)
            client.transmit()
            async with asyncio.timeout(TIMEOUT_S):
                await handler.started.wait()
            client._quic.reset_stream(stream_id, 0x10C)
            client.transmit()
        assert (await pair.request("GET", "example.com", "/")).status == 200
        assert not client.terminated.is_set()

    run(main())


def test_second_control_stream_closes_with_stream_creation_error(ca: Authority) -> None:
    async def main() -> None:
        handler = Counting()
        pair = Pair(handler, [ca.quic_certificate("example.com")], ca.pem)
        await pair.connect()
        client = pair.client
        stream_id = client._quic.get_next_available_stream_id(is_unidirectional=True)
        settings = encode_frame(FrameType.SETTINGS, b"")
        client._quic.send_stream_data(stream_id, encode_uint_var(StreamType.CONTROL) + settings)
        client.transmit()
        assert await _closed_with(pair) == 0x103  # H3_STREAM_CREATION_ERROR

    run(main())


def test_data_before_headers_closes_with_frame_unexpected(ca: Authority) -> None:
    async def main() -> None:
        handler = Counting()
        pair = Pair(handler, [ca.quic_certificate("example.com")], ca.pem)
        await pair.connect()
        client = pair.client
        stream_id = client._quic.get_next_available_stream_id()
        client._quic.send_stream_data(stream_id, encode_frame(FrameType.DATA, b"x" * 10))
        client.transmit()
        assert await _closed_with(pair) == 0x105  # H3_FRAME_UNEXPECTED
        assert handler.heads == 0

    run(main())
