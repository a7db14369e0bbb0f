"""The Gateway API through a real ``meshgate run``: examples/gateway-api plus a lab
configuration, echo backends that record what reaches them, and real clients.

Each test is one semantic of the Gateway API specification (HTTPRoute and GRPCRoute
reference, and the behaviour its conformance suite checks): precedence across routes,
hostname intersection, the Host port, PathPrefix on whole segments, name case,
redirect ports, prefix rewrites, 500 for unusable backends, plus HTTPS listeners,
mirrors, timeouts, header filters, ReferenceGrant, Istio resources and policies on
the same listener, hot reload and the status endpoints.

One gateway process serves every test (module fixture), so the file stays fast.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_gateway_helpers import MESHGATE, Gateway, free_ports, free_tcp_udp_port
from tls_certs import CA
from traffic_backends import H2Backend, ScriptedBackend

from gateway.server.h3client import H3Response, client_configuration, connect_h3

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gateway-api"

# The lab: a second Gateway on the same HTTP port (names under .test) and an HTTPS
# listener, and routes for the cases the example leaves out.
LAB = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: lab, namespace: lab}}
spec:
  gatewayClassName: meshgate
  listeners:
  - {{name: http, port: {http}, protocol: HTTP, hostname: "*.test"}}
  - name: https
    port: {https}
    protocol: HTTPS
    hostname: secure.test
    tls:
      certificateRefs: [{{name: lab-cert}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: a, namespace: lab}}
spec:
  hosts: [a.lab.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {a}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: b, namespace: lab}}
spec:
  hosts: [b.lab.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {b}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: mirror, namespace: lab}}
spec:
  hosts: [mirror.lab.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {mirror}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: greeter, namespace: lab}}
spec:
  hosts: [greeter.lab.svc.cluster.local]
  ports: [{{number: 50051, name: grpc, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{grpc: {grpc}}}}}]
---
# Precedence, route by route: "a" must win each of these ties, "b" is the runner-up.
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: prec-new, namespace: lab, creationTimestamp: "2024-06-01T00:00:00Z"}}
spec:
  parentRefs: [{{name: lab, sectionName: http}}]
  hostnames: [prec.test]
  rules:
  - matches: [{{path: {{type: Exact, value: /p/x}}}}]
    backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /p}}}}]
    backendRefs: [{{name: b, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /p/long}}}}]
    backendRefs: [{{name: a, port: 80}}]
  - matches:
    - path: {{value: /m}}
      headers: [{{name: h1, value: "1"}}, {{name: h2, value: "2"}}]
    backendRefs: [{{name: b, port: 80}}]
  - matches: [{{path: {{value: /m}}, method: POST}}]
    backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{value: /h}}, headers: [{{name: h1, value: "1"}}]}}]
    backendRefs: [{{name: b, port: 80}}]
  - matches:
    - path: {{value: /h}}
      headers: [{{name: h1, value: "1"}}, {{name: h2, value: "2"}}]
    backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{value: /q}}, queryParams: [{{name: q1, value: "1"}}]}}]
    backendRefs: [{{name: b, port: 80}}]
  - matches:
    - path: {{value: /q}}
      queryParams: [{{name: q1, value: "1"}}, {{name: q2, value: "2"}}]
    backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{value: /o}}}}]
    backendRefs: [{{name: b, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: prec-old, namespace: lab, creationTimestamp: "2023-06-01T00:00:00Z"}}
spec:
  parentRefs: [{{name: lab, sectionName: http}}]
  hostnames: [prec.test]
  rules:
  - matches: [{{path: {{value: /o}}}}]
    backendRefs: [{{name: a, port: 80}}]
---
# No creationTimestamp: the earlier in the file is the older.
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: unstamped-z-first, namespace: lab}}
spec:
  parentRefs: [{{name: lab, sectionName: http}}]
  hostnames: [prec.test]
  rules:
  - matches: [{{path: {{value: /u}}}}]
    backendRefs: [{{name: a, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: unstamped-a-second, namespace: lab}}
spec:
  parentRefs: [{{name: lab, sectionName: http}}]
  hostnames: [prec.test]
  rules:
  - matches: [{{path: {{value: /u}}}}]
    backendRefs: [{{name: b, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: hosts, namespace: lab}}
spec:
  parentRefs: [{{name: lab, sectionName: http}}]
  hostnames: ["*.wild.test", other.org]
  rules:
  - backendRefs: [{{name: a, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: elsewhere, namespace: lab}}
spec:
  parentRefs: [{{name: lab, sectionName: http}}]
  hostnames: [only.example.org]
  rules:
  - backendRefs: [{{name: a, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: names, namespace: lab}}
spec:
  parentRefs: [{{name: lab, sectionName: http}}]
  hostnames: [names.test]
  rules:
  - backendRefs: [{{name: b, port: 80}}]
  - matches: [{{path: {{value: /docs/}}}}]
    backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{value: /qs}}, queryParams: [{{name: Page, value: "2"}}]}}]
    backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{value: /hs}}, headers: [{{name: X-Mode, value: fast}}]}}]
    backendRefs: [{{name: a, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: redirects, namespace: lab}}
spec:
  parentRefs: [{{name: lab, sectionName: http}}]
  hostnames: [redir.test]
  rules:
  - matches: [{{path: {{value: /p80}}}}]
    filters: [{{type: RequestRedirect, requestRedirect: {{port: 80}}}}]
  - matches: [{{path: {{value: /s443}}}}]
    filters: [{{type: RequestRedirect, requestRedirect: {{scheme: https, port: 443}}}}]
  - matches: [{{path: {{value: /elsewhere}}}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {{hostname: www.example.org, port: 8443, statusCode: 301}}
  - matches: [{{path: {{value: /gone}}}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        path: {{type: ReplaceFullPath, replaceFullPath: /landing}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: broken, namespace: lab}}
spec:
  parentRefs: [{{name: lab, sectionName: http}}]
  hostnames: [broken.test]
  rules:
  - matches: [{{path: {{value: /missing}}}}]
    backendRefs: [{{name: nowhere, port: 80}}]
  - matches: [{{path: {{value: /kind}}}}]
    backendRefs: [{{group: example.io, kind: Bucket, name: b}}]
  - matches: [{{path: {{value: /none}}}}]
  - matches: [{{path: {{value: /zero}}}}]
    backendRefs: [{{name: a, port: 80, weight: 0}}]
  - matches: [{{path: {{value: /partial}}}}]
    backendRefs: [{{name: a, port: 80}}, {{name: nowhere, port: 80}}]
  - matches: [{{path: {{value: /granted}}}}]
    backendRefs: [{{name: store-v2, namespace: shop, port: 80}}]
  - matches: [{{path: {{value: /denied}}}}]
    backendRefs: [{{name: store, namespace: shop, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {{name: lab-to-store-v2, namespace: shop}}
spec:
  from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: lab}}]
  to: [{{group: "", kind: Service, name: store-v2}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: traffic, namespace: lab}}
spec:
  parentRefs: [{{name: lab}}]
  hostnames: [traffic.test, secure.test]
  rules:
  - matches: [{{path: {{value: /mirror}}}}]
    filters:
    - type: RequestMirror
      requestMirror: {{backendRef: {{name: mirror, port: 80}}, percent: 100}}
    backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{value: /slow}}}}]
    timeouts: {{request: 5s, backendRequest: 300ms}}
    backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{value: /headers}}}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        add: [{{name: X-Added, value: gw}}]
        remove: [X-Secret]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{{name: X-Served-Via, value: meshgate}}]
    - type: URLRewrite
      urlRewrite: {{hostname: rewritten.internal}}
    backendRefs:
    - name: a
      port: 80
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier:
          set: [{{name: X-Backend, value: a}}]
  - backendRefs: [{{name: a, port: 80}}]
---
# Istio resources in the same configuration, on the same port: one listener serves both.
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: istio-edge, namespace: lab}}
spec:
  servers:
  - port: {{number: {http}, name: http, protocol: HTTP}}
    hosts: [istio.test]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: istio-routes, namespace: lab}}
spec:
  hosts: [istio.test]
  gateways: [istio-edge]
  http:
  - route:
    - destination: {{host: a.lab.svc.cluster.local, port: {{number: 80}}}}
      headers: {{response: {{set: {{x-via: virtualservice}}}}}}
---
# Istio policy bound to the Gateway API Gateway by targetRef, as Istio binds it.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: lab-deny, namespace: lab}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: lab}}]
  action: DENY
  rules: [{{to: [{{operation: {{paths: [/forbidden]}}}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: greeter, namespace: lab}}
spec:
  parentRefs: [{{name: lab}}]
  hostnames: [grpc.test]
  rules:
  - matches:
    - method: {{service: helloworld.Greeter, method: SayHello}}
    backendRefs: [{{name: greeter, port: 50051}}]
"""


