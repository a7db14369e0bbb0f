"""Traffic policy through a real ``meshgate run`` process: retries, faults, mirrors,
load balancing and consistent hashing, circuit breakers, outlier ejection and TLS
origination to upstreams, against demo backends and scripted backends in the test."""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_gateway_helpers import Backend, Gateway, free_ports
from traffic_backends import ScriptedBackend, TestCA, pattern

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: shop}}
spec:
  servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: flaky, namespace: shop}}
spec:
  hosts: [flaky.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {flaky}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: shadow, namespace: shop}}
spec:
  hosts: [shadow.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {shadow}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pair, namespace: shop}}
spec:
  hosts: [pair.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
    - {{address: 127.0.0.1, ports: {{http: {demo_a}}}, weight: 3}}
    - {{address: 127.0.0.1, ports: {{http: {demo_b}}}, weight: 1}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: halfdead, namespace: shop}}
spec:
  hosts: [halfdead.local, sick.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
    - {{address: 127.0.0.1, ports: {{http: {dead}}}}}
    - {{address: 127.0.0.1, ports: {{http: {demo_a}}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: flip, namespace: shop}}
spec:
  hosts: [flip.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
    - {{address: 127.0.0.1, ports: {{http: {flaky}}}}}
    - {{address: 127.0.0.1, ports: {{http: {demo_b}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: flip, namespace: shop}}
spec:
  host: flip.local
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection: {{consecutive5xxErrors: 2, baseEjectionTime: 2s, maxEjectionPercent: 100}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: once, namespace: shop}}
spec:
  hosts: [once.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {flaky}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: once, namespace: shop}}
spec:
  host: once.local
  trafficPolicy: {{connectionPool: {{http: {{maxRequestsPerConnection: 1}}}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: shop}}
spec:
  hosts: [simple.tls, mutual.tls, wrongsan.tls, creds.tls]
  resolution: STATIC
  ports: [{{number: 443, name: https, protocol: HTTPS}}]
  endpoints: [{{address: 127.0.0.1, ports: {{https: {tls_mutual}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: simple-tls, namespace: shop}}
spec:
  hosts: [plain.tls]
  resolution: STATIC
  ports: [{{number: 443, name: https, protocol: HTTPS}}]
  endpoints: [{{address: 127.0.0.1, ports: {{https: {tls_simple}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pair, namespace: shop}}
spec:
  host: pair.local
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
  subsets:
    - name: by-header
      trafficPolicy: {{loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}}}
    - name: by-cookie
      trafficPolicy:
        loadBalancer: {{consistentHash: {{httpCookie: {{name: sticky, ttl: 60s, path: /}}}}}}
    - name: limited
      trafficPolicy:
        connectionPool:
          tcp: {{maxConnections: 1}}
          http: {{http1MaxPendingRequests: 1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: halfdead, namespace: shop}}
spec:
  host: halfdead.local
  trafficPolicy:
    outlierDetection:
      consecutiveGatewayErrors: 1
      baseEjectionTime: 60s
      maxEjectionPercent: 100
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: plain-tls, namespace: shop}}
spec:
  host: plain.tls
  trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: "{ca}", sni: backend.internal}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: mutual-tls, namespace: shop}}
spec:
  host: mutual.tls
  trafficPolicy:
    tls:
      mode: MUTUAL
      clientCertificate: "{client_cert}"
      privateKey: "{client_key}"
      caCertificates: "{ca}"
      subjectAltNames: [backend.internal]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: simple-on-mutual, namespace: shop}}
spec:
  host: simple.tls
  trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: "{ca}", sni: backend.internal}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: wrong-san, namespace: shop}}
spec:
  host: wrongsan.tls
  trafficPolicy:
    tls:
      mode: MUTUAL
      clientCertificate: "{client_cert}"
      privateKey: "{client_key}"
      caCertificates: "{ca}"
      subjectAltNames: [someone-else.internal]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: creds, namespace: shop}}
