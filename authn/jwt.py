"""JWT verification: one token against one rule and one key set, with pyjwt.

This module owns the checks a token must pass before any of its claims is believed:

- the JOSE header is parsed strictly by us first (base64url without padding
  tricks, a JSON object, a bounded size) so that a malformed token never reaches
  the library;
- the algorithm is pinned to the type of the key that verifies it. An RSA key
  verifies only RS*/PS*, an EC key only the ES* of its curve, an OKP key only EdDSA.
  HMAC and ``none`` are never accepted, so a public key can never be used as an
  HMAC secret;
- ``jku``, ``x5u`` and ``x5c`` are ignored: keys come only from the configured JWKS;
- ``kid`` is only ever a dictionary key, never a path or URL;
- ``exp``, ``nbf`` and ``iat`` are checked with a clock skew (default 60 s), then
  ``iss`` against the rule's issuers and ``aud`` against its audiences.

It knows nothing of HTTP or of where keys come from (``jwks.py``) or which rule
applies (``policy.py``). Failures raise ``TokenRejected`` with a short, client-safe
reason; pyjwt's exceptions never leave this module.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# pyjwt and cryptography are imported where keys are parsed and tokens verified:
# together about 8 MB of every worker's memory, which a gateway without a
# RequestAuthentication (or one answering from its token cache) does not need.

__all__ = [
    "MAX_TOKEN_BYTES",
    "KeySet",
    "TokenRejected",
    "VerifiedToken",
    "VerifyKey",
    "algorithms_for_key",
    "b64url_decode",
    "parse_jwks",
    "read_header",
    "unverified_payload",
    "verify_token",
]

# Envoy has no separate token limit (the header limit bounds it); meshgate refuses
# anything larger before decoding it, so a huge token costs nothing.
MAX_TOKEN_BYTES = 8192
_MAX_KID_CHARS = 256

_RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGS = {"secp256r1": ("ES256",), "secp384r1": ("ES384",), "secp521r1": ("ES512",)}
_SUPPORTED = frozenset((*_RSA_ALGS, "ES256", "ES384", "ES512", "EdDSA"))


class TokenRejected(Exception):
    """The token is not acceptable. ``reason`` is safe to show the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One public key from a JWKS with the algorithms it may verify."""

    kid: str | None
    key: Any  # a cryptography public key object
    algorithms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class KeySet:
    """The usable keys of one JWKS document, indexed by ``kid``."""

    keys: tuple[VerifyKey, ...]
    by_kid: Mapping[str, tuple[VerifyKey, ...]] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()  # why some JWKS entries were not usable

    def candidates(self, kid: str | None, alg: str) -> list[VerifyKey]:
        pool = self.by_kid.get(kid, ()) if kid is not None else self.keys
        return [k for k in pool if alg in k.algorithms]


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token whose signature and time/issuer/audience checks passed."""

    issuer: str
    subject: str
    claims: Mapping[str, Any]
    audiences: tuple[str, ...]
    expires_at: float | None  # unix seconds; None when the token has no exp
    raw_payload: str  # the payload segment as received (base64url), for outputPayloadToHeader

    @property
    def principal(self) -> str:
        """Istio's request principal: ``<iss>/<sub>``."""
        return f"{self.issuer}/{self.subject}"

    @property
    def presenter(self) -> str:
        value = self.claims.get("azp")
        return value if isinstance(value, str) else ""


def b64url_decode(segment: str) -> bytes:
    """Strict base64url: the URL-safe alphabet only, padding optional but exact."""
    if not segment:
        raise TokenRejected("malformed token")
    rem = len(segment) % 4
    if rem == 1:
        raise TokenRejected("malformed token")
    padded = segment + "=" * (-len(segment) % 4) if rem else segment
    try:
        return base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise TokenRejected("malformed token") from exc


def _json_object(segment: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(segment))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TokenRejected("malformed token") from exc
    if not isinstance(value, dict):
        raise TokenRejected("malformed token")
    return value


def _split(token: str) -> list[str]:
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected("token too large")
    parts = token.split(".")
    if len(parts) != 3 or not parts[2]:
        # Five parts would be JWE; an empty signature is an unsigned token.
        raise TokenRejected("malformed token")
    return parts


def read_header(token: str) -> dict[str, Any]:
    """The JOSE header of a compact JWS, after the structural checks."""
    return _json_object(_split(token)[0])


def unverified_payload(token: str) -> dict[str, Any]:
    """The claims before verification: only ever used to pick the rule by ``iss``."""
    return _json_object(_split(token)[1])


