"""meshgate run as a real process in front of real demo backends: routing actions,
every failure status with its response flag, limits, access-log fields, pipelining,
keep-alive reuse of upstream connections."""

from __future__ import annotations

import http.server
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_gateway_helpers import Backend, Gateway, free_ports, raw_exchange

CONFIG = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: [echo.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {echo}}}, labels: {{version: v1}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: dead, namespace: shop}}
spec:
  hosts: [dead.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {dead}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: counted, namespace: shop}}
spec:
  hosts: [counted.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {counted}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: shop}}
spec:
  host: echo.local
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v9, labels: {{version: v9}}}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: shop}}
spec:
  selector: {{istio: ingressgateway}}
  servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop, namespace: shop}}
spec:
  hosts: [shop.local]
  gateways: [edge]
  http:
    - name: direct
      match: [{{uri: {{exact: /direct}}}}]
      directResponse: {{status: 418, body: {{string: "short and stout"}}}}
    - name: moved
      match: [{{uri: {{prefix: /old}}}}]
      redirect: {{uri: /new, scheme: https, redirectCode: 308}}
    - name: api
      match: [{{uri: {{prefix: /api/}}}}]
      rewrite: {{uri: /v2/}}
      headers:
        request: {{set: {{x-added: "yes"}}, remove: [x-secret]}}
        response: {{add: {{x-resp: "r"}}}}
      route: [{{destination: {{host: echo.local}}}}]
    - name: slow
      match: [{{uri: {{prefix: /slow}}}}]
      timeout: 0.3s
      route: [{{destination: {{host: echo.local}}}}]
    - name: nohosts
      match: [{{uri: {{prefix: /uh}}}}]
      route: [{{destination: {{host: echo.local, subset: v9}}}}]
    - name: refused
      match: [{{uri: {{prefix: /uf}}}}]
      route: [{{destination: {{host: dead.local}}}}]
    - name: counted
      match: [{{uri: {{prefix: /counted}}}}]
      route: [{{destination: {{host: counted.local}}}}]
    - name: cors
      match: [{{uri: {{prefix: /cors}}}}]
      corsPolicy:
        allowOrigins: [{{exact: "https://app.example"}}]
        allowMethods: [GET, POST]
        allowHeaders: [x-token]
        maxAge: 10m
      route: [{{destination: {{host: echo.local}}}}]
    - name: main
      route: [{{destination: {{host: echo.local}}}}]