spec:
  host: creds.tls
  trafficPolicy: {{tls: {{mode: MUTUAL, credentialName: upstream-client, sni: backend.internal}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop, namespace: shop}}
spec:
  hosts: [shop.local]
  gateways: [edge]
  http:
    - match: [{{uri: {{prefix: /retry}}}}]
      retries: {{attempts: 3, retryOn: 5xx}}
      route: [{{destination: {{host: flaky.local}}}}]
    - match: [{{uri: {{prefix: /connect}}}}]
      retries: {{attempts: 2, retryOn: connect-failure}}
      route: [{{destination: {{host: sick.local}}}}]
    - match: [{{uri: {{prefix: /abort}}}}]
      fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}
      route: [{{destination: {{host: flaky.local}}}}]
    - match: [{{uri: {{prefix: /delay}}}}]
      fault: {{delay: {{fixedDelay: 300ms, percentage: {{value: 100}}}}}}
      route: [{{destination: {{host: flaky.local}}}}]
    - match: [{{uri: {{prefix: /mirror}}}}]
      mirror: {{host: shadow.local}}
      route: [{{destination: {{host: flaky.local}}}}]
    - match: [{{uri: {{prefix: /weighted}}}}]
      route: [{{destination: {{host: pair.local}}}}]
    - match: [{{uri: {{prefix: /hash-header}}}}]
      route: [{{destination: {{host: pair.local, subset: by-header}}}}]
    - match: [{{uri: {{prefix: /hash-cookie}}}}]
      route: [{{destination: {{host: pair.local, subset: by-cookie}}}}]
    - match: [{{uri: {{prefix: /limited}}}}]
      route: [{{destination: {{host: pair.local, subset: limited}}}}]
    - match: [{{uri: {{prefix: /outlier}}}}]
      route: [{{destination: {{host: halfdead.local}}}}]
    - match: [{{uri: {{prefix: /flip}}}}]
      route: [{{destination: {{host: flip.local}}}}]
    - match: [{{uri: {{prefix: /once}}}}]
      route: [{{destination: {{host: once.local}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tls, namespace: shop}}
spec:
  hosts: [tls.local]
  gateways: [edge]
  http:
    - match: [{{uri: {{prefix: /simple}}}}]
      route: [{{destination: {{host: plain.tls}}}}]
    - match: [{{uri: {{prefix: /mutual}}}}]
      route: [{{destination: {{host: mutual.tls}}}}]
    - match: [{{uri: {{prefix: /no-client-cert}}}}]
      route: [{{destination: {{host: simple.tls}}}}]
    - match: [{{uri: {{prefix: /wrong-san}}}}]
      route: [{{destination: {{host: wrongsan.tls}}}}]
    - match: [{{uri: {{prefix: /creds}}}}]
      route: [{{destination: {{host: creds.tls}}}}]
"""


class Setup:
    def __init__(self, tmp: Path) -> None:
        ports = free_ports(9)
        self.port, admin, flaky, shadow, demo_a, demo_b, dead, tls_simple, tls_mutual = ports
        ca = TestCA(tmp / "pki")
        client_cert, client_key = ca.issue("gateway-client", ["gateway.internal"])
        creds = tmp / "creds" / "upstream-client"
        creds.mkdir(parents=True)
        (creds / "tls.crt").write_bytes(client_cert.read_bytes())
        (creds / "tls.key").write_bytes(client_key.read_bytes())
        (creds / "ca.crt").write_bytes(ca.ca_path.read_bytes())
        self.flaky = ScriptedBackend(flaky, "flaky")
        self.shadow = ScriptedBackend(shadow, "shadow")
        self.tls_simple = ScriptedBackend(
            tls_simple,
            "tls-simple",
            ca.server_context("backend-simple", ["backend.internal"], require_client=False),
        )
        self.tls_mutual = ScriptedBackend(
            tls_mutual,
            "tls-mutual",
            ca.server_context("backend-mutual", ["backend.internal"], require_client=True),
        )
        self.demo_a = Backend(demo_a, "a")
        self.demo_b = Backend(demo_b, "b")
        config = tmp / "config"
        config.mkdir()
        (config / "config.yaml").write_text(
            CONFIG.format(
                port=self.port,
                flaky=flaky,
                shadow=shadow,
                demo_a=demo_a,
                demo_b=demo_b,
                dead=dead,
                tls_simple=tls_simple,
                tls_mutual=tls_mutual,
                ca=ca.ca_path,
                client_cert=client_cert,
                client_key=client_key,
            )
        )
        self.gateway = Gateway(config, admin, "--credentials-dir", str(tmp / "creds"))
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def get(self, path: str, host: str = "shop.local", **kw: object) -> tuple[httpx.Response, dict]:
        rid = uuid.uuid4().hex
        headers = {"host": host, "x-request-id": rid, **kw.pop("headers", {})}  # type: ignore[dict-item]
        method = str(kw.pop("method", "GET"))
        response = self.client.request(method, path, headers=headers, **kw)  # type: ignore[arg-type]
        return response, self.gateway.log_for(rid)

    def stop(self) -> None:
        self.client.close()
        self.gateway.stop()
        for backend in (self.flaky, self.shadow, self.tls_simple, self.tls_mutual):
            backend.stop()
        self.demo_a.stop()
        self.demo_b.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    setup = Setup(tmp_path_factory.mktemp("traffic"))
    try:
        yield setup
    finally:
        setup.stop()


# --------------------------------------------------------------------------- retries


def test_retry_on_5xx_succeeds_after_two_failures_and_replays_the_body(gw: Setup) -> None:
    response, log = gw.get(
        "/retry/a?fail=2&key=retry-a&status=503", method="POST", content=b"payload-123"
    )
    assert response.status_code == 200
    bodies = [r["body"] for r in gw.flaky.recorder.requests if r["path"] == "/retry/a"]
    assert bodies == [b"payload-123"] * 3
    assert "URX" not in log["response_flags"]


def test_body_over_the_retry_buffer_is_streamed_once_and_not_retried(gw: Setup) -> None:
    body = b"x" * (100 * 1024)  # over the 64 KiB kept for replays
    response, _ = gw.get("/retry/big?fail=1&key=retry-big&status=503", method="POST", content=body)
    assert response.status_code == 503
    seen = [r for r in gw.flaky.recorder.requests if r["path"] == "/retry/big"]
    assert [len(r["body"]) for r in seen] == [len(body)]
    # Streamed in the client's framing: its Content-Length, whether the whole body
    # had arrived when it outgrew the replay buffer or not (never chunked instead).
    headers = {name.lower(): value for name, value in seen[0]["headers"].items()}
    assert headers.get("content-length") == str(len(body))
    assert "transfer-encoding" not in headers


def test_retries_exhausted_return_the_last_answer_with_flag_urx(gw: Setup) -> None:
    response, log = gw.get("/retry/b?fail=10&key=retry-b&status=502")
    assert response.status_code == 502
    assert gw.flaky.recorder.paths().count("/retry/b") == 4  # the try and 3 retries
    assert "URX" in log["response_flags"]


def test_connect_failure_is_retried_on_another_endpoint(gw: Setup) -> None:
    # sick.local: one endpoint refuses connections, the other answers.
    statuses = [gw.get("/connect")[0].status_code for _ in range(6)]
    assert statuses == [200] * 6


# --------------------------------------------------------------------------- faults


def test_fault_abort_answers_at_the_gateway_with_flag_fi(gw: Setup) -> None:
    before = gw.flaky.recorder.paths().count("/abort")
    response, log = gw.get("/abort")
    assert response.status_code == 418
    assert response.text == "fault filter abort"
    assert log["response_flags"] == "FI"
    assert gw.flaky.recorder.paths().count("/abort") == before


def test_fault_delay_holds_the_request_with_flag_di(gw: Setup) -> None:
    started = time.monotonic()
    response, log = gw.get("/delay")
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.3
    assert log["response_flags"] == "DI"


# --------------------------------------------------------------------------- mirrors


def test_mirror_gets_a_shadow_copy_and_never_delays_the_answer(gw: Setup) -> None:
    # The shadow copy waits 2 s at the backend; the client's answer must not.
    started = time.monotonic()
    response, _ = gw.get("/mirror/x?ms=1500", method="POST", content=b"copy-me")
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and response.headers["x-served-by"] == "flaky"
    copy = gw.shadow.recorder.wait_for(lambda r: r["path"] == "/mirror/x")
    assert copy["host"] == "shop.local-shadow"
    assert copy["body"] == b"copy-me"
    # The main request itself waits 1.5 s at the flaky backend; the shadow's own 1.5 s
    # runs beside it, so twice that would mean the mirror was awaited.
    assert elapsed < 2.8


# --------------------------------------------------------------------------- balancing


def test_round_robin_follows_endpoint_weights(gw: Setup) -> None:
    served = Counter(gw.get("/weighted")[0].headers["x-served-by"] for _ in range(8))
    assert served == {"a": 6, "b": 2}


def test_consistent_hash_on_a_header_is_sticky(gw: Setup) -> None:
    for user in ("alice", "bob", "carol", "dave"):
        served = {
            gw.get("/hash-header", headers={"x-user": user})[0].headers["x-served-by"]
            for _ in range(4)
        }
        assert len(served) == 1


def test_hash_cookie_is_set_when_absent_and_then_sticks(gw: Setup) -> None:
    first, _ = gw.get("/hash-cookie")
    cookie = first.headers["set-cookie"]
    assert cookie.startswith("sticky=") and "Max-Age=60" in cookie and "Path=/" in cookie
    value = cookie.split(";")[0]
    served = {
        gw.get("/hash-cookie", headers={"cookie": value})[0].headers["x-served-by"]
        for _ in range(6)
    }
    assert len(served) == 1
    again, _ = gw.get("/hash-cookie", headers={"cookie": value})
    assert "set-cookie" not in again.headers


# --------------------------------------------------------------------------- limits


def test_connection_pool_overflow_is_answered_503_uo(gw: Setup) -> None:
    # One connection, one pending request: of four slow concurrent requests, the
    # third and fourth overflow.
    def one(_: int) -> tuple[int, str]:
        response, log = gw.get("/limited?delay_ms=600")
        return response.status_code, log["response_flags"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert results.count((503, "UO")) >= 1
    assert (200, "-") in results


def test_max_requests_per_connection_retires_connections(gw: Setup) -> None:
    for _ in range(3):
        assert gw.get("/once")[0].status_code == 200
    ports = [r["peer_port"] for r in gw.flaky.recorder.requests if r["path"] == "/once"]
    assert len(ports) == 3 and len(set(ports)) == 3


def test_outlier_detection_ejects_the_failing_endpoint(gw: Setup) -> None:
    # halfdead.local: one of two endpoints refuses connections. Round robin alone
    # would fail every other request; one gateway error ejects the dead endpoint
    # for 60 s, so at most the first request fails.
    statuses = [gw.get("/outlier")[0].status_code for _ in range(10)]
    assert statuses.count(503) <= 1
    assert statuses[2:] == [200] * 8


def test_ejected_endpoint_returns_after_its_ejection_time(gw: Setup) -> None:
    # flip.local: the scripted backend answers 500 to its first two requests, the
    # demo backend always 200. Round robin sends every other request to the first;
    # its second 500 ejects it for 2 s.
    path = "/flip?fail=2&key=flip&fail_status=500"
    served = [gw.get(path)[0].headers["x-served-by"] for _ in range(4)]
    assert served.count("flaky") == 2
    during = [gw.get(path)[0] for _ in range(4)]
    assert [r.headers["x-served-by"] for r in during] == ["b"] * 4
    # Back after the ejection time: poll (bounded) until it serves again, healthy.
    deadline = time.monotonic() + 10
    back = None
    while back is None and time.monotonic() < deadline:
        response = gw.get(path)[0]
        if response.headers["x-served-by"] == "flaky":
            back = response
    assert back is not None and back.status_code == 200


# --------------------------------------------------------------------------- TLS


def test_simple_tls_origination_verifies_the_server_with_sni(gw: Setup) -> None:
    response, _ = gw.get("/simple", host="tls.local")
    assert response.status_code == 200 and response.headers["x-served-by"] == "tls-simple"


def test_a_large_response_over_originated_tls_arrives_intact(gw: Setup) -> None:
    # Many TLS records, read through the shared read buffer: every byte, in order.
    response, log = gw.get("/simple?bytes=3000000", host="tls.local")
    assert response.status_code == 200 and response.headers["x-served-by"] == "tls-simple"
    assert response.content == pattern(3_000_000)
    assert log["bytes_sent"] == 3_000_000


def test_mutual_tls_presents_the_client_certificate(gw: Setup) -> None:
    response, _ = gw.get("/mutual", host="tls.local")
    assert response.status_code == 200 and response.headers["x-served-by"] == "tls-mutual"


def test_mutual_backend_refuses_a_gateway_without_client_certificate(gw: Setup) -> None:
    response, log = gw.get("/no-client-cert", host="tls.local")
    assert response.status_code == 503
    assert log["response_flags"] in ("UF", "UR")


def test_subject_alt_name_mismatch_is_a_connect_failure(gw: Setup) -> None:
    response, log = gw.get("/wrong-san", host="tls.local")
    assert response.status_code == 503 and log["response_flags"] == "UF"


def test_credential_name_supplies_client_certificate_and_ca(gw: Setup) -> None:
    response, _ = gw.get("/creds", host="tls.local")
    assert response.status_code == 200 and response.headers["x-served-by"] == "tls-mutual"
