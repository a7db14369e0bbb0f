"""A small HTTP/3 client on aioquic, for meshgate's tests and its HTTP/3 benchmark.

``H3Client`` is an aioquic ``QuicConnectionProtocol``: over a real UDP socket it comes
from ``connect_h3``; in memory a test attaches it to any datagram transport. Requests
may stream their body (an async iterator) and hand the response body to a callback
chunk by chunk, so large transfers do not have to fit in memory. It speaks only what
the gateway needs to be exercised: requests, bodies both ways, trailers, resets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic import events as quic_events
from aioquic.quic.configuration import QuicConfiguration

__all__ = ["H3Client", "H3Response", "client_configuration", "connect_h3"]

# Pause a streamed upload while this much of it is unacknowledged.
_UPLOAD_HIGH_BYTES = 512 * 1024


@dataclass
class H3Response:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    body_bytes: int = 0
    trailers: list[tuple[str, str]] | None = None
    reset_code: int | None = None  # the server reset the stream

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


class _Exchange:
    __slots__ = ("chunks", "done", "response", "sink")

    def __init__(self, done: asyncio.Future[H3Response], sink: Callable[[bytes], None] | None):
        self.response = H3Response()
        self.done = done
        self.sink = sink
        self.chunks: list[bytes] = []


class _ClientH3(H3Connection):
    """aioquic's HTTP/3 layer, noting the server's GOAWAY (aioquic skips it)."""

    goaway_received = False

    def _check_control_frame_type(self, frame_type: int) -> None:
        super()._check_control_frame_type(frame_type)
        if frame_type == FrameType.GOAWAY:
            self.goaway_received = True


class H3Client(QuicConnectionProtocol):
    """HTTP/3 requests over one QUIC connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = _ClientH3(self._quic)
        self._exchanges: dict[int, _Exchange] = {}
        self._ack_waiters: list[asyncio.Future[None]] = []
        self.terminated: asyncio.Event = asyncio.Event()

    async def request(
        self,
        method: str,
        authority: str,
        path: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | AsyncIterator[bytes] = b"",
        *,
        sink: Callable[[bytes], None] | None = None,
        trailers: Iterable[tuple[str, str]] | None = None,
    ) -> H3Response:
        """Send one request and wait for the whole response. With ``sink`` the body
        goes there chunk by chunk (``body_bytes`` still counts it)."""
        quic = self._quic
        stream_id = quic.get_next_available_stream_id()
        done: asyncio.Future[H3Response] = self._loop.create_future()
        self._exchanges[stream_id] = _Exchange(done, sink)
        fields = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            *((n.lower().encode(), v.encode()) for n, v in headers),
        ]
        has_body = not isinstance(body, bytes) or bool(body)
        ends_here = not has_body and trailers is None
        self.h3.send_headers(stream_id, fields, end_stream=ends_here)
        self.transmit()
        if isinstance(body, bytes):
            if body:
                self.h3.send_data(stream_id, body, end_stream=trailers is None)
                self.transmit()
        else:
            async for chunk in body:
                if done.done():
                    break  # answered (or reset) before the upload finished
                self.h3.send_data(stream_id, chunk, end_stream=False)
                self.transmit()
                while self._unacknowledged(stream_id) > _UPLOAD_HIGH_BYTES and not done.done():
                    await self._wait_ack()
            if not done.done() and trailers is None:
                self.h3.send_data(stream_id, b"", end_stream=True)
                self.transmit()
        if trailers is not None and not done.done():
            encoded = [(n.lower().encode(), v.encode()) for n, v in trailers]
            self.h3.send_headers(stream_id, encoded, end_stream=True)
            self.transmit()
        return await done

    @property
    def goaway_received(self) -> bool:
        return self.h3.goaway_received

    def reset_stream(self, stream_id: int, error_code: int = 0x10C) -> None:
        """Cancel a request (H3_REQUEST_CANCELLED by default)."""
        self._quic.reset_stream(stream_id, error_code)
        with contextlib.suppress(ValueError):
            self._quic.stop_stream(stream_id, error_code)
        self.transmit()

    def _unacknowledged(self, stream_id: int) -> int:
        stream = self._quic._streams.get(stream_id)
        if stream is None:
            return 0
        return stream.sender._buffer_stop - stream.sender._buffer_start

    async def _wait_ack(self) -> None:
        waiter = self._loop.create_future()
        self._ack_waiters.append(waiter)
        await waiter

    def transmit(self) -> None:
        super().transmit()
        waiters, self._ack_waiters = self._ack_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def quic_event_received(self, event: quic_events.QuicEvent) -> None:
        if isinstance(event, quic_events.ConnectionTerminated):
            for exchange in self._exchanges.values():
                if not exchange.done.done():
                    exchange.done.set_exception(ConnectionError(event.reason_phrase or "closed"))
            self._exchanges.clear()
            self.terminated.set()
            return
        if isinstance(event, quic_events.StreamReset):
            exchange = self._exchanges.pop(event.stream_id, None)
            if exchange is not None and not exchange.done.done():
                exchange.response.reset_code = event.error_code
                exchange.response.body = b"".join(exchange.chunks)
                exchange.done.set_result(exchange.response)
        for h3_event in self.h3.handle_event(event):
            exchange = self._exchanges.get(getattr(h3_event, "stream_id", -1))
            if exchange is None:
                continue
            response = exchange.response
            if isinstance(h3_event, HeadersReceived):
                decoded = [(n.decode(), v.decode()) for n, v in h3_event.headers]
                if response.status == 0:
                    status = next(int(v) for n, v in decoded if n == ":status")
                    if status >= 200:
                        response.status = status
                        response.headers = [(n, v) for n, v in decoded if not n.startswith(":")]
                else:
                    response.trailers = decoded
            elif isinstance(h3_event, DataReceived):
                response.body_bytes += len(h3_event.data)
                if exchange.sink is not None:
                    exchange.sink(h3_event.data)
                else:
                    exchange.chunks.append(h3_event.data)
            if getattr(h3_event, "stream_ended", False):
                del self._exchanges[h3_event.stream_id]
                response.body = b"".join(exchange.chunks)
                if not exchange.done.done():
                    exchange.done.set_result(response)


def client_configuration(
    server_name: str = "localhost", cadata: bytes | None = None, verify: bool = True
) -> QuicConfiguration:
    """A client configuration speaking h3, trusting ``cadata`` (PEM)."""
    import ssl

    config = QuicConfiguration(is_client=True, alpn_protocols=list(H3_ALPN))
    config.server_name = server_name
    if cadata is not None:
        config.load_verify_locations(cadata=cadata)
    if not verify:
        config.verify_mode = ssl.CERT_NONE
    return config


@contextlib.asynccontextmanager
async def connect_h3(
    host: str, port: int, configuration: QuicConfiguration
) -> AsyncIterator[H3Client]:
    """An ``H3Client`` over UDP to ``host:port`` with the handshake done."""
    async with connect(host, port, configuration=configuration, create_protocol=H3Client) as client:
        assert isinstance(client, H3Client)
        yield client
