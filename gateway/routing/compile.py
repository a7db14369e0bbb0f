"""Compile a validated Model into the immutable Snapshot the data plane reads.

This module owns the translation of Istio's networking resources (Gateway,
VirtualService, DestinationRule, ServiceEntry) into listeners, virtual hosts, ordered
routes and clusters, following what Istio generates for a gateway proxy. Everything
that can be decided before a request arrives is decided here: which Gateways apply
to this workload, which match entries survive the compile-time filters
(``sourceLabels``, ``gateways``, ``port``), the order of merged VirtualServices, the
cluster each destination names, regexes compiled, header names lower-cased.

Gateway API resources are translated by ``gatewayapi.py`` and merged here, port by
port, into the same listeners; their backends resolve to the same clusters.

It leaves validation to ``gateway.config`` (the Model is assumed valid, but a
dangling reference never crashes: it compiles to something the data plane answers
with a clean error), request matching to ``match.py`` and serialisation to
``dump.py``. No I/O happens here.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import gc
import re
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

from ..config import hosts as hostrules
from ..config.errors import Model
from ..config.gatewayapi_status import bind_gateway_api
from ..config.resources import (
    CorsPolicy as CorsSpec,
)
from ..config.resources import (
    DestinationRuleSpec,
    GatewayServer,
    GatewaySpec,
    HeaderOperations,
    Headers,
    HTTPMatchRequest,
    HTTPRoute,
    Resource,
    ServiceEntryPort,
    ServiceEntrySpec,
    StringMatch,
    TrafficPolicy,
    VirtualServiceSpec,
    yaml_name,
)
from ..policy import compile_cluster_traffic, compile_route_traffic
from .dump import snapshot_content_hash
from .gatewayapi import GatewayAPIPort, compile_gateway_api
from .table import (
    NO_HEADER_OPS,
    ClaimMatch,
    Cluster,
    CorsPolicy,
    DirectResponse,
    Endpoint,
    Forward,
    HeaderMatch,
    HeaderOps,
    Listener,
    Origin,
    QueryMatch,
    Redirect,
    Rewrite,
    Route,
    RouteMatch,
    Snapshot,
    SNIRoute,
    StringMatcher,
    TLSServer,
    VirtualHost,
    WeightedCluster,
)

__all__ = ["ClusterCompiler", "compile_snapshot", "parse_duration_s"]

# Server protocols whose traffic is HTTP once any TLS is terminated. A TLS/TCP
# server (or an HTTPS one in passthrough) is routed by SNI/TCP rules, not http[].
_HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTPS"})
_PASSTHROUGH_MODES = frozenset({"PASSTHROUGH", "AUTO_PASSTHROUGH"})
# Server protocols whose ``tls`` block configures termination or passthrough (on
# HTTP ports it only carries httpsRedirect).
_TLS_PROTOCOLS = frozenset({"HTTPS", "TLS"})

_CLAIM_KEY = "@request.auth.claims."

# Istio: "The keys uri, scheme, method, and authority will be ignored" in headers.
_IGNORED_HEADER_KEYS = frozenset({"uri", "scheme", "method", "authority"})

# The traffic-policy fields a subset overrides one by one (Istio's MergeTrafficPolicy),
# and the subset of them a port-level setting replaces wholesale.
_POLICY_FIELDS = (
    "load_balancer",
    "connection_pool",
    "outlier_detection",
    "tls",
    "tunnel",
    "proxy_protocol",
)
_PORT_POLICY_FIELDS = ("load_balancer", "connection_pool", "outlier_detection", "tls")

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNIT_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def compile_snapshot(
    model: Model,
    gateway_labels: Mapping[str, str],
    *,
    namespace: str = "istio-system",
    gateway_classes: Sequence[str] = ("meshgate",),
) -> Snapshot:
    """Build the Snapshot for a gateway workload carrying ``gateway_labels``.

    Only Gateways whose ``selector`` is a subset of the labels apply (an empty
    selector applies to every gateway, as in Istio); Gateway API Gateways apply when
    their ``gatewayClassName`` is one of ``gateway_classes``. The result is deterministic:
    the same model and labels give an equal Snapshot with the same ``version``.
    ``namespace`` is where the gateway runs; it decides which RequestAuthentication
    and AuthorizationPolicy resources bind to it (``authn.policy``).
    """
    # Compiling allocates hundreds of thousands of long-lived, acyclic objects for a
    # large config; the cyclic collector would rescan the growing heap again and
    # again (it made 10 000 VirtualServices take ~3x longer), so it is paused here.
    collecting = gc.isenabled()
    gc.disable()
    try:
        snapshot = _Compiler(model, dict(gateway_labels), tuple(gateway_classes)).build()
        if model.of_kind("RequestAuthentication") or model.of_kind("AuthorizationPolicy"):
            from authn.policy import compile_security

            security = compile_security(model, gateway_labels, namespace, gateway_classes)
            snapshot = dataclasses.replace(snapshot, security=security)
        if model.of_kind("RateLimitPolicy"):
            from ratelimit.policy import attach_rate_limits

            snapshot = attach_rate_limits(
                snapshot, model.of_kind("RateLimitPolicy"), gateway_labels
            )
        return dataclasses.replace(snapshot, version=snapshot_content_hash(snapshot))
    finally:
        if collecting:
            gc.enable()


class ClusterCompiler:
    """Clusters compiled on demand, exactly as ``compile_snapshot`` compiles them.

    For a data plane that learns a host only when a request names it (the egress
    gateway's wildcard ServiceEntry hosts and ``ALLOW_ANY`` destinations): the
    DestinationRule lookup and policy merge and the ServiceEntry endpoints are this
    module's, so nothing outside it repeats them. Building one indexes the model once.
    """

    def __init__(self, model: Model) -> None:
        self._compiler = _Compiler(model, {})

    def cluster(self, host: str, port: int, service_entry: Resource | None) -> Cluster:
        """The cluster ``outbound|<port>||<host>`` with ``service_entry``'s endpoints
        for that port (none without one) and the DestinationRule that covers ``host``."""
        name = f"outbound|{port}||{host}"
        return self._compiler._cluster(name, host, port, "", service_entry)


def parse_duration_s(text: str | None) -> float | None:
    """A Go/protobuf duration (``"1.5s"``, ``"1m30s"``, ``"250ms"``) in seconds.

    None for None or an unparseable value (the validator reports those).
    """
    if text is None:
        return None
    text = text.strip()
    pos = 0
    total = 0.0
    while pos < len(text):
        part = _DURATION_PART.match(text, pos)
        if part is None:
            return None
        total += float(part.group(1)) * _DURATION_UNIT_S[part.group(2)]
        pos = part.end()
    return total if pos else None


# --------------------------------------------------------------------------- helpers


def _origin(resource: Resource, index: int | None = None, path: str = "") -> Origin:
    source = resource.where(path) if path else resource.source
    return Origin(
        kind=resource.kind,
        namespace=resource.metadata.namespace,
        name=resource.metadata.name,
        source=source,
        index=index,
    )


def _is_subset(wanted: Mapping[str, str], have: Mapping[str, str]) -> bool:
    return all(have.get(key) == value for key, value in wanted.items())


def plain(value: Any) -> Any:
    """A resource dataclass as plain dicts/lists in YAML spelling, unset fields left out.

    Used for everything the Snapshot keeps "as written" (traffic policies, retries,
    faults), so the dump reads like the user's YAML.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None or (isinstance(item, list | dict) and not item):
                continue
            out[f.metadata.get("yaml", yaml_name(f.name))] = plain(item)
        return out
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _string_matcher(match: StringMatch | None, ignore_case: bool = False) -> StringMatcher | None:
    """Compile a StringMatch; None when it sets nothing (``{}``)."""
    if match is None:
        return None
    if match.exact is not None:
        value = match.exact.lower() if ignore_case else match.exact
        return StringMatcher("exact", value, ignore_case)
    if match.prefix is not None:
        value = match.prefix.lower() if ignore_case else match.prefix
        return StringMatcher("prefix", value, ignore_case)
    if match.regex is not None:
        # Istio: ignoreUriCase applies "only in the case of exact and prefix URI
        # matches"; a regex is matched as written.
        return StringMatcher("regex", match.regex, False, re.compile(match.regex))
    return None


def _presence_only(match: StringMatch | None) -> bool:
    """Istio turns ``{}`` and ``prefix: ""`` on a header into a presence check."""
    if match is None:
        return True
    if match.exact is None and match.prefix is None and match.regex is None:
        return True
    return match.prefix == "" and match.exact is None and match.regex is None


def _header_ops(ops: HeaderOperations | None) -> HeaderOps:
    if ops is None:
        return NO_HEADER_OPS
    result = HeaderOps(
        set=tuple(sorted((name.lower(), value) for name, value in ops.set.items())),
        add=tuple(sorted((name.lower(), value) for name, value in ops.add.items())),
        remove=tuple(name.lower() for name in ops.remove),
    )
    return NO_HEADER_OPS if result.empty else result


def _split_headers(headers: Headers | None) -> tuple[HeaderOps, HeaderOps]:
    if headers is None:
        return NO_HEADER_OPS, NO_HEADER_OPS
    return _header_ops(headers.request), _header_ops(headers.response)


def _cors(spec: CorsSpec | None) -> CorsPolicy | None:
    if spec is None:
        return None
    origins = [m for m in (_string_matcher(o) for o in spec.allow_origins) if m is not None]
    for origin in spec.allow_origin:
        # The deprecated list holds exact origins; "*" there meant "any origin".
        if origin == "*":
            origins.append(StringMatcher("prefix", ""))
        else:
            origins.append(StringMatcher("exact", origin))
    max_age = parse_duration_s(spec.max_age)
    return CorsPolicy(
        allow_origins=tuple(origins),
        allow_methods=",".join(spec.allow_methods),
        allow_headers=",".join(spec.allow_headers),
        expose_headers=",".join(spec.expose_headers),
        max_age="" if max_age is None else str(int(max_age)),
        allow_credentials=bool(spec.allow_credentials),
        forward_unmatched_preflights=(spec.unmatched_preflights or "FORWARD").upper() != "IGNORE",
    )


def _is_catch_all(route: Route) -> bool:
    """Istio's notion of a catch-all route: prefix "/" (or no match) and nothing else.

    Method, scheme and authority count as header conditions, as they do once Istio
    has turned them into Envoy ``:method``/``:scheme``/``:authority`` matchers.
    """
    if not route.matches:
        return True
    for m in route.matches:
        if m.uri is not None and not (m.uri.kind == "prefix" and m.uri.value == "/"):
            continue
        if m.headers or m.without_headers or m.query_params or m.claims:
            continue
        if m.method is not None or m.scheme is not None or m.authority is not None:
            continue
        return True
    return False


def _merge_routes(parts: list[list[Route]]) -> tuple[Route, ...]:
    """Concatenate the routes of several VirtualServices for one host.

    As Istio's CombineVHostRoutes does, catch-all routes move to the end (keeping
    their relative order) so that one VirtualService's "everything else" does not
    shadow the specific routes of the VirtualServices merged after it.
    """
    if len(parts) == 1:
        return tuple(parts[0])
    specific: list[Route] = []
    catch_all: list[Route] = []
    for routes in parts:
        for route in routes:
            (catch_all if _is_catch_all(route) else specific).append(route)
    return tuple(specific + catch_all)


# --------------------------------------------------------------------------- compiler


class _Compiler:
    """One compile pass; holds the indexes built from the model."""

    def __init__(
        self, model: Model, gateway_labels: dict[str, str], gateway_classes: tuple[str, ...] = ()
    ) -> None:
        self.model = model
        self.gateway_classes = gateway_classes
        self.labels = gateway_labels
        self.gateways = [
            r for r in model.of_kind("Gateway") if _is_subset(_gw_spec(r).selector, gateway_labels)
        ]
        self.virtual_services = list(model.of_kind("VirtualService"))
        self.services: dict[str, Resource] = {}
        for se in model.of_kind("ServiceEntry"):
            spec: ServiceEntrySpec = se.spec
            for host in spec.hosts:
                # The first ServiceEntry (load order) to declare a host owns it.
                self.services.setdefault(hostrules.expand_host(host, se.metadata.namespace), se)
        self.rules_exact: dict[str, Resource] = {}
        self.rules_wild: list[tuple[str, Resource]] = []
        for dr in model.of_kind("DestinationRule"):
            host = hostrules.expand_host(dr.spec.host, dr.metadata.namespace)
            if host.startswith("*"):
                self.rules_wild.append((host, dr))
            else:
                self.rules_exact.setdefault(host, dr)
        # Most specific wildcard first; ties keep load order (sort is stable).
        self.rules_wild.sort(key=lambda item: -len(item[0]))
        self.clusters: dict[str, Cluster] = {}
        self._route_cache: dict[tuple[int, str, str, int], list[Route]] = {}

    # ----------------------------------------------------------------- listeners

    def build(self) -> Snapshot:
        by_port: dict[int, list[tuple[Resource, int, GatewayServer]]] = {}
        for gw in self.gateways:
            for index, server in enumerate(_gw_spec(gw).servers):
                by_port.setdefault(server.port.number, []).append((gw, index, server))
        listeners = {port: self._listener(port, by_port[port]) for port in sorted(by_port)}
        if self.model.gateway_api("Gateway"):
            binding = bind_gateway_api(self.model, self.gateway_classes)
            for port, part in compile_gateway_api(binding, self._gateway_api_cluster).items():
                listeners[port] = _merge_gateway_api(listeners.get(port), part)
            listeners = dict(sorted(listeners.items()))
        # Clusters are made while compiling actions, before compile-time filters and
        # https redirects may drop the route: keep only those a route still names.
        used: set[str] = set()
        for listener in listeners.values():
            vhosts = [*listener.virtual_hosts.values(), *listener.wildcard_hosts.values()]
            if listener.catch_all is not None:
                vhosts.append(listener.catch_all)
            for vhost in vhosts:
                for route in vhost.routes:
                    if isinstance(route.action, Forward):
                        used.update(d.cluster for d in route.action.destinations)
                    if route.traffic is not None:
                        used.update(m.cluster for m in route.traffic.mirrors)
        for listener in listeners.values():
            for sni_route in listener.sni_routes:
                used.update(d.cluster for d in sni_route.destinations)
        # A Gateway API backend that cannot be used names no cluster (answered 500).
        clusters = {name: self.clusters[name] for name in sorted(used) if name in self.clusters}
        return Snapshot(
            version="",
            listeners=listeners,
            clusters=clusters,
            gateway_labels=dict(sorted(self.labels.items())),
        )

    def _listener(self, port: int, servers: list[tuple[Resource, int, GatewayServer]]) -> Listener:
        routes_by_domain: dict[str, list[list[Route]]] = {}
        merged: set[tuple[str, int]] = set()
        redirect_domains: dict[str, Origin] = {}
        for gw, index, server in servers:
            if not _serves_http(server):
                continue
            gw_ns = gw.metadata.namespace
            bound = [vs for vs in self.virtual_services if self._binds(vs, gw)]
            server_domains: list[str] = []
            for entry in server.hosts:
                ns_filter, server_host = hostrules.split_server_host(entry, gw_ns)
                found = False
                for vs in bound:
                    if ns_filter not in ("*", vs.metadata.namespace):
                        continue
                    for vs_host in _vs_spec(vs).hosts:
                        host = hostrules.expand_host(vs_host, vs.metadata.namespace)
                        domain = hostrules.hosts_intersection(server_host, host)
                        if domain is None:
                            continue
                        found = True
                        server_domains.append(domain)
                        key = (domain, id(vs))
                        if key in merged:
                            continue
                        merged.add(key)
                        routes = self._vs_routes(vs, gw, port)
                        routes_by_domain.setdefault(domain, []).append(routes)
                if not found:
                    server_domains.append(server_host)
            if server.tls is not None and server.tls.https_redirect:
                # Envoy's require_tls: every request on this host gets a 301 to https,
                # whatever the routes say; with no VirtualService the host still exists.
                where = _origin(gw, index, f"spec.servers[{index}]")
                for domain in server_domains:
                    redirect_domains.setdefault(domain, where)

        vhosts: dict[str, VirtualHost] = {}
        for domain, parts in routes_by_domain.items():
            routes = _merge_routes(parts)
            if routes:
                # The host's key is copied right before its VirtualHost and plan are
                # built (plan.py copies the plan's strings the same way), so what one
                # lookup reads was allocated together, on one or two memory pages,
                # instead of wherever the configuration's strings landed.
                key = (domain + "_")[:-1]
                vhosts[key] = VirtualHost(f"{domain}:{port}", (domain,), routes)
        for domain, origin in redirect_domains.items():
            redirect = Route(
                name="https-redirect",
                origin=origin,
                matches=(),
                action=Redirect(code=301, scheme="https"),
            )
            vhosts[domain] = VirtualHost(f"{domain}:{port}", (domain,), (redirect,))

        exact: dict[str, VirtualHost] = {}
        wildcard: dict[str, VirtualHost] = {}
        catch_all: VirtualHost | None = None
        for domain in sorted(vhosts):
            if domain == "*":
                catch_all = vhosts[domain]
            elif domain.startswith("*."):
                wildcard[domain[1:]] = vhosts[domain]
            else:
                exact[domain] = vhosts[domain]
        first = servers[0][2]
        tls_servers = tuple(
            _tls_server(gw, index, server)
            for gw, index, server in servers
            if server.tls is not None and server.port.protocol.upper() in _TLS_PROTOCOLS
        )
        return Listener(
            name=f"0.0.0.0_{port}",
            port=port,
            protocol=first.port.protocol.upper(),
            virtual_hosts=exact,
            wildcard_hosts=wildcard,
            catch_all=catch_all,
            origins=tuple(_origin(gw, index, f"spec.servers[{index}]") for gw, index, _ in servers),
            tls_servers=tls_servers,
            sni_routes=self._sni_routes(port, servers),
        )

    def _sni_routes(
        self, port: int, servers: list[tuple[Resource, int, GatewayServer]]
    ) -> tuple[SNIRoute, ...]:
        """VirtualService ``tls[]`` routes for the PASSTHROUGH servers of a port.

        As Istio does for a gateway, each match entry becomes one SNI filter chain for
        the names where its ``sniHosts`` and the server's hosts intersect; the first
        route (Gateway order, then VirtualService load order) to claim a name wins."""
        out: list[SNIRoute] = []
        for gw, _, server in servers:
            if server.tls is None or server.tls.mode.upper() != "PASSTHROUGH":
                continue
            server_hosts = [
                hostrules.split_server_host(entry, gw.metadata.namespace) for entry in server.hosts
            ]
            for vs in self.virtual_services:
                if not self._binds(vs, gw):
                    continue
                vs_ns = vs.metadata.namespace
                spec = _vs_spec(vs)
                for index, tls_route in enumerate(spec.tls):
                    if not tls_route.route:
                        continue
                    for entry in tls_route.match:
                        if entry.port is not None and entry.port != port:
                            continue
                        if entry.gateways and not any(
                            hostrules.gateway_ref(ref, vs_ns)
                            == (gw.metadata.namespace, gw.metadata.name)
                            for ref in entry.gateways
                        ):
                            continue
                        names: list[str] = []
                        for sni in entry.sni_hosts:
                            sni_host = hostrules.expand_host(sni, vs_ns)
                            for ns_filter, host in server_hosts:
                                if ns_filter not in ("*", vs_ns):
                                    continue
                                common = hostrules.hosts_intersection(host, sni_host)
                                if common is not None and common not in names:
                                    names.append(common)
                        if names:
                            out.append(self._sni_route(vs, index, names, tls_route.route, port))
        return tuple(out)

    def _sni_route(
        self, vs: Resource, index: int, names: list[str], route: list[Any], port: int
    ) -> SNIRoute:
        weights = [d.weight for d in route]
        if len(weights) == 1 and weights[0] is None:
            weights = [100]
        resolved = [w or 0 for w in weights]
        if sum(resolved) == 0:
            resolved = [1] * len(resolved)
        destinations = []
        cumulative = []
        total = 0
        for dest, weight in zip(route, resolved, strict=True):
            cluster = self._cluster_for(dest.destination, vs.metadata.namespace, port)
            destinations.append(WeightedCluster(cluster=cluster, weight=weight))
            total += weight
            cumulative.append(total)
        path = f"spec.tls[{index}]"
        return SNIRoute(
            name=f"{vs.metadata.namespace}/{vs.metadata.name}/tls[{index}]",
            origin=_origin(vs, index, path),
            sni_hosts=tuple(names),
            destinations=tuple(destinations),
            total_weight=total,
            cumulative=tuple(cumulative),
        )

    def _binds(self, vs: Resource, gw: Resource) -> bool:
        """Does the VirtualService's top-level ``gateways`` name this Gateway?

        No ``gateways`` means ``mesh`` only: such a VirtualService never reaches a gateway.
        """
        wanted = (gw.metadata.namespace, gw.metadata.name)
        ns = vs.metadata.namespace
        return any(hostrules.gateway_ref(ref, ns) == wanted for ref in _vs_spec(vs).gateways)

    # ----------------------------------------------------------------- routes

    def _vs_routes(self, vs: Resource, gw: Resource, port: int) -> list[Route]:
        key = (id(vs), gw.metadata.namespace, gw.metadata.name, port)
        cached = self._route_cache.get(key)
        if cached is None:
            cached = self._compile_vs_routes(vs, gw, port)
            self._route_cache[key] = cached
        return cached

    def _compile_vs_routes(self, vs: Resource, gw: Resource, port: int) -> list[Route]:
        out: list[Route] = []
        ns = vs.metadata.namespace
        for index, http in enumerate(_vs_spec(vs).http):
            path = f"spec.http[{index}]"
            action = self._action(http, ns, port)
            if action is None:
                # delegate (not supported yet) or nothing to do: no route, as if absent.
                continue
            origin = _origin(vs, index, path)
            request_headers, response_headers = _split_headers(http.headers)
            extra = _extra(http)
            common: dict[str, Any] = {
                "origin": origin,
                "action": action,
                "rewrite": _rewrite(http),
                "request_headers": request_headers,
                "response_headers": response_headers,
                "cors": _cors(http.cors_policy),
                "extra": extra,
                "traffic": compile_route_traffic(
                    extra, lambda dest: self._mirror_cluster(dest, ns, port)
                ),
            }
            # Istio emits one Envoy route per match entry (the entries are OR-ed); we do
            # the same so a rewrite knows which entry matched and the dump has one row each.
            if not http.match:
                candidates: list[RouteMatch | None] = [None]
            else:
                candidates = []
                for entry in http.match:
                    compiled = self._match(entry, gw, port, ns)
                    if compiled is not None:
                        candidates.append(compiled)
            catch_all = False
            for compiled in candidates:
                name = _route_name(http, compiled)
                route = Route(
                    name=name,
                    matches=() if compiled is None else (compiled,),
                    **common,
                )
                out.append(route)
                if _is_catch_all(route):
                    catch_all = True
                    break
            if catch_all:
                # Istio stops here: nothing after a catch-all in one VirtualService is
                # reachable, and dropping it keeps merging (catch-alls last) faithful.
                break
        return out

    def _match(
        self, entry: HTTPMatchRequest, gw: Resource, port: int, vs_namespace: str
    ) -> RouteMatch | None:
        """Compile one match entry, or None when it cannot apply at this gateway/port."""
        if entry.source_labels and not _is_subset(entry.source_labels, self.labels):
            return None
        if entry.source_namespace is not None:
            # A gateway run by meshgate has no namespace of its own to compare with.
            return None
        if entry.gateways:
            wanted = (gw.metadata.namespace, gw.metadata.name)
            refs = {hostrules.gateway_ref(ref, vs_namespace) for ref in entry.gateways}
            if wanted not in refs:
                return None
        if entry.port is not None and entry.port != port:
            return None
        # Conditions are AND-ed, so their order is meaningless: sort them, and the
        # Snapshot (and its version) does not depend on how the YAML map was ordered.
        headers = tuple(
            HeaderMatch(name.lower(), None if _presence_only(m) else _string_matcher(m))
            for name, m in sorted(entry.headers.items())
            if name.lower() not in _IGNORED_HEADER_KEYS and not name.startswith(_CLAIM_KEY)
        )
        # Istio's gateway-only "@request.auth.claims.<a>.<b>" keys match verified
        # JWT claims, never a header of that name.
        claims = tuple(
            ClaimMatch(
                tuple(name[len(_CLAIM_KEY) :].split(".")),
                None if _presence_only(m) else _string_matcher(m),
            )
            for name, m in sorted(entry.headers.items())
            if name.startswith(_CLAIM_KEY)
        )
        without = tuple(
            HeaderMatch(name.lower(), None if _presence_only(m) else _string_matcher(m))
            for name, m in sorted(entry.without_headers.items())
            if name.lower() not in _IGNORED_HEADER_KEYS
        )
        query = tuple(
            QueryMatch(name, _string_matcher(m)) for name, m in sorted(entry.query_params.items())
        )
        return RouteMatch(
            name=entry.name or "",
            uri=_string_matcher(entry.uri, entry.ignore_uri_case),
            scheme=_string_matcher(entry.scheme),
            method=_string_matcher(entry.method),
            authority=_string_matcher(entry.authority),
            headers=headers,
            without_headers=without,
            query_params=query,
            port=entry.port,
            claims=claims,
        )

    def _action(self, http: HTTPRoute, vs_namespace: str, port: int):
        if http.direct_response is not None:
            return DirectResponse(http.direct_response.status, _body(http.direct_response.body))
        if http.redirect is not None:
            r = http.redirect
            return Redirect(
                code=r.redirect_code or 301,
                uri=r.uri,
                authority=r.authority,
                scheme=r.scheme,
                port=r.port,
                derive_port=r.derive_port,
            )
        if not http.route:
            return None
        weights = [d.weight for d in http.route]
        if len(weights) == 1 and weights[0] is None:
            # Istio: a lone destination takes all the traffic.
            weights = [100]
        resolved = [w or 0 for w in weights]
        if sum(resolved) == 0:
            # Nothing configured: spread evenly rather than send nowhere.
            resolved = [1] * len(resolved)
        destinations = []
        cumulative = []
        total = 0
        for dest, weight in zip(http.route, resolved, strict=True):
            request_headers, response_headers = _split_headers(dest.headers)
            destinations.append(
                WeightedCluster(
                    cluster=self._cluster_for(dest.destination, vs_namespace, port),
                    weight=weight,
                    request_headers=request_headers,
                    response_headers=response_headers,
                )
            )
            total += weight
            cumulative.append(total)
        timeout_s = parse_duration_s(http.timeout)
        return Forward(
            destinations=tuple(destinations),
            total_weight=total,
            cumulative=tuple(cumulative),
            # "0s" disables the timeout in Istio/Envoy, the same as leaving it unset.
            timeout_s=timeout_s if timeout_s else None,
        )

    # ----------------------------------------------------------------- clusters

    def _gateway_api_cluster(self, host: str, port: int, grpc: bool) -> str:
        """The cluster of a resolved Gateway API backend: the same one a VirtualService
        destination ``host``/``port`` gets. A GRPCRoute's backend speaks HTTP/2 even
        when its ServiceEntry port does not say so."""
        destination = SimpleNamespace(host=host, subset=None, port=SimpleNamespace(number=port))
        name = self._cluster_for(destination, "default", port)
        cluster = self.clusters[name]
        if grpc and cluster.protocol not in ("GRPC", "HTTP2", "GRPC-WEB"):
            self.clusters[name] = dataclasses.replace(
                cluster,
                protocol="GRPC",
                traffic=compile_cluster_traffic(
                    cluster.policy, "GRPC", weighted=len({e.weight for e in cluster.endpoints}) > 1
                ),
            )
        return name

    def _cluster_for(self, destination, vs_namespace: str, listener_port: int) -> str:
        host = hostrules.expand_host(destination.host, vs_namespace)
        se = self.services.get(host)
        se_ports = se.spec.ports if se is not None else []
        if destination.port is not None:
            port = destination.port.number
        elif len(se_ports) == 1:
            port = se_ports[0].number
        else:
            # Istio's GetDestinationCluster: no port given and the service does not
            # have exactly one, so the listener's port is used.
            port = listener_port
        subset = destination.subset or ""
        name = f"outbound|{port}|{subset}|{host}"
        if name not in self.clusters:
            self.clusters[name] = self._cluster(name, host, port, subset, se)
        return name

    def _mirror_cluster(self, dest: Mapping[str, Any], vs_namespace: str, port: int) -> str:
        """The cluster of a mirror destination given in YAML spelling."""
        port_spec = dest.get("port")
        number = port_spec.get("number") if isinstance(port_spec, Mapping) else None
        destination = SimpleNamespace(
            host=dest["host"],
            subset=dest.get("subset"),
            port=SimpleNamespace(number=number) if number is not None else None,
        )
        return self._cluster_for(destination, vs_namespace, port)

    def _cluster(
        self, name: str, host: str, port: int, subset: str, se: Resource | None
    ) -> Cluster:
        rule = self._rule_for(host)
        subset_spec = None
        if subset and rule is not None:
            rule_spec: DestinationRuleSpec = rule.spec
            subset_spec = next((s for s in rule_spec.subsets if s.name == subset), None)
        se_port: ServiceEntryPort | None = None
        if se is not None:
            se_port = next((p for p in se.spec.ports if p.number == port), None)
        endpoints: tuple[Endpoint, ...] = ()
        if se is not None and se_port is not None:
            endpoints = _endpoints(host, se.spec, se_port)
        if subset:
            if subset_spec is None:
                # A subset nobody defined selects nothing: the data plane answers 503.
                endpoints = ()
            else:
                endpoints = tuple(e for e in endpoints if _is_subset(subset_spec.labels, e.labels))
        protocol = "HTTP"
        if se_port is not None and se_port.protocol:
            protocol = se_port.protocol.upper()
        policy = _policy(
            rule.spec.traffic_policy if rule is not None else None,
            subset_spec.traffic_policy if subset_spec is not None else None,
            port,
        )
        return Cluster(
            name=name,
            host=host,
            port=port,
            subset=subset,
            protocol=protocol,
            endpoints=endpoints,
            policy=policy,
            traffic=compile_cluster_traffic(
                policy, protocol, weighted=len({e.weight for e in endpoints}) > 1
            ),
        )

    def _rule_for(self, host: str) -> Resource | None:
        """The DestinationRule for a host: exact first, else the most specific wildcard."""
        rule = self.rules_exact.get(host)
        if rule is not None:
            return rule
        for pattern, candidate in self.rules_wild:
            if hostrules.host_matches(pattern, host):
                return candidate
        return None


# --------------------------------------------------------------------------- pieces


def _merge_gateway_api(istio: Listener | None, part: GatewayAPIPort) -> Listener:
    """A port's Gateway API hosts added to (or forming) its Listener.

    Where an Istio Gateway already serves the same hostname on the port, the Istio
    virtual host is kept and the Gateway API routes for that hostname are not added;
    a port whose Istio servers speak another protocol keeps only those."""
    port = part.port
    if istio is not None and istio.protocol != part.protocol:
        return istio
    exact = dict(istio.virtual_hosts) if istio is not None else {}
    wildcard = dict(istio.wildcard_hosts) if istio is not None else {}
    catch_all = istio.catch_all if istio is not None else None
    for domain in part.domains + [d for d in part.routes_by_domain if d not in part.domains]:
        routes = tuple(part.routes_by_domain.get(domain, ()))
        vhost = VirtualHost(f"{domain}:{port}", (domain,), routes)
        if domain == "*":
            if catch_all is None:
                catch_all = vhost
        elif domain.startswith("*."):
            wildcard.setdefault(domain[1:], vhost)
        else:
            exact.setdefault(domain, vhost)
    return Listener(
        name=f"0.0.0.0_{port}",
        port=port,
        protocol=part.protocol,
        virtual_hosts=dict(sorted(exact.items())),
        wildcard_hosts=dict(sorted(wildcard.items())),
        catch_all=catch_all,
        origins=(*(istio.origins if istio is not None else ()), *part.origins),
        tls_servers=(*(istio.tls_servers if istio is not None else ()), *part.tls_servers),
        sni_routes=istio.sni_routes if istio is not None else (),
    )


def _gw_spec(resource: Resource) -> GatewaySpec:
    return resource.spec


def _vs_spec(resource: Resource) -> VirtualServiceSpec:
    return resource.spec


def _tls_server(gw: Resource, index: int, server: GatewayServer) -> TLSServer:
    tls = server.tls
    assert tls is not None  # the caller filters
    hosts: list[str] = []
    for entry in server.hosts:
        _, host = hostrules.split_server_host(entry, gw.metadata.namespace)
        if host not in hosts:
            hosts.append(host)
    return TLSServer(
        hosts=tuple(hosts),
        mode=tls.mode.upper(),
        origin=_origin(gw, index, f"spec.servers[{index}]"),
        server_certificate=tls.server_certificate,
        private_key=tls.private_key,
        ca_certificates=tls.ca_certificates,
        credential_name=tls.credential_name,
        min_protocol_version=tls.min_protocol_version,
        max_protocol_version=tls.max_protocol_version,
        cipher_suites=tuple(tls.cipher_suites),
        subject_alt_names=tuple(tls.subject_alt_names),
    )


def _serves_http(server: GatewayServer) -> bool:
    protocol = server.port.protocol.upper()
    if protocol not in _HTTP_PROTOCOLS:
        return False
    if protocol == "HTTPS" and server.tls is not None:
        return server.tls.mode.upper() not in _PASSTHROUGH_MODES
    return True


def _route_name(http: HTTPRoute, match: RouteMatch | None) -> str:
    """Istio's route naming: ``route.match`` when both are named, else whichever is."""
    match_name = match.name if match is not None else ""
    if http.name and match_name:
        return f"{http.name}.{match_name}"
    return http.name or match_name


def _body(body) -> bytes:
    if body is None:
        return b""
    if body.string is not None:
        return body.string.encode("utf-8")
    if body.bytes is not None:
        try:
            return base64.b64decode(body.bytes, validate=True)
        except (binascii.Error, ValueError):
            # The validator rejects bad base64; never crash if one slips through.
            return b""
    return b""


def _rewrite(http: HTTPRoute) -> Rewrite | None:
    spec = http.rewrite
    if spec is None:
        return None
    regex = None
    if spec.uri_regex_rewrite is not None:
        regex = (re.compile(spec.uri_regex_rewrite.match), spec.uri_regex_rewrite.rewrite)
    if spec.uri is None and spec.authority is None and regex is None:
        return None
    return Rewrite(uri=spec.uri, authority=spec.authority, uri_regex=regex)


def _extra(http: HTTPRoute) -> dict[str, Any]:
    """What the route carries that this version does not enforce, as written."""
    extra: dict[str, Any] = {}
    for name in ("retries", "fault", "mirror", "mirrors", "mirror_percentage"):
        value = getattr(http, name)
        if value is None or (isinstance(value, list) and not value):
            continue
        extra[yaml_name(name)] = plain(value)
    return extra


def _endpoints(host: str, spec: ServiceEntrySpec, port: ServiceEntryPort) -> tuple[Endpoint, ...]:
    resolution = (spec.resolution or "NONE").upper()
    default_port = port.target_port or port.number
    if resolution == "STATIC" or (resolution in ("DNS", "DNS_ROUND_ROBIN") and spec.endpoints):
        out = []
        for ep in spec.endpoints:
            if not ep.address:
                continue
            out.append(
                Endpoint(
                    address=ep.address,
                    port=ep.ports.get(port.name, default_port),
                    weight=ep.weight or 1,
                    labels=dict(ep.labels),
                )
            )
        return tuple(out)
    if resolution in ("DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS") and not host.startswith("*"):
        # DNS with no endpoints: the host name itself is resolved and dialled. A
        # wildcard host (DYNAMIC_DNS) has none until a request names one.
        return (Endpoint(address=host, port=default_port),)
    # NONE: Istio forwards to the original destination address; a gateway has none
    # to forward to, so meshgate compiles no endpoints (503 UH).
    return ()


def _policy(top: TrafficPolicy | None, subset: TrafficPolicy | None, port: int) -> dict[str, Any]:
    """Istio's MergeTrafficPolicy, flattened for one port.

    Order: top-level fields, then the top-level portLevelSettings for this port,
    then each field the subset sets, then the subset's portLevelSettings for this
    port. A port-level entry replaces loadBalancer, connectionPool, outlierDetection
    and tls as a whole, unset ones included: Istio documents that port-level settings
    do not inherit from the destination level.
    """
    if top is None and subset is None:
        return {}
    merged: dict[str, Any] = {}
    for policy in (top, subset):
        if policy is None:
            continue
        for name in _POLICY_FIELDS:
            value = getattr(policy, name)
            if value is not None:
                merged[name] = value
        for level in policy.port_level_settings:
            if level.port is not None and level.port.number == port:
                for name in _PORT_POLICY_FIELDS:
                    merged[name] = getattr(level, name)
                break
    return {
        yaml_name(name): plain(merged[name])
        for name in _POLICY_FIELDS
        if merged.get(name) is not None
    }
