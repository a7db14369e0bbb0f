"""meshgate's security policy: JWT authentication (RequestAuthentication, JWKS) and
authorization (AuthorizationPolicy), compiled per gateway and enforced as request
stages. See docs/security.md for what is supported and how it maps to Istio."""

from .authz import AuthzPolicies, AuthzPolicy, AuthzRequest, compile_authorization
from .jwks import JwksRegistry, JwksSettings
from .jwt import KeySet, TokenRejected, VerifiedToken, parse_jwks, verify_token
from .policy import ROOT_NAMESPACE, JwtRule, SecurityPolicy, compile_security
from .runtime import Authenticator, AuthnSettings, SecurityRuntime

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
