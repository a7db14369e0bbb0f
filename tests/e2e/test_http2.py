"""HTTP/2 through the real gateway: ``meshgate run`` with two ``meshgate demo-backend``
processes, driven by httpx (prior knowledge) and curl (h2c upgrade and prior
knowledge). Every route must answer over HTTP/2 exactly as it does over HTTP/1.1, and
large bodies must stream through both ways.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from gateway.demo_backend import pattern_bytes

START_TIMEOUT_S = 30.0
BIG_BYTES = 64 * 1024 * 1024
CURL = shutil.which("curl")


def _curl_speaks_http2() -> bool:
    if CURL is None:
        return False
    version = subprocess.run([CURL, "--version"], capture_output=True, text=True, check=False)
    return "HTTP2" in version.stdout


needs_curl = pytest.mark.skipif(
    not _curl_speaks_http2(), reason="curl with HTTP/2 support is not installed"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A child process whose stderr is read line by line on a thread."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.output.append(line)
            self.lines.put(line)

    def wait_for_line(self, prefix: str) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if prefix in line:
                return line
        self.stop()
        raise AssertionError(f"no line with {prefix!r}; stderr:\n{''.join(self.output)}")

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(f"process did not stop within {timeout_s} s of SIGTERM") from None


def _start_backend(name: str) -> tuple[Process, int]:
    backend = Process(["demo-backend", "--port", "0", "--name", name])
    line = backend.wait_for_line(f"demo-backend {name} listening on 127.0.0.1:")
    return backend, int(line.strip().rsplit(":", 1)[1])


CONFIG = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [echo.h2.test]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
    - {{address: 127.0.0.1, ports: {{http: {v1}}}, labels: {{version: v1}}}}
    - {{address: 127.0.0.1, ports: {{http: {v2}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: default}}
spec:
  host: echo.h2.test
  subsets:
    - {{name: v1, labels: {{version: v1}}}}
    - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: default}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
    - port: {{number: {port}, name: http, protocol: HTTP}}
      hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: default}}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
    - name: healthz
      match: [{{uri: {{exact: /healthz}}}}]
      directResponse: {{status: 200, body: {{string: "ok\\n"}}}}
    - name: api
      match: [{{uri: {{prefix: /api/}}}}]
      rewrite: {{uri: /v1/}}
      route: [{{destination: {{host: echo.h2.test, subset: v1}}}}]
    - name: canary
      match: [{{headers: {{x-canary: {{exact: "true"}}}}}}]
      route: [{{destination: {{host: echo.h2.test, subset: v2}}}}]
    - name: admin-only
      match: [{{uri: {{prefix: /private}}}}]
      directResponse: {{status: 403, body: {{string: "no\\n"}}}}
    - name: rest
      route: [{{destination: {{host: echo.h2.test, subset: v1}}}}]
"""


class Gateway:
    def __init__(self, tmp: Path) -> None:
        self.v1, v1_port = _start_backend("v1")
        self.v2, v2_port = _start_backend("v2")
        self.port = _free_port()
        (tmp / "config.yaml").write_text(CONFIG.format(v1=v1_port, v2=v2_port, port=self.port))
        self.gateway = Process(["run", str(tmp), "--admin-port", str(_free_port())])
        self.gateway.wait_for_line("serving HTTP on")
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        for process in (self.gateway, self.v1, self.v2):
            process.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    started = Gateway(tmp_path_factory.mktemp("h2-gateway"))
    try:
        yield started
    finally:
        started.stop()


# (method, path, headers, body): routes, rewrites, header matches, direct responses,
# query strings, status passthrough and a request body.
MATRIX: list[tuple[str, str, dict[str, str], bytes]] = [
    ("GET", "/healthz", {}, b""),
    ("GET", "/api/items?x=1&y=2", {}, b""),
    ("GET", "/anything", {"x-canary": "true"}, b""),
    ("GET", "/anything", {"x-canary": "false"}, b""),
    ("GET", "/private/thing", {}, b""),
    ("GET", "/missing?status=404", {}, b""),
    ("POST", "/api/upload", {"content-type": "text/plain"}, b"hello, h2"),
    ("DELETE", "/api/items/7", {"cookie": "a=1; b=2"}, b""),
]


