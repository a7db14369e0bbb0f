"""The callback-driven exchange (``Pipeline.start`` / ``UpstreamStage.start``) on real
sockets: every way it can leave its lane ends as the coroutine path would have.

One in-process gateway (the real ``HTTP1Connection``, ``Pipeline`` and pools, on a
127.0.0.1 listener) in front of a scripted asyncio backend. The first request on a
client connection opens the upstream connection (the coroutine path); the requests
after it find that connection idle in the pool and take the callback-driven lane,
which is what these tests are about.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tls_certs import CA

from gateway.config.load import load_config
from gateway.pipeline import Pipeline
from gateway.routing.compile import compile_snapshot
from gateway.runtime import SnapshotRef
from gateway.server.http1 import HTTP1Connection
from gateway.server.settings import ServerSettings
from gateway.telemetry import AccessLog
from gateway.upstream.pool import UpstreamPools

CONFIG = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
    - port: {{number: 8080, name: http, protocol: HTTP}}
      hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend}}
spec:
  hosts: [backend.test.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
    - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
    - address: 127.0.0.1
      ports: {{http: {port}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs}}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
    - name: slow
      match: [{{uri: {{prefix: /slow}}}}]
      timeout: 0.2s
      route: [{{destination: {{host: backend.test.local, port: {{number: 80}}}}}}]
    - name: all
      route: [{{destination: {{host: backend.test.local, port: {{number: 80}}}}}}]
"""

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
EXTRA = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"


class Backend:
    """A keep-alive HTTP/1.1 server whose answer depends on the request path."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.connections = 0
        self.release = asyncio.Event()  # lets a held response (/slow, /hold, /stream) go
        self.holding = asyncio.Event()  # set when a /hold request has arrived
        self.answered = asyncio.Event()  # set by a test once it has its response
        self.extra_sent = asyncio.Event()  # set when /extra-while-idle sent its extra
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        drop_next = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if drop_next:
                    # Closed "while idle" as far as the gateway can tell: the request
                    # is dropped unanswered, no byte of a response sent.
                    self.requests.append(b"dropped " + path)
                    writer.transport.abort()
                    return
                self.requests.append(path)
                if path == b"/close-idle":
                    drop_next = True
                    writer.write(OK)
                    await writer.drain()
                    continue
                if path == b"/reset":
                    writer.transport.abort()
                    return
                if path.startswith(b"/slow"):
                    await self.release.wait()
                    writer.write(OK)
                elif path == b"/hold":
                    self.holding.set()
                    await self.release.wait()
                    writer.write(OK)
                elif path == b"/stream":
                    # The body only once the client has the head: the gateway must
                    # have passed the head on before any of the body existed.
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    await writer.drain()
                    await self.release.wait()
                    for piece in (b"first-", b"second-", b"third"):
                        writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                    writer.write(b"0\r\n\r\n")
                elif path == b"/extra-same-write":
                    writer.write(OK + EXTRA)  # a second response, unasked for
                elif path == b"/extra-while-idle":
                    writer.write(OK)
                    await writer.drain()
                    # Once the gateway has had the answer: another one, unasked for.
                    await self.answered.wait()
                    writer.write(EXTRA)
                    await writer.drain()
                    self.extra_sent.set()
                elif path == b"/head":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
                else:
                    writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        self.release.set()


class Gateway:
    def __init__(self, pipeline: Pipeline, log_path: Path) -> None:
        self.pipeline = pipeline
        self.log_path = log_path
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        settings = ServerSettings()
        self.server = await loop.create_server(
            lambda: HTTP1Connection(self.pipeline, settings, 8080, "http"), "127.0.0.1", 0
        )
        self.port = self.server.sockets[0].getsockname()[1]

    def log_lines(self) -> list[dict]:
        self.pipeline.access_log.flush()
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]


class NotifyingLog(AccessLog):
    """The real access log, which also wakes the test after each line."""

    def __init__(self, fd: int) -> None:
        super().__init__("json", fd)
        self.written = asyncio.Event()

    def log(self, record, now: float) -> None:  # type: ignore[no-untyped-def]
        super().log(record, now)
        self.written.set()


Scenario = Callable[[Gateway, Backend], Awaitable[None]]


def run(scenario: Scenario) -> None:
    """Run ``scenario`` against a fresh gateway and backend, bounded in time."""

    async def main() -> None:
        backend = Backend()
        await backend.start()
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "config.yaml"
            config.write_text(CONFIG.format(port=backend.port))
            snapshot = compile_snapshot(load_config([str(config)]), {"istio": "ingressgateway"})
            log_path = Path(tmp) / "access.log"
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT)
            pools = UpstreamPools()
            pipeline = Pipeline(SnapshotRef(snapshot), pools, NotifyingLog(fd))
            gateway = Gateway(pipeline, log_path)
            await gateway.start()
            try:
                await asyncio.wait_for(scenario(gateway, backend), 10)
            finally:
                assert gateway.server is not None
                gateway.server.close()
                pools.close()
                await backend.stop()
                os.close(fd)

    asyncio.run(main())


class Client:
    """One keep-alive client connection speaking raw HTTP/1.1."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, method: str, path: str) -> None:
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: app.test\r\n\r\n".encode())

    async def head(self) -> tuple[int, dict[str, str]]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return int(lines[0].split(" ")[1]), headers

    async def body(self, headers: dict[str, str]) -> bytes:
        if "content-length" in headers:
            return await self.reader.readexactly(int(headers["content-length"]))
        body = b""
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        return body

    async def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        status, headers = await self.head()
        return status, headers, b"" if head_only else await self.body(headers)

    async def get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        self.send(method, path)
        return await self.response(head_only=method == "HEAD")

    def close(self) -> None:
        self.writer.close()


