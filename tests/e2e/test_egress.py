"""End to end: ``meshgate egress`` in front of "external" services on 127.0.0.x.

The external services are real HTTP and HTTPS servers on other loopback addresses
(certificates from a test CA), reached through ServiceEntry STATIC endpoints; no
traffic leaves loopback. Clients are httpx (plain HTTP, absolute-form proxy
requests) and curl (CONNECT through ``--proxy``).
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_gateway_helpers import Gateway, free_ports
from traffic_backends import ScriptedBackend, TestCA

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress, namespace: istio-system}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: {port}, name: http, protocol: HTTP}}
    hosts: ["*"]
---
# Plain HTTP to an external service.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: plain, namespace: egress}}
spec:
  hosts: [plain.example.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {plain_port}}}]
  endpoints: [{{address: 127.0.0.7}}]
---
# TLS origination on port 80, CONNECT on 443: both to the HTTPS server.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: egress}}
spec:
  hosts: [api.example.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: {tls_port}}}
  - {{number: 443, name: tls, protocol: TLS, targetPort: {tls_port}}}
  endpoints: [{{address: 127.0.0.5}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: egress}}
spec:
  host: api.example.test
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 80}}
      tls: {{mode: SIMPLE, caCertificates: "{ca}", subjectAltNames: [api.example.test]}}
---
# The same server, verified against a CA that did not sign it.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: wrong-ca, namespace: egress}}
spec:
  hosts: [wrongca.example.test]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {tls_port}}}]
  endpoints: [{{address: 127.0.0.5}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: wrong-ca, namespace: egress}}
spec:
  host: wrongca.example.test
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: "{other_ca}", sni: api.example.test}}
---
# The right CA, but the certificate names api.example.test, not the expected SAN.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: wrong-san, namespace: egress}}
spec:
  hosts: [wrongsan.example.test]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {tls_port}}}]
  endpoints: [{{address: 127.0.0.5}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: wrong-san, namespace: egress}}
spec:
  host: wrongsan.example.test
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: "{ca}", subjectAltNames: [wrongsan.example.test]}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: internal, namespace: egress}}
spec:
  hosts: [internal.example.test]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {plain_port}}}]
  endpoints: [{{address: 127.0.0.7}}]
---
# SNI passthrough: routed by a VirtualService tls[] route, or by the registry.
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: egress-tls, namespace: istio-system}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: {sni_port}, name: tls, protocol: TLS}}
    hosts: ["*.example.test"]
    tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: passthrough, namespace: egress}}
spec:
  hosts: [api.example.test, unlisted.example.test]
  gateways: [istio-system/egress-tls]
  tls:
  - match: [{{sniHosts: [api.example.test]}}]
    route: [{{destination: {{host: api.example.test, port: {{number: 443}}}}}}]
  - match: [{{sniHosts: [unlisted.example.test]}}]
    route: [{{destination: {{host: unlisted.example.test, port: {{number: 443}}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: direct, namespace: egress}}
spec:
  hosts: [direct.example.test]
  resolution: STATIC
  ports: [{{number: {sni_port}, name: tls, protocol: TLS, targetPort: {tls_port}}}]
  endpoints: [{{address: 127.0.0.5}}]
---
# resolution NONE: the destination is the address the client asked for, when it
# falls in the entry's block.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy-block, namespace: egress}}
spec:
  hosts: [legacy.example.test]
  addresses: [127.0.0.7/32]
  resolution: NONE
  ports: [{{number: {plain_port}, name: http, protocol: HTTP}}]
---
# Declared, but nothing listens there.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: down, namespace: egress}}
spec:
  hosts: [down.example.test]
  resolution: STATIC
  ports:
  - {{number: 443, name: tls, protocol: TLS, targetPort: {dead_port}}}
  - {{number: {sni_port}, name: tls-sni, protocol: TLS, targetPort: {dead_port}}}
  endpoints: [{{address: 127.0.0.7}}]
---
# A metered exit: two requests a minute, per gateway.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: metered, namespace: egress}}
spec:
  hosts: [metered.example.test]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {plain_port}}}]
  endpoints: [{{address: 127.0.0.7}}]
---
apiVersion: meshgate.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: metered, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: egressgateway}}}}
  hosts: [metered.example.test]
  limits:
  - name: all-callers
    rate: {{requests: 2, per: minute}}
---
# Istio's egress routing: the gateway's half of it (the mesh half needs sidecars).
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: routed, namespace: egress}}
spec:
  hosts: [routed.example.test]
  gateways: [mesh, istio-system/egress]
  http:
  - match: [{{gateways: [istio-system/egress], uri: {{prefix: /unlisted}}}}]
    route: [{{destination: {{host: unlisted.example.test, port: {{number: 80}}}}}}]
  - match: [{{gateways: [istio-system/egress]}}]
    route: [{{destination: {{host: api.example.test, port: {{number: 80}}}}}}]
"""


