"""AuthorizationPolicy decisions: a table of policies x requests, built from the
examples in Istio's AuthorizationPolicy documentation (adapted to an edge gateway),
loaded through the real YAML loader and validator."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from authn.authz import AuthzRequest, compile_authorization, normalize_path
from authn.jwt import VerifiedToken
from gateway.config import load_config


def policies(tmp_path: Path, yaml_text: str):
    path = tmp_path / "policies.yaml"
    path.write_text(yaml_text)
    model = load_config([str(path)])
    return compile_authorization(list(model.of_kind("AuthorizationPolicy")))


def token(sub: str = "alice", iss: str = "https://issuer", **claims: Any) -> VerifiedToken:
    data = {"iss": iss, "sub": sub, **claims}
    aud = claims.get("aud", ())
    return VerifiedToken(iss, sub, data, tuple([aud] if isinstance(aud, str) else aud), None, "")


@dataclass
class Req:
    method: str = "GET"
    path: str = "/"
    host: str = "api.example.com"
    port: int = 8080
    ip: str = "10.0.0.1"
    headers: dict[str, str] = field(default_factory=dict)
    auth: VerifiedToken | None = None
    principal: str = ""
    namespace: str = ""

    def build(self) -> AuthzRequest:
        return AuthzRequest(
            method=self.method,
            path=self.path,
            host=self.host,
            port=self.port,
            source_ip=self.ip,
            remote_ip=self.ip,
            header=self.headers.get,
            auth=self.auth,
            source_principal=self.principal,
            source_namespace=self.namespace,
        )


HEAD = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: istio-system}}
spec:
"""


def doc(name: str, body: str) -> str:
    return HEAD.format(name=name) + "".join(f"  {line}\n" for line in body.strip().splitlines())


# Istio's first example: principals or namespace test, GET /info* or POST /data,
# when the token's issuer is accounts.google.com.
HTTPBIN = doc(
    "httpbin",
    """
action: ALLOW
rules:
- from:
  - source:
      principals: ["cluster.local/ns/default/sa/curl"]
  - source:
      namespaces: ["test"]
  to:
  - operation:
      methods: ["GET"]
      paths: ["/info*"]
  - operation:
      methods: ["POST"]
      paths: ["/data"]
  when:
  - key: request.auth.claims[iss]
    values: ["https://accounts.google.com"]
""",
)
GOOGLE = token(iss="https://accounts.google.com")

ALLOW_NOTHING = doc("allow-nothing", "{}")
DENY_ALL = doc("deny-all", "action: DENY\nrules:\n- {}")
ALLOW_ALL = doc("allow-all", "rules:\n- {}")

# Istio's "require JWT" example: only a given request principal.
REQUIRE_JWT = doc(
    "require-jwt",
    """
action: ALLOW
rules:
- from:
  - source:
      requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]
""",
)
TESTER = token(sub="testing@secure.istio.io", iss="testing@secure.istio.io")

# Istio's example: deny requests without a JWT, except to /healthz.
DENY_NO_JWT = doc(
    "deny-no-jwt",
    """
action: DENY
rules:
- from:
  - source:
      notRequestPrincipals: ["*"]
  to:
  - operation:
      notPaths: ["/healthz"]
""",
)

IP_ALLOW = doc(
    "ip-allow",
    """
action: ALLOW
rules:
- from:
  - source:
      ipBlocks: ["1.2.3.4", "5.6.7.0/24"]
""",
)

HEADER_VERSIONS = doc(
    "versions",
    """
action: ALLOW
rules:
- to:
  - operation:
      hosts: ["*.Example.com"]
      ports: ["8080"]
  when:
  - key: request.headers[version]
    values: ["v1", "v2*"]
  - key: request.headers[x-beta]
    notValues: ["*"]
""",
)

NESTED_CLAIMS = doc(
    "nested",
    """
action: ALLOW
rules:
- when:
  - key: request.auth.claims[nested][key1]
    values: ["val1"]
  - key: request.auth.claims[groups]
    values: ["admins"]
""",
)

SCOPE_WRITE = doc(
    "writers",
    """
action: ALLOW
rules:
- to:
  - operation:
      methods: ["GET", "HEAD"]
- to:
  - operation:
      methods: ["POST", "PUT", "DELETE"]
      paths: ["/api/*", "*.json"]
  when:
  - key: request.auth.claims[scope]
    values: ["write"]
""",
)

AUDIT = doc("audit-admin", "action: AUDIT\nrules:\n- to:\n  - operation:\n      paths: ['/admin*']")


def scope_token(scope: Any) -> VerifiedToken:
    return token(scope=scope)


CURL = "cluster.local/ns/default/sa/curl"

