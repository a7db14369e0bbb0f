"""``meshgate token``: mint test JWTs with a local private key. DEVELOPMENT ONLY.

    meshgate token --new-key DIR            write DIR/dev-key.pem and DIR/jwks.json
    meshgate token --key DIR/dev-key.pem --issuer ISS [--sub S] [--aud A]
                   [--scope "read write"] [--claim k=v ...] [--ttl-s N] [--kid K]

This exists so examples and local experiments can show 200/401/403 with curl. It
signs whatever it is told to, with a key that sits in a file: never use it, or its
keys, for anything real. Every run says so on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

__all__ = ["add_arguments", "mint", "new_key", "run_token_command"]

WARNING = (
    "meshgate token: DEVELOPMENT ONLY - this token is signed with a local test key; "
    "never trust such keys in production"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--new-key", metavar="DIR", help="generate a key pair and JWKS in DIR")
    parser.add_argument("--alg", default="RS256", choices=("RS256", "ES256", "EdDSA"))
    parser.add_argument("--key", metavar="PEM", help="private key to sign with")
    parser.add_argument("--kid", help="key id (default: from jwks.json beside the key)")
    parser.add_argument("--issuer", help="iss claim")
    parser.add_argument("--sub", default="dev-user", help="sub claim (dev-user)")
    parser.add_argument("--aud", action="append", default=[], help="aud claim (repeatable)")
    parser.add_argument("--scope", help='scope claim, e.g. "read write"')
    parser.add_argument(
        "--claim", action="append", default=[], metavar="K=V", help="extra claim (repeatable)"
    )
    parser.add_argument("--ttl-s", type=int, default=3600, help="lifetime in seconds (3600)")


def new_key(directory: str, alg: str = "RS256", kid: str = "dev-1") -> tuple[str, str]:
    """Write ``dev-key.pem`` (private) and ``jwks.json`` (public) into ``directory``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

    private: Any
    if alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    else:
        private = ed25519.Ed25519PrivateKey.generate()
        jwk = json.loads(OKPAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    os.makedirs(directory, exist_ok=True)
    key_path = os.path.join(directory, "dev-key.pem")
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with open(key_path, "wb") as f:
        f.write(pem)
    jwks_path = os.path.join(directory, "jwks.json")
    with open(jwks_path, "w", encoding="utf-8") as f:
        json.dump({"keys": [jwk]}, f, indent=2)
        f.write("\n")
    return key_path, jwks_path


def _alg_for(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES256"
    return "EdDSA"


def mint(
    key_pem: bytes,
    claims: dict[str, Any],
    *,
    kid: str | None = None,
    ttl_s: int = 3600,
    now: float | None = None,
) -> str:
    import jwt
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(key_pem, password=None)
    issued = int(now if now is not None else time.time())
    payload = {"iat": issued, "exp": issued + ttl_s, **claims}
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, key, algorithm=_alg_for(key), headers=headers)  # type: ignore[arg-type]


def _value(text: str) -> Any:
    """``--claim`` values: JSON when they parse (numbers, lists, objects), else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run_token_command(args: argparse.Namespace) -> int:
    print(WARNING, file=sys.stderr)
    if args.new_key:
        key_path, jwks_path = new_key(args.new_key, args.alg)
        print(f"wrote {key_path} (private, keep out of version control) and {jwks_path}")
        return 0
    if not args.key or not args.issuer:
        print("meshgate token: --key and --issuer are required to mint", file=sys.stderr)
        return 2
    with open(args.key, "rb") as f:
        pem = f.read()
    kid = args.kid
    if kid is None:
        jwks_path = os.path.join(os.path.dirname(args.key), "jwks.json")
        if os.path.exists(jwks_path):
            with open(jwks_path, encoding="utf-8") as f:
                keys = json.load(f).get("keys", [])
            if keys:
                kid = keys[0].get("kid")
    claims: dict[str, Any] = {"iss": args.issuer, "sub": args.sub}
    if args.aud:
        claims["aud"] = args.aud[0] if len(args.aud) == 1 else args.aud
    if args.scope:
        claims["scope"] = args.scope
    for item in args.claim:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"meshgate token: --claim {item!r} is not K=V", file=sys.stderr)
            return 2
        claims[name] = _value(value)
    print(mint(pem, claims, kid=kid, ttl_s=args.ttl_s))
    return 0