class Egress:
    def __init__(self, tmp: Path) -> None:
        self.port, admin, self.sni_port, dead_port = free_ports(4)
        ca = TestCA(tmp / "pki")
        other = TestCA(tmp / "other-pki", "another CA")
        self.ca = ca.ca_path
        self.tls = ScriptedBackend(
            0,
            "api-tls",
            ca.server_context(
                "api", ["api.example.test", "direct.example.test"], require_client=False
            ),
            address="127.0.0.5",
        )
        self.plain = ScriptedBackend(0, "plain", address="127.0.0.7")
        config = tmp / "config"
        config.mkdir()
        (config / "egress.yaml").write_text(
            CONFIG.format(
                port=self.port,
                sni_port=self.sni_port,
                dead_port=dead_port,
                plain_port=self.plain.port,
                tls_port=self.tls.port,
                ca=ca.ca_path,
                other_ca=other.ca_path,
            )
        )
        self.gateway = Gateway(config, admin, command="egress")
        self.admin = admin
        self.config = config
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def get(self, host: str, path: str = "/") -> tuple[httpx.Response, dict]:
        rid = uuid.uuid4().hex
        response = self.client.get(path, headers={"host": host, "x-request-id": rid})
        return response, self.gateway.log_for(rid)

    def stop(self) -> None:
        self.client.close()
        self.gateway.stop()
        self.tls.stop()
        self.plain.stop()


@pytest.fixture(scope="module")
def eg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Egress]:
    setup = Egress(tmp_path_factory.mktemp("egress"))
    try:
        yield setup
    finally:
        setup.stop()


# --------------------------------------------------------------------------- HTTP


def test_registered_external_host_is_forwarded(eg: Egress) -> None:
    response, log = eg.get("plain.example.test", "/hello")
    assert response.status_code == 200 and response.headers["x-served-by"] == "plain"
    assert log["upstream_cluster"] == "outbound|80||plain.example.test"
    assert log["route"] == "ServiceEntry/egress/plain:registry"
    assert log["upstream_host"] == f"127.0.0.7:{eg.plain.port}"


def test_absolute_form_proxy_request_is_forwarded(eg: Egress) -> None:
    rid = uuid.uuid4().hex
    with httpx.Client(proxy=f"http://127.0.0.1:{eg.port}", timeout=10) as client:
        response = client.get("http://plain.example.test/via-proxy", headers={"x-request-id": rid})
    assert response.status_code == 200 and response.headers["x-served-by"] == "plain"
    assert eg.gateway.log_for(rid)["authority"] == "plain.example.test"


def test_unregistered_host_is_refused_with_502_nr_naming_caller_and_destination(
    eg: Egress,
) -> None:
    response, log = eg.get("unknown.example.test", "/steal")
    assert response.status_code == 502
    assert log["response_flags"] == "NR" and log["upstream_cluster"] == "BlackHoleCluster"
    assert log["authority"] == "unknown.example.test" and log["x_forwarded_for"] == "127.0.0.1"
    line = eg.gateway.wait_stderr(lambda ln: "refused" in ln and "unknown.example.test:80" in ln)
    assert "127.0.0.1" in line


def test_undeclared_port_of_a_registered_host_is_refused(eg: Egress) -> None:
    response, log = eg.get("plain.example.test:8080")
    assert response.status_code == 502 and log["response_flags"] == "NR"


def test_mesh_internal_host_is_not_an_exit(eg: Egress) -> None:
    response, log = eg.get("internal.example.test")
    assert response.status_code == 502 and log["response_flags"] == "NR"


def test_ip_literal_without_service_entry_is_refused(eg: Egress) -> None:
    response, log = eg.get(f"127.0.0.9:{eg.plain.port}")
    assert response.status_code == 502 and log["response_flags"] == "NR"


def test_address_in_a_resolution_none_block_goes_to_the_original_destination(
    eg: Egress,
) -> None:
    response, log = eg.get(f"127.0.0.7:{eg.plain.port}", "/none")
    assert response.status_code == 200 and response.headers["x-served-by"] == "plain"
    assert log["route"] == "ServiceEntry/egress/legacy-block:registry"
    assert log["upstream_host"] == f"127.0.0.7:{eg.plain.port}"


