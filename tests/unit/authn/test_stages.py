"""The JWT stage on a request context, without sockets: what it strips, writes and
refuses (inline JWKS, so no key server is needed)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from jwt_fixtures import jwks_json, mint, rsa_key

from authn.policy import compile_security
from authn.runtime import SecurityRuntime
from authn.stages import JwtAuthnStage
from gateway.config import load_config
from gateway.errors import Unauthenticated, respond_to
from gateway.server.events import RequestHead
from gateway.stages import RequestContext

KEY = rsa_key("k")


class _Snapshot:
    def __init__(self, security) -> None:
        self.security = security


class _Stream:
    def __init__(self, head: RequestHead) -> None:
        self.head = head


def stage_and_snapshot(tmp_path: Path, rule_extra: str = "") -> tuple[JwtAuthnStage, _Snapshot]:
    jwks = jwks_json(KEY).replace("'", "''")
    (tmp_path / "ra.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {name: ra, namespace: istio-system}\nspec:\n  jwtRules:\n"
        f"  - issuer: iss\n    jwks: '{jwks}'\n" + rule_extra
    )
    policy = compile_security(load_config([str(tmp_path)]), {})
    return JwtAuthnStage(SecurityRuntime()), _Snapshot(policy)


def run(stage: JwtAuthnStage, snapshot: _Snapshot, headers, query: str = "") -> RequestContext:
    head = RequestHead("GET", "/p", query, "api", "http", list(headers), port=80)
    ctx = RequestContext(_Stream(head), snapshot, 0.0, 0.0)  # type: ignore[arg-type]
    assert stage.on_request(ctx) is None
    return ctx


def token(**claims) -> str:
    now = int(time.time())
    return mint(KEY, {"iss": "iss", "sub": "alice", "iat": now, "exp": now + 600, **claims})


def test_token_is_stripped_and_principal_set(tmp_path: Path) -> None:
    stage, snap = stage_and_snapshot(tmp_path)
    ctx = run(stage, snap, [("authorization", f"Bearer {token()}"), ("x-other", "1")])
    assert ctx.head.headers == [("x-other", "1")]
    assert ctx.auth.principal == "iss/alice"


def test_repeated_authorization_headers_are_all_stripped(tmp_path: Path) -> None:
    stage, snap = stage_and_snapshot(tmp_path)
    tok = token()
    ctx = run(stage, snap, [("authorization", f"Bearer {tok}"), ("authorization", "Basic x")])
    assert ctx.head.header("authorization") is None


def test_query_parameter_token_is_removed_from_the_query(tmp_path: Path) -> None:
    stage, snap = stage_and_snapshot(tmp_path)
    ctx = run(stage, snap, [], query=f"a=1&access_token={token()}&b=2")
    assert ctx.head.query == "a=1&b=2"
    assert ctx.auth is not None


def test_payload_and_claims_are_written_and_client_copies_dropped(tmp_path: Path) -> None:
    extra = (
        "    forwardOriginalToken: true\n"
        "    outputPayloadToHeader: x-jwt-payload\n"
        "    outputClaimToHeaders:\n"
        "    - {header: x-tenant, claim: org.tenant}\n"
        "    - {header: x-admin, claim: admin}\n"
    )
    stage, snap = stage_and_snapshot(tmp_path, extra)
    tok = token(org={"tenant": "acme"}, admin=True)
    ctx = run(
        stage,
        snap,
        [("authorization", f"Bearer {tok}"), ("x-tenant", "forged"), ("x-jwt-payload", "x")],
    )
    head = ctx.head
    assert head.header("authorization") == f"Bearer {tok}"  # forwarded as asked
    assert head.header("x-tenant") == "acme"
    assert head.header("x-admin") == "true"
    payload = head.header("x-jwt-payload")
    assert payload is not None
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert decoded["sub"] == "alice"


def test_no_token_passes_without_a_principal(tmp_path: Path) -> None:
    stage, snap = stage_and_snapshot(tmp_path)
    ctx = run(stage, snap, [("authorization", "Basic dXNlcjpwYXNz")])
    assert ctx.auth is None
    assert ctx.head.header("authorization") == "Basic dXNlcjpwYXNz"


def test_invalid_token_is_401_with_www_authenticate(tmp_path: Path) -> None:
    stage, snap = stage_and_snapshot(tmp_path)
    head_b64, payload, sig = token().split(".")
    forged = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    bad = f"{head_b64}.{payload}.{forged}"
    head = RequestHead(
        "GET", "/p", "", "api", "http", [("authorization", f"Bearer {bad}")], port=80
    )
    ctx = RequestContext(_Stream(head), snap, 0.0, 0.0)  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated) as info:
        stage.on_request(ctx)
    response, body = respond_to(info.value)
    assert response.status == 401
    assert ("www-authenticate", 'Bearer realm="http://api/p", error="invalid_token"') in (
        response.headers
    )
    assert body == b"Jwt verification fails"
    assert stage.stats.jwt[("rejected", "signature verification failed")] == 1
