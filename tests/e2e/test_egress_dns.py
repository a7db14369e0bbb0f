"""End to end: the egress gateway resolving names with a DNS server on 127.0.0.1.

``tests/dns_server.py`` answers for the "external" names; the gateway is pointed at it
with ``--dns-server``, so the real resolution path runs (queries, TTLs, failures)
and nothing leaves loopback. Two HTTPS servers listen on the same port of 127.0.0.5
and 127.0.0.6 with certificates for different names, so where a name resolved to,
and which name the gateway verified, show in the answer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dns_server import DnsServer
from jwt_fixtures import ISSUER, claims, ec_key, jwks_json, mint
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
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: dns-hosts, namespace: egress}}
spec:
  hosts: [api.dns.example.test, moving.dns.example.test, gone.dns.example.test]
  resolution: DNS
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {tls_port}}}]
---
# Every name under wild.example.test, resolved when asked for.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: wild, namespace: egress}}
spec:
  hosts: ["*.wild.example.test"]
  resolution: DYNAMIC_DNS
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: {tls_port}}}
  - {{number: 443, name: tls, protocol: TLS, targetPort: {tls_port}}}
---
# A VirtualService route whose destination is the wildcard host itself.
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: via-route, namespace: egress}}
spec:
  hosts: ["*.viavs.wild.example.test"]
  gateways: [istio-system/egress]
  http:
  - name: via-route
    route: [{{destination: {{host: "*.wild.example.test", port: {{number: 80}}}}}}]
---
# TLS origination on port 80 for every example.test host, SNI = the host asked for.
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: example-test, namespace: egress}}
spec:
  host: "*.example.test"
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 80}}
      tls: {{mode: SIMPLE, caCertificates: "{ca}"}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: callers, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: egressgateway}}}}
  jwtRules:
  - issuer: {issuer}
    jwks: '{jwks}'
---
# Only alice may leave for api.dns.example.test.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-callers, namespace: istio-system}}
spec:
  selector: {{matchLabels: {{istio: egressgateway}}}}
  action: DENY
  rules:
  - from: [{{source: {{notRequestPrincipals: ["{issuer}/alice"]}}}}]
    to: [{{operation: {{hosts: [api.dns.example.test]}}}}]
"""


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.port, admin, admin_any, self.any_port, tls_port = free_ports(5)
        ca = TestCA(tmp / "pki")
        self.ca = ca.ca_path
        self.dns = DnsServer()
        five = [
            "api.dns.example.test",
            "moving.dns.example.test",
            "www.wild.example.test",
            "www.viavs.wild.example.test",
        ]
        six = ["moving.dns.example.test", "other.wild.example.test", "pinned.wild.example.test"]
        self.five = ScriptedBackend(
            tls_port, "five", ca.server_context("five", five, require_client=False), "127.0.0.5"
        )
        self.six = ScriptedBackend(
            tls_port, "six", ca.server_context("six", six, require_client=False), "127.0.0.6"
        )
        self.plain = ScriptedBackend(0, "plain", address="127.0.0.7")
        for name in five:
            self.dns.set(name, ["127.0.0.5"], ttl=300)
        self.dns.set("moving.dns.example.test", ["127.0.0.5"], ttl=0)
        self.dns.set("other.wild.example.test", ["127.0.0.6"], ttl=300)
        # Resolves to the server whose certificate does not carry this name.
        self.dns.set("liar.wild.example.test", ["127.0.0.6"], ttl=300)
        self.dns.set("free.example.org", ["127.0.0.7"], ttl=300)
        # DNS says five, the hosts file says six: the hosts file wins, as in Envoy.
        self.dns.set("pinned.wild.example.test", ["127.0.0.5"], ttl=300)
        hosts = tmp / "hosts"
        hosts.write_text("# test hosts file\n127.0.0.6  Pinned.Wild.Example.Test  pinned-alias\n")
        self.key = ec_key()
        config = tmp / "config"
        config.mkdir()
        text = CONFIG.format(
            port=self.port,
            tls_port=tls_port,
            ca=ca.ca_path,
            issuer=ISSUER,
            jwks=jwks_json(self.key),
        )
        (config / "egress.yaml").write_text(text)
        dns = ("--dns-server", self.dns.address, "--dns-timeout-s", "2", "--hosts-file", str(hosts))
        self.gateway = Gateway(config, admin, *dns, command="egress")
        # The same configuration with ALLOW_ANY, on its own port.
        any_config = tmp / "allow-any"
        any_config.mkdir()
        (any_config / "egress.yaml").write_text(text.replace(str(self.port), str(self.any_port)))
        self.allow_any = Gateway(
            any_config, admin_any, *dns, "--outbound-traffic-policy", "ALLOW_ANY", command="egress"
        )
        self.alice = mint(self.key, claims(sub="alice"), alg="ES256")

    def get(
        self, host: str, path: str = "/", *, port: int | None = None, token: str | None = None
    ) -> tuple[httpx.Response, dict]:
        rid = uuid.uuid4().hex
        headers = {"host": host, "x-request-id": rid}
        if token:
            headers["authorization"] = f"Bearer {token}"
        gateway = self.allow_any if port == self.any_port else self.gateway
        response = httpx.get(
            f"http://127.0.0.1:{port or self.port}{path}", headers=headers, timeout=10
        )
        return response, gateway.log_for(rid)

    def stop(self) -> None:
        self.gateway.stop()
        self.allow_any.stop()
        for backend in (self.five, self.six, self.plain):
            backend.stop()
        self.dns.stop()