def test_rate_limit_policy_meters_an_exit_by_host(eg: Egress) -> None:
    statuses = [eg.get("metered.example.test", f"/m{i}")[0].status_code for i in range(2)]
    assert statuses == [200, 200]
    response, log = eg.get("metered.example.test", "/m2")
    assert response.status_code == 429 and log["response_flags"] == "RL"
    response, _ = eg.get("plain.example.test", "/not-metered")
    assert response.status_code == 200


# --------------------------------------------------------------------------- TLS origination


def test_tls_origination_verifies_the_external_certificate(eg: Egress) -> None:
    response, log = eg.get("api.example.test", "/secure")
    assert response.status_code == 200 and response.headers["x-served-by"] == "api-tls"
    assert log["upstream_cluster"] == "outbound|80||api.example.test"
    assert log["upstream_host"] == f"127.0.0.5:{eg.tls.port}"


def test_tls_origination_with_a_wrong_ca_is_refused_and_logged(eg: Egress) -> None:
    response, log = eg.get("wrongca.example.test")
    assert response.status_code == 503 and log["response_flags"] == "UF"
    eg.gateway.wait_stderr(
        lambda ln: "outbound|80||wrongca.example.test" in ln and "CERTIFICATE_VERIFY_FAILED" in ln
    )


def test_tls_origination_with_a_wrong_subject_alt_name_is_refused_and_logged(
    eg: Egress,
) -> None:
    response, log = eg.get("wrongsan.example.test")
    assert response.status_code == 503 and log["response_flags"] == "UF"
    eg.gateway.wait_stderr(
        lambda ln: "outbound|80||wrongsan.example.test" in ln and "carries none of" in ln
    )


def test_virtual_service_routes_egress_traffic_with_tls_origination(eg: Egress) -> None:
    response, log = eg.get("routed.example.test", "/via-route")
    assert response.status_code == 200 and response.headers["x-served-by"] == "api-tls"
    assert log["route"] == "VirtualService/egress/routed"
    assert log["upstream_cluster"] == "outbound|80||api.example.test"


def test_virtual_service_route_to_an_unregistered_host_is_refused(eg: Egress) -> None:
    response, log = eg.get("routed.example.test", "/unlisted")
    assert response.status_code == 502 and log["response_flags"] == "NR"


def test_metrics_name_the_external_host_as_destination_service(eg: Egress) -> None:
    eg.get("api.example.test", "/counted")
    text = httpx.get(f"http://127.0.0.1:{eg.admin}/metrics", timeout=10).text
    wanted = [
        line
        for line in text.splitlines()
        if line.startswith("istio_requests_total")
        and 'destination_service="api.example.test"' in line
        and 'source_workload="meshgate-egressgateway"' in line
    ]
    assert wanted, text[-3000:]


# --------------------------------------------------------------------------- CONNECT


def _connect(port: int, target: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return s.recv(4096)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_https_client_tunnels_through_connect_to_a_registered_host(eg: Egress) -> None:
    rid = uuid.uuid4().hex
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--proxy",
            f"http://127.0.0.1:{eg.port}",
            "--proxy-header",
            f"x-request-id: {rid}",
            "--cacert",
            str(eg.ca),
            "https://api.example.test/tunnelled",
        ],
        capture_output=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"api-tls 200")
    log = eg.gateway.log_for(rid)
    assert log["method"] == "CONNECT" and log["status"] == 200
    assert log["upstream_cluster"] == "outbound|443||api.example.test"
    assert log["bytes_sent"] > 0 and log["bytes_received"] > 0


def test_connect_to_an_unregistered_host_is_refused(eg: Egress) -> None:
    answer = _connect(eg.port, "unknown.example.test:443")
    assert answer.startswith(b"HTTP/1.1 502")
    eg.gateway.log_where(
        lambda r: r["method"] == "CONNECT" and r["authority"] == "unknown.example.test:443"
    )


def test_connect_to_an_unreachable_endpoint_is_503_uf(eg: Egress) -> None:
    answer = _connect(eg.port, "down.example.test:443")
    assert answer.startswith(b"HTTP/1.1 503")
    log = eg.gateway.log_where(lambda r: r["authority"] == "down.example.test:443")
    assert (
        log["response_flags"] == "UF"
        and log["upstream_cluster"] == "outbound|443||down.example.test"
    )


def test_connect_to_an_undeclared_port_is_refused(eg: Egress) -> None:
    answer = _connect(eg.port, "api.example.test:8443")
    assert answer.startswith(b"HTTP/1.1 502")


# --------------------------------------------------------------------------- SNI passthrough