class Lab:
    def __init__(self, tmp: Path) -> None:
        http, admin, store, store_v2, a, b, mirror, grpc = free_ports(8)
        https = free_tcp_udp_port()  # HTTPS listeners serve HTTP/3 on the UDP port too
        self.http, self.https, self.admin = http, https, admin
        self.store = ScriptedBackend(store, "store")
        self.store_v2 = ScriptedBackend(store_v2, "store-v2")
        self.a = ScriptedBackend(a, "a")
        self.b = ScriptedBackend(b, "b")
        self.mirror = ScriptedBackend(mirror, "mirror")
        self.grpc = H2Backend(grpc, "greeter")
        self.ca = CA(tmp / "pki")
        self.creds = tmp / "credentials"
        self.ca.issue(
            "lab",
            dns=("secure.test",),
            folder=self.creds / "lab-cert",
            cert_name="tls.crt",
            key_name="tls.key",
        )
        self.config = tmp / "config"
        self.config.mkdir()
        for name in ("gateway.yaml", "services.yaml", "routes.yaml"):
            text = (EXAMPLE / name).read_text(encoding="utf-8")
            text = (
                text.replace("port: 8080", f"port: {http}")
                .replace("http: 9181", f"http: {store}")
                .replace("http: 9182", f"http: {store_v2}")
            )
            (self.config / name).write_text(text, encoding="utf-8")
        (self.config / "lab.yaml").write_text(
            LAB.format(http=http, https=https, a=a, b=b, mirror=mirror, grpc=grpc),
            encoding="utf-8",
        )
        self.gateway = Gateway(self.config, admin, "--credentials-dir", str(self.creds))
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{http}", timeout=10)

    def get(self, host: str, path: str, **kwargs: object) -> httpx.Response:
        headers = {"host": host, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        method = str(kwargs.pop("method", "GET"))
        return self.client.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        try:
            self.client.close()
            self.gateway.stop()
        finally:
            for backend in (self.store, self.store_v2, self.a, self.b, self.mirror, self.grpc):
                backend.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    started = Lab(tmp_path_factory.mktemp("gateway-api"))
    yield started
    started.stop()


def _served_by(response: httpx.Response) -> str:
    assert response.status_code == 200, (response.status_code, response.text)
    return response.headers["x-served-by"]


# --------------------------------------------------------------------------- the example


def test_example_validates_without_warnings() -> None:
    result = subprocess.run(
        [MESHGATE, "validate", str(EXAMPLE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "6 resources valid, 0 warnings" in result.stdout
    assert "warning" not in result.stderr


def test_example_routes_by_precedence_not_by_rule_order(lab: Lab) -> None:
    # The catch-all is the first rule, yet the more specific rules win.
    assert _served_by(lab.get("shop.example.com", "/checkout", method="POST")) == "store-v2"
    assert _served_by(lab.get("shop.example.com", "/checkout")) == "store"
    assert _served_by(lab.get("shop.example.com", "/anything")) == "store"


def test_example_prefix_rewrite_to_root_never_doubles_the_slash(lab: Lab) -> None:
    for path, upstream in (("/api/items", "/items"), ("/api", "/"), ("/api/", "/")):
        marker = uuid.uuid4().hex
        response = lab.get("shop.example.com", path, headers={"x-marker": marker})
        assert _served_by(response) == "store"
        record = lab.store.recorder.wait_for(lambda r, m=marker: r["headers"].get("x-marker") == m)
        assert record["path"] == upstream
        assert record["headers"].get("x-gateway") == "meshgate"


def test_example_path_prefix_matches_whole_segments_only(lab: Lab) -> None:
    marker = uuid.uuid4().hex
    lab.get("shop.example.com", "/apix", headers={"x-marker": marker})
    record = lab.store.recorder.wait_for(lambda r: r["headers"].get("x-marker") == marker)
    # Not the /api rule: the path reaches the store unrewritten.
    assert record["path"] == "/apix"
    assert "x-gateway" not in record["headers"]


def test_example_redirects_keep_the_listener_port_or_use_the_new_schemes(lab: Lab) -> None:
    moved = lab.get("www.example.com", "/old/page?x=1")
    assert moved.status_code == 301
    assert moved.headers["location"] == f"http://www.example.com:{lab.http}/new/page?x=1"
    upgrade = lab.get("www.example.com:1234", "/login")
    assert upgrade.status_code == 302
    assert upgrade.headers["location"] == "https://www.example.com/login"


# --------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    ("path", "kwargs", "winner"),
    [
        ("/p/x", {}, "a"),  # an exact path beats any prefix
        ("/p/long/y", {}, "a"),  # the longest prefix wins
        ("/p/other", {}, "b"),
        ("/m", {"method": "POST", "headers": {"h1": "1", "h2": "2"}}, "a"),  # method first
        ("/m", {"headers": {"h1": "1", "h2": "2"}}, "b"),
        ("/h", {"headers": {"h1": "1", "h2": "2"}}, "a"),  # then the most headers
        ("/q", {"params": {"q1": "1", "q2": "2"}}, "a"),  # then the most query params
        ("/o", {}, "a"),  # then the oldest route by creationTimestamp
        ("/u", {}, "a"),  # unstamped: the earlier in the file
    ],
)
def test_precedence_across_every_route_on_a_hostname(
    lab: Lab, path: str, kwargs: dict, winner: str
) -> None:
    assert _served_by(lab.get("prec.test", path, **kwargs)) == winner


# --------------------------------------------------------------------------- hostnames


def test_wildcard_hostname_covers_any_depth_but_not_the_bare_domain(lab: Lab) -> None:
    assert _served_by(lab.get("x.wild.test", "/")) == "a"
    assert _served_by(lab.get("a.b.c.wild.test", "/")) == "a"
    assert lab.get("wild.test", "/").status_code == 404


def test_route_hostnames_outside_the_listener_are_not_served(lab: Lab) -> None:
    # other.org is in the "hosts" route but outside the listener's *.test; the
    # "elsewhere" route does not intersect at all and is not attached.
    assert lab.get("other.org", "/").status_code == 404
    assert lab.get("only.example.org", "/").status_code == 404


def test_port_in_host_header_is_ignored_for_matching_and_forwarded_unchanged(lab: Lab) -> None:
    marker = uuid.uuid4().hex
    response = lab.get("prec.test:4321", "/p/x", headers={"x-marker": marker})
    assert _served_by(response) == "a"
    record = lab.a.recorder.wait_for(lambda r: r["headers"].get("x-marker") == marker)
    assert record["host"] == "prec.test:4321"


# --------------------------------------------------------------------------- matching


def test_path_prefix_value_with_trailing_slash_matches_the_bare_segment(lab: Lab) -> None:
    assert _served_by(lab.get("names.test", "/docs")) == "a"
    assert _served_by(lab.get("names.test", "/docs/guide")) == "a"
    assert _served_by(lab.get("names.test", "/docsx")) == "b"


def test_query_param_names_are_case_sensitive(lab: Lab) -> None:
    assert _served_by(lab.get("names.test", "/qs", params={"Page": "2"})) == "a"
    assert _served_by(lab.get("names.test", "/qs", params={"page": "2"})) == "b"


def test_header_names_are_case_insensitive_values_are_not(lab: Lab) -> None:
    assert _served_by(lab.get("names.test", "/hs", headers={"x-mode": "fast"})) == "a"
    assert _served_by(lab.get("names.test", "/hs", headers={"X-MODE": "fast"})) == "a"
    assert _served_by(lab.get("names.test", "/hs", headers={"x-mode": "FAST"})) == "b"


# --------------------------------------------------------------------------- redirects


@pytest.mark.parametrize(
    ("path", "status", "location"),
    [
        ("/p80", 302, "http://redir.test/p80"),  # a well-known port is left out
        ("/s443", 302, "https://redir.test/s443"),
        ("/elsewhere", 301, "http://www.example.org:8443/elsewhere"),
        ("/gone?k=v", 302, "http://redir.test:{http}/landing?k=v"),  # listener port kept
    ],
)
def test_redirect_location_follows_the_port_and_scheme_rules(
    lab: Lab, path: str, status: int, location: str
) -> None:
    response = lab.get("redir.test", path)
    assert response.status_code == status
    assert response.headers["location"] == location.format(http=lab.http)


# --------------------------------------------------------------------------- 500s


@pytest.mark.parametrize("path", ["/missing", "/kind", "/none", "/zero", "/denied"])
def test_rule_with_unusable_backends_answers_500_not_404(lab: Lab, path: str) -> None:
    request_id = uuid.uuid4().hex
    response = lab.get("broken.test", path, headers={"x-request-id": request_id})
    assert response.status_code == 500
    assert response.text == "invalid backend"
    record = lab.gateway.log_for(request_id)
    assert record["response_flags"] == "NC"
    assert "HTTPRoute/lab/broken" in record["route"]


def test_only_the_unusable_backends_share_of_requests_answers_500(lab: Lab) -> None:
    # Weights 1:1; 60 requests all landing on one side happens with p = 2 * 2**-60.
    statuses = [lab.get("broken.test", "/partial").status_code for _ in range(60)]
    assert set(statuses) == {200, 500}, statuses


def test_backend_weights_split_the_traffic(lab: Lab) -> None:
    # The example's testers' rule: weights 1 (store) to 9 (store-v2). Fewer than 40
    # of 80 requests to store-v2 has a probability below 1e-20.
    served = [
        _served_by(lab.get("shop.example.com", "/", headers={"x-beta": "yes"})) for _ in range(80)
    ]
    assert set(served) <= {"store", "store-v2"}
    assert served.count("store-v2") >= 40, served


def test_reference_grant_permits_a_cross_namespace_backend(lab: Lab) -> None:
    assert _served_by(lab.get("broken.test", "/granted")) == "store-v2"


# --------------------------------------------------------------------------- traffic


def test_request_mirror_copies_the_request_to_the_mirror_backend(lab: Lab) -> None:
    marker = uuid.uuid4().hex
    response = lab.get("traffic.test", "/mirror", headers={"x-marker": marker})
    assert _served_by(response) == "a"
    copy = lab.mirror.recorder.wait_for(lambda r: r["headers"].get("x-marker") == marker)
    assert copy["path"] == "/mirror"


def test_backend_request_timeout_answers_504(lab: Lab) -> None:
    request_id = uuid.uuid4().hex
    response = lab.get("traffic.test", "/slow?ms=3000", headers={"x-request-id": request_id})
    assert response.status_code == 504
    assert lab.gateway.log_for(request_id)["response_flags"] == "UT"


def test_header_filters_apply_route_then_backend_edits(lab: Lab) -> None:
    marker = uuid.uuid4().hex
    response = lab.get(
        "traffic.test", "/headers", headers={"x-marker": marker, "x-secret": "s3cret"}
    )
    assert _served_by(response) == "a"
    assert response.headers["x-served-via"] == "meshgate"
    record = lab.a.recorder.wait_for(lambda r: r["headers"].get("x-marker") == marker)
    headers = {k.lower(): v for k, v in record["headers"].items()}
    assert headers["x-added"] == "gw"
    assert headers["x-backend"] == "a"
    assert "x-secret" not in headers
    assert record["host"] == "rewritten.internal"


def test_https_listener_terminates_tls_with_its_certificate_ref(lab: Lab) -> None:
    ctx = ssl.create_default_context(cafile=str(lab.ca.path))
    with httpx.Client(transport=httpx.HTTPTransport(verify=ctx, http2=True), timeout=10) as c:
        response = c.get(
            f"https://127.0.0.1:{lab.https}/headers",
            headers={"host": "secure.test"},
            extensions={"sni_hostname": "secure.test"},
        )
    assert _served_by(response) == "a"
    assert response.http_version == "HTTP/2"


def test_https_listener_serves_http3_once_advertised(lab: Lab) -> None:
    # The TCP answer advertises HTTP/3 on the listener's own port, and a request over
    # QUIC to the same hostname is routed by the same HTTPRoute.
    ctx = ssl.create_default_context(cafile=str(lab.ca.path))
    with httpx.Client(verify=ctx, timeout=10) as c:
        over_tcp = c.get(
            f"https://127.0.0.1:{lab.https}/headers",
            headers={"host": "secure.test"},
            extensions={"sni_hostname": "secure.test"},
        )
    assert _served_by(over_tcp) == "a"
    assert over_tcp.headers["alt-svc"].startswith(f'h3=":{lab.https}"')

    async def over_quic() -> H3Response:
        config = client_configuration("secure.test", cadata=lab.ca.path.read_bytes())
        async with asyncio.timeout(20), connect_h3("127.0.0.1", lab.https, config) as client:
            return await client.request("GET", "secure.test", "/headers", [], b"")

    response = asyncio.run(over_quic())
    assert response.status == 200, response
    assert dict(response.headers)["x-served-by"] == "a"

    # Another hostname on the same port has no route: 404, as over TCP.
    async def unrouted() -> H3Response:
        config = client_configuration("secure.test", cadata=lab.ca.path.read_bytes())
        async with asyncio.timeout(20), connect_h3("127.0.0.1", lab.https, config) as client:
            return await client.request("GET", "elsewhere.test", "/headers", [], b"")

    assert asyncio.run(unrouted()).status == 404


def test_grpc_route_matches_service_and_method_over_http2(lab: Lab) -> None:
    message = b"\x00\x00\x00\x00\x05hello"
    headers = {"host": "grpc.test", "content-type": "application/grpc", "te": "trailers"}
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        base = f"http://127.0.0.1:{lab.http}"
        hit = client.post(f"{base}/helloworld.Greeter/SayHello", content=message, headers=headers)
        miss = client.post(f"{base}/helloworld.Greeter/SayBye", content=message, headers=headers)
    assert hit.status_code == 200
    assert hit.content == message
    record = lab.grpc.recorder.wait_for(lambda r: r["path"] == "/helloworld.Greeter/SayHello")
    assert record["protocol"] == "h2"
    assert miss.status_code == 404


# --------------------------------------------------------------------------- mixing


def test_istio_and_gateway_api_resources_share_one_listener(lab: Lab) -> None:
    istio = lab.get("istio.test", "/")
    assert _served_by(istio) == "a"
    assert istio.headers["x-via"] == "virtualservice"
    assert _served_by(lab.get("prec.test", "/p/x")) == "a"
    dump = httpx.get(f"http://127.0.0.1:{lab.admin}/routes", timeout=10).json()
    (listener,) = [item for item in dump["listeners"] if item["port"] == lab.http]
    kinds = {
        route["origin"]["kind"] for vhost in listener["virtualHosts"] for route in vhost["routes"]
    }
    assert kinds == {"VirtualService", "HTTPRoute", "GRPCRoute"}


def test_authorization_policy_binds_to_a_gateway_api_gateway_by_target_ref(lab: Lab) -> None:
    assert lab.get("traffic.test", "/forbidden").status_code == 403
    assert _served_by(lab.get("traffic.test", "/allowed")) == "a"


# --------------------------------------------------------------------------- status


def test_start_up_prints_status_problems_as_warnings(lab: Lab) -> None:
    line = lab.gateway.wait_stderr(lambda ln: "NoMatchingListenerHostname" in ln)
    assert line.startswith("warning: ")
    assert "HTTPRoute lab/elsewhere: spec.hostnames: Accepted=False" in line


def test_admin_serves_gateway_status_with_the_spec_reasons(lab: Lab) -> None:
    response = httpx.get(f"http://127.0.0.1:{lab.admin}/gateway_status", timeout=10)
    assert response.status_code == 200
    status = response.json()
    routes = {(r["namespace"], r["name"]): r["status"]["parents"] for r in status["routes"]}
    broken = {c["type"]: c for c in routes[("lab", "broken")][0]["conditions"]}
    assert broken["Accepted"]["status"] == "True"
    assert broken["ResolvedRefs"]["status"] == "False"
    assert broken["ResolvedRefs"]["reason"] == "BackendNotFound"
    elsewhere = {c["type"]: c for c in routes[("lab", "elsewhere")][0]["conditions"]}
    assert elsewhere["Accepted"]["reason"] == "NoMatchingListenerHostname"
    gateways = {g["name"]: g for g in status["gateways"]}
    listeners = {lst["name"]: lst for lst in gateways["lab"]["status"]["listeners"]}
    assert listeners["https"]["conditions"][1] == {
        "type": "Programmed",
        "status": "True",
        "reason": "Programmed",
    }
    assert listeners["http"]["attachedRoutes"] >= 8


def test_status_command_prints_the_same_conditions(lab: Lab) -> None:
    result = subprocess.run(
        [MESHGATE, "status", str(lab.config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "reason: NoMatchingListenerHostname" in result.stdout
    # One ResolvedRefs condition per parent: the first unusable reference's reason.
    assert "reason: BackendNotFound" in result.stdout


def test_validate_turns_conditions_into_warnings(lab: Lab, tmp_path: Path) -> None:
    copy = tmp_path / "config"
    shutil.copytree(lab.config, copy)
    result = subprocess.run([MESHGATE, "validate", str(copy)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert any(
        "HTTPRoute lab/broken: spec.rules[0].backendRefs[0]: ResolvedRefs=False (BackendNotFound)"
        in ln
        for ln in lines
    ), lines
    assert any("InvalidKind" in ln for ln in lines), lines
    assert any("RefNotPermitted" in ln for ln in lines), lines
    payload = json.dumps(lines)
    assert "lab.yaml:" in payload


# --------------------------------------------------------------------------- reload

RELOAD_BASE = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: edge, namespace: default}}
spec:
  gatewayClassName: meshgate
  listeners: [{{name: http, port: {port}, protocol: HTTP}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: a, namespace: default}}
spec:
  hosts: [a.default.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {backend}}}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: v1, namespace: default}}
spec:
  parentRefs: [{{name: edge}}]
  rules:
  - matches: [{{path: {{value: /v1}}}}]
    backendRefs: [{{name: a, port: 80}}]
"""

RELOAD_ADDED = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: v2, namespace: default}
spec:
  parentRefs: [{name: edge}]
  rules:
  - matches: [{path: {type: %s, value: /v2}}]
    backendRefs: [{name: a, port: 80}]
"""


def test_gateway_api_changes_reload_and_invalid_ones_keep_the_running_routes(
    lab: Lab, tmp_path: Path
) -> None:
    port, admin = free_ports(2)
    config = tmp_path / "config"
    config.mkdir()
    (config / "base.yaml").write_text(
        RELOAD_BASE.format(port=port, backend=lab.a.server.server_address[1]), encoding="utf-8"
    )
    gateway = Gateway(config, admin, "--reload-interval-s", "0.05")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert _served_by(client.get("/v1")) == "a"
            assert client.get("/v2").status_code == 404
            (config / "added.yaml").write_text(RELOAD_ADDED % "PathPrefix", encoding="utf-8")
            gateway.wait_stderr(lambda ln: "reload #1 (file change) applied" in ln)
            assert _served_by(client.get("/v2/x")) == "a"
            (config / "added.yaml").write_text(RELOAD_ADDED % "Prefix", encoding="utf-8")
            gateway.wait_stderr(lambda ln: "reload #2 (file change) rejected" in ln)
            assert _served_by(client.get("/v2/x")) == "a"  # the last good routes serve on
        dump = httpx.get(f"http://127.0.0.1:{admin}/config_dump", timeout=10).json()
        (error,) = dump["reload"]["errors"]
        assert "added.yaml:" in error
        assert 'HTTPRoute default/v2: spec.rules[0].matches[0].path.type: "Prefix"' in error
    finally:
        gateway.stop()