@pytest.fixture(scope="module")
def eg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    setup = Setup(tmp_path_factory.mktemp("egress-dns"))
    try:
        yield setup
    finally:
        setup.stop()


# --------------------------------------------------------------------------- DNS


def test_dns_host_is_resolved_and_its_answer_kept_for_the_ttl(eg: Setup) -> None:
    for _ in range(3):
        response, log = eg.get("api.dns.example.test", token=eg.alice)
        assert response.status_code == 200 and response.headers["x-served-by"] == "five"
    assert log["upstream_host"].startswith("127.0.0.5:")
    assert log["upstream_cluster"] == "outbound|80||api.dns.example.test"
    assert eg.dns.count("api.dns.example.test") == 1


def test_ttl_zero_answer_is_asked_again_and_follows_the_move(eg: Setup) -> None:
    response, _ = eg.get("moving.dns.example.test")
    assert response.headers["x-served-by"] == "five"
    eg.dns.set("moving.dns.example.test", ["127.0.0.6"], ttl=0)
    response, log = eg.get("moving.dns.example.test")
    assert response.status_code == 200 and response.headers["x-served-by"] == "six"
    assert log["upstream_host"].startswith("127.0.0.6:")
    assert eg.dns.count("moving.dns.example.test") >= 2


def test_hosts_file_answers_before_dns(eg: Setup) -> None:
    response, log = eg.get("pinned.wild.example.test")
    assert response.status_code == 200 and response.headers["x-served-by"] == "six"
    assert log["upstream_host"].startswith("127.0.0.6:")
    assert eg.dns.count("pinned.wild.example.test") == 0


def test_name_that_does_not_resolve_is_503_uf_with_the_reason_logged(eg: Setup) -> None:
    response, log = eg.get("gone.dns.example.test")
    assert response.status_code == 503 and log["response_flags"] == "UF"
    eg.gateway.wait_stderr(lambda ln: "gone.dns.example.test" in ln and "no such name" in ln)


# --------------------------------------------------------------------------- wildcard


