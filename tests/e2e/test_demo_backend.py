"""The demo backend as a real process on 127.0.0.1, driven by httpx and raw sockets."""

from __future__ import annotations

import hashlib
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.demo_backend import pattern_bytes

START_TIMEOUT_S = 15.0


class Backend:
    """A ``meshgate demo-backend`` child process on a port the OS picked."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "demo-backend", "--port", "0", "--name", name],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        prefix = f"demo-backend {self.name} listening on 127.0.0.1:"
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line.startswith(prefix):
                return int(line.strip().rsplit(":", 1)[1])
        self.stop()
        raise AssertionError(f"demo-backend {self.name} did not report its port in time")

    def peak_rss_kb(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc status")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                return None
        return self.process.returncode


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    started = Backend("echo-test")
    yield started
    started.stop()


@pytest.fixture
def client(backend: Backend) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=backend.url, timeout=10.0) as http:
        yield http


def _raw_exchange(port: int, payload: bytes) -> bytes:
    """Send bytes, read until the server closes or 5 s pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_get_is_echoed_as_json_with_served_by(client: httpx.Client) -> None:
    response = client.get("/shop/items?id=7&sort=asc", headers={"X-Trace": "abc"})
    assert response.status_code == 200
    assert response.headers["x-served-by"] == "echo-test"
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["service"] == "echo-test"
    assert body["method"] == "GET"
    assert body["path"] == "/shop/items"
    assert body["query"] == "id=7&sort=asc"
    assert body["headers"]["x-trace"] == "abc"
    assert body["body_bytes"] == 0
    assert body["body_sha256"] == hashlib.sha256(b"").hexdigest()


def test_request_body_is_counted_and_hashed(client: httpx.Client) -> None:
    payload = b"meshgate" * 10_000
    body = client.post("/upload", content=payload).json()
    assert body["method"] == "POST"
    assert body["body_bytes"] == len(payload)
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()


def test_chunked_request_body_is_counted_and_hashed(client: httpx.Client) -> None:
    parts = [b"first,", b"second,", b"x" * 100_000]
    # A generator has no length, so httpx sends it with Transfer-Encoding: chunked.
    response = client.put("/chunked", content=iter(parts))
    body = response.json()
    assert body["headers"]["transfer-encoding"] == "chunked"
    assert body["body_bytes"] == sum(map(len, parts))
    assert body["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


def test_status_parameter_sets_the_status(client: httpx.Client) -> None:
    response = client.get("/?status=503")
    assert response.status_code == 503
    assert response.json()["service"] == "echo-test"


def test_out_of_range_status_is_a_400_naming_the_parameter(client: httpx.Client) -> None:
    response = client.get("/?status=99")
    assert response.status_code == 400
    assert "status=99" in response.json()["error"]


def test_header_parameter_adds_response_headers(client: httpx.Client) -> None:
    response = client.get("/", params=[("header", "x-a:one"), ("header", "X-B: two")])
    assert response.headers["x-a"] == "one"
    assert response.headers["x-b"] == "two"


def test_delay_parameter_holds_the_answer(client: httpx.Client) -> None:
    started = time.monotonic()
    response = client.get("/?delay_ms=300")
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert elapsed >= 0.3


def test_bytes_parameter_streams_the_pattern(client: httpx.Client) -> None:
    response = client.get("/?bytes=200003")
    assert response.status_code == 200
    assert response.headers["content-length"] == "200003"
    assert response.content == pattern_bytes(200_003)


def test_close_parameter_resets_the_connection(client: httpx.Client) -> None:
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.get("/?close=1")


def test_head_gets_headers_without_a_body(backend: Backend) -> None:
    raw = _raw_exchange(
        backend.port, b"HEAD /?bytes=5000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"content-length: 5000" in head
    assert rest == b""


def test_pipelined_requests_are_answered_in_order_on_one_connection(backend: Backend) -> None:
    # The first answer is delayed, so the second is queued behind it and must not
    # overtake it; the third closes the connection once answered.
    raw = _raw_exchange(
        backend.port,
        b"GET /first?delay_ms=100 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /third HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    paths = [json.loads(line)["path"] for line in raw.split(b"\n") if line.startswith(b"{")]
    assert paths == ["/first", "/second", "/third"]
    assert raw.count(b"HTTP/1.1 200 OK") == 3


def test_http_10_request_is_answered_then_closed(backend: Backend) -> None:
    raw = _raw_exchange(backend.port, b"GET /old HTTP/1.0\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"connection: close" in head
    assert json.loads(body)["path"] == "/old"


def test_malformed_request_gets_400(backend: Backend) -> None:
    raw = _raw_exchange(backend.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 Bad Request")


def test_large_transfers_both_ways_keep_memory_bounded() -> None:
    # A process of its own, so its peak RSS reflects only these transfers. Without
    # flow control the whole download would sit in the transport's write buffer, and
    # a body held whole would show up as upload size in the peak.
    own = Backend("big-transfers")
    size = 256 * 1024 * 1024
    block = pattern_bytes(1 << 20)  # the pattern's period divides 1 MiB
    expected = hashlib.sha256()
    for _ in range(256):
        expected.update(block)
    try:
        with httpx.Client(base_url=own.url, timeout=30) as http:
            received = 0
            digest = hashlib.sha256()
            with http.stream("GET", f"/?bytes={size}") as response:
                for chunk in response.iter_raw(1 << 20):
                    received += len(chunk)
                    digest.update(chunk)
            assert received == size
            assert digest.hexdigest() == expected.hexdigest()

            body = http.post("/upload", content=(block for _ in range(256))).json()
            assert body["body_bytes"] == size
            assert body["body_sha256"] == expected.hexdigest()
        peak_kb = own.peak_rss_kb()
        assert peak_kb < 96 * 1024, f"peak RSS {peak_kb} kB for a {size} byte transfer"
    finally:
        own.stop()


def test_sigterm_stops_the_backend_cleanly() -> None:
    own = Backend("short-lived")
    with httpx.Client(timeout=5) as http:
        assert http.get(own.url).status_code == 200
    assert own.stop() == 0
