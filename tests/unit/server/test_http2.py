"""The HTTP/2 adapter driven without sockets.

A real h2 client connection produces the bytes; a small recording transport carries
them to ``H2Protocol`` and back. The pipeline is a tiny echo handler that exercises
the ``DownstreamStream`` interface the way the real pipeline does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes

from gateway.errors import BadRequest, BodyTooLarge, GatewayError, HeadersTooLarge, respond_to
from gateway.server.events import RequestHead, ResponseHead, StreamReset
from gateway.server.http2 import (
    CONNECTION_WINDOW_BYTES,
    STREAM_WINDOW_BYTES,
    H2Protocol,
    take_over_prior_knowledge,
    take_over_upgrade,
)
from gateway.server.settings import ServerSettings

TIMEOUT_S = 5.0


class RecordingTransport:
    """Just enough of ``asyncio.Transport`` for the adapter: records writes."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.writes = 0
        self.closed = False
        self.reading = True
        self.protocol: Any = None
        self._watchers: list[asyncio.Future[None]] = []
        self.closed_event = asyncio.Event()

    def next_change(self) -> asyncio.Future[None]:
        """A future resolved at the next write (or client flush): taken *before*
        checking a condition, so no wake-up is lost in between."""
        future = asyncio.get_running_loop().create_future()
        self._watchers.append(future)
        return future

    def notify(self) -> None:
        watchers, self._watchers = self._watchers, []
        for future in watchers:
            if not future.done():
                future.set_result(None)

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.chunks.append(bytes(data))
        self.writes += 1
        self.notify()

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data

    def close(self) -> None:
        self.closed = True
        self.closed_event.set()
        self.notify()

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol


class Client:
    """An h2 client connection wired to the protocol under test."""

    def __init__(self, transport: RecordingTransport) -> None:
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.transport = transport
        self.proto: H2Protocol | None = None
        self.events: list[h2.events.Event] = []
        self.auto_ack = True  # acknowledge response DATA as it arrives
        self.bodies: dict[int, bytearray] = {}
        self.unacked: dict[int, int] = {}

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            assert self.proto is not None
            self.proto.data_received(data)
            # Wake other waiters too: what the client sent may be what they wait for.
            self.transport.notify()

    def receive(self) -> list[h2.events.Event]:
        data = self.transport.take()
        if not data:
            return []
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self.bodies.setdefault(event.stream_id, bytearray()).extend(event.data)
                if self.auto_ack:
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                else:
                    self.unacked[event.stream_id] = (
                        self.unacked.get(event.stream_id, 0) + event.flow_controlled_length
                    )
        self.events.extend(events)
        if not self.transport.closed:
            self.flush()
        return events

    async def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        """Pump bytes both ways until ``predicate`` holds; waits on the transport's
        write event, never on a clock, and fails after TIMEOUT_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT_S
        while True:
            change = self.transport.next_change()
            self.receive()
            if predicate():
                change.cancel()
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            try:
                await asyncio.wait_for(change, remaining)
            except TimeoutError:
                raise AssertionError(f"timed out waiting for {what}") from None

    def of(self, kind: type, stream_id: int | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and (stream_id is None or e.stream_id == stream_id)
        ]

    def ended(self, stream_id: int) -> bool:
        return bool(self.of(h2.events.StreamEnded, stream_id)) or bool(
            self.of(h2.events.StreamReset, stream_id)
        )

    def status(self, stream_id: int) -> int:
        (response,) = self.of(h2.events.ResponseReceived, stream_id)
        return int(dict(response.headers)[b":status"])

    def response_headers(self, stream_id: int) -> dict[bytes, bytes]:
        (response,) = self.of(h2.events.ResponseReceived, stream_id)
        return dict(response.headers)

    def request(
        self,
        path: str,
        method: str = "GET",
        extra: list[tuple[str, str]] | None = None,
        end_stream: bool = True,
        authority: str | None = "example.com",
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":path", path), (":scheme", "http")]
        if authority is not None:
            headers.append((":authority", authority))
        headers.extend(extra or [])
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        self.flush()
        return stream_id

    async def send_body(self, stream_id: int, body: bytes) -> None:
        """Send ``body`` and END_STREAM, as fast as the server's windows allow."""
        offset = 0
        while offset < len(body):
            window = self.conn.local_flow_control_window(stream_id)
            if window == 0:
                before = len(self.of(h2.events.WindowUpdated))
                await self.wait_for(
                    lambda b=before: len(self.of(h2.events.WindowUpdated)) > b,
                    "a window update",
                )
                continue
            size = min(window, self.conn.max_outbound_frame_size, len(body) - offset)
            self.conn.send_data(stream_id, body[offset : offset + size])
            offset += size
            self.flush()
        self.conn.end_stream(stream_id)
        self.flush()


