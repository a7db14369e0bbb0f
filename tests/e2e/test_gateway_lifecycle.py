"""Streaming with bounded memory, graceful SIGTERM drain, several workers — all with
real ``meshgate`` processes."""

from __future__ import annotations

import hashlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_gateway_helpers import Backend, Gateway, free_ports, pid_alive, rss_kib, wait_port

from gateway.demo_backend import pattern_bytes

CONFIG = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [echo.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {echo}}}}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: default}}
spec:
  selector: {{istio: ingressgateway}}
  servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: default}}
spec:
  hosts: ["*"]
  gateways: [edge]
  http: [{{route: [{{destination: {{host: echo.local}}}}]}}]
"""

GIB = 1024 * 1024 * 1024
RSS_GROWTH_LIMIT_KIB = 8 * 1024  # "a few MiB"


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[tuple[int, int, Backend, Path]]:
    port, echo, admin = free_ports(3)
    backend = Backend(echo, "echo")
    (tmp_path / "config.yaml").write_text(CONFIG.format(port=port, echo=echo))
    try:
        yield port, admin, backend, tmp_path
    finally:
        backend.stop()


def test_one_gib_upload_and_download_keep_gateway_memory_flat(stack: tuple) -> None:
    port, admin, _, config = stack
    gateway = Gateway(config, admin)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            client.get("/warm-up")
            before = rss_kib(gateway.proc.pid)
            block = b"u" * (1024 * 1024)
            digest = hashlib.sha256()

            def upload() -> Iterator[bytes]:
                for _ in range(GIB // len(block)):
                    digest.update(block)
                    yield block

            echoed = client.post("/up", content=upload()).json()
            assert echoed["body_bytes"] == GIB
            assert echoed["body_sha256"] == digest.hexdigest()
            after_upload = rss_kib(gateway.proc.pid)

            received = 0
            check = hashlib.sha256()
            with client.stream("GET", f"/down?bytes={GIB}") as response:
                assert response.status_code == 200
                for chunk in response.iter_raw(1024 * 1024):
                    received += len(chunk)
                    check.update(chunk)
            assert received == GIB
            expected = hashlib.sha256()
            expected.update(pattern_bytes(GIB))
            assert check.hexdigest() == expected.hexdigest()
            after_download = rss_kib(gateway.proc.pid)
        assert after_upload - before < RSS_GROWTH_LIMIT_KIB, (before, after_upload)
        assert after_download - before < RSS_GROWTH_LIMIT_KIB, (before, after_download)
    finally:
        gateway.stop()


def test_sigterm_lets_the_request_in_flight_finish_then_exits_zero(stack: tuple) -> None:
    port, admin, _, config = stack
    gateway = Gateway(config, admin)
    result: dict[str, object] = {}
    sent = threading.Event()

    def slow_request() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /slow?delay_ms=700 HTTP/1.1\r\nHost: a\r\n\r\n")
            sent.set()
            data = b""
            while b'"path":"/slow"' not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            result["data"] = data

    thread = threading.Thread(target=slow_request)
    thread.start()
    assert sent.wait(5)
    # In flight for sure once the gateway holds a connection to the backend.
    _wait_upstream_connection(stack[2].port)
    code = gateway.stop(signal.SIGTERM)
    thread.join(10)
    assert code == 0
    assert bytes(result["data"]).startswith(b"HTTP/1.1 200 ")  # type: ignore[arg-type]


def _wait_upstream_connection(backend_port: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    wanted = f":{backend_port:04X} "
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            # local_address rem_address st ...; st 01 is ESTABLISHED
            if any(
                line.split()[2].endswith(wanted.strip()) and line.split()[3] == "01"
                for line in f.readlines()[1:]
            ):
                return
        time.sleep(0.01)  # polling kernel state: there is nothing to block on
    raise TimeoutError("the gateway never connected to the backend")


def test_two_workers_share_the_port_and_admin_reports_ready(stack: tuple) -> None:
    port, admin, _, config = stack
    gateway = Gateway(config, admin, "--workers", "2")
    try:
        wait_port(admin)
        ready = httpx.get(f"http://127.0.0.1:{admin}/healthz/ready", timeout=5)
        assert ready.status_code == 200
        for i in range(20):
            response = httpx.get(f"http://127.0.0.1:{port}/w{i}", timeout=5)
            assert response.json()["path"] == f"/w{i}"
        children = Path(f"/proc/{gateway.proc.pid}/task/{gateway.proc.pid}/children")
        workers = [int(p) for p in children.read_text().split()]
        assert len(workers) == 2
    finally:
        code = gateway.stop(signal.SIGTERM)
    assert code == 0
    assert not any(pid_alive(pid) for pid in workers)
