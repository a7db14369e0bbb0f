"""Typed Istio resources, as the user wrote them.

These classes are the contract between loading/validation (``load.py``,
``validate.py``) and the compiler (``gateway.routing.compile``). They mirror the
Istio API field for field: a Python field ``foo_bar`` is spelled ``fooBar`` in YAML
(``yaml_name`` below), unless its metadata names it otherwise. Nothing here is
interpreted yet: durations stay strings, hosts stay as written. Interpretation is
the compiler's job; checking is the validator's.

Every field that Istio marks optional has a default here; a field without a default
is required and the parser reports its absence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "API_VERSIONS",
    "AuthorizationPolicySpec",
    "AuthzCondition",
    "AuthzFrom",
    "AuthzOperation",
    "AuthzRule",
    "AuthzSource",
    "AuthzTo",
    "ClaimToHeader",
    "ClientTLSSettings",
    "ConnectionPoolSettings",
    "ConsistentHashLB",
    "CorsPolicy",
    "Delegate",
    "Destination",
    "DestinationRuleSpec",
    "ExtensionProvider",
    "FaultAbort",
    "FaultDelay",
    "GatewayServer",
    "GatewaySpec",
    "HTTPBody",
    "HTTPDirectResponse",
    "HTTPFaultInjection",
    "HTTPMatchRequest",
    "HTTPRedirect",
    "HTTPRetry",
    "HTTPRewrite",
    "HTTPRoute",
    "HTTPRouteDestination",
    "HTTPSettings",
    "HeaderOperations",
    "Headers",
    "JWTHeader",
    "JWTRule",
    "L4MatchAttributes",
    "LoadBalancerSettings",
    "Metadata",
    "OutlierDetection",
    "Percent",
    "PolicyTargetReference",
    "Port",
    "PortSelector",
    "PortTrafficPolicy",
    "RateLimit",
    "RateLimitOverride",
    "RateLimitPolicySpec",
    "RateLimitRate",
    "RegexRewrite",
    "RequestAuthenticationSpec",
    "Resource",
    "RetryBudget",
    "RouteDestination",
    "ServerTLSSettings",
    "ServiceEntryPort",
    "ServiceEntrySpec",
    "StringMatch",
    "Subset",
    "TCPRoute",
    "TCPSettings",
    "TLSCertificate",
    "TLSMatchAttributes",
    "TLSRoute",
    "TrafficPolicy",
    "VirtualServiceSpec",
    "WarmupConfiguration",
    "WorkloadEntry",
    "WorkloadSelector",
    "yaml_name",
]


def yaml_name(python_name: str) -> str:
    """``redirect_code`` -> ``redirectCode``; a field's ``yaml`` metadata wins."""
    head, *rest = python_name.rstrip("_").split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _yaml(name: str) -> Any:
    """Field metadata for a YAML spelling that camelCase cannot produce."""
    return {"yaml": name}


# --------------------------------------------------------------------------- common


@dataclass(frozen=True, slots=True)
class Metadata:
    name: str
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    # Kept as written: the Gateway API orders routes by age (oldest first).
    creation_timestamp: str | None = None


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Exactly one of exact / prefix / regex is set (the validator checks)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


@dataclass(frozen=True, slots=True)
class Percent:
    value: float = 0.0


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    set: dict[str, str] = field(default_factory=dict)
    add: dict[str, str] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


@dataclass(frozen=True, slots=True)
class Port:
    number: int
    protocol: str
    name: str
    target_port: int | None = None


# --------------------------------------------------------------------------- Gateway


@dataclass(frozen=True, slots=True)
class TLSCertificate:
    server_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None


@dataclass(frozen=True, slots=True)
class ServerTLSSettings:
    https_redirect: bool = False
    mode: str = "SIMPLE"  # PASSTHROUGH | SIMPLE | MUTUAL | AUTO_PASSTHROUGH | ISTIO_MUTUAL
    server_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    ca_crl: str | None = None
    credential_name: str | None = None
    credential_names: list[str] = field(default_factory=list)  # Istio 1.26: RSA and ECDSA
    tls_certificates: list[TLSCertificate] = field(default_factory=list)  # Istio 1.26
    ca_cert_credential_name: str | None = None  # Istio 1.28
    subject_alt_names: list[str] = field(default_factory=list)
    verify_certificate_spki: list[str] = field(default_factory=list)
    verify_certificate_hash: list[str] = field(default_factory=list)
    min_protocol_version: str | None = None  # TLS_AUTO | TLSV1_0 .. TLSV1_3
    max_protocol_version: str | None = None
    cipher_suites: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class GatewayServer:
    port: Port
    hosts: list[str]
    bind: str | None = None
    tls: ServerTLSSettings | None = None
    default_endpoint: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    servers: list[GatewayServer]
    selector: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- VirtualService