"""


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: set[tuple[str, int]] = set()

    def do_GET(self) -> None:
        _CountingHandler.connections.add(self.client_address)
        body = b"counted"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.port, echo, self.dead, counted, admin = free_ports(5)
        self.counting = http.server.ThreadingHTTPServer(("127.0.0.1", counted), _CountingHandler)
        threading.Thread(target=self.counting.serve_forever, daemon=True).start()
        self.backend = Backend(echo, "echo")
        (tmp / "config.yaml").write_text(
            CONFIG.format(port=self.port, echo=echo, dead=self.dead, counted=counted)
        )
        self.gateway = Gateway(
            tmp,
            admin,
            "--max-request-body-bytes",
            "1000",
            "--max-request-headers",
            "20",
            "--request-header-timeout-s",
            "0.3",
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def get(self, path: str, host: str = "shop.local", **kw: object) -> tuple[httpx.Response, dict]:
        rid = uuid.uuid4().hex
        headers = {"host": host, "x-request-id": rid, **kw.pop("headers", {})}  # type: ignore[dict-item]
        method = str(kw.pop("method", "GET"))
        response = self.client.request(method, path, headers=headers, **kw)  # type: ignore[arg-type]
        return response, self.gateway.log_for(rid)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    setup = Setup(tmp_path_factory.mktemp("routing"))
    try:
        yield setup
    finally:
        setup.client.close()
        setup.gateway.stop()
        setup.backend.stop()
        setup.counting.shutdown()


def test_request_is_proxied_with_forwarded_headers_and_logged(gw: Setup) -> None:
    response, log = gw.get("/hello?q=1", headers={"user-agent": "tester/1"})
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["path"] == "/hello" and echoed["query"] == "q=1"
    assert echoed["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert echoed["headers"]["x-forwarded-proto"] == "http"
    assert echoed["headers"]["host"] == "shop.local"
    assert log["status"] == 200 and log["response_flags"] == "-"
    assert log["method"] == "GET" and log["path"] == "/hello?q=1"
    assert log["authority"] == "shop.local" and log["protocol"] == "HTTP/1.1"
    assert log["route"] == "VirtualService/shop/shop:main"
    assert log["upstream_cluster"] == "outbound|80||echo.local"
    assert log["upstream_host"] == f"127.0.0.1:{gw.backend.port}"
    assert log["bytes_sent"] == len(response.content)
    assert log["user_agent"] == "tester/1" and log["x_forwarded_for"] == "127.0.0.1"
    assert log["upstream_service_time_ms"] is not None and log["duration_ms"] >= 0
    assert log["start_time"].endswith("Z") and "T" in log["start_time"]


def test_unknown_host_gets_404_flag_nr(gw: Setup) -> None:
    response, log = gw.get("/", host="nowhere.local")
    assert response.status_code == 404
    assert log["response_flags"] == "NR" and log["route"] == "-"


def test_subset_without_endpoints_gets_503_flag_uh(gw: Setup) -> None:
    response, log = gw.get("/uh")
    assert response.status_code == 503 and response.text == "no healthy upstream"
    assert log["response_flags"] == "UH"


def test_refused_connection_gets_503_flag_uf(gw: Setup) -> None:
    response, log = gw.get("/uf")
    assert response.status_code == 503
    assert log["response_flags"] == "UF" and log["upstream_host"] == f"127.0.0.1:{gw.dead}"


def test_route_timeout_gets_504_flag_ut(gw: Setup) -> None:
    response, log = gw.get("/slow?delay_ms=2000")
    assert response.status_code == 504 and response.text == "upstream request timeout"
    assert log["response_flags"] == "UT"
    assert 250 <= log["duration_ms"] < 2000


def test_upstream_reset_before_head_gets_503_flag_ur(gw: Setup) -> None:
    response, log = gw.get("/x?close=1")
    assert response.status_code == 503
    assert log["response_flags"] == "UR"


def test_direct_response_and_redirect_are_answered_by_the_gateway(gw: Setup) -> None:
    response, log = gw.get("/direct")
    assert response.status_code == 418 and response.text == "short and stout"
    assert log["upstream_cluster"] == "-"
    response, _ = gw.get("/old/x?a=1")
    assert response.status_code == 308
    assert response.headers["location"] == "https://shop.local/new?a=1"


def test_rewrite_and_header_operations(gw: Setup) -> None:
    response, _ = gw.get("/api/items", headers={"x-secret": "s"})
    echoed = response.json()
    assert echoed["path"] == "/v2/items"
    assert echoed["headers"]["x-added"] == "yes"
    assert "x-secret" not in echoed["headers"]
    assert response.headers["x-resp"] == "r"


def test_cors_preflight_is_answered_and_simple_requests_decorated(gw: Setup) -> None:
    preflight, log = gw.get(
        "/cors",
        method="OPTIONS",
        headers={"origin": "https://app.example", "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert log["upstream_cluster"] == "-"
    simple, _ = gw.get("/cors", headers={"origin": "https://app.example"})
    assert simple.json()["service"] == "echo"
    assert simple.headers["access-control-allow-origin"] == "https://app.example"
    other, _ = gw.get("/cors", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_upstream_connections_are_kept_alive_and_reused(gw: Setup) -> None:
    _CountingHandler.connections.clear()
    for _ in range(20):
        response, _ = gw.get("/counted")
        assert response.text == "counted"
    assert len(_CountingHandler.connections) == 1


def test_pipelined_requests_are_answered_in_order(gw: Setup) -> None:
    requests = b"".join(
        b"GET /p%d?delay_ms=%d HTTP/1.1\r\nHost: shop.local\r\n\r\n" % (i, 50 - 20 * i)
        for i in range(3)
    )
    data = raw_exchange(
        gw.port, requests + b"GET /last HTTP/1.1\r\nHost: shop.local\r\nConnection: close\r\n\r\n"
    )
    order = [
        data.find(b'"path":"/p0"'),
        data.find(b'"path":"/p1"'),
        data.find(b'"path":"/p2"'),
        data.find(b'"path":"/last"'),
    ]
    assert -1 not in order and order == sorted(order)


def test_content_length_with_chunked_is_refused_with_400(gw: Setup) -> None:
    data = raw_exchange(
        gw.port,
        b"POST / HTTP/1.1\r\nHost: shop.local\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    )
    assert data.startswith(b"HTTP/1.1 400 ")
    log = gw.gateway._wait(gw.gateway.lines, lambda ln: '"status":400' in ln, 5)
    assert '"response_flags":"DPE"' in log


def test_body_over_the_limit_gets_413(gw: Setup) -> None:
    data = raw_exchange(
        gw.port,
        b"POST / HTTP/1.1\r\nHost: shop.local\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000,
    )
    assert data.startswith(b"HTTP/1.1 413 ")


def test_too_many_headers_get_431(gw: Setup) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
    data = raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: shop.local\r\n" + headers + b"\r\n")
    assert data.startswith(b"HTTP/1.1 431 ")


def test_slow_headers_get_408(gw: Setup) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: shop.local\r\n")
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 408 ")


def test_http10_client_gets_an_answer(gw: Setup) -> None:
    data = raw_exchange(gw.port, b"GET /ten HTTP/1.0\r\nHost: shop.local\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ")
    assert b'"path":"/ten"' in data
