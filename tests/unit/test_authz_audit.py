"""An audit of AuthorizationPolicy semantics against Istio's documentation: path
normalisation (Istio's default, BASE), evaluation order, matching of every
source/operation field and ``when`` key, the peer's mTLS identity, and what the
validator refuses. Policies go through the real YAML loader and validator.

The references are Istio's "Authorization Policy" reference, its "Authorization
Policy Conditions" and "Authorization Policy Normalization" pages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from authn.authz import AuthzRequest, PathRejected, compile_authorization, normalize_path
from authn.jwt import VerifiedToken
from authn.policy import compile_security
from authn.runtime import SecurityRuntime
from authn.stages import AuthzStage
from gateway.config import ConfigErrors, load_config
from gateway.errors import AccessDenied, BadRequest
from gateway.server.events import PeerIdentity, RequestHead
from gateway.stages import RequestContext

HEAD = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: istio-system}}
spec:
"""


def doc(name: str, body: str) -> str:
    return HEAD.format(name=name) + "".join(f"  {line}\n" for line in body.strip().splitlines())


def compile_docs(tmp_path: Path, *docs: str):
    path = tmp_path / "policies.yaml"
    path.write_text("---\n".join(docs))
    return compile_authorization(list(load_config([str(path)]).of_kind("AuthorizationPolicy")))


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
    sni: str = ""
    principal: str = ""
    namespace: str = ""
    certified: bool = False

    def build(self) -> AuthzRequest:
        return AuthzRequest(
            method=self.method,
            path=normalize_path(self.path),
            host=self.host.lower(),
            port=self.port,
            source_ip=self.ip,
            remote_ip=self.ip,
            header=self.headers.get,
            auth=self.auth,
            sni=self.sni,
            source_principal=self.principal,
            source_namespace=self.namespace,
            peer_certified=self.certified or bool(self.principal),
        )


def allowed(tmp_path: Path, docs: list[str], request: Req) -> bool:
    return compile_docs(tmp_path, *docs).evaluate(request.build()).allowed


# --------------------------------------------------------------------------- paths