async def _warm(gateway: Gateway) -> Client:
    """A client whose first request left an idle upstream connection in the pool."""
    client = await Client.connect(gateway.port)
    assert (await client.get("/warm"))[0] == 200
    return client


def test_pooled_requests_are_answered_and_logged() -> None:
    async def scenario(gateway: Gateway, backend: Backend) -> None:
        client = await _warm(gateway)
        for _ in range(5):
            status, _, body = await client.get("/x")
            assert (status, body) == (200, b"ok")
        client.close()
        assert backend.connections == 1  # every request after the first used the pool
        lines = gateway.log_lines()
        assert [line["status"] for line in lines] == [200] * 6
        assert all(line["response_flags"] == "-" for line in lines)

    run(scenario)


def test_route_timeout_on_a_pooled_connection_is_504_ut() -> None:
    async def scenario(gateway: Gateway, backend: Backend) -> None:
        client = await _warm(gateway)
        status, _, _ = await client.get("/slow")
        assert status == 504
        backend.release.set()
        # The upstream connection that timed out is not reused: the next one works.
        status, _, body = await client.get("/after")
        assert (status, body) == (200, b"ok")
        client.close()
        lines = gateway.log_lines()
        assert [(x["path"], x["status"], x["response_flags"]) for x in lines[1:]] == [
            ("/slow", 504, "UT"),
            ("/after", 200, "-"),
        ]

    run(scenario)


def test_client_gone_while_waiting_is_logged_dc_and_the_upstream_released() -> None:
    async def scenario(gateway: Gateway, backend: Backend) -> None:
        client = await _warm(gateway)
        log = gateway.pipeline.access_log
        assert isinstance(log, NotifyingLog)
        log.written.clear()
        client.send("GET", "/hold")
        await backend.holding.wait()
        # A reset, not a half-close: a client that only stops sending still gets
        # its answer.
        sock = client.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.writer.transport.abort()
        await log.written.wait()
        line = gateway.log_lines()[1]
        assert (line["path"], line["response_flags"]) == ("/hold", "DC")
        backend.release.set()
        # The gateway keeps serving, on a fresh upstream connection.
        other = await Client.connect(gateway.port)
        assert (await other.get("/next"))[0] == 200
        other.close()
        assert backend.connections == 2

    run(scenario)


def test_pooled_connection_closed_while_idle_is_retried_once() -> None:
    async def scenario(gateway: Gateway, backend: Backend) -> None:
        client = await Client.connect(gateway.port)
        assert (await client.get("/close-idle"))[0] == 200
        # The backend drops the next request on that connection unanswered, as a
        # server that closed an idle connection does: the request never reached it,
        # so it is retried once on a new connection, invisibly to the client.
        status, _, body = await client.get("/again")
        assert (status, body) == (200, b"ok")
        client.close()
        assert backend.requests[-2:] == [b"dropped /again", b"/again"]
        assert backend.connections == 2
        assert gateway.log_lines()[-1]["response_flags"] == "-"

    run(scenario)


