"""Limits and hostile input against a real ``meshgate run`` over raw sockets: oversized
heads, idle keep-alive connections, request-smuggling shapes (each refused with 400
and never forwarded: the backend is checked to have seen nothing), and HTTP/2's
concurrent-stream limit and rapid-reset guard driven by an ``h2`` client.

The 413, header-count 431, slow-header 408 and CL+TE cases live in
``test_gateway_routing.py``; this file covers the rest."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from test_gateway_helpers import Gateway, free_ports, raw_exchange
from traffic_backends import ScriptedBackend

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: shop}}
spec:
  servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: app, namespace: shop}}
spec:
  hosts: [app.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {backend}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app, namespace: shop}}
spec:
  hosts: ["*"]
  gateways: [edge]
  http: [{{route: [{{destination: {{host: app.local}}}}]}}]
"""

IDLE_TIMEOUT_S = 0.5


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.port, admin, backend = free_ports(3)
        self.backend = ScriptedBackend(backend, "app")
        (tmp / "config.yaml").write_text(CONFIG.format(port=self.port, backend=backend))
        self.gateway = Gateway(
            tmp,
            admin,
            "--max-request-header-bytes",
            "4096",
            "--idle-timeout-s",
            str(IDLE_TIMEOUT_S),
        )

    def assert_never_forwarded(self, path: str) -> None:
        """The backend never saw ``path``: a request sent after it (on a fresh
        connection) arrives first, so the refused one had every chance to get there."""
        sentinel = f"/sentinel-{uuid.uuid4().hex}"
        reply = raw_exchange(
            self.port,
            f"GET {sentinel} HTTP/1.1\r\nHost: app.local\r\nConnection: close\r\n\r\n".encode(),
        )
        assert reply.startswith(b"HTTP/1.1 200 ")
        self.backend.recorder.wait_for(lambda r: r["path"] == sentinel)
        assert not [p for p in self.backend.recorder.paths() if p.startswith(path)]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    setup = Setup(tmp_path_factory.mktemp("hostile"))
    try:
        yield setup
    finally:
        setup.gateway.stop()
        setup.backend.stop()


# --------------------------------------------------------------------------- HTTP/1.1


def test_head_over_the_byte_limit_gets_431_and_is_not_forwarded(gw: Setup) -> None:
    data = raw_exchange(
        gw.port, b"GET /big-head HTTP/1.1\r\nHost: app.local\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 431 ")
    gw.assert_never_forwarded("/big-head")


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(gw: Setup) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"GET /idle HTTP/1.1\r\nHost: app.local\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        while b"app 200" not in first:  # the body may follow the head separately
            first += s.recv(65536)
        started = time.monotonic()
        rest = b""
        while True:  # bounded by the socket timeout
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        elapsed = time.monotonic() - started
    assert rest == b""
    assert IDLE_TIMEOUT_S * 0.8 <= elapsed < 4.0