def _tls_get(eg: Egress, server_name: str) -> bytes:
    """An HTTPS request straight to the passthrough port, verified end to end."""
    context = ssl.create_default_context(cafile=str(eg.ca))
    with (
        socket.create_connection(("127.0.0.1", eg.sni_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(f"GET /sni HTTP/1.1\r\nHost: {server_name}\r\n\r\n".encode())
        return tls.recv(4096)


def test_sni_passthrough_follows_the_tls_route(eg: Egress) -> None:
    answer = _tls_get(eg, "api.example.test")
    assert answer.startswith(b"HTTP/1.1 200") and b"api-tls" in answer
    log = eg.gateway.log_where(lambda r: r["authority"] == f"api.example.test:{eg.sni_port}")
    assert log["route"].startswith("VirtualService/egress/passthrough:")
    assert log["upstream_cluster"] == "outbound|443||api.example.test"
    assert log["upstream_host"] == f"127.0.0.5:{eg.tls.port}"
    assert log["bytes_received"] > 0 and log["bytes_sent"] > 0


def test_sni_passthrough_without_a_route_is_decided_by_the_registry(eg: Egress) -> None:
    answer = _tls_get(eg, "direct.example.test")
    assert answer.startswith(b"HTTP/1.1 200") and b"api-tls" in answer
    log = eg.gateway.log_where(lambda r: r["authority"] == f"direct.example.test:{eg.sni_port}")
    assert log["route"] == "ServiceEntry/egress/direct:connect"


def test_sni_of_an_unregistered_host_is_reset_and_logged(eg: Egress) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _tls_get(eg, "unknown.example.test")
    log = eg.gateway.log_where(lambda r: r["authority"] == f"unknown.example.test:{eg.sni_port}")
    assert log["response_flags"] == "NR" and log["upstream_cluster"] == "BlackHoleCluster"
    assert log["x_forwarded_for"] == "127.0.0.1"


def test_tls_route_to_an_unregistered_host_is_reset(eg: Egress) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _tls_get(eg, "unlisted.example.test")
    log = eg.gateway.log_where(lambda r: r["authority"] == f"unlisted.example.test:{eg.sni_port}")
    assert log["response_flags"] == "NR"


# --------------------------------------------------------------------------- reload


def test_a_service_entry_added_on_reload_opens_that_exit(eg: Egress) -> None:
    response, _ = eg.get("late.example.test", "/before")
    assert response.status_code == 502
    (eg.config / "late.yaml").write_text(
        "apiVersion: networking.istio.io/v1\n"
        "kind: ServiceEntry\n"
        "metadata: {name: late, namespace: egress}\n"
        "spec:\n"
        "  hosts: [late.example.test]\n"
        "  resolution: STATIC\n"
        f"  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {eg.plain.port}}}]\n"
        "  endpoints: [{address: 127.0.0.7}]\n"
    )
    eg.gateway.wait_stderr(lambda ln: "(file change) applied" in ln)
    response, log = eg.get("late.example.test", "/after")
    assert response.status_code == 200 and response.headers["x-served-by"] == "plain"
    assert log["route"] == "ServiceEntry/egress/late:registry"


def test_sni_passthrough_to_an_unreachable_endpoint_is_reset_and_logged_uf(eg: Egress) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _tls_get(eg, "down.example.test")
    log = eg.gateway.log_where(lambda r: r["authority"] == f"down.example.test:{eg.sni_port}")
    assert log["response_flags"] == "UF"


def test_tunnels_are_counted_with_the_external_host_as_destination(eg: Egress) -> None:
    answer = _tls_get(eg, "api.example.test")  # SNI passthrough: a TCP connection
    assert answer.startswith(b"HTTP/1.1 200")
    _connect(eg.port, "counted.unknown.example.test:443")  # refused CONNECT: a request
    # Each is counted when its access-log line is written, in the same step.
    eg.gateway.log_where(lambda r: r["authority"] == f"api.example.test:{eg.sni_port}")
    eg.gateway.log_where(lambda r: r["authority"] == "counted.unknown.example.test:443")
    text = httpx.get(f"http://127.0.0.1:{eg.admin}/metrics", timeout=10).text
    totals = [line for line in text.splitlines() if line.startswith("istio_requests_total{")]
    # An HTTP CONNECT is a request, as in Istio; a passthrough connection is not.
    assert any(
        'destination_service="BlackHoleCluster"' in line and 'response_flags="NR"' in line
        for line in totals
    ), totals
    assert not any(
        'destination_service="api.example.test"' in line and 'response_code="0"' in line
        for line in totals
    ), totals
    opened = [
        line
        for line in text.splitlines()
        if line.startswith("istio_tcp_connections_opened_total{")
        and 'destination_service="api.example.test"' in line
        and 'request_protocol="tcp"' in line
    ]
    assert opened and float(opened[0].rsplit(" ", 1)[1]) >= 1, text[-3000:]
