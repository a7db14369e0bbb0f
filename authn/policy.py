"""Compiled, immutable security policy for one gateway: which RequestAuthentication
and AuthorizationPolicy resources bind to it, turned into ``JwtRule`` and
``AuthzPolicy`` objects the request stages read.

Binding follows Istio. The gateway runs in a namespace (``meshgate run
--namespace``, default ``istio-system``, Istio's root namespace) and carries labels:

- no ``selector`` and no ``targetRef(s)``: the policy applies when it lives in the
  root namespace (mesh-wide) or in the gateway's namespace;
- ``selector.matchLabels``: as above, and the labels must be a subset of the
  gateway's;
- ``targetRef``/``targetRefs``: a reference of kind ``Gateway`` applies when a
  Gateway of that name in the policy's namespace selects this gateway.

All of it is decided here, once per configuration, so a request never asks "does
this policy apply to me?": a gateway with no bound policy gets ``None`` and its
stages return at once.

Several rules naming the same issuer are kept, in a fixed order (policy namespace,
policy name, rule index); a token is accepted when any of them accepts it. This is
the deterministic merge documented in docs/security.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.config.durations import DurationError, parse_duration_s
from gateway.config.errors import Model
from gateway.config.resources import (
    JWTRule,
    PolicyTargetReference,
    RequestAuthenticationSpec,
    Resource,
    WorkloadSelector,
)

from .authz import AuthzPolicies, compile_authorization

__all__ = [
    "DEFAULT_JWKS_TIMEOUT_S",
    "ROOT_NAMESPACE",
    "JwtRule",
    "SecurityPolicy",
    "TokenLocation",
    "binds_to_gateway",
    "compile_security",
    "issuer_pattern",
    "jwks_uri_of",
]

ROOT_NAMESPACE = "istio-system"
DEFAULT_JWKS_TIMEOUT_S = 5.0  # Istio's default for jwksUri fetches


@dataclass(frozen=True, slots=True)
class TokenLocation:
    """Where a token may be: ``header`` (with a prefix), ``param`` or ``cookie``."""

    source: str
    name: str  # header names lower-case
    prefix: str = ""

    def describe(self) -> str:
        if self.source == "header":
            return f"header {self.name}" + (f" ({self.prefix.strip()})" if self.prefix else "")
        return f"{self.source} {self.name}"


# Istio/Envoy: with neither fromHeaders nor fromParams, a token is looked for in
# "Authorization: Bearer <token>" and in the access_token query parameter.
DEFAULT_LOCATIONS = (
    TokenLocation("header", "authorization", "Bearer "),
    TokenLocation("param", "access_token"),
)


def issuer_pattern(issuers: Sequence[str]) -> re.Pattern[str] | None:
    """One regex for the ``*`` patterns among ``issuers`` (``*`` spans any text)."""
    globs = [i for i in issuers if "*" in i]
    if not globs:
        return None
    alternatives = (
        "".join(".*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", glob))
        for glob in globs
    )
    return re.compile("|".join(f"(?:{alt})" for alt in alternatives))


@dataclass(frozen=True, slots=True)
class JwtRule:
    """One ``jwtRules[]`` entry, compiled."""

    origin: str  # "RequestAuthentication ns/name jwtRules[0]"
    issuers: frozenset[str]  # exact issuers
    audiences: tuple[str, ...]
    locations: tuple[TokenLocation, ...]
    jwks_uri: str | None = None
    jwks_inline: str | None = None
    output_payload_to_header: str | None = None
    claim_to_headers: tuple[tuple[str, str], ...] = ()  # (header, claim path)
    forward_original_token: bool = False
    timeout_s: float = DEFAULT_JWKS_TIMEOUT_S
    issuer_globs: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = field(default=None, compare=False)

    def issuer_ok(self, iss: str) -> bool:
        if iss in self.issuers:
            return True
        return self.pattern is not None and self.pattern.fullmatch(iss) is not None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "origin": self.origin,
            "issuers": sorted(self.issuers) + list(self.issuer_globs),
            "locations": [loc.describe() for loc in self.locations],
        }
        if self.audiences:
            data["audiences"] = list(self.audiences)
        if self.jwks_uri:
            data["jwksUri"] = self.jwks_uri
        if self.jwks_inline:
            data["jwks"] = "inline"
        if self.output_payload_to_header:
            data["outputPayloadToHeader"] = self.output_payload_to_header
        if self.claim_to_headers:
            data["outputClaimToHeaders"] = [f"{c} -> {h}" for h, c in self.claim_to_headers]
        if self.forward_original_token:
            data["forwardOriginalToken"] = True
        data["timeoutS"] = self.timeout_s
        return data


@dataclass(frozen=True, slots=True)
class SecurityPolicy:
    """Everything security-related that binds to this gateway, ready per request."""

    jwt_rules: tuple[JwtRule, ...] = ()
    # Every distinct token location of every rule, in rule order: the JWT stage looks
    # in each once per request.
    locations: tuple[TokenLocation, ...] = ()
    # Headers the JWT stage writes (outputPayloadToHeader, outputClaimToHeaders): a
    # client-sent header of the same name is removed first so it cannot be spoofed.
    output_headers: frozenset[str] = frozenset()
    authz: AuthzPolicies | None = None
    # The common case, precomputed: one header location (and perhaps query
    # parameters, which a request without a query string cannot use). The JWT stage
    # then scans the header list once instead of the general extraction.
    single_header: TokenLocation | None = None
    param_locations: bool = False

    @property
    def jwks_uris(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for rule in self.jwt_rules:
            if rule.jwks_uri:
                seen.setdefault(rule.jwks_uri, None)
        return tuple(seen)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.jwt_rules:
            data["jwtRules"] = [rule.to_dict() for rule in self.jwt_rules]
        if self.authz is not None:
            data["authorization"] = self.authz.to_dict()
        return data


# --------------------------------------------------------------------------- binding


def _labels_match(selector: WorkloadSelector | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return True
    return all(labels.get(k) == v for k, v in selector.match_labels.items())


def _gateways_selecting(
    model: Model, labels: Mapping[str, str], gateway_classes: Sequence[str] = ("meshgate",)
) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for resource in model.of_kind("Gateway"):
        selector = getattr(resource.spec, "selector", None) or {}
        if all(labels.get(k) == v for k, v in selector.items()):
            found.add((resource.metadata.namespace, resource.metadata.name))
    # A Gateway API Gateway this process serves is a target too, as Istio binds a
    # targetRef to the Kubernetes Gateway it names.
    for resource in model.gateway_api("Gateway"):
        if resource.spec.gateway_class_name in gateway_classes:
            found.add((resource.metadata.namespace, resource.metadata.name))
    return found


def binds_to_gateway(
    resource: Resource,
    labels: Mapping[str, str],
    namespace: str,
    gateways: set[tuple[str, str]],
) -> bool:
    """Whether a RequestAuthentication/AuthorizationPolicy applies to this gateway."""
    spec = resource.spec
    ns = resource.metadata.namespace
    refs: list[PolicyTargetReference] = list(spec.target_refs)
    if spec.target_ref is not None:
        refs.append(spec.target_ref)
    if refs:
        return any(
            ref.kind == "Gateway" and (ref.namespace or ns, ref.name) in gateways for ref in refs
        )
    if ns not in (ROOT_NAMESPACE, namespace):
        return False
    return _labels_match(spec.selector, labels)


# --------------------------------------------------------------------------- compile


def _timeout_s(text: str | None) -> float:
    if text is None:
        return DEFAULT_JWKS_TIMEOUT_S
    try:
        return parse_duration_s(text) or DEFAULT_JWKS_TIMEOUT_S
    except DurationError:
        return DEFAULT_JWKS_TIMEOUT_S


def _locations(rule: JWTRule) -> tuple[TokenLocation, ...]:
    if not rule.from_headers and not rule.from_params and not rule.from_cookies:
        return DEFAULT_LOCATIONS
    out = [TokenLocation("header", h.name.lower(), h.prefix or "") for h in rule.from_headers]
    out.extend(TokenLocation("param", p) for p in rule.from_params)
    out.extend(TokenLocation("cookie", c) for c in rule.from_cookies)
    return tuple(out)


def jwks_uri_of(rule: JWTRule) -> str | None:
    """The rule's key set URL, under either spelling Istio's schema takes."""
    return rule.jwks_uri if rule.jwks_uri is not None else rule.jwks_uri_snake


def compile_jwt_rule(resource: Resource, index: int, rule: JWTRule) -> JwtRule:
    if rule.issuer is None:
        # No issuer (Istio 1.27, with jwksUri): any "iss" the key set verifies.
        issuers = ["*"]
    else:
        issuers = [rule.issuer] if isinstance(rule.issuer, str) else list(rule.issuer)
    exact = frozenset(i for i in issuers if "*" not in i)
    globs = tuple(i for i in issuers if "*" in i)
    meta = resource.metadata
    return JwtRule(
        origin=f"{resource.kind} {meta.namespace}/{meta.name} jwtRules[{index}]",
        issuers=exact,
        audiences=tuple(rule.audiences),
        locations=_locations(rule),
        jwks_uri=jwks_uri_of(rule),
        jwks_inline=rule.jwks,
        output_payload_to_header=rule.output_payload_to_header.lower()
        if rule.output_payload_to_header
        else None,
        claim_to_headers=tuple((c.header.lower(), c.claim) for c in rule.output_claim_to_headers),
        forward_original_token=rule.forward_original_token,
        timeout_s=_timeout_s(rule.timeout),
        issuer_globs=globs,
        pattern=issuer_pattern(globs),
    )


def compile_security(
    model: Model,
    labels: Mapping[str, str],
    namespace: str = ROOT_NAMESPACE,
    gateway_classes: Sequence[str] = ("meshgate",),
) -> SecurityPolicy | None:
    """The policy bound to a gateway with ``labels`` in ``namespace`` (serving the
    Gateway API ``gateway_classes``); None if none."""
    gateways = _gateways_selecting(model, labels, gateway_classes)

    def bound(kind: str) -> list[Resource]:
        found = [r for r in model.of_kind(kind) if binds_to_gateway(r, labels, namespace, gateways)]
        # Deterministic whatever the file order: namespace, then name.
        return sorted(found, key=lambda r: (r.metadata.namespace, r.metadata.name))

    rules: list[JwtRule] = []
    for resource in bound("RequestAuthentication"):
        spec: RequestAuthenticationSpec = resource.spec
        rules.extend(compile_jwt_rule(resource, i, rule) for i, rule in enumerate(spec.jwt_rules))
    authz = compile_authorization(bound("AuthorizationPolicy"))
    if not rules and authz is None:
        return None
    locations: dict[TokenLocation, None] = {}
    outputs: set[str] = set()
    for rule in rules:
        for loc in rule.locations:
            locations.setdefault(loc, None)
        if rule.output_payload_to_header:
            outputs.add(rule.output_payload_to_header)
        outputs.update(h for h, _ in rule.claim_to_headers)
    ordered = tuple(locations)
    header_locs = [loc for loc in ordered if loc.source == "header"]
    has_cookies = any(loc.source == "cookie" for loc in ordered)
    single = header_locs[0] if len(header_locs) == 1 and not has_cookies else None
    has_params = any(loc.source == "param" for loc in ordered)
    return SecurityPolicy(tuple(rules), ordered, frozenset(outputs), authz, single, has_params)
