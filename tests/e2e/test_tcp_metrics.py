"""End to end: Istio's TCP metrics for connections meshgate splices as TCP.

Real ``meshgate run`` / ``meshgate egress`` processes on 127.0.0.1 with TLS
PASSTHROUGH servers, in front of a plain TCP backend. The client sends a real TLS
ClientHello (made by ``ssl``, so the gateway can route it by SNI) followed by a
payload and reads until the backend closes; the backend never speaks TLS, so every
byte each way is known exactly and compared with what ``/metrics`` reports.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_gateway_helpers import Gateway, free_ports

OPENED = "istio_tcp_connections_opened_total"
CLOSED = "istio_tcp_connections_closed_total"
RECEIVED = "istio_tcp_received_bytes_total"
SENT = "istio_tcp_sent_bytes_total"

PAYLOAD = b"q" * 3000
REPLY = b"r" * 70_000  # more than one read on the way back

INGRESS = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: default}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
    - port: {{number: {port}, name: tls-db, protocol: TLS}}
      hosts: [db.example.com, down.example.com]
      tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db.tcp.test]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tls: {backend}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: down, namespace: default}}
spec:
  hosts: [down.tcp.test]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tls: {dead}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db.example.com, down.example.com]
  gateways: [edge]
  tls:
    - match: [{{sniHosts: [db.example.com]}}]
      route: [{{destination: {{host: db.tcp.test, port: {{number: 443}}}}}}]
    - match: [{{sniHosts: [down.example.com]}}]
      route: [{{destination: {{host: down.tcp.test, port: {{number: 443}}}}}}]
"""

EGRESS = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress-tls, namespace: istio-system}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: {port}, name: tls, protocol: TLS}}
    hosts: ["*.example.test"]
    tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: raw, namespace: egress}}
spec:
  hosts: [raw.example.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: tls, protocol: TLS, targetPort: {backend}}}]
  endpoints: [{{address: 127.0.0.1}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: down, namespace: egress}}
spec:
  hosts: [down.example.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: tls, protocol: TLS, targetPort: {dead}}}]
  endpoints: [{{address: 127.0.0.1}}]
"""


class RawBackend:
    """A plain TCP server: reads one TLS record (the ClientHello) and ``len(PAYLOAD)``
    more bytes, answers ``REPLY`` and closes. It never speaks TLS."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            try:
                header = _read_exactly(conn, 5)
                (length,) = struct.unpack("!H", header[3:5])
                _read_exactly(conn, length + len(PAYLOAD))
                conn.sendall(REPLY)
            except OSError:
                return

    def stop(self) -> None:
        # shutdown wakes the blocked accept() (close alone would not, on Linux).
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return data


def client_hello(server_name: str) -> bytes:
    """A real TLS ClientHello for ``server_name``, as the first flight of a client."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16 and len(hello) == 5 + struct.unpack("!H", hello[3:5])[0]
    return hello


def exchange(port: int, server_name: str) -> tuple[int, int]:
    """One connection: ClientHello and payload up, the reply read to the close.
    Returns (bytes sent, bytes received) by the client."""
    hello = client_hello(server_name)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(hello)
        s.sendall(PAYLOAD)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    assert received == REPLY
    return len(hello) + len(PAYLOAD), len(received)


def refused(port: int, server_name: str) -> None:
    """One connection the gateway closes or resets without reaching an upstream."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(client_hello(server_name))
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(65536) == b""


def scrape(admin: int) -> str:
    return httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_metric(admin: int, name: str, want: float, **labels: str) -> str:
    """Scrape until ``name`` reaches ``want``: a connection is counted as closed just
    after the client sees its end. Fails at once if it ever goes past it."""
    deadline = time.monotonic() + 10.0
    while True:
        text = scrape(admin)
        value = metric(text, name, **labels)
        assert value <= want, (name, value, want)
        if value == want:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} stuck at {value}, expected {want}")
        time.sleep(0.05)  # polling a scrape: there is no event to wait on


class Setup:
    def __init__(self, tmp: Path, template: str, command: str, *extra: str) -> None:
        self.port, self.admin, dead = free_ports(3)
        self.backend = RawBackend()
        config = tmp / "config"
        config.mkdir()
        (config / "gateway.yaml").write_text(
            template.format(port=self.port, backend=self.backend.port, dead=dead)
        )
        try:
            self.gateway = Gateway(config, self.admin, *extra, command=command)
        except BaseException:
            self.backend.stop()
            raise

    def stop(self) -> None:
        try:
            assert self.gateway.stop(signal.SIGTERM) == 0
        finally:
            self.backend.stop()


@pytest.fixture()
def ingress(tmp_path: Path) -> Iterator[Setup]:
    setup = Setup(tmp_path, INGRESS, "run")
    yield setup
    setup.stop()


@pytest.fixture()
def egress(tmp_path: Path) -> Iterator[Setup]:
    setup = Setup(tmp_path, EGRESS, "egress")
    yield setup
    setup.stop()


DB = {"destination_service": "db.tcp.test", "request_protocol": "tcp"}


