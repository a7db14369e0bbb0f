"""Compiled RequestAuthentication: binding, token locations, several issuers and the
deterministic merge of rules that share one, and routing on verified claims."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from jwt_fixtures import jwks_json, mint, rsa_key

from authn.jwt import TokenRejected
from authn.policy import compile_security
from authn.runtime import Authenticator, AuthnSettings, find_tokens
from gateway.config import load_config
from gateway.routing.match import match_route
from gateway.routing.table import (
    ClaimMatch,
    DirectResponse,
    Origin,
    Route,
    RouteMatch,
    StringMatcher,
    VirtualHost,
)
from gateway.server.events import RequestHead

KEY_A = rsa_key("a")
KEY_B = rsa_key("b")


def security(tmp_path: Path, rules_yaml: str, *, namespace: str = "istio-system", **extra):
    path = tmp_path / "ra.yaml"
    path.write_text(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        f"metadata: {{name: ra, namespace: {namespace}}}\nspec:\n" + rules_yaml
    )
    model = load_config([str(path)])
    return compile_security(model, {"istio": "ingressgateway"}, extra.get("gw_ns", "istio-system"))


def inline(*keys) -> str:
    return jwks_json(*keys).replace("'", "''")


def head(headers=(), query: str = "") -> RequestHead:
    return RequestHead("GET", "/", query, "api", "http", list(headers), port=8080)


def token(key, iss: str, **claims) -> str:
    now = int(time.time())
    return mint(key, {"iss": iss, "sub": "u", "iat": now, "exp": now + 600, **claims})


def authenticator(policy) -> Authenticator:
    auth = Authenticator(AuthnSettings(), registry=None)  # inline keys only: no registry
    auth.use_policy(policy)
    return auth


def test_policy_in_another_namespace_does_not_bind_to_a_root_gateway(tmp_path: Path) -> None:
    rules = f"  jwtRules: [{{issuer: x, jwks: '{inline(KEY_A)}'}}]\n"
    assert security(tmp_path, rules, namespace="shop") is None
    assert security(tmp_path, rules, namespace="shop", gw_ns="shop") is not None


def test_default_locations_are_bearer_header_and_access_token_param(tmp_path: Path) -> None:
    policy = security(tmp_path, f"  jwtRules: [{{issuer: x, jwks: '{inline(KEY_A)}'}}]\n")
    found = find_tokens(policy, head([("authorization", "bearer abc")], "access_token=def"))
    assert [(f.location.source, f.token) for f in found] == [("header", "abc"), ("param", "def")]
    assert find_tokens(policy, head([("authorization", "Basic abc")])) == []


def test_cookie_and_custom_header_locations(tmp_path: Path) -> None:
    rules = (
        f"  jwtRules: [{{issuer: x, jwks: '{inline(KEY_A)}', fromHeaders: [{{name: X-Jwt}}], "
        "fromCookies: [session]}]\n"
    )
    policy = security(tmp_path, rules)
    request = head([("x-jwt", "one"), ("cookie", "theme=dark; session=two")])
    assert [f.token for f in find_tokens(policy, request)] == ["one", "two"]


def test_several_issuers_and_issuer_patterns_share_one_key_set(tmp_path: Path) -> None:
    rules = (
        f"  jwtRules: [{{issuer: ['https://t1.example.com', 'https://*.idp.example.com'], "
        f"jwks: '{inline(KEY_A)}'}}]\n"
    )
    policy = security(tmp_path, rules)
    auth = authenticator(policy)
    loc = policy.locations[0]
    for iss in ("https://t1.example.com", "https://tenant-9.idp.example.com"):
        assert auth.verify_at(loc, token(KEY_A, iss))[0].issuer == iss
    with pytest.raises(TokenRejected) as info:
        auth.verify_at(loc, token(KEY_A, "https://evil.example.com"))
    assert info.value.reason == "issuer not configured"


def test_rules_sharing_an_issuer_accept_a_token_any_of_them_accepts(tmp_path: Path) -> None:
    rules = (
        f"  jwtRules:\n"
        f"  - {{issuer: shared, audiences: [one], jwks: '{inline(KEY_A)}'}}\n"
        f"  - {{issuer: shared, audiences: [two], jwks: '{inline(KEY_B)}'}}\n"
    )
    policy = security(tmp_path, rules)
    assert [r.origin for r in policy.jwt_rules] == [
        "RequestAuthentication istio-system/ra jwtRules[0]",
        "RequestAuthentication istio-system/ra jwtRules[1]",
    ]
    auth = authenticator(policy)
    loc = policy.locations[0]
    assert auth.verify_at(loc, token(KEY_B, "shared", aud="two"))[1] is policy.jwt_rules[1]
    assert auth.verify_at(loc, token(KEY_A, "shared", aud="one"))[1] is policy.jwt_rules[0]
    with pytest.raises(TokenRejected):
        auth.verify_at(loc, token(KEY_A, "shared", aud="two"))  # rule 0's key, rule 1's aud


def test_cached_token_is_dropped_after_its_expiry(tmp_path: Path) -> None:
    policy = security(tmp_path, f"  jwtRules: [{{issuer: x, jwks: '{inline(KEY_A)}'}}]\n")
    auth = authenticator(policy)
    loc = policy.locations[0]
    tok = token(KEY_A, "x")
    auth.verify_at(loc, tok)
    verified, _, _, _, deadline = auth.cache[tok]
    assert deadline == verified.expires_at + 60.0
    auth.cache[tok] = (*auth.cache[tok][:4], time.time() - 1)  # as if exp had passed
    auth.verify_at(loc, tok)  # re-verified rather than served from the entry
    assert auth.cache[tok][4] == deadline


def _claims_vhost() -> VirtualHost:
    origin = Origin("VirtualService", "ns", "vs")
    beta = Route(
        "beta",
        origin,
        (RouteMatch(claims=(ClaimMatch(("org", "track"), StringMatcher("exact", "beta")),)),),
        DirectResponse(200),
    )
    groups = Route(
        "admins",
        origin,
        (RouteMatch(claims=(ClaimMatch(("groups",), StringMatcher("prefix", "adm")),)),),
        DirectResponse(200),
    )
    rest = Route("rest", origin, (), DirectResponse(200))
    return VirtualHost("*:80", ("*",), (beta, groups, rest))


@pytest.mark.parametrize(
    ("claims", "route"),
    [
        ({"org": {"track": "beta"}}, "beta"),
        ({"org": {"track": "stable"}}, "rest"),
        ({"org": "beta"}, "rest"),
        ({"groups": ["dev", "admins"]}, "admins"),
        ({"groups": "admins"}, "admins"),
        ({}, "rest"),
        (None, "rest"),
    ],
)
def test_route_matches_on_verified_claims_only(claims, route: str) -> None:
    request = head([("org", "beta"), ("groups", "admins")])  # headers never count
    assert match_route(_claims_vhost(), request, claims).name == route
