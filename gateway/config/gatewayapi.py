"""Typed Kubernetes Gateway API resources (``gateway.networking.k8s.io``) and their checks.

meshgate reads GatewayClass, Gateway, HTTPRoute, GRPCRoute and ReferenceGrant as a
second way to write the same routing: ``gateway.routing.gatewayapi`` translates them
into the Snapshot the Istio resources compile to. This module owns the schema (field
for field as the upstream CRDs spell it, read by the generic ``parse.py``) and the
checks the upstream CRD schema and its validation rules make (enums, path shapes,
filters that need their matching field, durations). What a Gateway *does* with a
route -- attachment, hostnames, references -- is reported as status conditions by
``gateway.routing.gatewayapi_status``, not as errors, because a controller reports
those on the objects rather than refusing them.

Names here shadow Istio names in ``resources.py`` (``GatewaySpec``, ``HTTPRoute``);
other modules import this one as a module to keep the two apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONTROLLER_NAME",
    "GATEWAY_API_GROUP",
    "GATEWAY_API_VERSIONS",
    "AllowedRoutes",
    "BackendObjectReference",
    "BackendRef",
    "Fraction",
    "GRPCMethodMatch",
    "GRPCRouteMatch",
    "GRPCRouteRule",
    "GRPCRouteSpec",
    "GatewayClassSpec",
    "GatewaySpec",
    "GatewayTLSConfig",
    "HTTPHeader",
    "HTTPHeaderFilter",
    "HTTPHeaderMatch",
    "HTTPPathMatch",
    "HTTPPathModifier",
    "HTTPQueryParamMatch",
    "HTTPRequestMirrorFilter",
    "HTTPRequestRedirectFilter",
    "HTTPRouteFilter",
    "HTTPRouteMatch",
    "HTTPRouteRule",
    "HTTPRouteSpec",
    "HTTPRouteTimeouts",
    "HTTPURLRewriteFilter",
    "LabelSelector",
    "Listener",
    "LocalObjectReference",
    "ParentReference",
    "ReferenceGrantFrom",
    "ReferenceGrantSpec",
    "ReferenceGrantTo",
    "RouteGroupKind",
    "RouteNamespaces",
    "SecretObjectReference",
    "check_gateway_api",
    "parse_gateway_duration_s",
]

GATEWAY_API_GROUP = "gateway.networking.k8s.io"
# The controllerName a GatewayClass names to be served by meshgate.
CONTROLLER_NAME = "meshgate.io/gateway-controller"


def _yaml(name: str) -> Any:
    return {"yaml": name}


# --------------------------------------------------------------------------- references


@dataclass(frozen=True, slots=True)
class ParentReference:
    name: str
    group: str | None = None  # default gateway.networking.k8s.io
    kind: str | None = None  # default Gateway
    namespace: str | None = None  # default: the route's
    section_name: str | None = None  # a listener name
    port: int | None = None


@dataclass(frozen=True, slots=True)
class BackendObjectReference:
    name: str
    group: str | None = None  # default "" (core)
    kind: str | None = None  # default Service
    namespace: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True)
class SecretObjectReference:
    name: str
    group: str | None = None  # default "" (core)
    kind: str | None = None  # default Secret
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class LocalObjectReference:
    group: str
    kind: str
    name: str


# --------------------------------------------------------------------------- GatewayClass


@dataclass(frozen=True, slots=True)
class GatewayClassSpec:
    controller_name: str
    parameters_ref: dict[str, Any] | None = None
    description: str | None = None


# --------------------------------------------------------------------------- Gateway


@dataclass(frozen=True, slots=True)
class GatewayTLSConfig:
    mode: str | None = None  # Terminate (default) | Passthrough
    certificate_refs: list[SecretObjectReference] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    frontend_validation: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class LabelSelector:
    match_labels: dict[str, str] = field(default_factory=dict)
    match_expressions: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RouteNamespaces:
    from_: str | None = field(default=None, metadata=_yaml("from"))  # Same | All | Selector
    selector: LabelSelector | None = None


@dataclass(frozen=True, slots=True)
class RouteGroupKind:
    kind: str
    group: str | None = None


@dataclass(frozen=True, slots=True)
class AllowedRoutes:
    namespaces: RouteNamespaces | None = None
    kinds: list[RouteGroupKind] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    port: int
    protocol: str
    hostname: str | None = None
    tls: GatewayTLSConfig | None = None
    allowed_routes: AllowedRoutes | None = None


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    gateway_class_name: str
    listeners: list[Listener]
    addresses: list[dict[str, Any]] = field(default_factory=list)
    infrastructure: dict[str, Any] | None = None


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True, slots=True)
class HTTPPathMatch:
    type: str | None = None  # Exact | PathPrefix (default) | RegularExpression
    value: str | None = None  # default "/"


@dataclass(frozen=True, slots=True)
class HTTPHeaderMatch:
    name: str
    value: str
    type: str | None = None  # Exact (default) | RegularExpression


@dataclass(frozen=True, slots=True)
class HTTPQueryParamMatch:
    name: str
    value: str
    type: str | None = None  # Exact (default) | RegularExpression


@dataclass(frozen=True, slots=True)
class HTTPRouteMatch:
    path: HTTPPathMatch | None = None
    headers: list[HTTPHeaderMatch] = field(default_factory=list)
    query_params: list[HTTPQueryParamMatch] = field(default_factory=list)
    method: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPHeader:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class HTTPHeaderFilter:
    set: list[HTTPHeader] = field(default_factory=list)
    add: list[HTTPHeader] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class HTTPPathModifier:
    type: str  # ReplaceFullPath | ReplacePrefixMatch
    replace_full_path: str | None = None
    replace_prefix_match: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPRequestRedirectFilter:
    scheme: str | None = None  # http | https
    hostname: str | None = None
    path: HTTPPathModifier | None = None
    port: int | None = None
    status_code: int | None = None  # 301 | 302 (default)


@dataclass(frozen=True, slots=True)
class HTTPURLRewriteFilter:
    hostname: str | None = None
    path: HTTPPathModifier | None = None


@dataclass(frozen=True, slots=True)
class Fraction:
    numerator: int
    denominator: int = 100


@dataclass(frozen=True, slots=True)
class HTTPRequestMirrorFilter:
    backend_ref: BackendObjectReference
    percent: int | None = None
    fraction: Fraction | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteFilter:
    """One filter; ``type`` names which of the other fields carries its settings."""

    type: str
    request_header_modifier: HTTPHeaderFilter | None = None
    response_header_modifier: HTTPHeaderFilter | None = None
    request_mirror: HTTPRequestMirrorFilter | None = None
    request_redirect: HTTPRequestRedirectFilter | None = None
    url_rewrite: HTTPURLRewriteFilter | None = field(default=None, metadata=_yaml("urlRewrite"))
    extension_ref: LocalObjectReference | None = None
    cors: dict[str, Any] | None = None
    external_auth: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class BackendRef:
    """An HTTPBackendRef / GRPCBackendRef: a backend, its weight and its own filters."""

    name: str
    group: str | None = None
    kind: str | None = None
    namespace: str | None = None
    port: int | None = None
    weight: int | None = None  # default 1
    filters: list[HTTPRouteFilter] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class HTTPRouteTimeouts:
    request: str | None = None
    backend_request: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteRule:
    name: str | None = None
    matches: list[HTTPRouteMatch] = field(default_factory=list)
    filters: list[HTTPRouteFilter] = field(default_factory=list)
    backend_refs: list[BackendRef] = field(default_factory=list)
    timeouts: HTTPRouteTimeouts | None = None
    retry: dict[str, Any] | None = None
    session_persistence: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteSpec:
    parent_refs: list[ParentReference] = field(default_factory=list)
    hostnames: list[str] = field(default_factory=list)
    rules: list[HTTPRouteRule] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class GRPCMethodMatch:
    type: str | None = None  # Exact (default) | RegularExpression
    service: str | None = None
    method: str | None = None


@dataclass(frozen=True, slots=True)
class GRPCRouteMatch:
    method: GRPCMethodMatch | None = None
    headers: list[HTTPHeaderMatch] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class GRPCRouteRule:
    name: str | None = None
    matches: list[GRPCRouteMatch] = field(default_factory=list)
    filters: list[HTTPRouteFilter] = field(default_factory=list)
    backend_refs: list[BackendRef] = field(default_factory=list)
    session_persistence: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class GRPCRouteSpec:
    parent_refs: list[ParentReference] = field(default_factory=list)
    hostnames: list[str] = field(default_factory=list)
    rules: list[GRPCRouteRule] = field(default_factory=list)


# --------------------------------------------------------------------------- ReferenceGrant


@dataclass(frozen=True, slots=True)
class ReferenceGrantFrom:
    group: str
    kind: str
    namespace: str


@dataclass(frozen=True, slots=True)
class ReferenceGrantTo:
    group: str
    kind: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ReferenceGrantSpec:
    from_: list[ReferenceGrantFrom] = field(metadata=_yaml("from"))
    to: list[ReferenceGrantTo]


# Kind -> accepted apiVersions and the spec class, as resources.API_VERSIONS.
_V1 = (f"{GATEWAY_API_GROUP}/v1", f"{GATEWAY_API_GROUP}/v1beta1")
GATEWAY_API_VERSIONS: dict[str, tuple[tuple[str, ...], type]] = {
    "GatewayClass": (_V1, GatewayClassSpec),
    "Gateway": (_V1, GatewaySpec),
    "HTTPRoute": (_V1, HTTPRouteSpec),
    "GRPCRoute": ((f"{GATEWAY_API_GROUP}/v1",), GRPCRouteSpec),
    "ReferenceGrant": (
        (f"{GATEWAY_API_GROUP}/v1beta1", f"{GATEWAY_API_GROUP}/v1"),
        ReferenceGrantSpec,
    ),
}


# --------------------------------------------------------------------------- durations

# GEP-2257: one or more <integer><unit> terms, units h, m, s, ms; at most 5 terms.
_DURATION = re.compile(r"(?:\d{1,5}(?:h|m|s|ms)){1,4}")
_TERM = re.compile(r"(\d+)(ms|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_gateway_duration_s(text: str) -> float | None:
    """A Gateway API duration (``10s``, ``1m30s``, ``500ms``) in seconds; None if invalid."""
    if not _DURATION.fullmatch(text):
        return None
    return sum(int(n) * _UNIT_S[unit] for n, unit in _TERM.findall(text))


# --------------------------------------------------------------------------- checks

PATH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
VALUE_TYPES = ("Exact", "RegularExpression")
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
HTTP_FILTERS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "ExtensionRef": "extensionRef",
    "CORS": "cors",
    "ExternalAuth": "externalAuth",
}
GRPC_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "ExtensionRef")
_FILTER_FIELD_ATTR = {
    "requestHeaderModifier": "request_header_modifier",
    "responseHeaderModifier": "response_header_modifier",
    "requestMirror": "request_mirror",
    "requestRedirect": "request_redirect",
    "urlRewrite": "url_rewrite",
    "extensionRef": "extension_ref",
    "cors": "cors",
    "externalAuth": "external_auth",
}
_UNSUPPORTED_FILTERS = ("CORS", "ExternalAuth")

# The upstream CRD's hostname pattern: an optional "*." then DNS-1123 labels.
_HOSTNAME = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")
_SECTION_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_GRPC_SERVICE = re.compile(r"[^\s/]+")
_GRPC_METHOD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
# The CRD refuses these in a path value (they would be normalised away upstream).
_BAD_PATH_PARTS = ("//", "/./", "/../", "%2f", "%2F", "#")


def _bad_hostname(text: str) -> str | None:
    if len(text) > 253 or not _HOSTNAME.fullmatch(text):
        return (
            f'"{text}" is not a valid hostname (lower-case DNS labels, optionally '
            'starting with "*."; no port, no IP)'
        )
    labels = text.split(".")
    if all(label.isdigit() for label in labels if label != "*"):
        return f'"{text}" is not a valid hostname (IP addresses are not allowed)'
    return None


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as exc:
        return f'invalid regular expression "{pattern}": {exc}'
    return None


def _check_path_value(report: Any, path: str, value: str) -> None:
    if not value.startswith("/"):
        report.error(path, f'"{value}" must start with "/"')
    elif any(part in value for part in _BAD_PATH_PARTS) or value.endswith(("/..", "/.")):
        report.error(path, f'"{value}" must not contain "//", "/./", "/../", "%2f" or "#"')


def _check_headers(report: Any, path: str, ops: HTTPHeaderFilter) -> None:
    seen: set[str] = set()
    for kind in ("set", "add"):
        for i, header in enumerate(getattr(ops, kind)):
            p = f"{path}.{kind}[{i}].name"
            if not _HEADER_NAME.fullmatch(header.name):
                report.error(p, f'"{header.name}" is not a valid header name')
            elif header.name.lower() in seen:
                report.error(p, f'header "{header.name}" is named twice in set/add')
            seen.add(header.name.lower())
    for i, name in enumerate(ops.remove):
        if not _HEADER_NAME.fullmatch(name):
            report.error(f"{path}.remove[{i}]", f'"{name}" is not a valid header name')
    if not (ops.set or ops.add or ops.remove):
        report.warn(path, "sets, adds and removes nothing")


def _check_value_match(report: Any, path: str, match: Any, what: str) -> None:
    kind = match.type or "Exact"
    if kind not in VALUE_TYPES:
        report.error(f"{path}.type", f'"{kind}" is not one of {", ".join(VALUE_TYPES)}')
    elif kind == "RegularExpression":
        problem = _regex_problem(match.value)
        if problem:
            report.error(f"{path}.value", problem)
    if what == "header" and not _HEADER_NAME.fullmatch(match.name):
        report.error(f"{path}.name", f'"{match.name}" is not a valid header name')
    if what == "query" and not match.name:
        report.error(f"{path}.name", "must not be empty")


def _check_backend(report: Any, path: str, ref: Any, weight: int | None = None) -> None:
    if weight is not None and not 0 <= weight <= 1_000_000:
        report.error(f"{path}.weight", f"{weight} is out of range (0 to 1000000)")
    group = ref.group or ""
    kind = ref.kind or "Service"
    if group == "" and kind == "Service" and ref.port is None:
        report.error(f"{path}.port", "required when the backend is a Service")
    if ref.port is not None and not 1 <= ref.port <= 65535:
        report.error(f"{path}.port", f"{ref.port} is not a valid port (1 to 65535)")


def _check_modifier(report: Any, path: str, mod: HTTPPathModifier, rule_matches: list) -> None:
    if mod.type == "ReplaceFullPath":
        if mod.replace_full_path is None:
            report.error(f"{path}.replaceFullPath", "required when type is ReplaceFullPath")
        if mod.replace_prefix_match is not None:
            report.error(f"{path}.replacePrefixMatch", "only allowed with ReplacePrefixMatch")
        if mod.replace_full_path is not None:
            _check_path_value(report, f"{path}.replaceFullPath", mod.replace_full_path)
    elif mod.type == "ReplacePrefixMatch":
        if mod.replace_prefix_match is None:
            report.error(f"{path}.replacePrefixMatch", "required when type is ReplacePrefixMatch")
        if mod.replace_full_path is not None:
            report.error(f"{path}.replaceFullPath", "only allowed with ReplaceFullPath")
        if mod.replace_prefix_match:
            _check_path_value(report, f"{path}.replacePrefixMatch", mod.replace_prefix_match)
        # CRD rule: a prefix can only be replaced where the rule matched on one.
        prefixes = [
            m
            for m in rule_matches
            if m.path is None or (m.path.type or "PathPrefix") == "PathPrefix"
        ]
        if len(rule_matches) > 1 or (rule_matches and not prefixes):
            report.error(
                f"{path}.type",
                "ReplacePrefixMatch needs the rule to have exactly one PathPrefix match",
            )
    else:
        report.error(f"{path}.type", f'"{mod.type}" is not ReplaceFullPath or ReplacePrefixMatch')


def _check_filters(
    report: Any, path: str, filters: list[HTTPRouteFilter], matches: list, allowed: tuple
) -> None:
    kinds = [f.type for f in filters]
    for i, flt in enumerate(filters):
        p = f"{path}[{i}]"
        if flt.type not in allowed:
            report.error(f"{p}.type", f'"{flt.type}" is not one of {", ".join(allowed)}')
            continue
        wanted = HTTP_FILTERS[flt.type]
        for yaml_field, attr in _FILTER_FIELD_ATTR.items():
            present = getattr(flt, attr) is not None
            if yaml_field == wanted and not present:
                report.error(f"{p}.{yaml_field}", f"required when type is {flt.type}")
            elif yaml_field != wanted and present:
                report.error(f"{p}.{yaml_field}", f"not allowed when type is {flt.type}")
        if flt.type == "ExtensionRef":
            report.error(
                f"{p}.type",
                "ExtensionRef filters are not supported: meshgate has no extension filters "
                "(remove the filter, or use a RequestHeaderModifier/URLRewrite equivalent)",
            )
        elif flt.type in _UNSUPPORTED_FILTERS:
            report.error(f"{p}.type", f"{flt.type} filters are not supported by meshgate")
        elif flt.type in ("RequestHeaderModifier", "ResponseHeaderModifier"):
            ops = flt.request_header_modifier or flt.response_header_modifier
            if ops is not None:
                _check_headers(report, f"{p}.{wanted}", ops)
        elif flt.type == "RequestMirror" and flt.request_mirror is not None:
            mirror = flt.request_mirror
            mp = f"{p}.requestMirror"
            _check_backend(report, f"{mp}.backendRef", mirror.backend_ref)
            if mirror.percent is not None and mirror.fraction is not None:
                report.error(mp, "set percent or fraction, not both")
            if mirror.percent is not None and not 0 <= mirror.percent <= 100:
                report.error(f"{mp}.percent", f"{mirror.percent} is out of range (0 to 100)")
            frac = mirror.fraction
            if frac is not None and not (
                0 <= frac.numerator <= frac.denominator and frac.denominator > 0
            ):
                report.error(
                    f"{mp}.fraction", "needs 0 <= numerator <= denominator, denominator > 0"
                )
        elif flt.type == "RequestRedirect" and flt.request_redirect is not None:
            red = flt.request_redirect
            rp = f"{p}.requestRedirect"
            if red.scheme is not None and red.scheme not in ("http", "https"):
                report.error(f"{rp}.scheme", f'"{red.scheme}" is not http or https')
            if red.status_code is not None and red.status_code not in (301, 302):
                report.error(f"{rp}.statusCode", f"{red.status_code} is not 301 or 302")
            if red.port is not None and not 1 <= red.port <= 65535:
                report.error(f"{rp}.port", f"{red.port} is not a valid port (1 to 65535)")
            if red.hostname is not None and (problem := _bad_hostname(red.hostname)):
                report.error(f"{rp}.hostname", problem)
            if red.hostname is not None and red.hostname.startswith("*"):
                report.error(f"{rp}.hostname", "a redirect needs an exact hostname")
            if red.path is not None:
                _check_modifier(report, f"{rp}.path", red.path, matches)
        elif flt.type == "URLRewrite" and flt.url_rewrite is not None:
            rw = flt.url_rewrite
            rp = f"{p}.urlRewrite"
            if rw.hostname is not None and (problem := _bad_hostname(rw.hostname)):
                report.error(f"{rp}.hostname", problem)
            if rw.path is not None:
                _check_modifier(report, f"{rp}.path", rw.path, matches)
    for once in (
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "RequestRedirect",
        "URLRewrite",
    ):
        if kinds.count(once) > 1:
            report.error(path, f"{once} may appear only once in a filter list")
    if "RequestRedirect" in kinds and "URLRewrite" in kinds:
        report.error(path, "RequestRedirect and URLRewrite cannot be used together")


def _check_route_common(report: Any, spec: Any) -> None:
    for i, ref in enumerate(spec.parent_refs):
        p = f"spec.parentRefs[{i}]"
        if ref.section_name is not None and not _SECTION_NAME.fullmatch(ref.section_name):
            report.error(f"{p}.sectionName", f'"{ref.section_name}" is not a valid listener name')
        if ref.port is not None and not 1 <= ref.port <= 65535:
            report.error(f"{p}.port", f"{ref.port} is not a valid port (1 to 65535)")
    if not spec.parent_refs:
        report.warn("spec.parentRefs", "no parentRefs: the route attaches to no Gateway")
    for i, host in enumerate(spec.hostnames):
        problem = _bad_hostname(host)
        if problem:
            report.error(f"spec.hostnames[{i}]", problem)


def _check_http_route(report: Any, spec: HTTPRouteSpec) -> None:
    _check_route_common(report, spec)
    for i, rule in enumerate(spec.rules):
        p = f"spec.rules[{i}]"
        for j, match in enumerate(rule.matches):
            mp = f"{p}.matches[{j}]"
            if match.path is not None:
                kind = match.path.type or "PathPrefix"
                value = match.path.value if match.path.value is not None else "/"
                if kind not in PATH_TYPES:
                    report.error(
                        f"{mp}.path.type", f'"{kind}" is not one of {", ".join(PATH_TYPES)}'
                    )
                elif kind == "RegularExpression":
                    problem = _regex_problem(value)
                    if problem:
                        report.error(f"{mp}.path.value", problem)
                else:
                    _check_path_value(report, f"{mp}.path.value", value)
            if match.method is not None and match.method not in METHODS:
                report.error(f"{mp}.method", f'"{match.method}" is not one of {", ".join(METHODS)}')
            for k, header in enumerate(match.headers):
                _check_value_match(report, f"{mp}.headers[{k}]", header, "header")
            for k, query in enumerate(match.query_params):
                _check_value_match(report, f"{mp}.queryParams[{k}]", query, "query")
        allowed = tuple(HTTP_FILTERS)
        _check_filters(report, f"{p}.filters", rule.filters, rule.matches, allowed)
        kinds = {f.type for f in rule.filters}
        if "RequestRedirect" in kinds and rule.backend_refs:
            report.error(
                f"{p}.backendRefs", "a rule with a RequestRedirect filter takes no backendRefs"
            )
        for k, backend in enumerate(rule.backend_refs):
            bp = f"{p}.backendRefs[{k}]"
            _check_backend(report, bp, backend, backend.weight)
            nested = (
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestMirror",
                "ExtensionRef",
            )
            _check_filters(report, f"{bp}.filters", backend.filters, rule.matches, nested)
            for f, flt in enumerate(backend.filters):
                if flt.type == "RequestMirror":
                    report.warn(
                        f"{bp}.filters[{f}]",
                        "a RequestMirror on one backendRef is not applied; put it in the "
                        "rule's filters",
                    )
        _check_timeouts(report, p, rule.timeouts)
        if rule.retry is not None:
            report.warn(f"{p}.retry", "not supported by meshgate (experimental); ignored")
        if rule.session_persistence is not None:
            report.warn(f"{p}.sessionPersistence", "not supported by meshgate; ignored")


def _check_timeouts(report: Any, path: str, timeouts: HTTPRouteTimeouts | None) -> None:
    if timeouts is None:
        return
    values: dict[str, float] = {}
    for name in ("request", "backendRequest"):
        text = timeouts.request if name == "request" else timeouts.backend_request
        if text is None:
            continue
        seconds = parse_gateway_duration_s(text)
        if seconds is None:
            report.error(
                f"{path}.timeouts.{name}",
                f'"{text}" is not a Gateway API duration (e.g. 10s, 1m30s, 500ms; units h m s ms)',
            )
        else:
            values[name] = seconds
    request = values.get("request")
    backend = values.get("backendRequest")
    if request and backend is not None and (backend == 0 or backend > request):
        report.error(f"{path}.timeouts.backendRequest", "must not be longer than timeouts.request")


def _check_grpc_route(report: Any, spec: GRPCRouteSpec) -> None:
    _check_route_common(report, spec)
    for i, rule in enumerate(spec.rules):
        p = f"spec.rules[{i}]"
        for j, match in enumerate(rule.matches):
            mp = f"{p}.matches[{j}]"
            method = match.method
            if method is not None:
                kind = method.type or "Exact"
                if kind not in VALUE_TYPES:
                    report.error(
                        f"{mp}.method.type", f'"{kind}" is not one of {", ".join(VALUE_TYPES)}'
                    )
                if method.service is None and method.method is None:
                    report.error(f"{mp}.method", "set service, method or both")
                for part, pattern in (("service", _GRPC_SERVICE), ("method", _GRPC_METHOD)):
                    value = getattr(method, part)
                    if value is None:
                        continue
                    if kind == "Exact" and not pattern.fullmatch(value):
                        report.error(
                            f"{mp}.method.{part}", f'"{value}" is not a valid gRPC {part} name'
                        )
                    elif kind == "RegularExpression" and (problem := _regex_problem(value)):
                        report.error(f"{mp}.method.{part}", problem)
            for k, header in enumerate(match.headers):
                _check_value_match(report, f"{mp}.headers[{k}]", header, "header")
        _check_filters(report, f"{p}.filters", rule.filters, [], GRPC_FILTERS)
        for k, backend in enumerate(rule.backend_refs):
            bp = f"{p}.backendRefs[{k}]"
            _check_backend(report, bp, backend, backend.weight)
            _check_filters(report, f"{bp}.filters", backend.filters, [], GRPC_FILTERS)


def _check_gateway(report: Any, spec: GatewaySpec) -> None:
    if not spec.listeners:
        report.error("spec.listeners", "a Gateway needs at least one listener")
    names: dict[str, int] = {}
    for i, listener in enumerate(spec.listeners):
        p = f"spec.listeners[{i}]"
        if not _SECTION_NAME.fullmatch(listener.name):
            report.error(f"{p}.name", f'"{listener.name}" is not a valid listener name')
        elif listener.name in names:
            report.error(
                f"{p}.name",
                f'listener name "{listener.name}" is already used by '
                f"listeners[{names[listener.name]}]",
            )
        else:
            names[listener.name] = i
        if not 1 <= listener.port <= 65535:
            report.error(f"{p}.port", f"{listener.port} is not a valid port (1 to 65535)")
        if listener.hostname is not None and (problem := _bad_hostname(listener.hostname)):
            report.error(f"{p}.hostname", problem)
        protocol = listener.protocol
        if protocol in ("HTTPS", "TLS") and listener.tls is None:
            report.error(f"{p}.tls", f"required for protocol {protocol}")
        if protocol in ("HTTP", "TCP", "UDP") and listener.tls is not None:
            report.error(f"{p}.tls", f"not allowed for protocol {protocol}")
        tls = listener.tls
        if tls is not None:
            mode = tls.mode or "Terminate"
            if mode not in ("Terminate", "Passthrough"):
                report.error(f"{p}.tls.mode", f'"{mode}" is not Terminate or Passthrough')
            elif mode == "Terminate" and not tls.certificate_refs:
                report.error(
                    f"{p}.tls.certificateRefs", "at least one is required in Terminate mode"
                )
        if listener.allowed_routes is not None and listener.allowed_routes.namespaces is not None:
            source = listener.allowed_routes.namespaces.from_ or "Same"
            ap = f"{p}.allowedRoutes.namespaces.from"
            if source not in ("All", "Same", "Selector"):
                report.error(ap, f'"{source}" is not one of All, Same, Selector')
            elif source == "Selector":
                report.warn(
                    ap,
                    "Selector needs Namespace labels, which meshgate does not have outside "
                    "Kubernetes: no route namespace is selected",
                )
    if spec.addresses:
        report.warn("spec.addresses", "ignored: meshgate binds the --address it is started with")


def _check_gateway_class(report: Any, spec: GatewayClassSpec) -> None:
    if not spec.controller_name:
        report.error("spec.controllerName", "must not be empty")
    if spec.parameters_ref is not None and spec.controller_name == CONTROLLER_NAME:
        report.warn("spec.parametersRef", "meshgate takes no parameters; ignored")


def _check_reference_grant(report: Any, spec: ReferenceGrantSpec) -> None:
    if not spec.from_:
        report.error("spec.from", "at least one entry is required")
    if not spec.to:
        report.error("spec.to", "at least one entry is required")


def check_gateway_api(report: Any, spec: Any) -> bool:
    """Check a Gateway API spec through ``report`` (validate.py's ``_Report``).

    Returns False when ``spec`` is not a Gateway API kind, so the caller tries others.
    """
    if isinstance(spec, HTTPRouteSpec):
        _check_http_route(report, spec)
    elif isinstance(spec, GRPCRouteSpec):
        _check_grpc_route(report, spec)
    elif isinstance(spec, GatewaySpec):
        _check_gateway(report, spec)
    elif isinstance(spec, GatewayClassSpec):
        _check_gateway_class(report, spec)
    elif isinstance(spec, ReferenceGrantSpec):
        _check_reference_grant(report, spec)
    else:
        return False
    return True