class Echo:
    """The test pipeline. ``/echo`` streams the body back; ``/head`` describes the
    request; ``/wait`` answers once ``gate`` opens; ``/big`` sends ``?n`` bytes;
    ``/hold`` never reads its body until ``gate`` opens; ``/boom`` raises."""

    def __init__(self) -> None:
        self.heads: list[RequestHead] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.idle = asyncio.Event()  # set whenever no handler is running
        self.running = 0
        self.resets: list[StreamReset] = []
        self.finished: list[str] = []
        self.refused: list[GatewayError] = []
        # Tests wait on handler state through the transport's change futures.
        self.on_change: Callable[[], None] = lambda: None

    async def __call__(self, stream: Any) -> None:
        self.heads.append(stream.head)
        self.running += 1
        self.idle.clear()
        self.started.set()
        self.on_change()
        try:
            # As the pipeline does: a request the adapter refused, or whose body broke
            # a limit before any response, is answered with the error's status.
            rejection = stream.rejection
            if rejection is not None:
                await self._refuse(stream, rejection)
            else:
                try:
                    await self._serve(stream)
                except GatewayError as error:
                    await self._refuse(stream, error)
            self.finished.append(stream.head.path)
        except StreamReset as exc:
            self.resets.append(exc)
            raise
        finally:
            self.running -= 1
            if self.running == 0:
                self.idle.set()
            self.on_change()

    async def _refuse(self, stream: Any, error: GatewayError) -> None:
        head, body = respond_to(error)
        self.refused.append(error)
        await stream.send_head(head, end_stream=False)
        await stream.send_body(body, end_stream=True)

    async def _serve(self, stream: Any) -> None:
        head: RequestHead = stream.head
        if head.path == "/echo":
            await stream.send_head(ResponseHead(200, [("X-Echo", "yes")]), end_stream=False)
            while chunk := await stream.read_body():
                await stream.send_body(chunk, end_stream=False)
            await stream.send_body(b"", end_stream=True)
        elif head.path == "/head":
            body = json.dumps(
                {
                    "method": head.method,
                    "path": head.path,
                    "query": head.query,
                    "authority": head.authority,
                    "scheme": head.scheme,
                    "version": head.http_version,
                    "port": head.port,
                    "peer": head.peer,
                    "headers": head.headers,
                    "complete": stream.body_complete(),
                }
            ).encode()
            await stream.send_head(ResponseHead(200, []), end_stream=False)
            await stream.send_body(body, end_stream=True)
        elif head.path in ("/wait", "/hold"):
            if head.path == "/hold":
                await self.gate.wait()
                while await stream.read_body():
                    pass
            else:
                await self.gate.wait()
            await stream.send_head(ResponseHead(200, []), end_stream=True)
        elif head.path == "/read":
            while await stream.read_body():
                pass
            await stream.send_head(ResponseHead(204, []), end_stream=True)
        elif head.path == "/big":
            size = int(head.query)
            await stream.send_head(ResponseHead(200, []), end_stream=False)
            await stream.send_body(b"x" * size, end_stream=True)
        elif head.path == "/hop":
            headers = [
                ("Content-Type", "text/plain"),
                ("Connection", "keep-alive, X-Hop"),
                ("Keep-Alive", "timeout=5"),
                ("Transfer-Encoding", "chunked"),
                ("Upgrade", "h2c"),
                ("Proxy-Connection", "close"),
                ("X-Hop", "1"),
                ("X-Kept", "2"),
            ]
            await stream.send_head(ResponseHead(200, headers), end_stream=True)
        elif head.path == "/paced":
            await stream.send_head(ResponseHead(200, []), end_stream=False)
            await self.gate.wait()
            self.on_change()  # the test resumes once send_body below is waiting
            await stream.send_body(b"p" * 1000, end_stream=True)
        elif head.path == "/boom":
            raise RuntimeError("pipeline bug")
        else:
            await stream.send_head(ResponseHead(404, []), end_stream=True)