SMUGGLING = {
    "double-content-length": (
        b"POST /smuggle-dcl HTTP/1.1\r\nHost: app.local\r\nContent-Length: 4\r\n"
        b"Content-Length: 30\r\n\r\nabcdGET /smuggle-dcl-inner HTTP/1.1\r\n\r\n"
    ),
    "content-length-list": (
        b"POST /smuggle-cll HTTP/1.1\r\nHost: app.local\r\nContent-Length: 4, 30\r\n\r\nabcd"
    ),
    "te-and-cl-body-hides-a-request": (
        b"POST /smuggle-tecl HTTP/1.1\r\nHost: app.local\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 6\r\n\r\n0\r\n\r\n"
        b"GET /smuggle-tecl-inner HTTP/1.1\r\nHost: app.local\r\n\r\n"
    ),
    "obs-fold": (b"GET /smuggle-fold HTTP/1.1\r\nHost: app.local\r\nX-Folded: a\r\n  b\r\n\r\n"),
    "bad-chunk-size": (
        b"POST /smuggle-chunk HTTP/1.1\r\nHost: app.local\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nabcd\r\n0\r\n\r\n"
    ),
    "chunk-size-overflow": (
        b"POST /smuggle-overflow HTTP/1.1\r\nHost: app.local\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1ffffffffffffffff\r\nabcd\r\n0\r\n\r\n"
    ),
    "te-gzip": (
        b"POST /smuggle-gzip HTTP/1.1\r\nHost: app.local\r\nTransfer-Encoding: gzip\r\n\r\nabcd"
    ),
    "te-chunked-not-last": (
        b"POST /smuggle-notlast HTTP/1.1\r\nHost: app.local\r\n"
        b"Transfer-Encoding: chunked, gzip\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
    ),
    "space-before-colon": (
        b"POST /smuggle-space HTTP/1.1\r\nHost: app.local\r\nContent-Length : 4\r\n\r\nabcd"
    ),
    "signed-content-length": (
        b"POST /smuggle-signed HTTP/1.1\r\nHost: app.local\r\nContent-Length: +4\r\n\r\nabcd"
    ),
}


@pytest.mark.parametrize("shape", sorted(SMUGGLING))
def test_smuggling_shape_is_refused_with_400_and_never_forwarded(gw: Setup, shape: str) -> None:
    raw = SMUGGLING[shape]
    data = raw_exchange(gw.port, raw)
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    # Exactly one answer: nothing after the 400 was parsed as a second request.
    assert data.count(b"HTTP/1.1 ") == 1
    path = raw.split(b" ", 2)[1].decode()
    gw.assert_never_forwarded(path)


# --------------------------------------------------------------------------- HTTP/2


def _h2_connect(port: int) -> tuple[socket.socket, h2.connection.H2Connection]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def _h2_events(sock: socket.socket, conn: h2.connection.H2Connection) -> list[h2.events.Event]:
    data = sock.recv(65536)
    if not data:
        return [h2.events.ConnectionTerminated()]
    events = conn.receive_data(data)
    pending = conn.data_to_send()
    if pending:
        sock.sendall(pending)
    return events


def _headers(path: str) -> list[tuple[str, str]]:
    return [(":method", "GET"), (":scheme", "http"), (":authority", "app.local"), (":path", path)]


def test_http2_streams_over_max_concurrent_are_refused(gw: Setup) -> None:
    sock, conn = _h2_connect(gw.port)
    with sock:
        # Open 101 slow streams before reading the server's SETTINGS, so the client
        # library does not hold the extra one back itself.
        ids = []
        for _ in range(101):
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, _headers("/h2-slow?ms=300"), end_stream=True)
            ids.append(stream_id)
        sock.sendall(conn.data_to_send())
        advertised = None
        refused: list[int] = []
        answered: set[int] = set()
        deadline = time.monotonic() + 15
        while len(answered) + len(refused) < 101 and time.monotonic() < deadline:
            for event in _h2_events(sock, conn):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    changed = event.changed_settings.get(
                        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                    )
                    if changed is not None:
                        advertised = changed.new_value
                elif isinstance(event, h2.events.StreamReset):
                    refused.append(event.stream_id)
                    assert event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                elif isinstance(event, h2.events.StreamEnded):
                    answered.add(event.stream_id)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    pytest.fail("the server closed the connection instead of refusing a stream")
    assert advertised == 100
    assert refused == [ids[-1]]
    assert len(answered) == 100