CASES = [
    # (policies, request, expected allowed)
    ([HTTPBIN], Req(path="/info/x", principal=CURL, auth=GOOGLE), True),
    ([HTTPBIN], Req(method="POST", path="/data", namespace="test", auth=GOOGLE), True),
    ([HTTPBIN], Req(method="POST", path="/data/x", namespace="test", auth=GOOGLE), False),
    ([HTTPBIN], Req(path="/info", namespace="prod", auth=GOOGLE), False),
    ([HTTPBIN], Req(path="/info", namespace="test", auth=token()), False),
    ([HTTPBIN], Req(path="/info", namespace="test"), False),
    ([ALLOW_NOTHING], Req(), False),
    ([ALLOW_ALL], Req(path="/anything"), True),
    ([DENY_ALL, ALLOW_ALL], Req(), False),
    ([], Req(), True),
    ([REQUIRE_JWT], Req(auth=TESTER), True),
    ([REQUIRE_JWT], Req(auth=token()), False),
    ([REQUIRE_JWT], Req(), False),
    ([DENY_NO_JWT], Req(path="/healthz"), True),
    ([DENY_NO_JWT], Req(path="/api"), False),
    ([DENY_NO_JWT], Req(path="/api", auth=token()), True),
    ([IP_ALLOW], Req(ip="1.2.3.4"), True),
    ([IP_ALLOW], Req(ip="5.6.7.200"), True),
    ([IP_ALLOW], Req(ip="5.6.8.1"), False),
    ([HEADER_VERSIONS], Req(host="API.example.com:8080", headers={"version": "v1"}), True),
    ([HEADER_VERSIONS], Req(headers={"version": "v2-beta"}), True),
    ([HEADER_VERSIONS], Req(headers={"version": "v3"}), False),
    ([HEADER_VERSIONS], Req(headers={"version": "v1", "x-beta": "1"}), False),
    ([HEADER_VERSIONS], Req(port=9090, headers={"version": "v1"}), False),
    ([HEADER_VERSIONS], Req(host="example.org", headers={"version": "v1"}), False),
    ([NESTED_CLAIMS], Req(auth=token(nested={"key1": "val1"}, groups=["dev", "admins"])), True),
    ([NESTED_CLAIMS], Req(auth=token(nested={"key1": "val2"}, groups=["admins"])), False),
    ([NESTED_CLAIMS], Req(auth=token(nested={"key1": "val1"}, groups="dev")), False),
    ([SCOPE_WRITE], Req(method="GET", path="/api/items"), True),
    ([SCOPE_WRITE], Req(method="POST", path="/api/items"), False),
    ([SCOPE_WRITE], Req(method="POST", path="/api/items", auth=scope_token(["write"])), True),
    ([SCOPE_WRITE], Req(method="POST", path="/x/y.json", auth=scope_token("write")), True),
    ([SCOPE_WRITE], Req(method="POST", path="/x/y", auth=scope_token("write")), False),
    ([SCOPE_WRITE], Req(method="PUT", path="/api/1", auth=scope_token("read write")), True),
    ([SCOPE_WRITE], Req(method="PUT", path="/api/1", auth=scope_token("read writer")), False),
    ([NESTED_CLAIMS], Req(auth=token(nested={"key1": "val1"}, groups="dev admins")), False),
    ([AUDIT], Req(path="/admin"), True),
]


@pytest.mark.parametrize(("docs", "request_", "allowed"), CASES)
def test_policy_table(tmp_path: Path, docs: list[str], request_: Req, allowed: bool) -> None:
    compiled = policies(tmp_path, "---\n".join(docs)) if docs else None
    if compiled is None:
        assert allowed  # no policy at all: Istio allows
        return
    decision = compiled.evaluate(request_.build())
    assert decision.allowed is allowed, decision


def test_deny_wins_over_allow_and_names_the_policy(tmp_path: Path) -> None:
    compiled = policies(tmp_path, "---\n".join([ALLOW_ALL, DENY_ALL]))
    decision = compiled.evaluate(Req().build())
    assert not decision.allowed
    assert decision.policy == "istio-system/deny-all"


def test_audit_match_is_recorded_without_changing_the_decision(tmp_path: Path) -> None:
    compiled = policies(tmp_path, AUDIT)
    decision = compiled.evaluate(Req(path="/admin/x").build())
    assert decision.allowed
    assert decision.audited == ("istio-system/audit-admin",)


def test_custom_policy_match_asks_its_provider_before_deny_and_allow(tmp_path: Path) -> None:
    custom = doc(
        "ext",
        "action: CUSTOM\nprovider: {name: opa}\nrules:\n- to:\n  - operation:\n"
        "      paths: ['/admin*']",
    )
    compiled = policies(tmp_path, "---\n".join([custom, DENY_ALL]))
    hit = compiled.evaluate(Req(path="/admin").build())
    assert hit.custom == (("opa", "istio-system/ext"),)
    assert not hit.allowed
    assert compiled.evaluate(Req(path="/public").build()).custom == ()


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/public/../admin", "/admin"),
        ("/public/%2e%2E/admin", "/admin"),
        ("/a/./b", "/a/b"),
        ("/../../etc", "/etc"),
        ("/a/b/..", "/a/"),
        ("/plain", "/plain"),
    ],
)
def test_dot_segments_are_removed_before_matching(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal
