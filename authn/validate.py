"""Semantic checks for RequestAuthentication and AuthorizationPolicy.

Called by ``gateway.config.validate`` for these kinds, with its reporter (anything
with ``error(path, message)`` and ``warn(path, message)``). Errors follow what Istio's
own validation refuses; warnings say what meshgate accepts but cannot act on at an
edge gateway (a peer's mTLS identity, for instance).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Protocol

from gateway.config.durations import DurationError, parse_duration_s
from gateway.config.resources import (
    AuthorizationPolicySpec,
    JWTRule,
    PolicyTargetReference,
    RequestAuthenticationSpec,
    Resource,
)

from .authz import CONDITION_KEYS, OPERATION_FIELDS, SOURCE_FIELDS, split_condition_key
from .jwks import jwks_uri_problem
from .jwt import parse_jwks
from .policy import jwks_uri_of

__all__ = ["check_security"]

ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_IP_CONDITIONS = ("source.ip", "remote.ip")
# Every source/operation field the matcher evaluates: a field it ignored would make
# a rule match more than it says, so any other field is refused.
_EVALUATED_SOURCE = frozenset(attr for attr, _, _ in SOURCE_FIELDS)
_EVALUATED_OPERATION = frozenset(attr for attr, _, _ in OPERATION_FIELDS)
# A condition key: a name, then any number of bracketed arguments and nothing else.
_CONDITION_KEY = re.compile(r"[a-z.]+(?:\[[^\[\]]+\])*")
# The keys that take bracketed arguments, and how many (None: one or more).
_KEY_ARGS = {"request.headers": 1, "request.auth.claims": None}
# Fields that need a peer identity (mTLS), which an edge gateway's clients lack.
_PEER_FIELDS = ("principals", "namespaces", "service_accounts")


class Reporter(Protocol):
    def error(self, path: str, message: str) -> None: ...

    def warn(self, path: str, message: str) -> None: ...


def check_security(r: Reporter, resource: Resource) -> None:
    spec = resource.spec
    _check_binding(r, spec)
    if isinstance(spec, RequestAuthenticationSpec):
        _check_request_authentication(r, spec)
    elif isinstance(spec, AuthorizationPolicySpec):
        _check_authorization_policy(r, spec)


def _check_binding(r: Reporter, spec: Any) -> None:
    set_fields = [
        name
        for name, present in (
            ("selector", spec.selector is not None),
            ("targetRef", spec.target_ref is not None),
            ("targetRefs", bool(spec.target_refs)),
        )
        if present
    ]
    if len(set_fields) > 1:
        r.error(
            "spec",
            "only one of selector, targetRef or targetRefs may be set; found "
            + ", ".join(set_fields),
        )
    refs: list[tuple[str, PolicyTargetReference]] = [
        (f"spec.targetRefs[{i}]", ref) for i, ref in enumerate(spec.target_refs)
    ]
    if spec.target_ref is not None:
        refs.append(("spec.targetRef", spec.target_ref))
    for path, ref in refs:
        if ref.kind != "Gateway":
            r.warn(f"{path}.kind", f'kind "{ref.kind}" never binds to a gateway; use Gateway')


# --------------------------------------------------------------------------- RequestAuthentication


def _check_request_authentication(r: Reporter, spec: RequestAuthenticationSpec) -> None:
    for index, rule in enumerate(spec.jwt_rules):
        _check_jwt_rule(r, f"spec.jwtRules[{index}]", rule)


def _check_jwt_rule(r: Reporter, p: str, rule: JWTRule) -> None:
    issuer = rule.issuer
    if rule.jwks_uri is not None and rule.jwks_uri_snake not in (None, rule.jwks_uri):
        r.error(p, "jwksUri and jwks_uri (two spellings of one field) disagree")
    jwks_uri = jwks_uri_of(rule)
    if issuer is None:
        # Istio 1.27: a rule may leave the issuer out when it names its key set; it
        # then accepts any "iss" its keys verify.
        if jwks_uri is None:
            r.error(f"{p}.issuer", "issuer is required unless jwksUri is set")
    elif isinstance(issuer, str):
        if not issuer:
            r.error(f"{p}.issuer", "issuer must not be empty")
    elif isinstance(issuer, list):
        if not issuer or not all(isinstance(i, str) and i for i in issuer):
            r.error(f"{p}.issuer", "an issuer list must hold non-empty strings")
    else:
        r.error(f"{p}.issuer", "issuer must be a string or a list of strings")
    if jwks_uri is not None and rule.jwks is not None:
        r.error(p, "only one of jwksUri or jwks may be set")
    elif jwks_uri is None and rule.jwks is None:
        r.error(
            p,
            "jwksUri or jwks is required (meshgate does not discover keys from the issuer)",
        )
    if jwks_uri is not None:
        problem = jwks_uri_problem(jwks_uri, allow_http=True)
        if problem is not None:
            r.error(f"{p}.jwksUri", f'"{jwks_uri}" {problem}')
        elif jwks_uri_problem(jwks_uri, allow_http=False) is not None:
            r.warn(
                f"{p}.jwksUri",
                "plain HTTP to a non-loopback host is refused unless meshgate runs "
                "with --jwks-allow-http",
            )
    if rule.jwks is not None:
        try:
            keys = parse_jwks(rule.jwks)
        except ValueError as exc:
            r.error(f"{p}.jwks", str(exc))
        else:
            if not keys.keys:
                why = "; ".join(keys.skipped) or "the key set is empty"
                r.error(f"{p}.jwks", f"no usable key: {why}")
            for why in keys.skipped:
                r.warn(f"{p}.jwks", f"ignored {why}")
    for i, header in enumerate(rule.from_headers):
        if not _TOKEN.fullmatch(header.name):
            r.error(f"{p}.fromHeaders[{i}].name", f'"{header.name}" is not a valid header name')
    for i, name in enumerate(rule.from_params):
        if not name:
            r.error(f"{p}.fromParams[{i}]", "parameter name must not be empty")
    for i, name in enumerate(rule.from_cookies):
        if not name:
            r.error(f"{p}.fromCookies[{i}]", "cookie name must not be empty")
    if rule.output_payload_to_header is not None and not _TOKEN.fullmatch(
        rule.output_payload_to_header
    ):
        r.error(f"{p}.outputPayloadToHeader", "not a valid header name")
    for i, item in enumerate(rule.output_claim_to_headers):
        if not _TOKEN.fullmatch(item.header):
            r.error(f"{p}.outputClaimToHeaders[{i}].header", "not a valid header name")
        if not item.claim:
            r.error(f"{p}.outputClaimToHeaders[{i}].claim", "claim must not be empty")
    if rule.timeout is not None:
        try:
            seconds = parse_duration_s(rule.timeout)
        except DurationError as exc:
            r.error(f"{p}.timeout", str(exc))
        else:
            if seconds <= 0:
                r.error(f"{p}.timeout", "must be positive")


# --------------------------------------------------------------------------- AuthorizationPolicy


def _check_authorization_policy(r: Reporter, spec: AuthorizationPolicySpec) -> None:
    if spec.action not in ACTIONS:
        r.error(
            "spec.action", f'unknown action "{spec.action}"; valid values: {", ".join(ACTIONS)}'
        )
    if spec.action == "CUSTOM":
        if spec.provider is None or not spec.provider.name:
            r.error("spec.provider", "a CUSTOM policy needs provider.name")
    elif spec.provider is not None:
        r.error("spec.provider", "provider is only allowed with action CUSTOM")
    for i, rule in enumerate(spec.rules):
        rp = f"spec.rules[{i}]"
        for j, frm in enumerate(rule.from_):
            sp = f"{rp}.from[{j}].source"
            source = frm.source
            values = {name: getattr(source, name) for name in source.__dataclass_fields__}
            if not any(values.values()):
                r.error(sp, "source must set at least one field")
            for name, items in values.items():
                if items and name not in _EVALUATED_SOURCE:
                    # Ignoring a field would widen the rule to every source.
                    r.error(f"{sp}.{_camel(name)}", "is not supported by meshgate")
            for name, items in values.items():
                yaml = _camel(name)
                if items and name.removeprefix("not_") in _PEER_FIELDS:
                    r.warn(
                        f"{sp}.{yaml}",
                        "needs the peer's mTLS identity: it matches only a client "
                        "certificate verified by a MUTUAL TLS server",
                    )
                if name.endswith("ip_blocks"):
                    for k, block in enumerate(items):
                        if not _is_cidr(block):
                            r.error(f"{sp}.{yaml}[{k}]", f'"{block}" is not an IP or CIDR block')
        for j, to in enumerate(rule.to):
            op = f"{rp}.to[{j}].operation"
            operation = to.operation
            values = {name: getattr(operation, name) for name in operation.__dataclass_fields__}
            if not any(values.values()):
                r.error(op, "operation must set at least one field")
            for name, items in values.items():
                if items and name not in _EVALUATED_OPERATION:
                    r.error(f"{op}.{_camel(name)}", "is not supported by meshgate")
            for name in ("ports", "not_ports"):
                for k, port in enumerate(values[name]):
                    if not port.isdigit() or not 0 < int(port) < 65536:
                        r.error(f"{op}.{_camel(name)}[{k}]", f'"{port}" is not a port number')
            for name in ("paths", "not_paths"):
                for k, path in enumerate(values[name]):
                    if "{" in path:
                        r.error(f"{op}.{_camel(name)}[{k}]", "path templates are not supported")
        for j, cond in enumerate(rule.when):
            cp = f"{rp}.when[{j}]"
            kind, args = split_condition_key(cond.key)
            if kind not in CONDITION_KEYS:
                r.error(f"{cp}.key", f'unsupported condition key "{cond.key}"')
            elif kind in _KEY_ARGS and not args:
                r.error(f"{cp}.key", f'"{cond.key}" needs a name in brackets')
            elif not _CONDITION_KEY.fullmatch(cond.key):
                r.error(f"{cp}.key", f'"{cond.key}" is not a key followed by [name] arguments')
            elif kind not in _KEY_ARGS and args:
                r.error(f"{cp}.key", f'"{kind}" takes no argument in brackets')
            elif _KEY_ARGS.get(kind) == 1 and len(args) > 1:
                r.error(f"{cp}.key", f'"{kind}" takes one name in brackets')
            if kind == "destination.port":
                for name, items in (("values", cond.values), ("notValues", cond.not_values)):
                    for k, port in enumerate(items):
                        if not port.isdigit() or int(port) > 65535:
                            r.error(f"{cp}.{name}[{k}]", f'"{port}" is not a port number')
            if not cond.values and not cond.not_values:
                r.error(cp, "values or notValues is required")
            if kind in _IP_CONDITIONS:
                for name, items in (("values", cond.values), ("notValues", cond.not_values)):
                    for k, block in enumerate(items):
                        if not _is_cidr(block):
                            r.error(f"{cp}.{name}[{k}]", f'"{block}" is not an IP or CIDR block')
            if kind in ("source.principal", "source.namespace"):
                r.warn(
                    f"{cp}.key",
                    "needs the peer's mTLS identity: it matches only a client "
                    "certificate verified by a MUTUAL TLS server",
                )


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _is_cidr(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True