@dataclass(frozen=True, slots=True)
class HTTPMatchRequest:
    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = field(default_factory=dict)
    port: int | None = None
    source_labels: dict[str, str] = field(default_factory=dict)
    gateways: list[str] = field(default_factory=list)
    query_params: dict[str, StringMatch] = field(default_factory=dict)
    ignore_uri_case: bool = False
    without_headers: dict[str, StringMatch] = field(default_factory=dict)
    source_namespace: str | None = None
    stat_prefix: str | None = None


@dataclass(frozen=True, slots=True)
class PortSelector:
    number: int


@dataclass(frozen=True, slots=True)
class Destination:
    host: str
    subset: str | None = None
    port: PortSelector | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteDestination:
    destination: Destination
    weight: int | None = None
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class HTTPRedirect:
    uri: str | None = None
    authority: str | None = None
    port: int | None = None
    derive_port: str | None = None  # FROM_PROTOCOL_DEFAULT | FROM_REQUEST_PORT
    scheme: str | None = None
    redirect_code: int | None = None


@dataclass(frozen=True, slots=True)
class RegexRewrite:
    match: str
    rewrite: str


@dataclass(frozen=True, slots=True)
class HTTPRewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewrite | None = None


@dataclass(frozen=True, slots=True)
class HTTPBody:
    string: str | None = None
    bytes: str | None = None  # base64, as Istio spells it


@dataclass(frozen=True, slots=True)
class HTTPDirectResponse:
    status: int
    body: HTTPBody | None = None


@dataclass(frozen=True, slots=True)
class HTTPRetry:
    attempts: int | None = None
    per_try_timeout: str | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None  # Istio 1.26
    backoff: str | None = None  # Istio 1.26: Envoy's base interval


@dataclass(frozen=True, slots=True)
class FaultDelay:
    fixed_delay: str | None = None
    exponential_delay: str | None = None
    percentage: Percent | None = None
    percent: int | None = None


@dataclass(frozen=True, slots=True)
class FaultAbort:
    http_status: int | None = None
    grpc_status: str | None = None
    http2_error: str | None = None
    percentage: Percent | None = None


@dataclass(frozen=True, slots=True)
class HTTPFaultInjection:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    allow_origins: list[StringMatch] = field(default_factory=list)
    allow_origin: list[str] = field(default_factory=list)  # deprecated Istio spelling
    allow_methods: list[str] = field(default_factory=list)
    allow_headers: list[str] = field(default_factory=list)
    expose_headers: list[str] = field(default_factory=list)
    max_age: str | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: str | None = None  # FORWARD | IGNORE


@dataclass(frozen=True, slots=True)
class Delegate:
    name: str
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    name: str | None = None
    match: list[HTTPMatchRequest] = field(default_factory=list)
    route: list[HTTPRouteDestination] = field(default_factory=list)
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: str | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: list[dict[str, Any]] = field(default_factory=list)
    mirror_percentage: Percent | None = None
    # Istio's deprecated integer form of mirrorPercentage; its CRD takes both spellings.
    mirror_percent: int | None = None
    mirror_percent_snake: int | None = field(default=None, metadata=_yaml("mirror_percent"))
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class RouteDestination:
    """A ``tls[]``/``tcp[]`` route destination (no header edits at layer 4)."""

    destination: Destination
    weight: int | None = None


@dataclass(frozen=True, slots=True)
class TLSMatchAttributes:
    sni_hosts: list[str]
    destination_subnets: list[str] = field(default_factory=list)
    port: int | None = None
    source_labels: dict[str, str] = field(default_factory=dict)
    gateways: list[str] = field(default_factory=list)
    source_namespace: str | None = None


@dataclass(frozen=True, slots=True)
class TLSRoute:
    match: list[TLSMatchAttributes]
    route: list[RouteDestination] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class L4MatchAttributes:
    destination_subnets: list[str] = field(default_factory=list)
    port: int | None = None
    source_subnet: str | None = None
    source_labels: dict[str, str] = field(default_factory=dict)
    gateways: list[str] = field(default_factory=list)
    source_namespace: str | None = None


@dataclass(frozen=True, slots=True)
class TCPRoute:
    match: list[L4MatchAttributes] = field(default_factory=list)
    route: list[RouteDestination] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class VirtualServiceSpec:
    hosts: list[str] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)
    http: list[HTTPRoute] = field(default_factory=list)
    tls: list[TLSRoute] = field(default_factory=list)
    tcp: list[TCPRoute] = field(default_factory=list)
    export_to: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- DestinationRule


@dataclass(frozen=True, slots=True)
class ConsistentHashLB:
    http_header_name: str | None = None
    http_cookie: dict[str, Any] | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: dict[str, Any] | None = None
    maglev: dict[str, Any] | None = None
    minimum_ring_size: int | None = None