async def connect(
    settings: ServerSettings | None = None, handler: Any = None
) -> tuple[Client, H2Protocol, Echo]:
    echo = Echo()
    transport = RecordingTransport()
    proto = H2Protocol(handler or echo, settings or ServerSettings(), 8080, "http", "")
    client = Client(transport)
    client.proto = proto
    echo.on_change = transport.notify
    proto.connection_made(transport)  # type: ignore[arg-type]
    client.conn.initiate_connection()
    client.flush()
    await client.wait_for(lambda: bool(client.of(h2.events.RemoteSettingsChanged)), "SETTINGS")
    return client, proto, echo


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


# -- requests and responses ---------------------------------------------------------


def test_get_maps_pseudo_headers_and_cookie_crumbs_into_request_head() -> None:
    async def scenario() -> None:
        client, _, _ = await connect()
        sid = client.request(
            "/head?a=1&b=2",
            extra=[("cookie", "a=1"), ("accept", "*/*"), ("cookie", "b=2"), ("x-y", "z")],
        )
        await client.wait_for(lambda: client.ended(sid), "the response")
        assert client.status(sid) == 200
        seen = json.loads(client.bodies[sid])
        assert seen["method"] == "GET"
        assert seen["path"] == "/head"
        assert seen["query"] == "a=1&b=2"
        assert seen["authority"] == "example.com"
        assert seen["scheme"] == "http"
        assert seen["version"] == "2"
        assert seen["port"] == 8080
        assert seen["peer"] == "127.0.0.1"
        assert seen["complete"] is True
        assert [tuple(h) for h in seen["headers"]] == [
            ("cookie", "a=1; b=2"),
            ("accept", "*/*"),
            ("x-y", "z"),
        ]

    run(scenario)


def test_authority_falls_back_to_host_header() -> None:
    async def scenario() -> None:
        client, _, _ = await connect()
        sid = client.request("/head", authority=None, extra=[("host", "fallback.test:81")])
        await client.wait_for(lambda: client.ended(sid), "the response")
        assert json.loads(client.bodies[sid])["authority"] == "fallback.test:81"

    run(scenario)


def test_response_headers_are_lower_cased_and_connection_fields_dropped() -> None:
    async def scenario() -> None:
        client, _, _ = await connect()
        sid = client.request("/hop")
        await client.wait_for(lambda: client.ended(sid), "the response")
        headers = client.response_headers(sid)
        assert headers == {b":status": b"200", b"content-type": b"text/plain", b"x-kept": b"2"}

    run(scenario)


def test_settings_advertise_the_configured_limits() -> None:
    async def scenario() -> None:
        settings = ServerSettings(max_concurrent_streams=7, max_request_header_bytes=5000)
        client, _, _ = await connect(settings)
        remote = client.conn.remote_settings
        assert remote.max_concurrent_streams == 7
        assert remote.max_header_list_size == 5000
        assert remote.initial_window_size == STREAM_WINDOW_BYTES
        assert client.conn.outbound_flow_control_window == CONNECTION_WINDOW_BYTES

    run(scenario)