def _summary(response: httpx.Response) -> tuple[object, ...]:
    """What must not depend on the HTTP version: status, who served it, and what the
    backend saw (method, rewritten path, query, body)."""
    seen: object = None
    if response.headers.get("content-type") == "application/json":
        doc = response.json()
        seen = (doc["method"], doc["path"], doc["query"], doc["body_bytes"], doc["body_sha256"])
    return response.status_code, response.headers.get("x-served-by"), seen, len(response.content)


def test_routes_answer_the_same_over_http2_prior_knowledge_as_http1(gateway: Gateway) -> None:
    with (
        httpx.Client(base_url=gateway.base, timeout=10) as h1,
        httpx.Client(base_url=gateway.base, timeout=10, http1=False, http2=True) as h2c,
    ):
        for method, path, headers, body in MATRIX:
            over_h1 = h1.request(method, path, headers=headers, content=body or None)
            over_h2 = h2c.request(method, path, headers=headers, content=body or None)
            assert over_h1.http_version == "HTTP/1.1"
            assert over_h2.http_version == "HTTP/2"
            assert _summary(over_h2) == _summary(over_h1), (method, path)
        # The table above exercised the routes it meant to.
        assert h2c.get("/api/a").headers["x-served-by"] == "v1"
        assert h2c.get("/x", headers={"x-canary": "true"}).headers["x-served-by"] == "v2"
        assert h2c.get("/private/x").status_code == 403


def test_cookie_crumbs_reach_the_backend_joined(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.base, timeout=10, http1=False, http2=True) as client:
        # httpx sends one cookie field; h2 splits nothing, so send crumbs ourselves.
        response = client.get("/api/c", headers=[("cookie", "a=1"), ("cookie", "b=2")])
    assert response.http_version == "HTTP/2"
    assert response.json()["headers"]["cookie"] == "a=1; b=2"


def test_many_concurrent_streams_on_one_connection(gateway: Gateway) -> None:
    async def scenario() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(
            base_url=gateway.base, http1=False, http2=True, limits=limits, timeout=20
        ) as client:
            return await asyncio.gather(*(client.get(f"/api/n?i={i}") for i in range(60)))

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 60
    assert {r.http_version for r in responses} == {"HTTP/2"}
    assert [r.json()["query"] for r in responses] == [f"i={i}" for i in range(60)]


def test_large_download_streams_through_http2(gateway: Gateway) -> None:
    digest = hashlib.sha256()
    received = 0
    with (
        httpx.Client(base_url=gateway.base, timeout=60, http1=False, http2=True) as client,
        client.stream("GET", f"/api/big?bytes={BIG_BYTES}") as response,
    ):
        assert response.http_version == "HTTP/2"
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            digest.update(chunk)
            received += len(chunk)
    assert received == BIG_BYTES
    assert digest.hexdigest() == hashlib.sha256(pattern_bytes(BIG_BYTES)).hexdigest()