@dataclass(frozen=True, slots=True)
class WarmupConfiguration:
    duration: str
    minimum_percent: float | None = None
    aggression: float | None = None


@dataclass(frozen=True, slots=True)
class LoadBalancerSettings:
    simple: str | None = None  # UNSPECIFIED | RANDOM | PASSTHROUGH | ROUND_ROBIN | LEAST_REQUEST
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: dict[str, Any] | None = None
    warmup_duration_secs: str | None = None  # deprecated by Istio for warmup
    warmup: WarmupConfiguration | None = None  # Istio 1.24


@dataclass(frozen=True, slots=True)
class TCPSettings:
    max_connections: int | None = None
    connect_timeout: str | None = None
    tcp_keepalive: dict[str, Any] | None = None
    max_connection_duration: str | None = None
    idle_timeout: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPSettings:
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: str | None = None
    h2_upgrade_policy: str | None = None  # DEFAULT | DO_NOT_UPGRADE | UPGRADE
    use_client_protocol: bool | None = None
    max_concurrent_streams: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPoolSettings:
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_errors: int | None = None
    consecutive_5xx_errors: int | None = field(default=None, metadata=_yaml("consecutive5xxErrors"))
    consecutive_gateway_errors: int | None = None
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: int | None = None
    interval: str | None = None
    base_ejection_time: str | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


@dataclass(frozen=True, slots=True)
class ClientTLSSettings:
    mode: str = "DISABLE"  # DISABLE | SIMPLE | MUTUAL | ISTIO_MUTUAL
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    credential_name: str | None = None
    subject_alt_names: list[str] = field(default_factory=list)
    sni: str | None = None
    insecure_skip_verify: bool | None = None
    ca_crl: str | None = None


@dataclass(frozen=True, slots=True)
class RetryBudget:
    percent: float | None = None
    min_retry_concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class PortTrafficPolicy:
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: list[PortTrafficPolicy] = field(default_factory=list)
    tunnel: dict[str, Any] | None = None
    proxy_protocol: dict[str, Any] | None = None
    retry_budget: RetryBudget | None = None  # Istio 1.27; not in portLevelSettings


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class DestinationRuleSpec:
    host: str
    traffic_policy: TrafficPolicy | None = None
    subsets: list[Subset] = field(default_factory=list)
    export_to: list[str] = field(default_factory=list)
    workload_selector: dict[str, Any] | None = None


# --------------------------------------------------------------------------- ServiceEntry


@dataclass(frozen=True, slots=True)
class ServiceEntryPort:
    number: int
    name: str
    protocol: str | None = None
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    address: str | None = None
    ports: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    network: str | None = None
    locality: str | None = None
    weight: int | None = None
    service_account: str | None = None


@dataclass(frozen=True, slots=True)
class ServiceEntrySpec:
    hosts: list[str]
    addresses: list[str] = field(default_factory=list)
    ports: list[ServiceEntryPort] = field(default_factory=list)
    location: str | None = None  # MESH_EXTERNAL | MESH_INTERNAL
    resolution: str | None = None  # NONE | STATIC | DNS | DNS_ROUND_ROBIN
    endpoints: list[WorkloadEntry] = field(default_factory=list)
    workload_selector: dict[str, Any] | None = None
    export_to: list[str] = field(default_factory=list)
    subject_alt_names: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- security.istio.io


@dataclass(frozen=True, slots=True)
class WorkloadSelector:
    match_labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PolicyTargetReference:
    kind: str
    name: str
    group: str | None = None
    namespace: str | None = None


@dataclass(frozen=True, slots=True)
class JWTHeader:
    name: str
    prefix: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    header: str
    claim: str


@dataclass(frozen=True, slots=True)
class JWTRule:
    # Istio's issuer is one string; meshgate also takes a list, or "*" patterns
    # (validate.py checks the shape).
    issuer: Any = None
    audiences: list[str] = field(default_factory=list)
    jwks_uri: str | None = None
    jwks: str | None = None
    from_headers: list[JWTHeader] = field(default_factory=list)
    from_params: list[str] = field(default_factory=list)
    from_cookies: list[str] = field(default_factory=list)
    output_payload_to_header: str | None = None
    output_claim_to_headers: list[ClaimToHeader] = field(default_factory=list)
    forward_original_token: bool = False
    timeout: str | None = None
    space_delimited_claims: list[str] = field(default_factory=list)  # Istio 1.28
    # Istio's CRD also takes the proto spelling of jwksUri.
    jwks_uri_snake: str | None = field(default=None, metadata=_yaml("jwks_uri"))


