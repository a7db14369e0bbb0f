"""The admin API and telemetry of a real ``meshgate run`` process: readiness, config
dump, routes, clusters, Istio metrics (also summed over two workers), trace headers
to the upstream and spans to a small real OTLP collector."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_gateway_helpers import MESHGATE, Backend, Gateway, free_ports

from gateway.admin import redact

CONFIG = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: [echo.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {echo}}}}}]
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
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
  - match: [{{uri: {{prefix: /echo}}}}]
    route: [{{destination: {{host: echo.shop.svc.cluster.local}}}}]
"""

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class AdminGateway(Gateway):
    """A gateway process that is killed if it never comes up."""

    def __init__(self, config_dir: Path, admin_port: int, *extra: str) -> None:
        try:
            super().__init__(config_dir, admin_port, *extra)
        except BaseException:
            if hasattr(self, "proc") and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            raise


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    port, echo, admin = free_ports(3)
    backend = Backend(echo, "echo")
    (tmp_path / "config.yaml").write_text(CONFIG.format(port=port, echo=echo))
    try:
        yield port, admin, tmp_path
    finally:
        backend.stop()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _wait_metric(admin: int, name: str, want: float, timeout_s: float = 10.0, **labels: str) -> str:
    """Scrape until the figure reaches ``want`` (the log and count come just after
    the response is written); fails at once if it ever goes past it."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
        value = _metric(text, name, **labels)
        assert value <= want, (value, want)
        if value == want:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} stuck at {value}, expected {want}")
        time.sleep(0.05)  # polling a scrape: there is no event to wait on


def test_admin_endpoints_describe_the_running_gateway(stack: tuple[int, int, Path]) -> None:
    port, admin, config = stack
    gateway = AdminGateway(config, admin, "--workload-name", "edge-gw")
    base = f"http://127.0.0.1:{admin}"
    try:
        ready = httpx.get(f"{base}/healthz/ready", timeout=5)
        dump = httpx.get(f"{base}/config_dump", timeout=5).json()
        assert ready.status_code == 200 and ready.text.strip() == f"ready {dump['version']}"
        kinds = sorted(r["kind"] for r in dump["resources"])
        assert kinds == ["Gateway", "ServiceEntry", "VirtualService"]
        vs = next(r for r in dump["resources"] if r["kind"] == "VirtualService")
        assert vs["metadata"]["namespace"] == "shop" and vs["source"].endswith("config.yaml:19")
        assert dump["snapshot"]["version"] == dump["version"]
        assert dump["reload"]["errors"] == []

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            for i in range(7):
                assert client.post(f"/echo/{i}", content=b"x" * 100).status_code == 200
            for _ in range(2):
                assert client.get("/nowhere").status_code == 404

        text = _wait_metric(admin, "istio_requests_total", 9)
        ok = {"response_code": "200", "response_flags": "-"}
        assert _metric(text, "istio_requests_total", **ok) == 7
        assert (
            _metric(
                text,
                "istio_requests_total",
                reporter="source",
                source_workload="edge-gw",
                source_workload_namespace="istio-system",
                destination_service="echo.shop.svc.cluster.local",
                destination_service_name="echo",
                destination_service_namespace="shop",
                request_protocol="http",
                **ok,
            )
            == 7
        )
        assert _metric(text, "istio_requests_total", response_code="404", response_flags="NR") == 2
        assert _metric(text, "istio_request_bytes_sum", **ok) == 700
        assert _metric(text, "istio_request_bytes_bucket", le="100.0", **ok) == 7
        assert _metric(text, "istio_request_bytes_bucket", le="10.0", **ok) == 0
        assert _metric(text, "istio_request_duration_milliseconds_count", **ok) == 7
        assert _metric(text, "istio_response_bytes_count", **ok) == 7
        assert _metric(text, "istio_response_bytes_sum", **ok) > 7 * 100

        clusters = httpx.get(f"{base}/clusters", timeout=5).json()["clusters"]
        (cluster,) = clusters
        (endpoint,) = cluster["endpoints"]
        assert cluster["name"] == "outbound|80||echo.shop.svc.cluster.local"
        assert endpoint["health"] == "HEALTHY" and endpoint["ejected"] is False
        assert endpoint["connections_opened"] >= 1
        assert "active_requests" in endpoint

        routes = httpx.get(f"{base}/routes", timeout=5).json()
        cli = subprocess.run(
            [MESHGATE, "routes", str(config), "--json"], capture_output=True, check=True
        )
        assert routes == json.loads(cli.stdout)
    finally:
        assert gateway.stop(signal.SIGTERM) == 0


def test_two_workers_report_exact_request_totals(stack: tuple[int, int, Path]) -> None:
    port, admin, config = stack
    gateway = AdminGateway(config, admin, "--workers", "2")
    try:
        n = 60
        for i in range(n):  # a new connection each time: the kernel spreads them
            assert httpx.get(f"http://127.0.0.1:{port}/echo/{i}", timeout=5).status_code == 200
        text = _wait_metric(admin, "istio_requests_total", n)
        assert _metric(text, "meshgate_workers") == 2
        assert _metric(text, "istio_request_duration_milliseconds_count") == n
        dump = httpx.get(f"http://127.0.0.1:{admin}/config_dump", timeout=5).json()
        assert len({w["pid"] for w in dump["workers"]}) == 2
        clusters = httpx.get(f"http://127.0.0.1:{admin}/clusters", timeout=5).json()
        (endpoint,) = clusters["clusters"][0]["endpoints"]
        assert endpoint["connections_opened"] >= 2  # at least one per worker
    finally:
        assert gateway.stop(signal.SIGTERM) == 0


class _Collector:
    """A small real OTLP/HTTP collector on 127.0.0.1."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.arrived = threading.Event()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                document = json.loads(body)
                for resource in document["resourceSpans"]:
                    for scope in resource["scopeSpans"]:
                        collector.spans.extend(scope["spans"])
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
                collector.arrived.set()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_trace_context_reaches_the_upstream_and_spans_reach_the_collector(
    stack: tuple[int, int, Path],
) -> None:
    port, admin, config = stack
    collector = _Collector()
    gateway = AdminGateway(
        config,
        admin,
        "--otlp-endpoint",
        f"http://127.0.0.1:{collector.port}/v1/traces",
        "--trace-sampling",
        "0",
    )
    try:
        response = httpx.get(
            f"http://127.0.0.1:{port}/echo/traced",
            headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01"},
            timeout=5,
        )
        upstream = response.json()["headers"]
        _, trace, span, flags = upstream["traceparent"].split("-")
        assert (trace, flags) == (TRACE, "01") and span != CLIENT_SPAN
        assert upstream["x-b3-traceid"] == TRACE
        assert upstream["x-b3-spanid"] == span
        assert upstream["x-b3-parentspanid"] == CLIENT_SPAN
        assert upstream["x-b3-sampled"] == "1"

        # Not sampled (sampling 0%, no decision from the client): propagated, not exported.
        fresh = httpx.get(f"http://127.0.0.1:{port}/echo/fresh", timeout=5).json()["headers"]
        assert fresh["traceparent"].endswith("-00") and fresh["x-b3-sampled"] == "0"

        assert collector.arrived.wait(10)
        (exported,) = collector.spans
        assert exported["traceId"] == TRACE
        assert exported["spanId"] == span
        assert exported["parentSpanId"] == CLIENT_SPAN
        text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
        assert _metric(text, "meshgate_otlp_spans_exported_total") == 1
        assert _metric(text, "meshgate_otlp_spans_dropped_total") == 0
    finally:
        code = gateway.stop(signal.SIGTERM)
        collector.close()
    assert code == 0


def test_key_material_never_leaves_the_admin_api() -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nMIIE...\n-----END PRIVATE KEY-----\n"
    data = {
        "spec": {"tls": {"privateKey": "/etc/certs/key.pem", "inline": pem}},
        "list": [pem, "ok"],
    }
    assert redact(data) == {
        "spec": {"tls": {"privateKey": "/etc/certs/key.pem", "inline": "[redacted PEM]"}},
        "list": ["[redacted PEM]", "ok"],
    }