DENY_ADMIN = doc(
    "deny-admin", "action: DENY\nrules:\n- to:\n  - operation:\n      paths: ['/admin*']"
)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/%61dmin", "/admin"),  # %61-%7a: lower-case letters are decoded (BASE)
        ("/%41%44MIN", "/ADMIN"),
        ("/a%2db%5fc%7ed%30", "/a-b_c~d0"),
        ("/public/%2E%2e/admin", "/admin"),
        ("/public\\..\\admin", "/admin"),  # a backslash is a slash (BASE)
        ("/a%2fb", "/a%2fb"),  # %2f and %5c: only DECODE_AND_MERGE_SLASHES decodes them
        ("/a%5Cb", "/a%5Cb"),
        ("/a%252e%252e/b", "/a%252e%252e/b"),  # decoded once: no double decoding
        ("/a%20b", "/a%20b"),  # reserved or other characters stay encoded
        ("//admin", "//admin"),  # slashes are merged only with MERGE_SLASHES
        ("/admin;x", "/admin;x"),
        ("/a//../b", "/a/b"),  # RFC 3986 5.2.4 on the segments as they are
    ],
)
def test_paths_are_normalised_as_istio_base_does(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


@pytest.mark.parametrize("raw", ["/a%00b", "/%00"])
def test_percent_encoded_nul_is_refused(raw: str) -> None:
    with pytest.raises(PathRejected):
        normalize_path(raw)


@pytest.mark.parametrize(
    ("path", "denied"),
    [
        ("/admin", True),
        ("/admin/users", True),
        ("/%61dmin", True),  # was allowed: the DENY rule saw "/%61dmin"
        ("/%61%64%6d%69%6e/x", True),
        ("/public/../admin", True),
        ("/public\\..\\admin", True),
        ("/admin%2F", True),  # still starts with /admin
        ("/admin;x", True),
        ("/admin/../public", False),
        ("/ADMIN", False),  # paths are case-sensitive
        ("//admin", False),  # as with Istio's default BASE: see docs/security.md
        ("/public", False),
    ],
)
def test_deny_on_an_admin_prefix_judges_the_normalised_path(
    tmp_path: Path, path: str, denied: bool
) -> None:
    assert allowed(tmp_path, [DENY_ADMIN], Req(path=path)) is not denied


def test_exact_prefix_suffix_and_presence_path_forms(tmp_path: Path) -> None:
    policy = doc(
        "forms",
        "rules:\n- to:\n  - operation:\n      paths: ['/exact', '/api/*', '*.html']",
    )
    verdicts = {
        p: allowed(tmp_path, [policy], Req(path=p))
        for p in ("/exact", "/exact/", "/api/x", "/api", "/x/y.html", "/x.htm")
    }
    assert verdicts == {
        "/exact": True,
        "/exact/": False,
        "/api/x": True,
        "/api": False,
        "/x/y.html": True,
        "/x.htm": False,
    }
    present = doc("present", "rules:\n- to:\n  - operation:\n      notPaths: ['*']")
    assert not allowed(tmp_path, [present], Req(path="/anything"))


# --------------------------------------------------------------------------- order


ALLOW_NOTHING = doc("allow-nothing", "{}")
ALLOW_ALL = doc("allow-all", "rules:\n- {}")
DENY_NO_RULES = doc("deny-empty", "action: DENY")
DENY_ALL = doc("deny-all", "action: DENY\nrules:\n- {}")
AUDIT_ALL = doc("audit-all", "action: AUDIT\nrules:\n- {}")
ALLOW_API = doc("allow-api", "rules:\n- to:\n  - operation:\n      paths: ['/api/*']")


@pytest.mark.parametrize(
    ("docs", "request_", "expected"),
    [
        ([ALLOW_NOTHING], Req(), False),  # spec: {} is an ALLOW policy matching nothing
        ([ALLOW_ALL], Req(), True),  # rules: [{}] matches everything
        ([DENY_NO_RULES], Req(), True),  # a DENY policy without rules denies nothing
        ([DENY_ALL, ALLOW_ALL], Req(), False),  # DENY before ALLOW
        ([AUDIT_ALL], Req(), True),  # AUDIT never decides
        ([AUDIT_ALL, ALLOW_API], Req(path="/other"), False),
        ([ALLOW_API], Req(path="/api/x"), True),
        ([ALLOW_API], Req(path="/other"), False),  # an ALLOW policy bound: default deny
        ([ALLOW_API, ALLOW_NOTHING], Req(path="/api/x"), True),  # any ALLOW match is enough
    ],
)
def test_evaluation_order(tmp_path: Path, docs: list[str], request_: Req, expected: bool) -> None:
    assert allowed(tmp_path, docs, request_) is expected


# --------------------------------------------------------------------------- operation


def test_methods_hosts_ports_and_their_not_forms(tmp_path: Path) -> None:
    policy = doc(
        "ops",
        """
rules:
- to:
  - operation:
      methods: ["GET"]
      hosts: ["api.example.com", "*.internal"]
      notPorts: ["9090"]
- to:
  - operation:
      notMethods: ["GET", "DELETE"]
      notHosts: ["admin.example.com"]
      ports: ["8080"]
""",
    )
    cases = [
        (Req(), True),
        (Req(host="API.Example.COM"), True),  # hosts compare case-insensitively
        (Req(host="api.example.com:8080"), True),  # meshgate: with or without the port
        (Req(host="x.internal"), True),
        (Req(host="api.example.org"), False),
        (Req(port=9090), False),  # notPorts
        (Req(method="get", port=8443), False),  # methods are exact (the stage refuses "get")
        (Req(method="POST", host="other.example.com"), True),  # second rule
        (Req(method="POST", host="ADMIN.example.com:8080"), False),  # notHosts
        (Req(method="DELETE", host="other.example.com"), False),  # notMethods
        (Req(method="POST", host="other.example.com", port=8443), False),  # ports
    ]
    compiled = compile_docs(tmp_path, policy)
    assert [compiled.evaluate(r.build()).allowed for r, _ in cases] == [e for _, e in cases]


def test_from_to_and_when_are_anded_and_list_entries_ored(tmp_path: Path) -> None:
    policy = doc(
        "and-or",
        """
rules:
- from:
  - source: {ipBlocks: ["10.0.0.0/8"]}
  - source: {requestPrincipals: ["https://issuer/alice"]}
  to:
  - operation: {paths: ["/a"]}
  - operation: {paths: ["/b"]}
  when:
  - key: request.headers[x-env]
    values: ["prod", "stage"]
""",
    )
    prod = {"x-env": "prod"}
    cases = [
        (Req(path="/a", headers=prod), True),
        (Req(path="/b", headers={"x-env": "stage"}), True),
        (Req(path="/c", headers=prod), False),  # no operation matches
        (Req(path="/a", headers={"x-env": "dev"}), False),  # when fails
        (Req(path="/a"), False),  # header absent
        (Req(path="/a", ip="192.0.2.1", headers=prod), False),  # no source matches
        (Req(path="/a", ip="192.0.2.1", headers=prod, auth=token()), True),  # 2nd source
    ]
    compiled = compile_docs(tmp_path, policy)
    assert [compiled.evaluate(r.build()).allowed for r, _ in cases] == [e for _, e in cases]


# --------------------------------------------------------------------------- when


def test_when_condition_keys(tmp_path: Path) -> None:
    policy = doc(
        "when",
        """
rules:
- when:
  - key: request.auth.principal
    values: ["https://issuer/*"]
  - key: request.auth.audiences
    values: ["api"]
  - key: request.auth.presenter
    values: ["web-client"]
  - key: request.auth.claims[iss]
    values: ["https://issuer"]
  - key: request.auth.claims[org][team]
    values: ["core"]
  - key: request.auth.claims[groups]
    values: ["admins"]
    notValues: ["banned"]
  - key: source.ip
    values: ["10.0.0.0/8"]
    notValues: ["10.9.0.0/16"]
  - key: remote.ip
    values: ["10.0.0.0/8"]
  - key: destination.port
    values: ["8080"]
  - key: connection.sni
    values: ["*.example.com"]
  - key: request.headers[X-Client]
    notValues: ["curl*"]
""",
    )

    def good(**kw: Any) -> Req:
        claims: dict[str, Any] = {
            "aud": ["api", "other"],
            "azp": "web-client",
            "org": {"team": "core"},
            "groups": ["dev", "admins"],
        }
        claims.update(kw.pop("claims", {}))
        base = Req(auth=token(**claims), sni="api.example.com")
        for k, v in kw.items():
            setattr(base, k, v)
        return base

    cases = [
        (good(), True),
        (good(headers={"x-client": "browser"}), True),
        (good(headers={"x-client": "curl/8"}), False),  # notValues on a header
        (good(claims={"aud": "other"}), False),
        (good(claims={"azp": "cli"}), False),
        (good(claims={"org": {"team": "edge"}}), False),  # nested claim
        (good(claims={"groups": ["admins", "banned"]}), False),  # notValues: any element
        (good(claims={"groups": "admins"}), True),  # a string claim is one value
        (good(ip="10.9.1.1"), False),
        (good(ip="::ffff:10.1.2.3"), True),  # an IPv4-mapped peer is its IPv4 address
        (good(port=9090), False),
        (good(sni=""), False),
        (Req(sni="api.example.com"), False),  # no token: no principal, no claims
    ]
    compiled = compile_docs(tmp_path, policy)
    assert [compiled.evaluate(r.build()).allowed for r, _ in cases] == [e for _, e in cases]


# --------------------------------------------------------------------------- sources


def test_request_principals_forms_and_not_form(tmp_path: Path) -> None:
    policy = doc(
        "rp",
        """
rules:
- from:
  - source:
      requestPrincipals: ["https://issuer/*", "*@example.com", "https://other/bob"]
      notRequestPrincipals: ["https://issuer/mallory"]
""",
    )
    cases = [
        (token(), True),
        (token(sub="mallory"), False),
        (token(iss="https://x", sub="eve@example.com"), True),
        (token(iss="https://other", sub="bob"), True),
        (token(iss="https://other", sub="bobby"), False),
        (None, False),
    ]
    compiled = compile_docs(tmp_path, policy)
    got = [compiled.evaluate(Req(auth=t).build()).allowed for t, _ in cases]
    assert got == [e for _, e in cases]


def test_ip_blocks_with_cidrs_and_not_ip_blocks(tmp_path: Path) -> None:
    policy = doc(
        "ips",
        """
action: DENY
rules:
- from:
  - source:
      ipBlocks: ["203.0.113.0/24", "2001:db8::/32"]
      notIpBlocks: ["203.0.113.7"]
- from:
  - source:
      remoteIpBlocks: ["198.51.100.1"]
""",
    )
    cases = [
        ("203.0.113.5", False),
        ("::ffff:203.0.113.5", False),  # was allowed: a mapped address missed the block
        ("203.0.113.7", True),
        ("2001:db8::1", False),
        ("198.51.100.1", False),
        ("192.0.2.1", True),
    ]
    compiled = compile_docs(tmp_path, policy)
    assert [compiled.evaluate(Req(ip=ip).build()).allowed for ip, _ in cases] == [
        e for _, e in cases
    ]


CURL = "cluster.local/ns/default/sa/curl"


def test_peer_identity_fields_match_a_verified_spiffe_certificate(tmp_path: Path) -> None:
    deny = doc(
        "deny-peers",
        """
action: DENY
rules:
- from:
  - source: {principals: ["cluster.local/ns/evil/*"]}
  - source: {namespaces: ["blocked"]}
  - source: {serviceAccounts: ["default/banned"]}
""",
    )
    allow = doc("allow-any-peer", "rules:\n- from:\n  - source: {principals: ['*']}")
    compiled = compile_docs(tmp_path, deny, allow)

    def verdict(principal: str = "", namespace: str = "", certified: bool = False) -> bool:
        req = Req(principal=principal, namespace=namespace, certified=certified)
        return compiled.evaluate(req.build()).allowed

    assert verdict(CURL, "default")
    assert not verdict("cluster.local/ns/evil/sa/x", "evil")
    assert not verdict("cluster.local/ns/blocked/sa/x", "blocked")
    assert not verdict("cluster.local/ns/default/sa/banned", "default")
    assert verdict(certified=True)  # a certificate without a SPIFFE ID: only "*" matches it
    assert not verdict()  # no client certificate: principals ["*"] does not match


def test_service_accounts_no_longer_widen_a_rule_to_every_source(tmp_path: Path) -> None:
    # serviceAccounts used to be dropped at compile time, leaving a source with no
    # field that matched every request: this ALLOW rule allowed everyone.
    policy = doc("sa", "rules:\n- from:\n  - source: {serviceAccounts: ['default/curl']}")
    compiled = compile_docs(tmp_path, policy)
    assert not compiled.evaluate(Req().build()).allowed
    assert compiled.evaluate(Req(principal=CURL, namespace="default").build()).allowed
    other = Req(principal="cluster.local/ns/default/sa/other", namespace="default")
    assert not compiled.evaluate(other.build()).allowed


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("request.auth.principal[x]", "takes no argument in brackets"),
        ("request.headers[a][b]", "takes one name in brackets"),
        ("request.headers[a]junk", "is not a key followed by [name] arguments"),
        ("request.auth.claims", "needs a name in brackets"),
        ("destination.ip", 'unsupported condition key "destination.ip"'),
        ("request.regex.headers[x]", "unsupported condition key"),
    ],
)
def test_malformed_or_unknown_condition_keys_are_refused(
    tmp_path: Path, key: str, message: str
) -> None:
    policy = doc("bad", f"rules:\n- when:\n  - key: '{key}'\n    values: ['x']")
    with pytest.raises(ConfigErrors) as info:
        compile_docs(tmp_path, policy)
    assert message in str(info.value)