def test_ingress_passthrough_connections_are_counted_with_exact_bytes(ingress: Setup) -> None:
    sent = received = 0
    for _ in range(3):
        up, down = exchange(ingress.port, "db.example.com")
        sent, received = sent + up, received + down
    text = wait_metric(ingress.admin, CLOSED, 3, response_flags="-", **DB)
    assert metric(text, OPENED, response_flags="-", **DB) == 3
    # Received: what the client sent, ClientHello included; sent: what it got back.
    assert metric(text, RECEIVED, **DB) == sent
    assert metric(text, SENT, **DB) == received == 3 * len(REPLY)
    labels = next(
        s.labels
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == OPENED
    )
    assert labels["reporter"] == "source"
    assert labels["source_workload"] == "meshgate-ingressgateway"
    assert labels["connection_security_policy"] == "unknown"
    assert "response_code" not in labels
    # A spliced connection is not an HTTP request.
    assert metric(text, "istio_requests_total") == 0


def test_ingress_passthrough_connections_get_an_access_log_line(ingress: Setup) -> None:
    up, down = exchange(ingress.port, "db.example.com")
    refused(ingress.port, "down.example.com")  # nothing listens: UF
    refused(ingress.port, "other.example.com")  # no server for this SNI: NR
    port = ingress.port

    def line(name: str) -> dict:
        return ingress.gateway.log_where(lambda r: r["authority"] == f"{name}:{port}")

    spliced = line("db.example.com")
    assert (spliced["method"], spliced["path"], spliced["protocol"]) == ("-", "-", "-")
    assert spliced["response_flags"] == "-"
    assert spliced["upstream_cluster"] == "outbound|443||db.tcp.test"
    assert spliced["upstream_host"] == f"127.0.0.1:{ingress.backend.port}"
    # The same bytes the TCP metrics count: the client's (ClientHello included) in,
    # the backend's out.
    assert (spliced["bytes_received"], spliced["bytes_sent"]) == (up, down)
    failed = line("down.example.com")
    assert (failed["response_flags"], failed["upstream_cluster"]) == (
        "UF",
        "outbound|443||down.tcp.test",
    )
    assert failed["bytes_received"] == failed["bytes_sent"] == 0
    unknown = line("other.example.com")
    assert (unknown["response_flags"], unknown["upstream_cluster"]) == ("NR", "-")


def test_ingress_passthrough_upstream_connect_failure_is_counted_uf(ingress: Setup) -> None:
    refused(ingress.port, "down.example.com")
    down = {"destination_service": "down.tcp.test", "response_flags": "UF"}
    text = wait_metric(ingress.admin, CLOSED, 1, **down)
    assert metric(text, OPENED, **down) == 1
    assert metric(text, RECEIVED, **down) == metric(text, SENT, **down) == 0
    assert metric(text, OPENED, response_flags="-") == 0


def test_two_workers_add_up_their_tcp_connections(tmp_path: Path) -> None:
    setup = Setup(tmp_path, INGRESS, "run", "--workers", "2")
    try:
        n = 16
        sent = 0
        for _ in range(n):  # a new connection each time: the kernel spreads them
            sent += exchange(setup.port, "db.example.com")[0]
        refused(setup.port, "down.example.com")
        text = wait_metric(setup.admin, CLOSED, n, response_flags="-", **DB)
        assert metric(text, "meshgate_workers") == 2
        assert metric(text, OPENED, **DB) == n
        assert metric(text, RECEIVED, **DB) == sent
        assert metric(text, SENT, **DB) == n * len(REPLY)
        wait_metric(setup.admin, OPENED, 1, response_flags="UF")
    finally:
        setup.stop()


def test_egress_sni_passthrough_is_counted_as_tcp_not_as_a_request(egress: Setup) -> None:
    up, down = exchange(egress.port, "raw.example.test")
    refused(egress.port, "down.example.test")  # declared, nothing listens: UF
    refused(egress.port, "nowhere.example.test")  # in no ServiceEntry: NR
    # The access-log line of each tunnel is written in the same step as its count.
    for name in ("raw", "down", "nowhere"):
        egress.gateway.log_where(
            lambda r, name=name: r["authority"] == f"{name}.example.test:{egress.port}"
        )
    text = scrape(egress.admin)
    raw = {"destination_service": "raw.example.test", "request_protocol": "tcp"}
    assert metric(text, OPENED, response_flags="-", **raw) == 1
    assert metric(text, CLOSED, response_flags="-", **raw) == 1
    assert metric(text, RECEIVED, **raw) == up
    assert metric(text, SENT, **raw) == down == len(REPLY)
    failed = {"destination_service": "down.example.test", "response_flags": "UF"}
    assert metric(text, OPENED, **failed) == metric(text, CLOSED, **failed) == 1
    refusal = {"destination_service": "BlackHoleCluster", "response_flags": "NR"}
    assert metric(text, OPENED, **refusal) == metric(text, CLOSED, **refusal) == 1
    labels = next(
        s.labels
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == OPENED
    )
    assert labels["source_workload"] == "meshgate-egressgateway"
    assert metric(text, "istio_requests_total") == 0
