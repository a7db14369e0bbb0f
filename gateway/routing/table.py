"""The compiled Snapshot: what the data plane reads on every request.

Built once per configuration by ``compile.py``; never mutated after that. A request
takes one reference to the Snapshot when it starts and keeps it to the end, so a
reload (a new Snapshot beside the old one, one reference swapped) never shows a
request half of one config and half of another.

Shape:

    Snapshot
      listeners: port -> Listener
        Listener.virtual_hosts: exact host -> VirtualHost
        Listener.wildcard_hosts: "*.suffix" -> VirtualHost   (looked up label by label)
        Listener.catch_all: the VirtualHost of "*", if any
          VirtualHost.routes: ordered Routes, first match wins (Istio's order)
          VirtualHost.plan: the same routes as one flat tuple, what a lookup walks
            Route.matches: OR of RouteMatch; each RouteMatch ANDs its conditions
            Route.action: Forward | Redirect | DirectResponse
      clusters: name -> Cluster (endpoints + traffic policy)

Everything a request needs is precomputed here: regexes compiled, header names
lower-cased, weights summed. This module does no I/O and imports nothing that does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .plan import compile_plan

__all__ = [
    "INVALID_BACKEND_PREFIX",
    "ClaimMatch",
    "Cluster",
    "CorsPolicy",
    "DirectResponse",
    "Endpoint",
    "Forward",
    "HeaderMatch",
    "HeaderOps",
    "Listener",
    "Origin",
    "QueryMatch",
    "Redirect",
    "Rewrite",
    "Route",
    "RouteMatch",
    "SNIRoute",
    "Snapshot",
    "StringMatcher",
    "TLSServer",
    "VirtualHost",
    "WeightedCluster",
]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a compiled object came from, for logs, metrics and error messages."""

    kind: str
    namespace: str
    name: str
    source: str = ""  # "file.yaml:12" when known
    index: int | None = None  # http[] index for routes

    @property
    def ref(self) -> str:
        """``kind/namespace/name``, the form every log line and metric label uses."""
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """An Istio StringMatch, ready to run.

    ``kind`` is "exact", "prefix", "path_prefix" or "regex". Regex is a full match
    (RE2 semantics as Envoy uses them; Python's ``re`` covers the RE2 syntax Istio
    users write). ``prefix`` is a plain string prefix: "/pre" matches "/prefix".
    ``path_prefix`` is the Gateway API's PathPrefix, whole path segments only: its
    value is stored without a trailing "/", and "/pre" matches "/pre" and "/pre/x"
    but not "/prefix" ("/" is stored as "" and matches every path).
    With ``ignore_case`` the value is stored lower-cased and the input is
    lower-cased before comparing.
    """

    kind: str
    value: str
    ignore_case: bool = False
    pattern: re.Pattern[str] | None = field(default=None, compare=False)

    def matches(self, text: str) -> bool:
        if self.ignore_case:
            text = text.lower()
        kind = self.kind
        if kind == "exact":
            return text == self.value
        if kind == "prefix":
            return text.startswith(self.value)
        if kind == "path_prefix":
            value = self.value
            size = len(value)
            return text.startswith(value) and (len(text) == size or text[size] == "/")
        assert self.pattern is not None  # compile.py always sets it for regex
        return self.pattern.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """``name`` is lower-case. ``matcher`` None means "header present"."""

    name: str
    matcher: StringMatcher | None


@dataclass(frozen=True, slots=True)
class QueryMatch:
    name: str
    matcher: StringMatcher | None


