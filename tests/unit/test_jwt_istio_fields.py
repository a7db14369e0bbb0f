"""RequestAuthentication fields of recent Istio releases, as Istio reads them: a rule
without ``issuer`` when it names its key set (1.27), the ``jwks_uri`` spelling of
``jwksUri``, and the claims split on spaces (``scope`` and ``permission``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_authz_audit import Req, allowed, doc, token

from authn.policy import compile_jwt_rule
from gateway.config import ConfigErrors, load_config

JWKS_URI = "https://keys.example.com/jwks.json"


def request_authentication(tmp_path: Path, rule: str) -> Path:
    path = tmp_path / "ra.yaml"
    path.write_text(
        "apiVersion: security.istio.io/v1\n"
        "kind: RequestAuthentication\n"
        "metadata: {name: jwt, namespace: istio-system}\n"
        "spec:\n"
        "  jwtRules:\n"
        f"  - {rule}\n"
    )
    return path


def only_rule(tmp_path: Path, rule: str):  # -> the compiled JwtRule
    model = load_config([str(request_authentication(tmp_path, rule))])
    (resource,) = model.of_kind("RequestAuthentication")
    return compile_jwt_rule(resource, 0, resource.spec.jwt_rules[0]), model


def test_a_rule_without_issuer_takes_any_issuer_its_key_set_verifies(tmp_path: Path) -> None:
    rule, model = only_rule(tmp_path, f"{{jwksUri: '{JWKS_URI}'}}")
    assert not model.warnings
    assert rule.jwks_uri == JWKS_URI
    assert rule.issuer_ok("https://tenant-a.example.com")
    assert rule.issuer_ok("anything at all")


def test_a_rule_with_an_issuer_still_checks_it(tmp_path: Path) -> None:
    rule, _ = only_rule(tmp_path, f"{{issuer: https://a.example, jwksUri: '{JWKS_URI}'}}")
    assert rule.issuer_ok("https://a.example")
    assert not rule.issuer_ok("https://b.example")


def test_without_issuer_the_key_set_must_be_a_url(tmp_path: Path) -> None:
    # Istio: "An explicit JWKS URI is required when no issuer is configured".
    path = request_authentication(tmp_path, """{jwks: '{"keys": []}'}""")
    with pytest.raises(ConfigErrors) as refused:
        load_config([str(path)])
    assert next((e.path, e.message) for e in refused.value.errors) == (
        "spec.jwtRules[0].issuer",
        "issuer is required unless jwksUri is set",
    )


def test_jwks_uri_spelling_is_the_key_set_url(tmp_path: Path) -> None:
    rule, model = only_rule(tmp_path, f"{{issuer: https://a.example, jwks_uri: '{JWKS_URI}'}}")
    assert rule.jwks_uri == JWKS_URI
    assert not model.warnings  # read, so not "not yet enforced"


def test_both_spellings_may_agree_but_not_differ(tmp_path: Path) -> None:
    rule, _ = only_rule(tmp_path, f"{{issuer: x, jwksUri: '{JWKS_URI}', jwks_uri: '{JWKS_URI}'}}")
    assert rule.jwks_uri == JWKS_URI
    path = request_authentication(
        tmp_path, f"{{issuer: x, jwksUri: '{JWKS_URI}', jwks_uri: 'https://other/jwks'}}"
    )
    with pytest.raises(ConfigErrors) as refused:
        load_config([str(path)])
    assert "disagree" in str(refused.value)


@pytest.mark.parametrize(
    ("claim", "value", "expected"),
    [
        ("scope", "read write", True),
        ("permission", "read write", True),  # Istio's second built-in one
        ("permissions", "read write", False),  # not split: one exact value
        ("permissions", "write", True),
    ],
)
def test_scope_and_permission_claims_are_split_on_spaces(
    tmp_path: Path, claim: str, value: str, expected: bool
) -> None:
    policy = doc(
        "claims",
        f"rules:\n- when:\n  - key: request.auth.claims[{claim}]\n    values: [write]",
    )
    request = Req(auth=token(**{claim: value}))
    assert allowed(tmp_path, [policy], request) is expected
