"""JWT verification against tokens minted by jwcrypto: what passes and every attack."""

from __future__ import annotations

import base64
import json
import time

import pytest
from jwt_fixtures import (
    AUDIENCE,
    ISSUER,
    claims,
    ec_key,
    ed_key,
    hs256_with_public_key,
    jwks_json,
    mint,
    rsa_key,
    unsigned,
)

from authn.jwt import MAX_TOKEN_BYTES, TokenRejected, parse_jwks, verify_token

RSA = rsa_key("rsa-1")
EC = ec_key("ec-1")
EC384 = ec_key("ec-384", crv="P-384")
ED = ed_key("ed-1")
KEYS = parse_jwks(jwks_json(RSA, EC, EC384, ED))


def check(token: str, *, audiences: tuple[str, ...] = (AUDIENCE,), skew_s: float = 60.0):
    return verify_token(
        token,
        KEYS,
        issuer_ok=lambda iss: iss == ISSUER,
        audiences=audiences,
        now=time.time(),
        skew_s=skew_s,
    )


def reason(token: str, **kwargs) -> str:
    with pytest.raises(TokenRejected) as info:
        check(token, **kwargs)
    return info.value.reason


@pytest.mark.parametrize(
    ("key", "alg"),
    [
        (RSA, "RS256"),
        (RSA, "RS384"),
        (RSA, "RS512"),
        (RSA, "PS256"),
        (RSA, "PS384"),
        (RSA, "PS512"),
        (EC, "ES256"),
        (EC384, "ES384"),
        (ED, "EdDSA"),
    ],
)
def test_every_supported_algorithm_verifies(key, alg) -> None:
    verified = check(mint(key, claims(scope="read write"), alg=alg))
    assert verified.issuer == ISSUER
    assert verified.subject == "alice"
    assert verified.principal == f"{ISSUER}/alice"
    assert verified.claims["scope"] == "read write"
    assert verified.audiences == (AUDIENCE,)


def test_es512_verifies_with_a_p521_key() -> None:
    key = ec_key("ec-521", crv="P-521")
    keys = parse_jwks(jwks_json(key))
    token = mint(key, claims(), alg="ES512")
    verified = verify_token(
        token, keys, issuer_ok=lambda i: True, audiences=(), now=time.time(), skew_s=60
    )
    assert verified.subject == "alice"


def test_alg_none_is_rejected() -> None:
    assert reason(unsigned(claims())) in ("algorithm not accepted", "malformed token")


def test_hs256_signed_with_the_rsa_public_key_is_rejected() -> None:
    assert reason(hs256_with_public_key(RSA, claims())) == "algorithm not accepted"


def test_rsa_algorithm_on_an_ec_key_id_is_rejected() -> None:
    # A token claiming kid ec-1 but signed RS256: the EC key cannot verify RS256.
    token = mint(RSA, claims(), alg="RS256", kid="ec-1")
    assert reason(token) == "no key matches the token's kid and alg"


def test_expired_token_is_rejected() -> None:
    past = int(time.time()) - 3600
    assert reason(mint(RSA, claims(iat=past - 60, exp=past))) == "token expired"


def test_expired_within_clock_skew_is_accepted() -> None:
    now = int(time.time())
    assert check(mint(RSA, claims(iat=now - 100, exp=now - 30)), skew_s=60).subject == "alice"


def test_not_yet_valid_token_is_rejected() -> None:
    later = int(time.time()) + 3600
    assert reason(mint(RSA, claims(nbf=later))) == "token not yet valid"


def test_token_issued_in_the_future_is_rejected() -> None:
    later = int(time.time()) + 3600
    assert reason(mint(RSA, claims(iat=later, exp=later + 600))) == "token not yet valid"


def test_wrong_issuer_is_rejected() -> None:
    assert reason(mint(RSA, claims(iss="https://evil.example.com"))) == "issuer not accepted"


def test_wrong_audience_is_rejected() -> None:
    assert reason(mint(RSA, claims(aud="other"))) == "audience not accepted"


def test_any_listed_audience_is_accepted_and_none_configured_accepts_all() -> None:
    token = mint(RSA, claims(aud=["x", AUDIENCE]))
    assert check(token).audiences == ("x", AUDIENCE)
    assert check(mint(RSA, claims(aud="whatever")), audiences=()).subject == "alice"


def test_unknown_kid_is_rejected() -> None:
    stranger = rsa_key("nobody")
    assert reason(mint(stranger, claims())) == "no key matches the token's kid and alg"


def test_right_kid_but_other_key_fails_the_signature() -> None:
    impostor = rsa_key("rsa-1")
    assert reason(mint(impostor, claims())) == "signature verification failed"


def test_tampered_payload_is_rejected() -> None:
    token = mint(RSA, claims(sub="alice"))
    head, payload, sig = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=="))
    data["sub"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    assert reason(f"{head}.{forged}.{sig}") == "signature verification failed"


def test_oversized_token_is_rejected_before_decoding() -> None:
    token = mint(RSA, claims(pad="x" * MAX_TOKEN_BYTES))
    assert reason(token) == "token too large"


@pytest.mark.parametrize(
    "token",
    [
        "not-a-token",
        "a.b",
        "a.b.c.d.e",
        "!!!.e30.sig",
        "eyJhbGciOiJSUzI1NiJ9.e30.",
        "e30.e30.c2ln",  # header without alg
        "W10.e30.c2ln",  # header is a JSON list
        "eyJhbGciOiJSUzI1NiJ9.%%%.c2ln",
    ],
)
def test_malformed_base64_or_structure_is_rejected(token: str) -> None:
    assert reason(token) in ("malformed token", "algorithm not accepted")


def test_kid_with_path_characters_is_only_a_lookup_key() -> None:
    token = mint(RSA, claims(), kid="../../etc/passwd")
    assert reason(token) == "no key matches the token's kid and alg"


def test_jku_and_x5u_headers_are_ignored() -> None:
    token = mint(RSA, claims(), jku="https://evil.example.com/jwks", x5u="https://evil/x")
    assert check(token).subject == "alice"  # verified with the configured key only
    attacker = rsa_key("rsa-1")
    evil = mint(attacker, claims(), jku="https://evil.example.com/jwks")
    assert reason(evil) == "signature verification failed"


def test_jwks_refuses_private_and_symmetric_keys() -> None:
    doc = json.dumps(
        {
            "keys": [
                json.loads(RSA.export_private()),
                {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
                json.loads(EC.export_public()),
            ]
        }
    )
    keys = parse_jwks(doc)
    assert [k.kid for k in keys.keys] == ["ec-1"]
    assert len(keys.skipped) == 2


def test_jwk_alg_narrows_what_a_key_verifies() -> None:
    public = json.loads(RSA.export_public())
    public["alg"] = "PS256"
    keys = parse_jwks(json.dumps({"keys": [public]}))
    assert keys.keys[0].algorithms == ("PS256",)
    with pytest.raises(TokenRejected):
        verify_token(
            mint(RSA, claims()),
            keys,
            issuer_ok=lambda i: True,
            audiences=(),
            now=time.time(),
            skew_s=60,
        )