@dataclass(frozen=True, slots=True)
class RequestAuthenticationSpec:
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] = field(default_factory=list)
    jwt_rules: list[JWTRule] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AuthzSource:
    principals: list[str] = field(default_factory=list)
    not_principals: list[str] = field(default_factory=list)
    request_principals: list[str] = field(default_factory=list)
    not_request_principals: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    not_namespaces: list[str] = field(default_factory=list)
    service_accounts: list[str] = field(default_factory=list)
    not_service_accounts: list[str] = field(default_factory=list)
    ip_blocks: list[str] = field(default_factory=list)
    not_ip_blocks: list[str] = field(default_factory=list)
    remote_ip_blocks: list[str] = field(default_factory=list)
    not_remote_ip_blocks: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AuthzFrom:
    source: AuthzSource


@dataclass(frozen=True, slots=True)
class AuthzOperation:
    hosts: list[str] = field(default_factory=list)
    not_hosts: list[str] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)
    not_ports: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    not_methods: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    not_paths: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AuthzTo:
    operation: AuthzOperation


@dataclass(frozen=True, slots=True)
class AuthzCondition:
    key: str
    values: list[str] = field(default_factory=list)
    not_values: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AuthzRule:
    from_: list[AuthzFrom] = field(default_factory=list)
    to: list[AuthzTo] = field(default_factory=list)
    when: list[AuthzCondition] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ExtensionProvider:
    name: str


@dataclass(frozen=True, slots=True)
class AuthorizationPolicySpec:
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] = field(default_factory=list)
    rules: list[AuthzRule] = field(default_factory=list)
    action: str = "ALLOW"  # ALLOW | DENY | AUDIT | CUSTOM
    provider: ExtensionProvider | None = None


# --------------------------------------------------------------------------- meshgate.io


@dataclass(frozen=True, slots=True)
class RateLimitRate:
    """``requests`` per ``per`` (second | minute | hour | day); ``burst`` defaults to
    ``requests``."""

    requests: int
    per: str
    burst: int | None = None


@dataclass(frozen=True, slots=True)
class RateLimitOverride:
    when: dict[str, str]  # key part -> the value it must have
    rate: RateLimitRate


@dataclass(frozen=True, slots=True)
class RateLimit:
    name: str
    rate: RateLimitRate
    key: list[str] = field(default_factory=list)  # key parts; empty: one shared bucket
    backend: str | None = None  # local (default) | redis
    failure_mode: str | None = None  # open (default) | closed; redis only
    overrides: list[RateLimitOverride] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RateLimitPolicySpec:
    limits: list[RateLimit]
    selector: WorkloadSelector | None = None
    hosts: list[str] = field(default_factory=list)  # empty: every host
    routes: list[str] = field(default_factory=list)  # VirtualService http[].name
    num_trusted_proxies: int = 0  # x-forwarded-for hops in front of the gateway
    response_headers: str | None = None  # ratelimit (default) | x-ratelimit | none


# --------------------------------------------------------------------------- resources


@dataclass(frozen=True, slots=True)
class Resource:
    """One document of a config file.

    ``source`` is ``file:line`` of the document's first line; ``lines`` maps a field
    path in YAML spelling (``spec.http[0].route[1].weight``) to its line, for every
    node the loader saw, so later stages can point at the exact place.
    """

    api_version: str
    kind: str
    metadata: Metadata
    spec: Any
    source: str
    file: str
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def api_group(self) -> str:
        """``networking.istio.io`` of ``networking.istio.io/v1``; "" for the core group."""
        group, sep, _ = self.api_version.partition("/")
        return group if sep else ""

    @property
    def key(self) -> str:
        """``Kind namespace/name``, as error messages spell it."""
        return f"{self.kind} {self.metadata.namespace}/{self.metadata.name}"

    def where(self, path: str) -> str:
        """``file:line`` of a field path, the nearest known ancestor's line if needed."""
        probe = path
        while probe:
            line = self.lines.get(probe)
            if line is not None:
                return f"{self.file}:{line}"
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        return self.source


# Kind -> accepted apiVersions and the spec class that parses it.
API_VERSIONS: dict[str, tuple[tuple[str, ...], type]] = {
    "Gateway": (
        ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"),
        GatewaySpec,
    ),
    "VirtualService": (
        ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"),
        VirtualServiceSpec,
    ),
    "DestinationRule": (
        ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"),
        DestinationRuleSpec,
    ),
    "ServiceEntry": (
        ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"),
        ServiceEntrySpec,
    ),
    "RequestAuthentication": (
        ("security.istio.io/v1", "security.istio.io/v1beta1"),
        RequestAuthenticationSpec,
    ),
    "AuthorizationPolicy": (
        ("security.istio.io/v1", "security.istio.io/v1beta1"),
        AuthorizationPolicySpec,
    ),
    "RateLimitPolicy": (("meshgate.io/v1alpha1",), RateLimitPolicySpec),
}