def test_http2_rapid_reset_flood_gets_goaway_enhance_your_calm(gw: Setup) -> None:
    sock, conn = _h2_connect(gw.port)
    with sock:
        _h2_events(sock, conn)  # the server's SETTINGS
        terminated: h2.events.ConnectionTerminated | None = None
        deadline = time.monotonic() + 15

        def flood(count: int) -> None:
            # Open a stream and cancel it at once (CVE-2023-44487).
            for _ in range(count):
                stream_id = conn.get_next_available_stream_id()
                conn.send_headers(stream_id, _headers("/h2-reset"), end_stream=True)
                conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)

        # Batches of 50, each followed by a PING whose ACK shows the server has read
        # the batch and kept the connection; the default guard tolerates 200 resets
        # (premature ones, in its window), so it must close within a few more batches.
        sent = 0
        while terminated is None and sent < 1000 and time.monotonic() < deadline:
            flood(50)
            sent += 50
            conn.ping(b"batch%03d" % (sent // 50))
            sock.sendall(conn.data_to_send())
            acked = False
            while not acked and terminated is None and time.monotonic() < deadline:
                for event in _h2_events(sock, conn):
                    if isinstance(event, h2.events.PingAckReceived):
                        acked = True
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        terminated = event
    assert terminated is not None, f"no GOAWAY after {sent} resets"
    assert terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert 200 < sent <= 1000


def test_http2_refused_stream_the_client_already_reset_keeps_the_connection(gw: Setup) -> None:
    sock, conn = _h2_connect(gw.port)
    with sock:
        slow = []
        for _ in range(100):
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, _headers("/h2-full?ms=300"), end_stream=True)
            slow.append(stream_id)
        # The 101st is over the limit and cancelled by the client in the same write:
        # the server's refusal meets a stream that is closed already.
        extra = conn.get_next_available_stream_id()
        conn.send_headers(extra, _headers("/h2-over"), end_stream=True)
        conn.reset_stream(extra, h2.errors.ErrorCodes.CANCEL)
        sock.sendall(conn.data_to_send())
        answered: set[int] = set()
        deadline = time.monotonic() + 15
        while len(answered) < 100 and time.monotonic() < deadline:
            for event in _h2_events(sock, conn):
                if isinstance(event, h2.events.StreamEnded):
                    answered.add(event.stream_id)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    pytest.fail(f"connection closed: {event}")
    assert answered == set(slow)


@pytest.mark.parametrize(
    ("case", "status"), [("malformed", 400), ("header-431", 431), ("declared-413", 413)]
)
def test_http2_refusals_are_answered_logged_with_dpe_and_never_forwarded(
    gw: Setup, case: str, status: int
) -> None:
    path = f"/h2-refused-{case}-{uuid.uuid4().hex}"
    headers = _headers(path)
    end_stream = True
    sock, conn = _h2_connect(gw.port)
    if case == "malformed":
        # Leading whitespace in a value (RFC 9113 §8.2.1), past the client's checks.
        conn.config.validate_outbound_headers = False
        conn.config.normalize_outbound_headers = False
        headers.append(("x-padded", " value"))
    elif case == "header-431":
        headers.append(("x-big", "v" * 5000))  # the gateway runs with a 4096-byte limit
    else:
        headers.append(("content-length", str(2**30 + 1)))  # over the 1 GiB default
        end_stream = False
    with sock:
        conn.send_headers(1, headers, end_stream=end_stream)
        sock.sendall(conn.data_to_send())
        answer: int | None = None
        ended = terminated = None
        deadline = time.monotonic() + 15
        while not (ended and (terminated or case != "malformed")) and time.monotonic() < deadline:
            for event in _h2_events(sock, conn):
                if isinstance(event, h2.events.ResponseReceived):
                    answer = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.StreamEnded):
                    ended = event
                elif isinstance(event, h2.events.ConnectionTerminated):
                    terminated = event
                    ended = ended or event
    assert answer == status
    if case == "malformed":
        # Answered, then the connection ends as Envoy ends it by default.
        assert terminated is not None
        assert terminated.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    line = gw.gateway.log_where(lambda r: r.get("path") == path)
    assert (line["status"], line["response_flags"], line["protocol"]) == (status, "DPE", "HTTP/2")
    assert line["upstream_host"] == "-"
    gw.assert_never_forwarded(path)
