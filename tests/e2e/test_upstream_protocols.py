"""Upstream protocols through a real ``meshgate run``: HTTP/2 chosen by the
ServiceEntry port protocol (GRPC) or by ``h2UpgradePolicy: UPGRADE``, gRPC messages
and trailers passed through end to end to an HTTP/2 client, HTTP/1.1 clients served
from an HTTP/2 upstream; WebSocket upgrades over HTTP/1.1 (101 passed through, then
frames both ways, a refused upgrade answered as the upstream answered it)."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from test_gateway_helpers import Gateway, free_ports
from traffic_backends import (
    H2Backend,
    ScriptedBackend,
    WebSocketEcho,
    read_head,
    ws_accept,
    ws_frame,
    ws_read_frame,
)

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: shop}}
spec:
  servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: grpc, namespace: shop}}
spec:
  hosts: [grpc.local]
  resolution: STATIC
  ports: [{{number: 80, name: grpc, protocol: GRPC}}]
  endpoints: [{{address: 127.0.0.1, ports: {{grpc: {h2}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: upgraded, namespace: shop}}
spec:
  hosts: [upgraded.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {h2}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: plain, namespace: shop}}
spec:
  hosts: [plain.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {h1}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ws, namespace: shop}}
spec:
  hosts: [ws.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {ws}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: upgraded, namespace: shop}}
spec:
  host: upgraded.local
  trafficPolicy: {{connectionPool: {{http: {{h2UpgradePolicy: UPGRADE}}}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc, namespace: shop}}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
    - match: [{{uri: {{prefix: /echo.Echo/}}}}]
      route: [{{destination: {{host: grpc.local}}}}]
    - match: [{{uri: {{prefix: /upgraded}}}}]
      route: [{{destination: {{host: upgraded.local}}}}]
    - match: [{{uri: {{prefix: /ws}}}}]
      timeout: 2s
      route: [{{destination: {{host: ws.local}}}}]
    - route: [{{destination: {{host: plain.local}}}}]
"""


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.port, admin, h2_port, h1_port, ws_port = free_ports(5)
        self.h2 = H2Backend(h2_port, "h2")
        self.h1 = ScriptedBackend(h1_port, "h1")
        self.ws = WebSocketEcho(ws_port)
        (tmp / "config.yaml").write_text(
            CONFIG.format(port=self.port, h2=h2_port, h1=h1_port, ws=ws_port)
        )
        self.gateway = Gateway(tmp, admin)

    def stop(self) -> None:
        self.gateway.stop()
        self.h2.stop()
        self.h1.stop()
        self.ws.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    setup = Setup(tmp_path_factory.mktemp("protocols"))
    try:
        yield setup
    finally:
        setup.stop()


def _grpc_frame(message: bytes) -> bytes:
    # gRPC length-prefixed message: compressed flag, 4-byte big-endian length.
    return struct.pack(">BI", 0, len(message)) + message


def test_grpc_call_over_http2_passes_messages_and_trailers_through(gw: Setup) -> None:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    request = _grpc_frame(b"\x0a\x05hello")
    conn.send_headers(
        1,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "grpc.example"),
            (":path", "/echo.Echo/Say"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    conn.send_data(1, request, end_stream=True)
    sock.sendall(conn.data_to_send())
    status = None
    body = b""
    trailers: dict[bytes, bytes] | None = None
    ended = False
    deadline = time.monotonic() + 10
    with sock:
        while not ended and time.monotonic() < deadline:
            data = sock.recv(65536)
            assert data, "the gateway closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = dict(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            sock.sendall(conn.data_to_send())
    assert status == b"200"
    assert body == request
    assert trailers == {b"grpc-status": b"0", b"grpc-message": b"echoed"}
    seen = gw.h2.recorder.wait_for(lambda r: r["path"] == "/echo.Echo/Say")
    assert seen["protocol"] == "h2" and seen["body"] == request
    # gRPC servers require "te: trailers"; it must survive hop-by-hop cleaning.
    assert seen["headers"].get("te") == "trailers"


def test_h2_upgrade_policy_speaks_http2_upstream_for_http1_clients(gw: Setup) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{gw.port}/upgraded/x",
        headers={"host": "app.local"},
        content=b"0123456789",
        timeout=10,
    )
    assert response.status_code == 200
    assert response.text == "h2 h2 10"
    seen = gw.h2.recorder.wait_for(lambda r: r["path"] == "/upgraded/x")
    assert seen["protocol"] == "h2" and seen["host"] == "app.local"


def test_plain_http_ports_stay_on_http1(gw: Setup) -> None:
    response = httpx.get(
        f"http://127.0.0.1:{gw.port}/plain", headers={"host": "app.local"}, timeout=10
    )
    assert response.status_code == 200 and response.headers["x-served-by"] == "h1"


def _ws_handshake(port: int, path: str, rid: str) -> tuple[socket.socket, bytes, bytes, bytes]:
    key = base64.b64encode(os.urandom(16))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: app.local\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nx-request-id: {rid}\r\n".encode()
        + b"Sec-WebSocket-Key: "
        + key
        + b"\r\n\r\n"
    )
    head, rest = read_head(sock)
    return sock, key, head, rest


def test_websocket_upgrade_is_tunnelled_both_ways(gw: Setup) -> None:
    rid = uuid.uuid4().hex
    sock, key, head, rest = _ws_handshake(gw.port, "/ws/chat", rid)
    with sock:
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"sec-websocket-accept: " + ws_accept(key) in head
        assert rest == b""
        sock.sendall(ws_frame(1, b"hello", mask=True))
        assert ws_read_frame(sock) == (1, b"hello")
        # A frame bigger than every buffer on the way: the tunnel must carry it whole
        # while both sides apply back-pressure, and past the route's 2 s timeout
        # (which covers the handshake only).
        big = os.urandom(4 * 1024 * 1024)
        sock.sendall(ws_frame(2, big, mask=True))
        assert ws_read_frame(sock) == (2, big)
        sock.sendall(ws_frame(8, b"\x03\xe8", mask=True))
        assert ws_read_frame(sock) == (8, b"\x03\xe8")
        assert sock.recv(1) == b""  # the backend closed, so the tunnel closed
    seen = gw.ws.recorder.wait_for(lambda r: r["path"] == "/ws/chat")
    assert seen["headers"]["upgrade"] == "websocket"
    assert "upgrade" in seen["headers"]["connection"].lower()
    log = gw.gateway.log_for(rid)
    assert log["status"] == 101
    assert log["bytes_received"] > len(big) and log["bytes_sent"] > len(big)


def test_refused_websocket_upgrade_gets_the_upstream_answer(gw: Setup) -> None:
    sock, _, head, rest = _ws_handshake(gw.port, "/ws-refuse", uuid.uuid4().hex)
    with sock:
        assert head.startswith(b"HTTP/1.1 403 ")
        while len(rest) < 2:
            chunk = sock.recv(100)
            if not chunk:
                break
            rest += chunk
    assert rest == b"no"
