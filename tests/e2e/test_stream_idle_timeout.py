"""``--stream-idle-timeout-s`` through a real ``meshgate run``: a client that stalls its
stream is cut off and the access-log line carries Envoy's flag ``SI``."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_gateway_helpers import Backend, Gateway, free_ports, one_backend_config

IDLE_S = 0.3


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.port, admin, app = free_ports(3)
        self.app = Backend(app, "app")
        (tmp / "config.yaml").write_text(one_backend_config(self.port, app))
        self.gateway = Gateway(tmp, admin, "--stream-idle-timeout-s", str(IDLE_S))


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    setup = Setup(tmp_path_factory.mktemp("streamidle"))
    try:
        yield setup
    finally:
        setup.gateway.stop()
        setup.app.stop()


def _read_until_closed(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    sock.settimeout(timeout_s)
    chunks = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 20)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_body_that_stops_midway_is_answered_408_and_logged_si(gw: Setup) -> None:
    rid = uuid.uuid4().hex
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /upload HTTP/1.1\r\nHost: app.local\r\nx-request-id: {rid}\r\n"
                "Content-Length: 100\r\n\r\n"
            ).encode()
            + b"y" * 10
        )
        reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert reply.endswith(b"stream timeout")
    record = gw.gateway.log_for(rid)
    assert record["status"] == 408
    assert record["response_flags"] == "SI"


def test_client_that_stops_reading_is_cut_off_and_logged_si(gw: Setup) -> None:
    rid = uuid.uuid4().hex
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    with sock:
        sock.sendall(
            (
                f"GET /?bytes=500000000 HTTP/1.1\r\nHost: app.local\r\nx-request-id: {rid}\r\n\r\n"
            ).encode()
        )
        # Not a byte read until the gateway has given up on the stream.
        record = gw.gateway.log_for(rid)
        assert record["status"] == 200
        assert record["response_flags"] == "SI"
        data = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert len(data) < 100_000_000  # the connection closed far short of the body