def test_upstream_reset_after_the_request_is_503_ur() -> None:
    async def scenario(gateway: Gateway, backend: Backend) -> None:
        client = await _warm(gateway)
        status, _, _ = await client.get("/reset")
        assert status == 503
        client.close()
        assert gateway.log_lines()[1]["response_flags"] == "UR"

    run(scenario)


def test_body_arriving_after_the_head_is_streamed() -> None:
    async def scenario(gateway: Gateway, backend: Backend) -> None:
        client = await _warm(gateway)
        client.send("GET", "/stream")
        status, headers = await client.head()
        assert status == 200 and headers.get("transfer-encoding") == "chunked"
        backend.release.set()
        assert await client.body(headers) == b"first-second-third"
        # The connection stays usable after the streamed response.
        assert (await client.get("/x"))[2] == b"ok"
        client.close()

    run(scenario)


def test_head_request_on_a_pooled_connection_has_no_body() -> None:
    async def scenario(gateway: Gateway, backend: Backend) -> None:
        client = await _warm(gateway)
        status, headers, _ = await client.get("/head", method="HEAD")
        assert status == 200 and headers["content-length"] == "5"
        # Had a body been written, it would be read here as a broken status line.
        assert (await client.get("/x"))[2] == b"ok"
        client.close()

    run(scenario)


def test_pipelined_requests_are_answered_in_order() -> None:
    async def scenario(gateway: Gateway, backend: Backend) -> None:
        client = await _warm(gateway)
        for index in range(4):
            client.send("GET", f"/p{index}")
        for _ in range(4):
            status, _, body = await client.response()
            assert (status, body) == (200, b"ok")
        client.close()
        assert [line["path"] for line in gateway.log_lines()[1:]] == [f"/p{i}" for i in range(4)]

    run(scenario)


# --------------------------------------------------------------------------- HTTP/2
# The same lane under the HTTP/2 adapter: a stream whose request has ended is started
# from the HEADERS frame's callback, and must end exactly as its task would have.


