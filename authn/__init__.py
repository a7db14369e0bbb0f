"""meshgate's security policy: JWT authentication (RequestAuthentication, JWKS) and
authorization (AuthorizationPolicy), compiled per gateway and enforced as request
stages. See docs/security.md for what is supported and how it maps to Istio."""

from importlib import import_module
from typing import Any

# Each name, the submodule that defines it. Loaded on first use, so that importing
# one submodule (the CLI's ``authn.devtoken``, say) does not load pyjwt and
# cryptography with all the others.
_HOMES = {
    "AuthzPolicies": "authz",
    "AuthzPolicy": "authz",
    "AuthzRequest": "authz",
    "compile_authorization": "authz",
    "JwksRegistry": "jwks",
    "JwksSettings": "jwks",
    "KeySet": "jwt",
    "TokenRejected": "jwt",
    "VerifiedToken": "jwt",
    "parse_jwks": "jwt",
    "verify_token": "jwt",
    "ROOT_NAMESPACE": "policy",
    "JwtRule": "policy",
    "SecurityPolicy": "policy",
    "compile_security": "policy",
    "Authenticator": "runtime",
    "AuthnSettings": "runtime",
    "SecurityRuntime": "runtime",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'authn' has no attribute {name!r}")
    return getattr(import_module(f".{home}", __name__), name)


__all__ = [
    "ROOT_NAMESPACE",
    "Authenticator",
    "AuthnSettings",
    "AuthzPolicies",
    "AuthzPolicy",
    "AuthzRequest",
    "JwksRegistry",
    "JwksSettings",
    "JwtRule",
    "KeySet",
    "SecurityPolicy",
    "SecurityRuntime",
    "TokenRejected",
    "VerifiedToken",
    "compile_authorization",
    "compile_security",
    "parse_jwks",
    "verify_token",
]