def test_destination_port_values_must_be_ports(tmp_path: Path) -> None:
    policy = doc("port", "rules:\n- when:\n  - key: destination.port\n    values: ['http']")
    with pytest.raises(ConfigErrors) as info:
        compile_docs(tmp_path, policy)
    assert 'spec.rules[0].when[0].values[0]: "http" is not a port number' in str(info.value)


# --------------------------------------------------------------------------- the stage


class _Snapshot:
    def __init__(self, security: Any) -> None:
        self.security = security


class _Stream:
    def __init__(self, head: RequestHead) -> None:
        self.head = head


def _stage_ctx(tmp_path: Path, head: RequestHead, *docs: str) -> tuple[AuthzStage, RequestContext]:
    path = tmp_path / "policies.yaml"
    path.write_text("---\n".join(docs))
    security = compile_security(load_config([str(path)]), {})
    ctx = RequestContext(_Stream(head), _Snapshot(security), 0.0, 0.0)  # type: ignore[arg-type]
    return AuthzStage(SecurityRuntime()), ctx


def _head(method: str = "GET", path: str = "/", peer: str = "10.0.0.1") -> RequestHead:
    return RequestHead(method, path, "", "api", "https", [], port=8443, peer=peer)


def test_stage_refuses_a_lower_case_method_with_400(tmp_path: Path) -> None:
    deny_delete = doc(
        "no-delete", "action: DENY\nrules:\n- to:\n  - operation: {methods: [DELETE]}"
    )
    stage, ctx = _stage_ctx(tmp_path, _head("delete"), deny_delete)
    with pytest.raises(BadRequest):
        stage.on_request(ctx)


def test_stage_refuses_percent_encoded_nul_with_400(tmp_path: Path) -> None:
    stage, ctx = _stage_ctx(tmp_path, _head(path="/a%00"), ALLOW_ALL)
    with pytest.raises(BadRequest):
        stage.on_request(ctx)


def test_stage_forwards_the_normalised_path(tmp_path: Path) -> None:
    stage, ctx = _stage_ctx(tmp_path, _head(path="/%70ublic/./x"), ALLOW_ALL)
    assert stage.on_request(ctx) is None
    assert ctx.head.path == "/public/x"


def test_stage_reads_the_principal_from_the_peer_certificate(tmp_path: Path) -> None:
    deny = doc(
        "deny-curl", f"action: DENY\nrules:\n- from:\n  - source: {{principals: ['{CURL}']}}"
    )
    head = _head()
    head.peer_identity = PeerIdentity("CN=curl", uris=(f"spiffe://{CURL}",))
    stage, ctx = _stage_ctx(tmp_path, head, deny)
    with pytest.raises(AccessDenied):
        stage.on_request(ctx)
    stage, ctx = _stage_ctx(tmp_path, _head(), deny)
    assert stage.on_request(ctx) is None  # no certificate: the DENY rule cannot match