class H2Client:
    """A prior-knowledge HTTP/2 client connection (h2's client side, real socket)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import h2.config
        import h2.connection

        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.responses: dict[int, dict] = {}

    @classmethod
    async def connect(cls, port: int, window: int | None = None) -> H2Client:
        client = cls(*await asyncio.open_connection("127.0.0.1", port))
        client.conn.initiate_connection()
        if window is not None:
            from h2.settings import SettingCodes

            client.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
        client._flush()
        return client

    def _flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    def send(self, path: str) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":path", path), (":scheme", "http")]
        self.conn.send_headers(stream_id, [*headers, (":authority", "app.test")], end_stream=True)
        self._flush()
        self.responses[stream_id] = {"status": None, "body": b"", "ended": False, "reset": None}
        return stream_id

    def reset(self, stream_id: int) -> None:
        from h2.errors import ErrorCodes

        self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
        self._flush()

    async def until(self, done: Callable[[], bool]) -> None:
        import h2.events

        while not done():
            data = await self.reader.read(65536)
            assert data, "the gateway closed the connection"
            for event in self.conn.receive_data(data):
                record = self.responses.get(getattr(event, "stream_id", 0))
                if isinstance(event, h2.events.ResponseReceived) and record is not None:
                    record["status"] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived) and record is not None:
                    record["body"] += event.data
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.StreamEnded) and record is not None:
                    record["ended"] = True
                elif isinstance(event, h2.events.StreamReset) and record is not None:
                    record["reset"] = event.error_code
            self._flush()

    async def get(self, path: str) -> tuple[int, bytes]:
        stream_id = self.send(path)
        record = self.responses[stream_id]
        await self.until(lambda: record["ended"])
        return record["status"], record["body"]

    def close(self) -> None:
        self.writer.close()


def run_h2(scenario: Scenario) -> None:
    """``run`` with the gateway's listener speaking HTTP/2 (prior knowledge)."""

    async def start(self: Gateway) -> None:
        from gateway.server.http2 import H2Protocol

        loop = asyncio.get_running_loop()
        settings = ServerSettings()
        self.server = await loop.create_server(
            lambda: H2Protocol(self.pipeline, settings, 8080, "http", "127.0.0.1"),
            "127.0.0.1",
            0,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    _run_with(start, scenario)


def _run_with(start: Callable[[Gateway], Awaitable[None]], scenario: Scenario) -> None:
    """``run`` with ``start`` in place of the gateway's HTTP/1.1 listener."""
    original = Gateway.start
    Gateway.start = start  # type: ignore[method-assign]
    try:
        run(scenario)
    finally:
        Gateway.start = original  # type: ignore[method-assign]


def test_h2_streams_on_pooled_connections_are_answered_and_logged() -> None:
    async def scenario(gateway: Gateway, backend: Backend) -> None:
        client = await H2Client.connect(gateway.port)
        assert await client.get("/warm") == (200, b"ok")
        ids = [client.send(f"/s{index}") for index in range(5)]
        await client.until(lambda: all(client.responses[i]["ended"] for i in ids))
        assert [(client.responses[i]["status"], client.responses[i]["body"]) for i in ids] == [
            (200, b"ok")
        ] * 5
        assert await client.get("/last") == (200, b"ok")
        client.close()
        lines = gateway.log_lines()
        assert sorted(line["path"] for line in lines) == sorted(
            ["/warm", "/last", *(f"/s{i}" for i in range(5))]
        )
        assert all((x["status"], x["response_flags"]) == (200, "-") for x in lines)

    run_h2(scenario)


@pytest.mark.parametrize("how", ["stream reset", "connection lost"])
def test_h2_client_gone_while_waiting_is_logged_dc(how: str) -> None:
    async def scenario(gateway: Gateway, backend: Backend) -> None:
        client = await H2Client.connect(gateway.port)
        assert await client.get("/warm") == (200, b"ok")
        log = gateway.pipeline.access_log
        assert isinstance(log, NotifyingLog)
        log.written.clear()
        held = client.send("/hold")
        await backend.holding.wait()
        if how == "stream reset":
            client.reset(held)
        else:
            client.writer.transport.abort()
        await log.written.wait()
        line = gateway.log_lines()[1]
        assert (line["path"], line["response_flags"]) == ("/hold", "DC")
        backend.release.set()
        if how == "stream reset":
            # The same HTTP/2 connection goes on; the held upstream connection was
            # closed, so the next request opens another.
            assert await client.get("/next") == (200, b"ok")
            client.close()
            assert backend.connections == 2

    run_h2(scenario)


def test_h2_response_larger_than_the_window_waits_for_it() -> None:
    async def scenario(gateway: Gateway, backend: Backend) -> None:
        # A one-byte stream window: the two-byte body cannot go at once, so the lane
        # hands it to a task that sends what the window allows as updates come.
        client = await H2Client.connect(gateway.port, window=1)
        assert await client.get("/warm") == (200, b"ok")
        assert await client.get("/x") == (200, b"ok")
        client.close()
        lines = gateway.log_lines()
        assert [(x["status"], x["bytes_sent"]) for x in lines] == [(200, 2), (200, 2)]

    run_h2(scenario)


def test_h2_route_timeout_on_a_pooled_connection_is_504_ut() -> None:
    async def scenario(gateway: Gateway, backend: Backend) -> None:
        client = await H2Client.connect(gateway.port)
        assert await client.get("/warm") == (200, b"ok")
        status, _ = await client.get("/slow")
        assert status == 504
        backend.release.set()
        assert await client.get("/after") == (200, b"ok")
        client.close()
        flags = [(x["path"], x["status"], x["response_flags"]) for x in gateway.log_lines()]
        assert flags[1:] == [("/slow", 504, "UT"), ("/after", 200, "-")]

    run_h2(scenario)


# --------------------------------------------------------------------------- HTTP/3


def run_h3(scenario: Scenario, started: list[str] | None = None) -> None:
    """``run`` with the gateway's listener speaking HTTP/3 on a UDP port of its own
    (requests carry the configured port, 8080, as the listener they arrived on).
    ``started`` collects the paths the adapter handed to ``Pipeline.start``."""

    async def start(self: Gateway) -> None:
        from gateway.server.http3 import QuicListener, load_quic_certificate

        pair = H3_CA.issue("gateway", dns=("localhost",))
        pipeline = self.pipeline
        if started is not None:
            entry = pipeline.start

            def recording(stream: Any) -> None:
                started.append(stream.head.path)
                entry(stream)

            pipeline.start = recording  # type: ignore[method-assign]
        certificate = load_quic_certificate(str(pair.cert), str(pair.key), ("*",))
        listener = QuicListener(pipeline, ServerSettings(), [certificate])
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
        )
        self.port = transport.get_extra_info("sockname")[1]
        listener.port = 8080
        listener.attach(transport)
        self.server = transport  # type: ignore[assignment]  # close() ends it

    with tempfile.TemporaryDirectory() as tmp:
        global H3_CA
        H3_CA = CA(Path(tmp) / "pki")
        _run_with(start, scenario)


