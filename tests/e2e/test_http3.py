"""HTTP/3 through the real gateway: ``meshgate run`` with an HTTPS Gateway server (a
certificate minted here) in front of two ``meshgate demo-backend`` processes.

The same request matrix goes over HTTP/1.1 and HTTP/2 (httpx over TLS, ALPN) and over
HTTP/3 (aioquic's client over UDP on 127.0.0.1, ``gateway.server.h3client``); every
route must answer identically whichever version carried it. Responses over TCP carry
``alt-svc`` naming the UDP port, and only when that port is actually served. Large
bodies stream both ways over HTTP/3.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_gateway_helpers import free_tcp_udp_port

import gateway.runtime
from gateway.demo_backend import pattern_bytes
from gateway.server.h3client import H3Response, client_configuration, connect_h3

START_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 30.0
BIG_BYTES = 16 * 1024 * 1024


# --------------------------------------------------------------------------- processes


class Process:
    """A child process whose stderr is read line by line on a thread."""

    def __init__(self, args: list[str], access_log: bool = False) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *args],
            stdout=subprocess.PIPE if access_log else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.access: queue.Queue[dict[str, object]] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        if access_log:
            threading.Thread(target=self._drain_access, daemon=True).start()

    def _drain_access(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.access.put(json.loads(line))

    def access_line(self, path: str) -> dict[str, object]:
        """The access-log line of the request for ``path`` (waits for it)."""
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                record = self.access.get(timeout=left)
            except queue.Empty:
                break
            if record.get("path") == path:
                return record
        raise AssertionError(f"no access-log line for {path!r}")

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.output.append(line)
            self.lines.put(line)

    def wait_for_line(self, text: str) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if text in line:
                return line
        self.stop()
        raise AssertionError(f"no line with {text!r}; stderr:\n{''.join(self.output)}")

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


# --------------------------------------------------------------------------- certificates


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _mint(directory: Path) -> Path:
    """A CA and a server certificate for localhost / 127.0.0.1; returns the CA file."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("meshgate e2e CA"))
        .issuer_name(_name("meshgate e2e CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ca_file


CONFIG = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [echo.h3.test]
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
  host: echo.h3.test
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
    - port: {{number: {port}, name: https, protocol: HTTPS}}
      hosts: ["*"]
      tls:
        mode: SIMPLE
        serverCertificate: {certs}/tls.crt
        privateKey: {certs}/tls.key
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
      route: [{{destination: {{host: echo.h3.test, subset: v1}}}}]
    - name: canary
      match: [{{headers: {{x-canary: {{exact: "true"}}}}}}]
      route: [{{destination: {{host: echo.h3.test, subset: v2}}}}]
    - name: by-method
      match: [{{method: {{exact: PUT}}, uri: {{prefix: /put}}}}]
      route: [{{destination: {{host: echo.h3.test, subset: v2}}}}]
    - name: admin-only
      match: [{{uri: {{prefix: /private}}}}]
      directResponse: {{status: 403, body: {{string: "no\\n"}}}}
    - name: moved
      match: [{{uri: {{exact: /old}}}}]
      redirect: {{uri: /new}}
    - name: rest
      route: [{{destination: {{host: echo.h3.test, subset: v1}}}}]
"""


class Gateway:
    def __init__(self, tmp: Path, blocked_udp: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.ca_file = _mint(tmp)
        self.v1, v1_port = _start_backend("v1")
        self.v2, v2_port = _start_backend("v2")
        self.port = free_tcp_udp_port()
        self.blocker: socket.socket | None = None
        if blocked_udp:
            # Someone else holds the UDP side of the port (no SO_REUSEPORT).
            self.blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.blocker.bind(("127.0.0.1", self.port))
        config_dir = tmp / "config"
        config_dir.mkdir()
        (config_dir / "config.yaml").write_text(
            CONFIG.format(v1=v1_port, v2=v2_port, port=self.port, certs=tmp)
        )
        self.gateway = Process(
            ["run", str(config_dir), "--admin-port", str(free_tcp_udp_port()), *extra],
            access_log=True,
        )
        self.gateway.wait_for_line("serving HTTP on")
        self.base = f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        for process in (self.gateway, self.v1, self.v2):
            process.stop()
        if self.blocker is not None:
            self.blocker.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    started = Gateway(tmp_path_factory.mktemp("h3-gateway"))
    try:
        yield started
    finally:
        started.stop()


def _h3(gateway: Gateway, *requests: tuple[object, ...]) -> list[H3Response]:
    """Send requests (method, path, headers, body[, sink]) one after the other on one
    HTTP/3 connection."""

    async def scenario() -> list[H3Response]:
        config = client_configuration("localhost", cadata=gateway.ca_file.read_bytes())
        out: list[H3Response] = []
        async with asyncio.timeout(REQUEST_TIMEOUT_S * len(requests)):
            async with connect_h3("127.0.0.1", gateway.port, config) as client:
                for method, path, headers, body, *sink in requests:
                    out.append(
                        await client.request(
                            str(method),
                            f"127.0.0.1:{gateway.port}",
                            str(path),
                            list(dict(headers).items()),  # type: ignore[call-overload]
                            body,  # type: ignore[arg-type]
                            sink=sink[0] if sink else None,  # type: ignore[arg-type]
                        )
                    )
        return out

    return asyncio.run(scenario())


# (method, path, headers, body): routes, rewrites, header and method matches, direct
# responses, a redirect, query strings, status passthrough and request bodies.
MATRIX: list[tuple[str, str, dict[str, str], bytes]] = [
    ("GET", "/healthz", {}, b""),
    ("GET", "/api/items?x=1&y=2", {}, b""),
    ("GET", "/anything", {"x-canary": "true"}, b""),
    ("GET", "/anything", {"x-canary": "false"}, b""),
    ("PUT", "/put/thing", {"content-type": "text/plain"}, b"put body"),
    ("GET", "/private/thing", {}, b""),
    ("GET", "/old", {}, b""),
    ("GET", "/missing?status=404", {}, b""),
    ("POST", "/api/upload", {"content-type": "text/plain"}, b"hello, h3"),
    ("DELETE", "/api/items/7", {"cookie": "a=1; b=2"}, b""),
]


def _summary(status: int, headers: dict[str, str], body: bytes) -> tuple[object, ...]:
    """What must not depend on the HTTP version: status, who served it, where a
    redirect points, and what the backend saw (method, rewritten path, query, body)."""
    # The backend's JSON echoes the client's own headers (user-agent, accept), which
    # differ between clients; what the gateway decided is compared instead.
    seen: object = body
    if headers.get("content-type") == "application/json":
        doc = json.loads(body)
        seen = (doc["method"], doc["path"], doc["query"], doc["body_bytes"], doc["body_sha256"])
    return status, headers.get("x-served-by"), headers.get("location"), seen


def test_same_request_matrix_routes_identically_over_http1_http2_and_http3(
    gateway: Gateway,
) -> None:
    verify = ssl.create_default_context(cafile=gateway.ca_file)
    over: dict[str, list[tuple[object, ...]]] = {"1.1": [], "2": [], "3": []}
    with (
        httpx.Client(base_url=gateway.base, timeout=10, verify=verify) as h1,
        httpx.Client(base_url=gateway.base, timeout=10, verify=verify, http2=True) as h2,
    ):
        for client, version in ((h1, "HTTP/1.1"), (h2, "HTTP/2")):
            for method, path, headers, body in MATRIX:
                response = client.request(method, path, headers=headers, content=body or None)
                assert response.http_version == version
                key = "1.1" if version == "HTTP/1.1" else "2"
                over[key].append(
                    _summary(response.status_code, dict(response.headers), response.content)
                )
    for response in _h3(gateway, *MATRIX):
        assert response.reset_code is None
        over["3"].append(_summary(response.status, dict(response.headers), response.body))
    assert over["3"] == over["1.1"]
    assert over["2"] == over["1.1"]
    # The matrix exercised the routes it meant to.
    statuses = [summary[0] for summary in over["3"]]
    assert statuses == [200, 200, 200, 200, 200, 403, 301, 404, 200, 200]
    served_by = [summary[1] for summary in over["3"]]
    assert served_by[2] == "v2" and served_by[3] == "v1" and served_by[4] == "v2"


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/api/a b", {}),  # a space would end up in the upstream's request line
        ("/api/host", {"host": "evil.example"}),  # RFC 9114 §4.3.1: must match :authority
    ],
)
def test_malformed_http3_request_is_answered_400_logged_dpe_and_not_forwarded(
    gateway: Gateway, path: str, headers: dict[str, str]
) -> None:
    path = f"{path}-{uuid.uuid4().hex}"
    (response,) = _h3(gateway, ("GET", path, headers, b""))
    assert response.status == 400
    line = gateway.gateway.access_line(path)
    assert (line["status"], line["response_flags"], line["protocol"]) == (400, "DPE", "HTTP/3")
    assert (line["route"], line["upstream_host"]) == ("-", "-")


def test_http3_stack_is_loaded_by_the_first_quic_datagram(tmp_path: Path) -> None:
    """aioquic and cryptography (about 13 MB of a worker) stay out of a worker whose
    clients have not spoken QUIC, while the port is bound and advertised all along."""
    started = Gateway(tmp_path)
    maps = Path(f"/proc/{started.gateway.process.pid}/maps")

    def loaded() -> tuple[bool, bool]:
        text = maps.read_text()
        return "/aioquic/" in text, "/cryptography/" in text

    try:
        verify = ssl.create_default_context(cafile=started.ca_file)
        with httpx.Client(base_url=started.base, timeout=10, verify=verify, http2=True) as h2:
            response = h2.get("/api/a")
        assert response.headers.get("alt-svc") == f'h3=":{started.port}"; ma=86400'
        assert loaded() == (False, False)
        (over_h3,) = _h3(started, ("GET", "/api/b", {}, b""))
        assert over_h3.status == 200
        assert loaded() == (True, True)
    finally:
        started.stop()


def test_tcp_responses_advertise_the_quic_port_and_http3_ones_do_not(gateway: Gateway) -> None:
    expected = f'h3=":{gateway.port}"; ma=86400'
    verify = ssl.create_default_context(cafile=gateway.ca_file)
    with httpx.Client(base_url=gateway.base, timeout=10, verify=verify, http2=True) as h2:
        assert h2.get("/api/a").headers.get("alt-svc") == expected  # proxied
        assert h2.get("/healthz").headers.get("alt-svc") == expected  # direct response
    with httpx.Client(base_url=gateway.base, timeout=10, verify=verify) as h1:
        assert h1.get("/private").headers.get("alt-svc") == expected
    (over_h3,) = _h3(gateway, ("GET", "/api/a", {}, b""))
    assert over_h3.status == 200
    assert over_h3.header("alt-svc") is None


def test_http3_request_reaches_the_backend_with_forwarded_proto_https(gateway: Gateway) -> None:
    (response,) = _h3(gateway, ("GET", "/api/h?q=1", {"cookie": "a=1"}, b""))
    seen = json.loads(response.body)
    assert (seen["service"], seen["path"], seen["query"]) == ("v1", "/v1/h", "q=1")
    assert seen["headers"]["x-forwarded-proto"] == "https"
    assert seen["headers"]["cookie"] == "a=1"


def test_large_bodies_stream_both_ways_over_http3(gateway: Gateway) -> None:
    block = bytes(range(256)) * 1024  # 256 KiB
    expected_up = hashlib.sha256()
    for _ in range(BIG_BYTES // len(block)):
        expected_up.update(block)

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(BIG_BYTES // len(block)):
            yield block

    down = hashlib.sha256()
    up_response, down_response = _h3(
        gateway,
        ("POST", "/api/upload", {}, upload()),
        ("GET", f"/api/big?bytes={BIG_BYTES}", {}, b"", down.update),
    )
    assert up_response.status == 200
    seen = json.loads(up_response.body)
    assert seen["body_bytes"] == BIG_BYTES
    assert seen["body_sha256"] == expected_up.hexdigest()
    assert down_response.status == 200
    assert down_response.body_bytes == BIG_BYTES
    assert down.hexdigest() == hashlib.sha256(pattern_bytes(BIG_BYTES)).hexdigest()


def test_unbound_udp_port_means_no_alt_svc_and_tcp_still_serves(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, blocked_udp=True)
    try:
        assert any("HTTP/3 not served on UDP port" in line for line in gateway.gateway.output)
        with httpx.Client(
            base_url=gateway.base,
            timeout=10,
            verify=ssl.create_default_context(cafile=gateway.ca_file),
            http2=True,
        ) as h2:
            response = h2.get("/healthz")
        assert response.status_code == 200
        assert response.http_version == "HTTP/2"
        assert "alt-svc" not in response.headers
    finally:
        gateway.stop()


def test_sigterm_drains_an_http3_download_in_flight(tmp_path: Path) -> None:
    # A drain timeout far above what the download needs, even on a busy machine: the
    # point is that the stream is finished, not how fast.
    gateway = Gateway(tmp_path, extra=("--drain-timeout-s", "60"))
    received = hashlib.sha256()
    signalled: list[bool] = []

    def sink(chunk: bytes) -> None:
        received.update(chunk)
        if not signalled:
            # The response has started: stop the gateway now; it must finish this
            # stream (GOAWAY, drain) before it exits.
            signalled.append(True)
            gateway.gateway.process.send_signal(signal.SIGTERM)

    try:
        (response,) = _h3(gateway, ("GET", f"/api/big?bytes={BIG_BYTES}", {}, b"", sink))
        assert signalled == [True]
        assert response.status == 200
        assert response.reset_code is None
        assert response.body_bytes == BIG_BYTES
        assert received.hexdigest() == hashlib.sha256(pattern_bytes(BIG_BYTES)).hexdigest()
        assert gateway.gateway.process.wait(START_TIMEOUT_S) == 0
    finally:
        gateway.stop()