def test_large_upload_streams_through_http2(gateway: Gateway) -> None:
    block = bytes(range(256)) * 4096  # 1 MiB
    expected = hashlib.sha256()
    for _ in range(BIG_BYTES // len(block)):
        expected.update(block)

    def body() -> Iterator[bytes]:
        for _ in range(BIG_BYTES // len(block)):
            yield block

    with httpx.Client(base_url=gateway.base, timeout=60, http1=False, http2=True) as client:
        response = client.post("/api/upload", content=body())
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200
    seen = response.json()
    assert seen["body_bytes"] == BIG_BYTES
    assert seen["body_sha256"] == expected.hexdigest()


def _curl(*args: str) -> tuple[str, dict[str, object]]:
    assert CURL is not None
    result = subprocess.run(
        [CURL, "-sS", "--max-time", "60", "-w", "\n%{http_version} %{http_code}", *args],
        capture_output=True,
        check=True,
        timeout=90,
    )
    body, _, trailer = result.stdout.rpartition(b"\n")
    version, code = trailer.decode().split()
    document = json.loads(body) if body.startswith(b"{") else {"raw": body.decode()}
    return f"{version} {code}", document


@needs_curl
def test_curl_h2c_upgrade_is_routed(gateway: Gateway) -> None:
    status, seen = _curl("--http2", f"{gateway.base}/api/up?via=upgrade")
    assert status == "2 200"
    assert (seen["service"], seen["path"], seen["query"]) == ("v1", "/v1/up", "via=upgrade")
    assert "upgrade" not in seen["headers"]  # type: ignore[operator]
    assert "http2-settings" not in seen["headers"]  # type: ignore[operator]
    status, seen = _curl("--http2", "-H", "x-canary: true", f"{gateway.base}/z")
    assert status == "2 200"
    assert seen["service"] == "v2"


@needs_curl
def test_curl_prior_knowledge_streams_64_mib_both_ways(gateway: Gateway, tmp_path: Path) -> None:
    status, seen = _curl("--http2-prior-knowledge", f"{gateway.base}/private")
    assert (status, seen) == ("2 403", {"raw": "no\n"})

    download = tmp_path / "down.bin"
    status, _ = _curl(
        "--http2-prior-knowledge", "-o", str(download), f"{gateway.base}/api/d?bytes={BIG_BYTES}"
    )
    assert status == "2 200"
    assert download.stat().st_size == BIG_BYTES

    upload = tmp_path / "up.bin"
    block = bytes(range(256)) * 4096
    with upload.open("wb") as out:
        for _ in range(BIG_BYTES // len(block)):
            out.write(block)
    status, seen = _curl(
        "--http2-prior-knowledge", "--data-binary", f"@{upload}", f"{gateway.base}/api/u"
    )
    assert status == "2 200"
    assert seen["body_bytes"] == BIG_BYTES
    assert seen["body_sha256"] == hashlib.sha256(upload.read_bytes()).hexdigest()


def test_sigterm_with_an_open_http2_connection_stops_the_gateway(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    try:
        with httpx.Client(base_url=gateway.base, timeout=10, http1=False, http2=True) as client:
            assert client.get("/healthz").status_code == 200
            # The connection stays open while the gateway is asked to stop.
            started = time.monotonic()
            assert gateway.gateway.stop(timeout_s=15) == 0
            assert time.monotonic() - started < 10
    finally:
        gateway.stop()


class RawH2:
    """A blocking h2 client on a plain socket, for what httpx cannot show: frames."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.closed = False

    def get(self, path: str) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "t")]
        self.conn.send_headers(stream_id, headers, end_stream=True)
        return stream_id

    def pump_until(self, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 15
        while not done():
            if self.closed or time.monotonic() > deadline:
                raise AssertionError(f"gave up; events so far: {self.events}")
            self.sock.sendall(self.conn.data_to_send())
            data = self.sock.recv(65536)
            if not data:
                self.closed = True
                continue
            for event in self.conn.receive_data(data):
                self.events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                if isinstance(event, h2.events.ConnectionTerminated):
                    # RFC 9113 §6.8: streams up to last_stream_id may still complete;
                    # h2 closes its state machine on GOAWAY, so reopen it to read them.
                    self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN

    def ended(self, stream_id: int) -> bool:
        return any(
            isinstance(e, h2.events.StreamEnded | h2.events.StreamReset)
            and e.stream_id == stream_id
            for e in self.events
        )

    def status(self, stream_id: int) -> bytes | None:
        for event in self.events:
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                return dict(event.headers)[b":status"]
        return None


def test_sigterm_sends_goaway_and_lets_the_open_stream_finish(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    try:
        client = RawH2(gateway.port)
        slow = client.get("/api/slow?delay_ms=1500")
        probe = client.get("/healthz")
        # The probe's answer proves the gateway has the slow request in hand.
        client.pump_until(lambda: client.ended(probe))
        gateway.gateway.process.send_signal(signal.SIGTERM)
        client.pump_until(lambda: client.ended(slow))
        goaways = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
        assert [(g.error_code, g.last_stream_id) for g in goaways] == [(0, probe)]
        assert client.status(slow) == b"200"
        assert gateway.gateway.stop(timeout_s=15) == 0
    finally:
        gateway.stop()
