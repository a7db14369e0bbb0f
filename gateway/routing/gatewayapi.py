"""Gateway API routes compiled onto the same Snapshot as the Istio resources.

There is one routing engine. This module turns the ``Binding`` that
``gateway.config.gatewayapi_status`` computed (which route attaches to which
listener under which hostnames, which references resolve) into the compiled
pieces ``compile.py`` assembles: per port, virtual hosts holding ordered ``Route``s,
and the TLS servers of HTTPS listeners. Where Gateway API semantics differ from a
VirtualService's, the compiled route says so, rather than the data plane asking:

- routes are sorted across every route attached to a hostname by the spec's
  precedence (``_precedence``), not kept in declaration order;
- PathPrefix is a ``path_prefix`` matcher (whole segments, trailing "/" ignored),
  and ReplacePrefixMatch rewrites segment-wise without producing "//";
- query-parameter names compare case-sensitively, header names case-insensitively;
- a backend that cannot be used (missing Service, unsupported kind, reference not
  permitted), a rule without backends and all-zero weights send their share of
  requests to an ``INVALID_BACKEND_PREFIX`` destination, which the data plane answers
  with 500;
- a redirect without a port keeps the listener's port, or the scheme's well-known
  port when it changes the scheme, and a well-known port is left out of Location.

No I/O here; cluster names come from the caller's resolver, so Gateway API backends
share clusters (and DestinationRules) with VirtualService destinations.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import gatewayapi as gw
from ..config.gatewayapi_status import Attachment, Backend, Binding, route_age_key
from ..config.resources import Resource
from ..policy import Mirror, RouteTraffic
from .table import (
    INVALID_BACKEND_PREFIX,
    NO_HEADER_OPS,
    Forward,
    HeaderMatch,
    HeaderOps,
    Origin,
    QueryMatch,
    Redirect,
    Rewrite,
    Route,
    RouteMatch,
    StringMatcher,
    TLSServer,
    WeightedCluster,
)

__all__ = ["GatewayAPIPort", "compile_gateway_api"]

# (host, port, grpc) -> cluster name, made by compile.py's resolver.
ClusterResolver = Callable[[str, int, bool], str]

_PATH_RANK = {"Exact": 0, "RegularExpression": 1, "PathPrefix": 2}


@dataclass(slots=True)
class GatewayAPIPort:
    """What the Gateway API listeners of one port compile to."""

    port: int
    protocol: str  # HTTP | HTTPS
    routes_by_domain: dict[str, list[Route]] = field(default_factory=dict)
    domains: list[str] = field(default_factory=list)  # listener hostnames without routes too
    tls_servers: list[TLSServer] = field(default_factory=list)
    origins: list[Origin] = field(default_factory=list)


def _origin(resource: Resource, path: str, index: int | None = None) -> Origin:
    return Origin(
        kind=resource.kind,
        namespace=resource.metadata.namespace,
        name=resource.metadata.name,
        source=resource.where(path),
        index=index,
    )


def _value_matcher(kind: str | None, value: str) -> StringMatcher:
    if (kind or "Exact") == "RegularExpression":
        return StringMatcher("regex", value, False, re.compile(value))
    return StringMatcher("exact", value)


def _header_ops(spec: gw.HTTPHeaderFilter | None) -> HeaderOps:
    if spec is None:
        return NO_HEADER_OPS
    ops = HeaderOps(
        set=tuple((h.name.lower(), h.value) for h in spec.set),
        add=tuple((h.name.lower(), h.value) for h in spec.add),
        remove=tuple(name.lower() for name in spec.remove),
    )
    return NO_HEADER_OPS if ops.empty else ops


def _first_by_name(items: list[Any], fold: bool) -> list[Any]:
    """The spec: when several entries name the same header (case-insensitively) or
    query parameter (exactly), only the first is considered."""
    seen: set[str] = set()
    out = []
    for item in items:
        key = item.name.lower() if fold else item.name
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


@dataclass(frozen=True, slots=True)
class _Entry:
    """One (rule, match) of a route on one hostname, with its precedence key."""

    key: tuple[Any, ...]
    route: Route


class _Translator:
    def __init__(self, binding: Binding, cluster_for: ClusterResolver) -> None:
        self.binding = binding
        self.cluster_for = cluster_for
        self.ports: dict[int, GatewayAPIPort] = {}

    def run(self) -> dict[int, GatewayAPIPort]:
        for g in self.binding.gateways:
            for lb in g.listeners:
                if not lb.usable:
                    continue
                port = self.ports.get(lb.spec.port)
                if port is None:
                    port = self.ports[lb.spec.port] = GatewayAPIPort(lb.spec.port, lb.spec.protocol)
                elif port.protocol != lb.spec.protocol:
                    continue  # another Gateway took the port with the other protocol
                port.origins.append(_origin(g.resource, lb.path, lb.index))
                host = (lb.spec.hostname or "*").lower()
                if host not in port.domains:
                    port.domains.append(host)
                if lb.spec.protocol == "HTTPS":
                    port.tls_servers.append(
                        TLSServer(
                            hosts=(host,),
                            mode="SIMPLE",
                            origin=_origin(g.resource, lb.path, lb.index),
                            credential_name=lb.certificates[0],
                        )
                    )
        entries: dict[tuple[int, str], list[_Entry]] = {}
        done: set[tuple[int, int, str]] = set()
        for rb in self.binding.routes:
            for att in rb.attachments:
                port = self.ports.get(att.listener.spec.port)
                if port is None or port.protocol != att.listener.spec.protocol:
                    continue
                compiled: list[tuple[tuple[Any, ...], Route]] | None = None
                for domain in att.domains:
                    key = (id(att.route), port.port, domain)
                    if key in done:
                        continue  # attached through two listeners of one port
                    done.add(key)
                    if compiled is None:
                        compiled = self._routes(att, rb.backends, port.port)
                    bucket = entries.setdefault((port.port, domain), [])
                    bucket.extend(_Entry(k, r) for k, r in compiled)
        for (port_number, domain), bucket in entries.items():
            bucket.sort(key=lambda e: e.key)
            self.ports[port_number].routes_by_domain[domain] = [e.route for e in bucket]
        return self.ports

    # ----------------------------------------------------------------- routes

    def _routes(
        self, att: Attachment, backends: dict[tuple[Any, ...], Backend], port: int
    ) -> list[tuple[tuple[Any, ...], Route]]:
        res = att.route
        position = self.binding.positions[id(res)]
        age = route_age_key(res, position)
        out: list[tuple[tuple[Any, ...], Route]] = []
        grpc = res.kind == "GRPCRoute"
        # The CRD's default for an HTTPRoute without rules is one rule matching every
        # request, with no backends: everything it attaches to answers 500.
        rules = res.spec.rules or ([] if grpc else [gw.HTTPRouteRule()])
        for r, rule in enumerate(rules):
            matches: list[Any] = list(rule.matches) or [None]
            for m, match in enumerate(matches):
                if grpc:
                    compiled, rank = _grpc_match(match)
                    prefix = ""
                else:
                    compiled, rank, prefix = _http_match(match)
                key = (*rank, age, res.metadata.namespace, res.metadata.name, r, m)
                path = f"spec.rules[{r}].matches[{m}]" if match is not None else f"spec.rules[{r}]"
                route = self._route(res, rule, r, m, path, compiled, prefix, backends, port, grpc)
                out.append((key, route))
        return out

    def _route(
        self,
        res: Resource,
        rule: Any,
        r: int,
        m: int,
        path: str,
        match: RouteMatch,
        prefix: str,
        backends: dict[tuple[Any, ...], Backend],
        port: int,
        grpc: bool,
    ) -> Route:
        request_headers = response_headers = NO_HEADER_OPS
        rewrite: Rewrite | None = None
        redirect: Redirect | None = None
        mirrors: list[Mirror] = []
        shown: list[dict[str, Any]] = []  # the mirrors as the dump shows them
        for f, flt in enumerate(rule.filters):
            if flt.type == "RequestHeaderModifier":
                request_headers = _header_ops(flt.request_header_modifier)
            elif flt.type == "ResponseHeaderModifier":
                response_headers = _header_ops(flt.response_header_modifier)
            elif flt.type == "RequestMirror" and flt.request_mirror is not None:
                backend = backends.get(("mirror", r, f))
                mirror = self._mirror(flt.request_mirror, backend, grpc)
                if mirror is not None:
                    mirrors.append(mirror)
                    shown.append({"cluster": mirror.cluster, "fraction": mirror.fraction})
            elif flt.type == "URLRewrite" and flt.url_rewrite is not None:
                rewrite = _rewrite(flt.url_rewrite)
            elif flt.type == "RequestRedirect" and flt.request_redirect is not None:
                redirect = _redirect(flt.request_redirect, prefix)
        action: Forward | Redirect
        action = redirect if redirect is not None else self._forward(res, rule, r, backends, grpc)
        ns, name = res.metadata.namespace, res.metadata.name
        return Route(
            name=rule.name or f"{ns}.{name}.{r}.{m}",
            origin=_origin(res, path, r),
            matches=(match,),
            action=action,
            rewrite=rewrite if redirect is None else None,
            request_headers=request_headers,
            response_headers=response_headers,
            traffic=RouteTraffic(mirrors=tuple(mirrors)) if mirrors else None,
            extra={"mirrors": shown} if shown else {},
        )

    def _mirror(
        self, spec: gw.HTTPRequestMirrorFilter, backend: Backend | None, grpc: bool
    ) -> Mirror | None:
        if backend is None or backend.problem is not None:
            return None  # reported in status; a mirror that cannot be used is skipped
        fraction = 1.0
        if spec.percent is not None:
            fraction = spec.percent / 100.0
        elif spec.fraction is not None and spec.fraction.denominator:
            fraction = spec.fraction.numerator / spec.fraction.denominator
        if fraction <= 0.0:
            return None
        return Mirror(self.cluster_for(backend.host, backend.port, grpc), fraction)

    def _forward(
        self,
        res: Resource,
        rule: Any,
        r: int,
        backends: dict[tuple[Any, ...], Backend],
        grpc: bool,
    ) -> Forward:
        where = f"{res.metadata.namespace}/{res.metadata.name}/rules[{r}]"
        destinations: list[WeightedCluster] = []
        for b, ref in enumerate(rule.backend_refs):
            weight = 1 if ref.weight is None else ref.weight
            if weight <= 0:
                continue  # "traffic MUST NOT be forwarded there"
            backend = backends[(r, b)]
            req_ops = resp_ops = NO_HEADER_OPS
            for flt in ref.filters:
                if flt.type == "RequestHeaderModifier":
                    req_ops = _header_ops(flt.request_header_modifier)
                elif flt.type == "ResponseHeaderModifier":
                    resp_ops = _header_ops(flt.response_header_modifier)
            if backend.problem is not None:
                cluster = f"{INVALID_BACKEND_PREFIX}{backend.problem.reason}|{where}"
            else:
                cluster = self.cluster_for(backend.host, backend.port, grpc)
            destinations.append(WeightedCluster(cluster, weight, req_ops, resp_ops))
        if not destinations:
            # No backendRefs, or all weights 0: every request matching the rule gets 500.
            reason = "NoBackends" if not rule.backend_refs else "ZeroWeights"
            destinations.append(WeightedCluster(f"{INVALID_BACKEND_PREFIX}{reason}|{where}", 1))
        cumulative = []
        total = 0
        for d in destinations:
            total += d.weight
            cumulative.append(total)
        return Forward(
            destinations=tuple(destinations),
            total_weight=total,
            cumulative=tuple(cumulative),
            timeout_s=_timeout_s(getattr(rule, "timeouts", None)),
        )


def _timeout_s(timeouts: gw.HTTPRouteTimeouts | None) -> float | None:
    """The request timeout, or the backend one when shorter (no retries: one attempt)."""
    if timeouts is None:
        return None
    values = []
    for text in (timeouts.request, timeouts.backend_request):
        if text is not None:
            seconds = gw.parse_gateway_duration_s(text)
            if seconds:  # "0s": no timeout
                values.append(seconds)
    return min(values) if values else None


def _http_match(match: gw.HTTPRouteMatch | None) -> tuple[RouteMatch, tuple[Any, ...], str]:
    """The compiled match, its precedence rank and the prefix a ReplacePrefixMatch uses.

    Precedence, as the HTTPRoute spec orders matches across every rule of every route
    on a hostname: "Exact" path match; "Prefix" path match with the largest number of
    characters; method match; largest number of header matches; largest number of
    query param matches. The spec does not place RegularExpression; meshgate puts it
    between Exact and PathPrefix, longer patterns first, as Envoy Gateway does.
    """
    kind, value = "PathPrefix", "/"
    headers: list[gw.HTTPHeaderMatch] = []
    queries: list[gw.HTTPQueryParamMatch] = []
    method = None
    if match is not None:
        if match.path is not None:
            kind = match.path.type or "PathPrefix"
            value = match.path.value if match.path.value is not None else "/"
        headers = _first_by_name(match.headers, fold=True)
        queries = _first_by_name(match.query_params, fold=False)
        method = match.method
    prefix = ""
    if kind == "Exact":
        uri = StringMatcher("exact", value)
        length = len(value)
    elif kind == "RegularExpression":
        uri = StringMatcher("regex", value, False, re.compile(value))
        length = len(value)
    else:
        prefix = value.rstrip("/")
        uri = StringMatcher("path_prefix", prefix)
        length = len(prefix)
    compiled = RouteMatch(
        uri=uri,
        method=StringMatcher("exact", method) if method else None,
        headers=tuple(
            HeaderMatch(h.name.lower(), _value_matcher(h.type, h.value))
            for h in sorted(headers, key=lambda h: h.name.lower())
        ),
        query_params=tuple(
            QueryMatch(q.name, _value_matcher(q.type, q.value))
            for q in sorted(queries, key=lambda q: q.name)
        ),
    )
    rank = (_PATH_RANK[kind], -length, 0 if method else 1, -len(headers), -len(queries))
    return compiled, rank, prefix


_GRPC_NAME = "[^/]+"


def _grpc_match(match: gw.GRPCRouteMatch | None) -> tuple[RouteMatch, tuple[Any, ...]]:
    """A gRPC method match as a path match on ``/<service>/<method>``, and its rank.

    The GRPCRoute spec ranks matches by the characters of the matching service, then
    of the method, then the number of header matches. Those keys are placed where an
    HTTPRoute match keeps its path length, after RegularExpression's rank: on a
    hostname shared with HTTPRoutes, gRPC matches sit among the regular expressions.
    """
    headers = _first_by_name(match.headers, fold=True) if match is not None else []
    method = match.method if match is not None else None
    service_name = method.service if method is not None else None
    method_name = method.method if method is not None else None
    exact = method is None or (method.type or "Exact") == "Exact"
    if method is None:
        uri = StringMatcher("path_prefix", "")
    elif exact and service_name and method_name:
        uri = StringMatcher("exact", f"/{service_name}/{method_name}")
    elif exact and service_name:
        uri = StringMatcher("path_prefix", f"/{service_name}")
    else:
        if exact:
            service = re.escape(service_name) if service_name else _GRPC_NAME
            name = re.escape(method_name) if method_name else _GRPC_NAME
        else:
            service = service_name or _GRPC_NAME
            name = method_name or _GRPC_NAME
        pattern = f"/{service}/{name}"
        uri = StringMatcher("regex", pattern, False, re.compile(pattern))
    compiled = RouteMatch(
        uri=uri,
        headers=tuple(
            HeaderMatch(h.name.lower(), _value_matcher(h.type, h.value))
            for h in sorted(headers, key=lambda h: h.name.lower())
        ),
    )
    rank = (
        _PATH_RANK["RegularExpression"],
        -len(service_name or ""),
        -len(method_name or ""),
        -len(headers),
        0,
    )
    return compiled, rank


def _rewrite(spec: gw.HTTPURLRewriteFilter) -> Rewrite | None:
    full_path = None
    uri = None
    if spec.path is not None:
        if spec.path.type == "ReplaceFullPath":
            full_path = spec.path.replace_full_path
        else:
            uri = spec.path.replace_prefix_match or ""
    if spec.hostname is None and full_path is None and uri is None:
        return None
    return Rewrite(uri=uri, authority=spec.hostname, full_path=full_path)


def _redirect(spec: gw.HTTPRequestRedirectFilter, prefix: str) -> Redirect:
    """The spec's port rules: an explicit port wins; otherwise a new scheme brings its
    well-known port and no scheme keeps the listener's port (``FROM_REQUEST_PORT``
    is the port the request arrived on); 80 for http and 443 for https are left out
    of Location by ``redirect_location``."""
    uri = None
    replace_prefix = None
    if spec.path is not None:
        if spec.path.type == "ReplaceFullPath":
            uri = spec.path.replace_full_path
        else:
            replace_prefix = spec.path.replace_prefix_match or ""
    derive = None
    if spec.port is None:
        derive = "FROM_PROTOCOL_DEFAULT" if spec.scheme else "FROM_REQUEST_PORT"
    return Redirect(
        code=spec.status_code or 302,
        uri=uri,
        authority=spec.hostname,
        scheme=spec.scheme,
        port=spec.port,
        derive_port=derive,
        replace_prefix=replace_prefix,
        prefix=prefix,
    )


def compile_gateway_api(
    binding: Binding, cluster_for: ClusterResolver
) -> dict[int, GatewayAPIPort]:
    """The Gateway API listeners of ``binding``, by port, ready to merge into a Snapshot."""
    return _Translator(binding, cluster_for).run()