H3_CA: Any = None


def _h3(gateway: Gateway) -> Any:
    from gateway.server.h3client import client_configuration, connect_h3

    config = client_configuration("localhost", cadata=H3_CA.path.read_bytes())
    return connect_h3("127.0.0.1", gateway.port, config)


def test_h3_streams_on_pooled_connections_take_the_lane_and_are_logged() -> None:
    started: list[str] = []

    async def scenario(gateway: Gateway, backend: Backend) -> None:
        async with _h3(gateway) as client:
            warm = await client.request("GET", "app.test", "/warm")
            assert (warm.status, warm.body) == (200, b"ok")
            answers = await asyncio.gather(
                *(client.request("GET", "app.test", f"/s{i}") for i in range(5))
            )
        assert [(a.status, a.body) for a in answers] == [(200, b"ok")] * 5
        lines = gateway.log_lines()
        assert sorted(line["path"] for line in lines) == sorted(
            ["/warm", *(f"/s{i}" for i in range(5))]
        )
        assert all(
            (x["status"], x["response_flags"], x["protocol"]) == (200, "-", "HTTP/3") for x in lines
        )

    run_h3(scenario, started)
    # Bodiless requests are handed to the callback-driven entry, not a task.
    assert sorted(started) == sorted(["/warm", *(f"/s{i}" for i in range(5))])


def test_h3_client_reset_while_waiting_is_logged_dc_and_the_upstream_released() -> None:
    async def scenario(gateway: Gateway, backend: Backend) -> None:
        async with _h3(gateway) as client:
            assert (await client.request("GET", "app.test", "/warm")).status == 200
            log = gateway.pipeline.access_log
            assert isinstance(log, NotifyingLog)
            log.written.clear()
            held = client._quic.get_next_available_stream_id()
            waiting = asyncio.ensure_future(client.request("GET", "app.test", "/hold"))
            await backend.holding.wait()
            client.reset_stream(held)
            await log.written.wait()
            line = gateway.log_lines()[1]
            assert (line["path"], line["response_flags"]) == ("/hold", "DC")
            backend.release.set()
            waiting.cancel()
            # The held upstream connection was closed: the next request opens another.
            assert (await client.request("GET", "app.test", "/next")).status == 200
        assert backend.connections == 2

    run_h3(scenario)


def test_h3_route_timeout_on_a_pooled_connection_is_504_ut() -> None:
    async def scenario(gateway: Gateway, backend: Backend) -> None:
        async with _h3(gateway) as client:
            assert (await client.request("GET", "app.test", "/warm")).status == 200
            assert (await client.request("GET", "app.test", "/slow")).status == 504
            backend.release.set()
            assert (await client.request("GET", "app.test", "/after")).status == 200
        flags = [(x["path"], x["status"], x["response_flags"]) for x in gateway.log_lines()]
        assert flags[1:] == [("/slow", 504, "UT"), ("/after", 200, "-")]

    run_h3(scenario)


# --------------------------------------------------------------------------- desync


def test_a_response_nobody_asked_for_never_answers_the_next_request() -> None:
    """An upstream that sends a second response after the one asked for (in the same
    write, or later on the idle connection) must not have it taken for the answer to
    the next request, which may be another client's: the connection is closed."""

    async def scenario(gateway: Gateway, backend: Backend) -> None:
        client = await _warm(gateway)
        assert (await client.get("/extra-same-write"))[2] == b"ok"
        assert await client.get("/next") == (200, {"content-length": "2"}, b"ok")
        assert backend.connections == 2  # the connection that sent it was closed

        assert (await client.get("/extra-while-idle"))[2] == b"ok"
        backend.answered.set()
        await backend.extra_sent.wait()
        assert (await client.get("/next"))[2] == b"ok"
        client.close()
        assert backend.connections == 3
        assert b"evil" not in b"".join(backend.requests)

    run(scenario)