@dataclass(frozen=True, slots=True)
class ClaimMatch:
    """A validated-claim condition: ``path`` is the claim's nesting (``("a", "b")``).

    A string claim is matched as a header value would be; a list of strings matches
    when any element does. ``matcher`` None means "the claim is present"."""

    path: tuple[str, ...]
    matcher: StringMatcher | None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """One entry of ``http[].match``: every condition set here must hold."""

    name: str = ""
    uri: StringMatcher | None = None
    scheme: StringMatcher | None = None
    method: StringMatcher | None = None
    authority: StringMatcher | None = None
    headers: tuple[HeaderMatch, ...] = ()
    without_headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[QueryMatch, ...] = ()
    port: int | None = None
    # ``@request.auth.claims.<a>.<b>`` header keys: matched against the claims of a
    # verified JWT only (``ctx.auth``), never against anything the client wrote.
    claims: tuple[ClaimMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Header edits. Names lower-case; values as configured."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.set or self.add or self.remove)


NO_HEADER_OPS = HeaderOps()


# A destination whose cluster name starts with this names a backend that cannot be
# used (Gateway API: missing Service, kind not supported, reference not permitted).
# No cluster of that name exists; the upstream stage answers 500 with flag NC, as
# Envoy's cluster_not_found_response_code does for Gateway API routes.
INVALID_BACKEND_PREFIX = "invalid|"


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    cluster: str  # key into Snapshot.clusters
    weight: int
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS


@dataclass(frozen=True, slots=True)
class Forward:
    """Send upstream. ``cumulative`` holds running weight totals for a bisect pick."""

    destinations: tuple[WeightedCluster, ...]
    total_weight: int
    cumulative: tuple[int, ...]
    timeout_s: float | None = None  # None: no route timeout (Istio's default)


@dataclass(frozen=True, slots=True)
class Redirect:
    """Istio HTTPRedirect. None fields keep the request's value."""

    code: int = 301
    uri: str | None = None
    authority: str | None = None
    scheme: str | None = None
    port: int | None = None
    derive_port: str | None = None  # FROM_PROTOCOL_DEFAULT | FROM_REQUEST_PORT
    # Gateway API ReplacePrefixMatch: ``prefix`` (a path_prefix value) of the
    # request's path is replaced by ``replace_prefix`` (``replace_path_prefix``).
    replace_prefix: str | None = None
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Rewrite:
    """``uri`` replaces the matched prefix (or the whole path on exact/regex matches,
    as Envoy's prefix_rewrite does); ``uri_regex`` is (pattern, substitution)."""

    uri: str | None = None
    authority: str | None = None
    uri_regex: tuple[re.Pattern[str], str] | None = field(default=None, compare=False)
    # Gateway API ReplaceFullPath: the whole path, whatever the match kind.
    full_path: str | None = None


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    allow_origins: tuple[StringMatcher, ...] = ()
    allow_methods: str = ""  # pre-joined header values
    allow_headers: str = ""
    expose_headers: str = ""
    max_age: str = ""  # seconds, as a header value
    allow_credentials: bool = False
    forward_unmatched_preflights: bool = True


@dataclass(frozen=True, slots=True)
class Route:
    """One ``http[]`` entry of a VirtualService, compiled."""

    name: str
    origin: Origin
    matches: tuple[RouteMatch, ...]  # empty: matches every request
    action: Forward | Redirect | DirectResponse
    rewrite: Rewrite | None = None
    request_headers: HeaderOps = NO_HEADER_OPS
    response_headers: HeaderOps = NO_HEADER_OPS
    cors: CorsPolicy | None = None
    # ratelimit.policy.RouteRateLimit when a RateLimitPolicy applies; None costs nothing.
    ratelimit: Any = None
    # Fields parsed but not enforced in this version (retries, fault, mirror, ...),
    # kept so the admin dump and later stages can see them.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    # gateway.policy.RouteTraffic (retries, fault, mirrors) compiled from ``extra``;
    # None, the usual case, keeps the request on the upstream stage's lean path.
    traffic: Any = None


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str  # "host:port" as Envoy names gateway virtual hosts
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    # ``routes`` flattened for ``match_route`` (see plan.py): derived, so it is
    # neither compared, dumped nor given to the constructor.
    plan: tuple[Any, ...] = field(default=(), init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plan", compile_plan(self.routes))


@dataclass(frozen=True, slots=True)
class TLSServer:
    """One Gateway server's ``tls`` block on a TLS port, as the TLS layer needs it.

    ``hosts`` are the SNI names the server answers: exact lower-case names,
    ``*.suffix`` wildcards or ``*`` (namespace prefixes removed). Credential paths are
    as configured; ``credential_name`` is resolved by the data plane against its
    credentials directory, so the Snapshot stays free of key material.
    """

    hosts: tuple[str, ...]
    mode: str  # SIMPLE | MUTUAL | OPTIONAL_MUTUAL | PASSTHROUGH | AUTO_PASSTHROUGH | ISTIO_MUTUAL
    origin: Origin
    server_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    credential_name: str | None = None
    min_protocol_version: str | None = None  # None: TLS 1.2
    max_protocol_version: str | None = None  # None: TLS 1.3
    cipher_suites: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()  # accepted client SANs (MUTUAL); empty: any


@dataclass(frozen=True, slots=True)
class SNIRoute:
    """A VirtualService ``tls[]`` route bound to a passthrough server: connections whose
    SNI matches ``sni_hosts`` (exact, ``*.suffix`` or ``*``) are spliced to a cluster."""

    name: str
    origin: Origin
    sni_hosts: tuple[str, ...]
    destinations: tuple[WeightedCluster, ...]
    total_weight: int
    cumulative: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Listener:
    name: str  # "0.0.0.0_8080"-style
    port: int
    protocol: str  # HTTP | HTTPS | HTTP2 | GRPC | TCP | TLS
    virtual_hosts: Mapping[str, VirtualHost]  # exact, lower-case host without port
    wildcard_hosts: Mapping[str, VirtualHost]  # keyed by suffix incl. dot: ".example.com"
    catch_all: VirtualHost | None = None
    origins: tuple[Origin, ...] = ()  # the Gateway servers behind this listener
    # TLS ports: one entry per Gateway server, in declaration order (first wins a tie).
    tls_servers: tuple[TLSServer, ...] = ()
    # Passthrough servers: the VirtualService tls[] routes, first match wins.
    sni_routes: tuple[SNIRoute, ...] = ()


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str  # IP or DNS name
    port: int
    weight: int = 1
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Cluster:
    """Istio's naming: ``outbound|<port>|<subset>|<host>``."""

    name: str
    host: str
    port: int
    subset: str = ""
    protocol: str = "HTTP"
    endpoints: tuple[Endpoint, ...] = ()
    # DestinationRule traffic policy as written (subset policy merged over the
    # top-level one, port-level over that); enforcement grows in later versions.
    policy: Mapping[str, Any] = field(default_factory=dict, compare=False)
    # gateway.policy.ClusterTraffic compiled from ``policy`` and ``protocol``; None
    # when everything is at its default (round robin, no limits, plain HTTP/1.1).
    traffic: Any = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: str  # content hash of the compiled table
    listeners: Mapping[int, Listener]
    clusters: Mapping[str, Cluster]
    gateway_labels: Mapping[str, str] = field(default_factory=dict)
    # authn.policy.SecurityPolicy bound to this gateway, or None: the request stages
    # then skip authentication and authorization without looking further.
    security: Any = None
    # egress.registry.EgressRegistry on an egress gateway (the ServiceEntry hosts
    # traffic may leave for, and the outbound traffic policy); None elsewhere.
    egress: Any = None