def test_post_larger_than_the_window_is_echoed_whole() -> None:
    async def scenario() -> None:
        client, _, _ = await connect()
        body = bytes(range(256)) * (4 * CONNECTION_WINDOW_BYTES // 256 + 7)
        sid = client.request("/echo", method="POST", end_stream=False)
        await client.send_body(sid, body)
        await client.wait_for(lambda: client.ended(sid), "the echoed body")
        assert client.status(sid) == 200
        assert client.response_headers(sid)[b"x-echo"] == b"yes"
        assert bytes(client.bodies[sid]) == body

    run(scenario)


def test_slow_pipeline_holds_back_window_updates() -> None:
    async def scenario() -> None:
        client, proto, echo = await connect()
        sid = client.request("/hold", method="POST", end_stream=False)
        body = b"b" * (STREAM_WINDOW_BYTES * 3)
        sender = asyncio.ensure_future(client.send_body(sid, body))
        await client.wait_for(
            lambda: client.conn.local_flow_control_window(sid) == 0, "the client's window to fill"
        )
        # The pipeline has read nothing: the server gave no stream credit back and holds
        # exactly one window of body.
        assert not [e for e in client.of(h2.events.WindowUpdated) if e.stream_id == sid]
        assert proto._streams[sid]._unacked_bytes == STREAM_WINDOW_BYTES
        assert not sender.done()
        echo.gate.set()
        await asyncio.wait_for(sender, TIMEOUT_S)
        await client.wait_for(lambda: client.ended(sid), "the response")
        assert client.status(sid) == 200

    run(scenario)


def test_response_body_waits_for_the_clients_window() -> None:
    async def scenario() -> None:
        client, _, _ = await connect()
        client.auto_ack = False
        size = 200_000
        sid = client.request(f"/big?{size}")
        default_window = 65_535
        await client.wait_for(
            lambda: len(client.bodies.get(sid, b"")) == default_window, "one window of body"
        )
        assert not client.ended(sid)
        # Credit the stream and the connection: the rest arrives.
        client.auto_ack = True
        client.conn.acknowledge_received_data(client.unacked[sid], sid)
        client.conn.increment_flow_control_window(size)
        client.conn.increment_flow_control_window(size, stream_id=sid)
        client.flush()
        await client.wait_for(lambda: client.ended(sid), "the rest of the body")
        assert len(client.bodies[sid]) == size

    run(scenario)


def test_response_body_waits_while_the_transport_is_paused() -> None:
    async def scenario() -> None:
        client, proto, _ = await connect()
        proto.pause_writing()
        assert client.transport.reading is False
        sid = client.request("/big?1000")
        # The head goes out (send_head waits for the pause, too): nothing at all.
        client.receive()
        assert not client.of(h2.events.ResponseReceived, sid)
        proto.resume_writing()
        assert client.transport.reading is True
        await client.wait_for(lambda: client.ended(sid), "the response")
        assert len(client.bodies[sid]) == 1000

    run(scenario)


def test_send_body_waits_while_the_transport_is_paused() -> None:
    async def scenario() -> None:
        client, proto, echo = await connect()
        sid = client.request("/paced")
        await client.wait_for(lambda: bool(client.of(h2.events.ResponseReceived, sid)), "head")
        proto.pause_writing()
        change = client.transport.next_change()
        echo.gate.set()
        await asyncio.wait_for(change, TIMEOUT_S)
        client.receive()
        assert sid not in client.bodies
        assert len(proto._drain_waiters) == 1
        proto.resume_writing()
        await client.wait_for(lambda: client.ended(sid), "the body")
        assert len(client.bodies[sid]) == 1000

    run(scenario)


def test_concurrent_streams_run_in_parallel() -> None:
    async def scenario() -> None:
        client, _, echo = await connect()
        sids = [client.request("/wait") for _ in range(10)]
        await client.wait_for(lambda: echo.running == 10, "ten handlers running at once")
        echo.gate.set()
        await client.wait_for(lambda: all(client.ended(s) for s in sids), "all ten responses")
        assert [client.status(s) for s in sids] == [200] * 10

    run(scenario)


def test_the_record_of_closed_streams_stays_bounded_on_a_long_lived_connection() -> None:
    # h2 would remember 65,536 closed streams per connection (about 14.8 MB); the
    # adapter keeps ten times max_concurrent_streams, at least 1,024.
    async def scenario() -> None:
        client, proto, _ = await connect(replace(ServerSettings(), max_concurrent_streams=50))
        last = 0
        for _ in range(30):  # 1,500 requests, 50 at a time
            sids = [client.request("/echo") for _ in range(50)]
            await client.wait_for(
                lambda sids=sids: all(client.ended(s) for s in sids),  # type: ignore[misc]
                "the responses",
            )
            client.events.clear()
            last = sids[-1]
        assert len(proto._conn._closed_streams) == 1024
        assert last // 2 + 1 == 1500
        # Still serving; the newest closed streams are remembered, the oldest not.
        assert proto._conn._stream_closed_by(last) is not None
        assert proto._conn._stream_closed_by(1) is None
        sid = client.request("/echo")
        await client.wait_for(lambda: client.ended(sid), "one more response")
        assert client.status(sid) == 200

    run(scenario)


def test_small_responses_in_one_tick_share_one_write() -> None:
    async def scenario() -> None:
        client, _, echo = await connect()
        sids = [client.request("/wait") for _ in range(20)]
        await client.wait_for(lambda: echo.running == 20, "twenty handlers")
        client.receive()
        writes_before = client.transport.writes
        echo.gate.set()
        await client.wait_for(lambda: all(client.ended(s) for s in sids), "the responses")
        assert client.transport.writes - writes_before <= 3

    run(scenario)


def test_client_reset_raises_in_that_stream_only() -> None:
    async def scenario() -> None:
        client, _, echo = await connect()
        doomed = client.request("/read", method="POST", end_stream=False)
        other = client.request("/wait")
        await client.wait_for(lambda: echo.running == 2, "both handlers")
        client.conn.reset_stream(doomed, ErrorCodes.CANCEL)
        client.flush()
        await client.wait_for(lambda: len(echo.resets) == 1, "the reset to reach the pipeline")
        assert echo.resets[0].error_code == ErrorCodes.CANCEL
        echo.gate.set()
        await client.wait_for(lambda: client.ended(other), "the other stream")
        assert client.status(other) == 200

    run(scenario)


def test_streams_over_the_limit_are_refused() -> None:
    async def scenario() -> None:
        client, _, echo = await connect(ServerSettings(max_concurrent_streams=2))
        first, second = client.request("/wait"), client.request("/wait")
        await client.wait_for(lambda: echo.running == 2, "two handlers")
        # The h2 client honours the advertised limit; lift it to play a rude client.
        client.conn.remote_settings.acknowledge()
        client.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 10
        client.conn.remote_settings.acknowledge()
        third = client.request("/wait")
        await client.wait_for(lambda: client.ended(third), "the refusal")
        (reset,) = client.of(h2.events.StreamReset, third)
        assert reset.error_code == ErrorCodes.REFUSED_STREAM
        echo.gate.set()
        await client.wait_for(lambda: client.ended(first) and client.ended(second), "answers")
        assert client.status(first) == client.status(second) == 200

    run(scenario)


def test_header_list_over_the_limit_gets_431_and_connection_survives() -> None:
    async def scenario() -> None:
        client, _, echo = await connect(ServerSettings(max_request_header_bytes=4096))
        big = client.request("/head", extra=[("x-big", "v" * 5000)])
        await client.wait_for(lambda: client.ended(big), "the 431")
        assert client.status(big) == 431
        # The pipeline is handed the refusal (to answer, log and count it) and never
        # the request: no route, no upstream.
        assert [type(e) for e in echo.refused] == [HeadersTooLarge]
        assert echo.finished == ["/head"] and echo.heads[0].headers == []
        ok = client.request("/head")
        await client.wait_for(lambda: client.ended(ok), "a later request")
        assert client.status(ok) == 200

    run(scenario)


def test_too_many_header_fields_get_431() -> None:
    async def scenario() -> None:
        client, _, _ = await connect(ServerSettings(max_request_headers=5))
        sid = client.request("/head", extra=[(f"x-{i}", "v") for i in range(6)])
        await client.wait_for(lambda: client.ended(sid), "the 431")
        assert client.status(sid) == 431

    run(scenario)


def test_hpack_bomb_far_over_the_limit_closes_with_enhance_your_calm() -> None:
    async def scenario() -> None:
        client, _, _ = await connect(ServerSettings(max_request_header_bytes=1024))
        # One 4000-byte field, indexed once and then repeated by reference: a small
        # block that decodes to ~100 KB, past the 64 KiB ceiling.
        client.request("/head", extra=[("x-big", "v" * 4000)] * 25)
        await client.wait_for(lambda: client.transport.closed, "the connection to close")
        (goaway,) = client.of(h2.events.ConnectionTerminated)
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM

    run(scenario)


def test_declared_body_over_the_limit_gets_413_before_the_pipeline() -> None:
    async def scenario() -> None:
        client, _, echo = await connect(ServerSettings(max_request_body_bytes=100))
        sid = client.request(
            "/echo", method="POST", extra=[("content-length", "101")], end_stream=False
        )
        await client.wait_for(lambda: client.ended(sid), "the 413")
        assert client.status(sid) == 413
        assert [type(e) for e in echo.refused] == [BodyTooLarge]
        # The rest of the body is not wanted: RST_STREAM NO_ERROR (RFC 9113 §8.1).
        await client.wait_for(lambda: client.of(h2.events.StreamReset), "the reset")
        (reset,) = client.of(h2.events.StreamReset)
        assert (reset.stream_id, reset.error_code) == (sid, ErrorCodes.NO_ERROR)

    run(scenario)


def test_streamed_body_over_the_limit_gets_413_and_the_pipeline_is_stopped() -> None:
    async def scenario() -> None:
        client, _, echo = await connect(ServerSettings(max_request_body_bytes=1000))
        sid = client.request("/read", method="POST", end_stream=False)
        client.conn.send_data(sid, b"a" * 1001)
        client.flush()
        await client.wait_for(lambda: client.ended(sid), "the 413")
        assert client.status(sid) == 413
        # The pipeline's read raised BodyTooLarge, which it answered itself (so the
        # access log has the 413 with flag DPE); the stream was then closed.
        assert [type(e) for e in echo.refused] == [BodyTooLarge]
        assert echo.finished == ["/read"]
        ok = client.request("/head")
        await client.wait_for(lambda: client.ended(ok), "a later request")
        assert client.status(ok) == 200

    run(scenario)


def test_pipeline_exception_becomes_500() -> None:
    async def scenario() -> None:
        client, _, _ = await connect()
        sid = client.request("/boom")
        await client.wait_for(lambda: client.ended(sid), "the 500")
        assert client.status(sid) == 500

    run(scenario)


# -- abuse and protocol errors ------------------------------------------------------


def test_rapid_reset_flood_closes_the_connection_with_enhance_your_calm() -> None:
    async def scenario() -> None:
        settings = ServerSettings(h2_max_premature_resets=20)
        client, proto, _ = await connect(settings)
        for _ in range(30):
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(
                sid,
                [(":method", "GET"), (":path", "/wait"), (":scheme", "http"), (":authority", "x")],
            )
            client.conn.reset_stream(sid, ErrorCodes.CANCEL)
        client.flush()
        await client.wait_for(lambda: client.transport.closed, "the connection to close")
        goaways = client.of(h2.events.ConnectionTerminated)
        assert [g.error_code for g in goaways] == [ErrorCodes.ENHANCE_YOUR_CALM]
        assert proto.client_resets == 21

    run(scenario)


def test_resets_under_the_limit_keep_the_connection() -> None:
    async def scenario() -> None:
        client, proto, _ = await connect(ServerSettings(h2_max_premature_resets=20))
        for _ in range(20):
            sid = client.request("/wait", end_stream=False)
            client.conn.reset_stream(sid, ErrorCodes.CANCEL)
        client.flush()
        ok = client.request("/head")
        await client.wait_for(lambda: client.ended(ok), "a later request")
        assert client.status(ok) == 200
        assert proto.client_resets == 20
        assert not client.transport.closed

    run(scenario)


def test_protocol_error_sends_goaway_and_closes() -> None:
    async def scenario() -> None:
        client, proto, _ = await connect()
        # A DATA frame on stream 0 is a connection error (RFC 9113 §6.1).
        proto.data_received(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
        await client.wait_for(lambda: client.transport.closed, "the connection to close")
        (goaway,) = client.of(h2.events.ConnectionTerminated)
        assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR

    run(scenario)


async def refused_then_goaway(
    client: Client, echo: Echo, sid: int, pseudo_only: bool = True
) -> None:
    """A malformed request: the pipeline is handed it only to refuse it (400, so that
    the access log has it with flag DPE), then the connection ends with GOAWAY
    PROTOCOL_ERROR. No field of the block but the pseudo-headers is kept."""
    await client.wait_for(lambda: client.transport.closed, "the connection to close")
    assert client.status(sid) == 400
    assert client.ended(sid)
    (goaway,) = client.of(h2.events.ConnectionTerminated)
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert [type(e) for e in echo.refused] == [BadRequest]
    assert len(echo.heads) == 1
    if pseudo_only:
        assert echo.heads[0].headers == []


def test_uppercase_header_name_is_a_protocol_error() -> None:
    async def scenario() -> None:
        client, _, echo = await connect()
        # Bypass the client's own validation to put an illegal name on the wire.
        client.conn.config.validate_outbound_headers = False
        client.conn.config.normalize_outbound_headers = False
        sid = client.request("/head", extra=[("X-Upper", "1")])
        await refused_then_goaway(client, echo, sid)

    run(scenario)


@pytest.mark.parametrize(
    "extra",
    [
        [("x-injected", "a\r\nhost: evil")],  # CR LF in a value
        [("x-padded", " value")],  # leading whitespace
        [("connection", "keep-alive")],  # connection-specific
        [("te", "gzip")],
        [("host", "other.example")],  # disagrees with :authority
    ],
)
def test_malformed_request_block_is_a_protocol_error(extra: list[tuple[str, str]]) -> None:
    async def scenario() -> None:
        client, _, echo = await connect()
        client.conn.config.validate_outbound_headers = False
        client.conn.config.normalize_outbound_headers = False
        sid = client.request("/head", extra=extra)
        await refused_then_goaway(client, echo, sid)

    run(scenario)


def test_host_field_is_the_authority_and_is_not_passed_on_as_a_header() -> None:
    async def scenario() -> None:
        client, _, echo = await connect()
        client.request("/a", extra=[("host", "example.com")])  # same as :authority
        client.request("/b", authority=None, extra=[("host", "other.example")])
        await client.wait_for(lambda: len(echo.heads) == 2, "both requests")
        by_path = {head.path: head for head in echo.heads}
        assert by_path["/a"].authority == "example.com"
        assert by_path["/b"].authority == "other.example"
        # The upstream head gets one Host, written from the authority.
        assert all(name != "host" for head in echo.heads for name, _ in head.headers)

    run(scenario)


@pytest.mark.parametrize(
    "path",
    [
        "/a HTTP/1.1",  # would end up in the upstream's request line
        "/admin#x",  # a fragment: would miss a rule for /admin, reach /admin upstream
    ],
)
def test_space_or_fragment_in_the_path_is_a_protocol_error(path: str) -> None:
    async def scenario() -> None:
        client, _, echo = await connect()
        sid = client.request(path)
        await refused_then_goaway(client, echo, sid)
        assert echo.heads[0].path == path  # as the access log shows it

    run(scenario)


def test_pseudo_header_in_request_trailers_is_a_protocol_error() -> None:
    async def scenario() -> None:
        client, _, echo = await connect()
        client.conn.config.validate_outbound_headers = False
        stream_id = client.request("/read", method="POST", end_stream=False)
        client.conn.send_data(stream_id, b"x")
        client.conn.send_headers(stream_id, [(":path", "/other")], end_stream=True)
        client.flush()
        # The pipeline reading the body is told the request was malformed.
        await refused_then_goaway(client, echo, stream_id, pseudo_only=False)

    run(scenario)


# -- connection entry points and shutdown -------------------------------------------


def test_prior_knowledge_takeover_feeds_what_was_already_read() -> None:
    async def scenario() -> None:
        echo = Echo()
        transport = RecordingTransport()
        client = Client(transport)
        client.conn.initiate_connection()
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            sid,
            [(":method", "GET"), (":path", "/head"), (":scheme", "http"), (":authority", "a")],
            end_stream=True,
        )
        already_read = client.conn.data_to_send()
        assert already_read.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        proto = take_over_prior_knowledge(
            transport,  # type: ignore[arg-type]
            echo,
            ServerSettings(),
            8080,
            "http",
            "10.0.0.9",
            already_read,
        )
        client.proto = proto
        assert transport.protocol is proto
        await client.wait_for(lambda: client.ended(sid), "the response")
        assert client.status(sid) == 200
        assert json.loads(client.bodies[sid])["peer"] == "10.0.0.9"

    run(scenario)


def test_h2c_upgrade_answers_the_request_on_stream_1() -> None:
    async def scenario() -> None:
        echo = Echo()
        transport = RecordingTransport()
        client = Client(transport)
        settings_header = client.conn.initiate_upgrade_connection()
        assert settings_header is not None
        head = RequestHead(
            method="GET",
            path="/head",
            query="x=1",
            authority="up.test",
            scheme="http",
            headers=[
                ("host", "up.test"),
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c"),
                ("http2-settings", settings_header.decode()),
                ("accept", "*/*"),
            ],
            port=8080,
            peer="127.0.0.1",
        )
        proto = take_over_upgrade(
            transport,  # type: ignore[arg-type]
            echo,
            ServerSettings(),
            8080,
            "http",
            "127.0.0.1",
            head,
            settings_header.decode().rstrip("="),  # as sent on the wire: no padding
        )
        client.proto = proto
        assert transport.protocol is proto
        client.flush()  # the client's preface, sent once it has seen the 101
        await client.wait_for(lambda: client.ended(1), "the response on stream 1")
        assert client.status(1) == 200
        seen = json.loads(client.bodies[1])
        assert seen["query"] == "x=1"
        assert [tuple(h) for h in seen["headers"]] == [("host", "up.test"), ("accept", "*/*")]
        # The connection goes on as plain HTTP/2.
        sid = client.request("/head")
        assert sid == 3
        await client.wait_for(lambda: client.ended(sid), "a second request")
        assert client.status(sid) == 200

    run(scenario)


def test_bad_http2_settings_closes_the_upgraded_connection() -> None:
    async def scenario() -> None:
        transport = RecordingTransport()
        head = RequestHead("GET", "/", "", "a", "http", [])
        proto = take_over_upgrade(
            transport,  # type: ignore[arg-type]
            Echo(),
            ServerSettings(),
            8080,
            "http",
            "127.0.0.1",
            head,
            "!!not-base64!!",
        )
        assert transport.closed
        assert proto.active_streams == 0

    run(scenario)


def test_graceful_close_lets_open_streams_finish_and_refuses_new_ones() -> None:
    async def scenario() -> None:
        client, proto, echo = await connect()
        sid = client.request("/wait")
        await client.wait_for(lambda: echo.running == 1, "the handler")
        proto.close(graceful=True)
        await client.wait_for(lambda: bool(client.of(h2.events.ConnectionTerminated)), "the GOAWAY")
        (goaway,) = client.of(h2.events.ConnectionTerminated)
        assert goaway.error_code == ErrorCodes.NO_ERROR
        assert goaway.last_stream_id == sid
        assert not client.transport.closed
        # h2's client stops opening streams after GOAWAY; put one on the wire anyway.
        client.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        late = client.request("/head")
        await client.wait_for(lambda: client.ended(late), "the refusal")
        assert client.of(h2.events.StreamReset, late)[0].error_code == ErrorCodes.REFUSED_STREAM
        echo.gate.set()
        await client.wait_for(lambda: client.transport.closed, "the connection to close")
        assert client.status(sid) == 200
        assert client.ended(sid)
        await asyncio.wait_for(proto.wait_closed(), TIMEOUT_S)

    run(scenario)


def test_shutdown_and_on_close_serve_the_listener_set() -> None:
    async def scenario() -> None:
        client, proto, echo = await connect()
        gone: list[H2Protocol] = []
        proto.on_close = gone.append
        sid = client.request("/wait")
        await client.wait_for(lambda: echo.running == 1, "the handler")
        proto.shutdown()
        await client.wait_for(lambda: bool(client.of(h2.events.ConnectionTerminated)), "GOAWAY")
        # h2 closes its client state machine on GOAWAY (python-hyper/h2#1181); RFC 9113
        # §6.8 lets the open stream finish, so reopen it to read the answer.
        client.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        assert gone == []
        echo.gate.set()
        await client.wait_for(lambda: client.transport.closed, "the connection to close")
        assert client.status(sid) == 200
        assert gone == [proto]

    run(scenario)


def test_abrupt_close_resets_the_pipeline() -> None:
    async def scenario() -> None:
        client, proto, echo = await connect()
        client.request("/read", method="POST", end_stream=False)
        await client.wait_for(lambda: echo.running == 1, "the handler")
        proto.abort()
        assert client.transport.closed
        await asyncio.wait_for(echo.idle.wait(), TIMEOUT_S)
        assert len(echo.resets) == 1

    run(scenario)


def test_client_goaway_still_gets_answers_to_open_streams() -> None:
    async def scenario() -> None:
        client, _, echo = await connect()
        sid = client.request("/wait")
        await client.wait_for(lambda: echo.running == 1, "the handler")
        client.conn.close_connection()
        client.flush()
        # h2's client refuses to read after its own GOAWAY; let it, as RFC 9113 does.
        client.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        echo.gate.set()
        await client.wait_for(lambda: client.ended(sid), "the answer")
        assert client.status(sid) == 200
        await client.wait_for(lambda: client.transport.closed, "the connection to close")

    run(scenario)


def test_idle_connection_is_closed_with_goaway() -> None:
    async def scenario() -> None:
        client, _, _ = await connect(replace(ServerSettings(), idle_timeout_s=0.05))
        await asyncio.wait_for(client.transport.closed_event.wait(), TIMEOUT_S)
        client.receive()
        (goaway,) = client.of(h2.events.ConnectionTerminated)
        assert goaway.error_code == ErrorCodes.NO_ERROR

    run(scenario)