def test_wildcard_entry_reaches_each_name_it_covers_by_that_name(eg: Setup) -> None:
    response, log = eg.get("www.wild.example.test", "/w")
    assert response.status_code == 200 and response.headers["x-served-by"] == "five"
    assert log["upstream_cluster"] == "outbound|80||www.wild.example.test"
    assert log["route"] == "ServiceEntry/egress/wild:registry"
    response, log = eg.get("other.wild.example.test", "/o")
    assert response.status_code == 200 and response.headers["x-served-by"] == "six"
    assert log["upstream_cluster"] == "outbound|80||other.wild.example.test"


def test_route_to_the_wildcard_host_dials_the_name_asked_for(eg: Setup) -> None:
    response, log = eg.get("www.viavs.wild.example.test", "/v")
    assert response.status_code == 200 and response.headers["x-served-by"] == "five"
    assert log["route"] == "VirtualService/egress/via-route:via-route"
    assert log["upstream_cluster"] == "outbound|80||www.viavs.wild.example.test"


def test_wildcard_name_whose_certificate_does_not_carry_it_is_refused(eg: Setup) -> None:
    response, log = eg.get("liar.wild.example.test")
    assert response.status_code == 503 and log["response_flags"] == "UF"
    eg.gateway.wait_stderr(
        lambda ln: "outbound|80||liar.wild.example.test" in ln and "CERTIFICATE_VERIFY" in ln
    )


def test_name_outside_the_wildcard_is_refused(eg: Setup) -> None:
    response, log = eg.get("wild.example.test")
    assert response.status_code == 502 and log["response_flags"] == "NR"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_connect_to_a_wildcard_name_is_tunnelled_to_its_address(eg: Setup) -> None:
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--proxy",
            f"http://127.0.0.1:{eg.port}",
            "--cacert",
            str(eg.ca),
            "https://other.wild.example.test/tunnel",
        ],
        capture_output=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"six 200")
    log = eg.gateway.log_where(lambda r: r["authority"] == "other.wild.example.test:443")
    assert log["method"] == "CONNECT"
    assert log["upstream_cluster"] == "outbound|443||other.wild.example.test"


# --------------------------------------------------------------------------- ALLOW_ANY


def test_allow_any_forwards_a_host_nobody_declared(eg: Setup) -> None:
    host = f"free.example.org:{eg.plain.port}"
    response, log = eg.get(host, "/free", port=eg.any_port)
    assert response.status_code == 200 and response.headers["x-served-by"] == "plain"
    assert log["route"] == "OutboundTrafficPolicy/-/ALLOW_ANY:registry"
    assert log["upstream_cluster"] == f"outbound|{eg.plain.port}||free.example.org"
    refused, log = eg.get(host, "/free")
    assert refused.status_code == 502 and log["response_flags"] == "NR"


def test_allow_any_still_uses_the_registry_for_declared_hosts(eg: Setup) -> None:
    response, _ = eg.get("www.wild.example.test", port=eg.any_port)
    assert response.status_code == 200 and response.headers["x-served-by"] == "five"


# --------------------------------------------------------------------------- policy


def test_only_the_allowed_principal_may_leave_for_a_host(eg: Setup) -> None:
    response, log = eg.get("api.dns.example.test")
    assert response.status_code == 403 and log["response_flags"] == "RBAC"
    bob = mint(eg.key, claims(sub="bob"), alg="ES256")
    response, _ = eg.get("api.dns.example.test", token=bob)
    assert response.status_code == 403
    response, _ = eg.get("api.dns.example.test", token=eg.alice)
    assert response.status_code == 200
    # Other exits are not affected by that policy.
    response, _ = eg.get("www.wild.example.test")
    assert response.status_code == 200


def test_config_dump_shows_the_registry(eg: Setup) -> None:
    admin = eg.gateway.proc.args[eg.gateway.proc.args.index("--admin-port") + 1]
    dump = httpx.get(f"http://127.0.0.1:{admin}/config_dump", timeout=10).json()
    text = json.dumps(dump)
    assert '"outboundTrafficPolicy": "REGISTRY_ONLY"' in text
    assert "*.wild.example.test" in text