def algorithms_for_key(key: Any, declared_alg: str | None = None) -> tuple[str, ...]:
    """The algorithms a public key may verify; a JWK's own ``alg`` narrows them."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey):
        allowed: tuple[str, ...] = _RSA_ALGS
    elif isinstance(key, ec.EllipticCurvePublicKey):
        allowed = _EC_ALGS.get(key.curve.name, ())
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        allowed = ("EdDSA",)
    else:
        allowed = ()
    if declared_alg is not None:
        allowed = tuple(a for a in allowed if a == declared_alg)
    return allowed


def parse_jwks(text: str | bytes) -> KeySet:
    """A JWKS document (or a single JWK) into a ``KeySet``.

    Private keys and symmetric keys are refused (skipped with a reason): a JWKS must
    only ever hold public keys, and an ``oct`` key would invite HMAC confusion.
    Raises ``ValueError`` when the document is not a JWKS at all.
    """
    import jwt as pyjwt

    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if isinstance(doc, dict) and "keys" not in doc and "kty" in doc:
        doc = {"keys": [doc]}
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('not a JWKS: expected an object with a "keys" list')
    keys: list[VerifyKey] = []
    skipped: list[str] = []
    for index, jwk in enumerate(doc["keys"]):
        label = f"keys[{index}]"
        if not isinstance(jwk, dict):
            skipped.append(f"{label}: not an object")
            continue
        if jwk.get("use") not in (None, "sig"):
            skipped.append(f"{label}: use is {jwk.get('use')!r}, not sig")
            continue
        kty = jwk.get("kty")
        if kty not in ("RSA", "EC", "OKP"):
            skipped.append(f"{label}: key type {kty!r} is not accepted")
            continue
        if "d" in jwk or "p" in jwk:
            skipped.append(f"{label}: a private key has no place in a JWKS")
            continue
        alg = jwk.get("alg")
        if alg is not None and alg not in _SUPPORTED:
            skipped.append(f"{label}: algorithm {alg!r} is not accepted")
            continue
        try:
            # The algorithm is given explicitly so pyjwt never guesses one for us.
            guess = alg or {"RSA": "RS256", "OKP": "EdDSA"}.get(kty) or _ec_alg(jwk)
            key = pyjwt.PyJWK(jwk, algorithm=guess).key
        except (pyjwt.PyJWKError, pyjwt.InvalidKeyError, ValueError, TypeError, KeyError) as e:
            skipped.append(f"{label}: {e}")
            continue
        algorithms = algorithms_for_key(key, alg)
        if not algorithms:
            skipped.append(f"{label}: no accepted algorithm for this key")
            continue
        kid = jwk.get("kid")
        keys.append(VerifyKey(kid if isinstance(kid, str) else None, key, algorithms))
    by_kid: dict[str, list[VerifyKey]] = {}
    for k in keys:
        if k.kid is not None:
            by_kid.setdefault(k.kid, []).append(k)
    return KeySet(tuple(keys), {kid: tuple(v) for kid, v in by_kid.items()}, tuple(skipped))


def _ec_alg(jwk: Mapping[str, Any]) -> str:
    return {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}.get(jwk.get("crv", ""), "ES256")


def _string_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return ()


def verify_token(
    token: str,
    keys: KeySet | None,
    *,
    issuer_ok: Any,
    audiences: Sequence[str],
    now: float,
    skew_s: float,
) -> VerifiedToken:
    """Verify ``token`` with ``keys``; raise ``TokenRejected`` with the reason.

    ``issuer_ok(iss) -> bool`` decides the issuer (exact names or patterns, see
    ``policy.JwtRule``). ``audiences`` empty means any audience (Envoy's behaviour
    when a provider lists none).
    """
    import jwt as pyjwt

    parts = _split(token)
    header = _json_object(parts[0])
    # The payload and signature are decoded strictly here too: pyjwt's decoder is
    # more lenient than a gateway should be with what it lets through.
    _json_object(parts[1])
    b64url_decode(parts[2])
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in _SUPPORTED:
        # Covers "none", every HS*, and anything unknown.
        raise TokenRejected("algorithm not accepted")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > _MAX_KID_CHARS):
        raise TokenRejected("malformed token")
    if header.get("crit"):
        raise TokenRejected("unsupported critical header")
    if keys is None:
        raise TokenRejected("signing keys are not available")
    candidates = keys.candidates(kid, alg)
    if not candidates:
        raise TokenRejected("no key matches the token's kid and alg")
    claims: dict[str, Any] | None = None
    last: Exception | None = None
    for candidate in candidates:
        try:
            claims = pyjwt.decode(
                token,
                key=candidate.key,
                algorithms=[alg],
                leeway=skew_s,
                options={
                    "verify_signature": True,
                    "verify_exp": True,
                    "verify_nbf": True,
                    "verify_iat": True,
                    "verify_aud": False,  # checked below, with Istio's any-of rule
                    "verify_iss": False,  # checked below, with patterns
                    "require": [],
                },
            )
            break
        except pyjwt.InvalidSignatureError as exc:
            last = exc
            continue
        except pyjwt.ExpiredSignatureError as exc:
            raise TokenRejected("token expired") from exc
        except pyjwt.ImmatureSignatureError as exc:
            raise TokenRejected("token not yet valid") from exc
        except pyjwt.InvalidTokenError as exc:
            raise TokenRejected("token verification failed") from exc
    if claims is None:
        raise TokenRejected("signature verification failed") from last
    # pyjwt treats a future iat as "not yet valid" only in some versions; the rule
    # here is explicit: issued more than the skew in the future is refused.
    iat = claims.get("iat")
    if isinstance(iat, int | float) and iat > now + skew_s:
        raise TokenRejected("token not yet valid")
    iss = claims.get("iss")
    if not isinstance(iss, str) or not issuer_ok(iss):
        raise TokenRejected("issuer not accepted")
    token_audiences = _string_list(claims.get("aud"))
    if audiences and not any(a in audiences for a in token_audiences):
        raise TokenRejected("audience not accepted")
    sub = claims.get("sub")
    exp = claims.get("exp")
    return VerifiedToken(
        issuer=iss,
        subject=sub if isinstance(sub, str) else "",
        claims=claims,
        audiences=token_audiences,
        expires_at=float(exp) if isinstance(exp, int | float) else None,
        raw_payload=token.split(".")[1],
    )
