"""Compiled traffic policy: what a route or a cluster needs beyond "send it there".

The routing compiler keeps a VirtualService's ``retries``, ``fault`` and ``mirror*``
and a DestinationRule's merged ``trafficPolicy`` as plain YAML-spelled mappings (for
the admin dump). This module turns them, once per configuration, into small frozen
objects the data plane reads without parsing anything:

    RouteTraffic      retries, fault, mirrors of one route (None when it has none)
      RetryPolicy     attempts, per-try timeout, the retryOn conditions as flags
      FaultPolicy     delay and/or abort, each with the fraction of requests it hits
      Mirror          a shadow cluster and the fraction of requests copied to it
    ClusterTraffic    loadBalancer, connectionPool, outlierDetection, tls, HTTP/2
      LoadBalancer    the algorithm and, for consistentHash, what the key is
      ConnectionLimits circuit-breaker figures and connection lifetimes
      OutlierPolicy   consecutive-error ejection figures
      UpstreamTLS     how to originate TLS to the endpoints

A route or cluster with nothing configured compiles to ``None`` so the data plane
can take its fast path with one ``is None`` test. What the data plane does with these
objects lives in ``gateway.upstream`` (balancers, outlier state, TLS contexts) and
``gateway.traffic`` (the forwarding loop with retries, faults and mirrors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .config.durations import DurationError
from .config.durations import parse_duration_s as _strict_duration_s

__all__ = [
    "GRPC_STATUS_CODES",
    "ClusterTraffic",
    "ConnectionLimits",
    "FaultPolicy",
    "LoadBalancer",
    "Mirror",
    "OutlierPolicy",
    "RetryPolicy",
    "RouteTraffic",
    "UpstreamTLS",
    "compile_cluster_traffic",
    "compile_route_traffic",
]

# gRPC status names (as Istio's ``fault.abort.grpcStatus`` spells them) to codes.
GRPC_STATUS_CODES: Mapping[str, int] = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}

# Envoy's retriable-4xx: only 409 Conflict.
_RETRIABLE_4XX = frozenset({409})
# Envoy's gateway-error: the statuses a proxy answers when its upstream failed.
_GATEWAY_ERRORS = frozenset({502, 503, 504})
# Failures before a response head that Envoy handles as upstream resets: connect
# failure, reset, per-try timeout, a malformed response (UPE), a refused stream. An
# overflow (UO) is not one.
_RESET_FLAGS = frozenset({"UF", "UR", "UT", "UPE", "REFUSED"})
# Request bodies up to this size are kept so a retry can replay them; a longer body
# is streamed once and its request is not retried (Envoy's per_request_buffer_limit
# plays this part).
DEFAULT_RETRY_BUFFER_BYTES = 64 * 1024


def _seconds(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return _strict_duration_s(text, minimum_ms=0)
    except DurationError:
        return None


def _fraction(percentage: Any, default: float) -> float:
    """Istio ``Percent`` (``{value: 0..100}``) as a fraction 0..1."""
    if isinstance(percentage, Mapping):
        value = percentage.get("value", 0.0)
        try:
            return min(max(float(value) / 100.0, 0.0), 1.0)
        except (TypeError, ValueError):
            return default
    return default


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Istio ``HTTPRetry`` as Envoy runs it. ``attempts`` counts retries, not the first
    try (Istio: "Number of retries to be allowed for a given request")."""

    attempts: int
    per_try_timeout_s: float | None = None
    on_5xx: bool = False
    on_gateway_error: bool = False
    on_reset: bool = False
    on_connect_failure: bool = False
    on_retriable_4xx: bool = False
    on_refused_stream: bool = False
    retriable_status_codes: frozenset[int] = frozenset()
    remote_localities: bool = False  # parsed; meshgate has no localities to prefer
    # Istio's retryIgnorePreviousHosts (default true): a retry avoids the endpoint
    # that failed, when the cluster has another (Envoy's previous_hosts predicate).
    ignore_previous_hosts: bool = True
    # Istio's backoff: Envoy's base interval (25 ms by default); the back-off before
    # retry N is random in [0, (2^N - 1) x base), at most ten times the base.
    backoff_s: float = 0.025
    buffer_limit_bytes: int = DEFAULT_RETRY_BUFFER_BYTES
    unknown_conditions: tuple[str, ...] = ()  # gRPC ones etc., kept for the dump

    def retry_on_status(self, status: int) -> bool:
        """True when a response with ``status`` is worth another attempt."""
        if status >= 500:
            if self.on_5xx or (self.on_gateway_error and status in _GATEWAY_ERRORS):
                return True
        elif self.on_retriable_4xx and status in _RETRIABLE_4XX:
            return True
        return status in self.retriable_status_codes

    def retry_on_error(self, flag: str) -> bool:
        """True when a failure before the response head (by its response flag:
        UF connect failure, UR reset, UT per-try timeout, UPE malformed response,
        REFUSED a refused HTTP/2 stream) is retriable.

        Envoy sees each of these as a stream reset with a reason, and its
        ``wouldRetryFromReset`` retries any reset under ``reset``, ``5xx`` and
        ``gateway-error`` ("does not respond at all (disconnect/reset/read
        timeout)"); ``connect-failure`` and ``refused-stream`` only their own
        reason. An overflow (UO) is never retried."""
        if self.on_reset or self.on_5xx or self.on_gateway_error:
            return flag in _RESET_FLAGS
        if flag == "UF":
            return self.on_connect_failure
        if flag == "REFUSED":
            return self.on_refused_stream
        return False


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    """``fault.delay`` then ``fault.abort``; fractions are 0..1 of requests."""

    delay_s: float = 0.0
    delay_fraction: float = 0.0
    abort_status: int = 0  # HTTP status of the abort; 200 for a gRPC abort
    abort_grpc_status: int | None = None
    abort_fraction: float = 0.0


@dataclass(frozen=True, slots=True)
class Mirror:
    cluster: str
    fraction: float = 1.0


@dataclass(frozen=True, slots=True)
class RouteTraffic:
    retry: RetryPolicy | None = None
    fault: FaultPolicy | None = None
    mirrors: tuple[Mirror, ...] = ()


def _retry(spec: Mapping[str, Any]) -> RetryPolicy | None:
    attempts = spec.get("attempts")
    if not isinstance(attempts, int) or attempts <= 0:
        # Istio: attempts 0 turns retries off for the route.
        return None
    flags: dict[str, bool] = {}
    codes: set[int] = set()
    unknown: list[str] = []
    names = {
        "5xx": "on_5xx",
        "gateway-error": "on_gateway_error",
        "reset": "on_reset",
        "connect-failure": "on_connect_failure",
        "retriable-4xx": "on_retriable_4xx",
        "refused-stream": "on_refused_stream",
    }
    # Istio's retryOn: comma-separated Envoy conditions; a bare number is a
    # retriable status code (Istio adds it to retriable_status_codes for you).
    for token in str(spec.get("retryOn") or "").split(","):
        token = token.strip()
        if not token:
            continue
        if token in names:
            flags[names[token]] = True
        elif token.isdigit():
            codes.add(int(token))
        elif token != "retriable-status-codes":
            unknown.append(token)
    if not spec.get("retryOn"):
        # Istio's default when retryOn is omitted.
        flags.update(on_connect_failure=True, on_refused_stream=True)
        codes.add(503)
    return RetryPolicy(
        attempts=attempts,
        per_try_timeout_s=_seconds(spec.get("perTryTimeout")) or None,
        retriable_status_codes=frozenset(codes),
        remote_localities=bool(spec.get("retryRemoteLocalities")),
        ignore_previous_hosts=spec.get("retryIgnorePreviousHosts") is not False,
        backoff_s=_seconds(spec.get("backoff")) or 0.025,
        unknown_conditions=tuple(unknown),
        **flags,
    )


def _fault(spec: Mapping[str, Any]) -> FaultPolicy | None:
    delay_s = 0.0
    delay_fraction = 0.0
    delay = spec.get("delay")
    if isinstance(delay, Mapping):
        delay_s = _seconds(delay.get("fixedDelay")) or 0.0
        if "percentage" in delay:
            delay_fraction = _fraction(delay.get("percentage"), 0.0)
        elif isinstance(delay.get("percent"), int):
            delay_fraction = min(max(delay["percent"] / 100.0, 0.0), 1.0)
    abort_status = 0
    abort_grpc: int | None = None
    abort_fraction = 0.0
    abort = spec.get("abort")
    if isinstance(abort, Mapping):
        if isinstance(abort.get("httpStatus"), int):
            abort_status = abort["httpStatus"]
        elif isinstance(abort.get("grpcStatus"), str):
            abort_grpc = GRPC_STATUS_CODES.get(abort["grpcStatus"].upper(), 2)
            abort_status = 200  # gRPC carries its status in grpc-status
        abort_fraction = _fraction(abort.get("percentage"), 0.0)
    if not (delay_s and delay_fraction) and not (abort_status and abort_fraction):
        return None
    return FaultPolicy(
        delay_s=delay_s,
        delay_fraction=delay_fraction if delay_s else 0.0,
        abort_status=abort_status,
        abort_grpc_status=abort_grpc,
        abort_fraction=abort_fraction if abort_status else 0.0,
    )


def compile_route_traffic(
    extra: Mapping[str, Any], cluster_for: Callable[[Mapping[str, Any]], str]
) -> RouteTraffic | None:
    """The typed policy of one route from its ``extra`` mapping (YAML spelling).

    ``cluster_for`` turns a ``Destination`` mapping into a cluster name (the
    compiler's resolver), for mirrors. None when the route has no policy at all.
    """
    if not extra:
        return None
    retries = extra.get("retries")
    retry = _retry(retries) if isinstance(retries, Mapping) else None
    fault_spec = extra.get("fault")
    fault = _fault(fault_spec) if isinstance(fault_spec, Mapping) else None
    mirrors: list[Mirror] = []
    mirror = extra.get("mirror")
    if isinstance(mirror, Mapping) and mirror.get("host"):
        # Istio: mirrorPercentage unset means every request is mirrored.
        fraction = _fraction(extra.get("mirrorPercentage"), 1.0)
        mirrors.append(Mirror(cluster_for(mirror), fraction))
    for entry in extra.get("mirrors") or ():
        if not isinstance(entry, Mapping):
            continue
        destination = entry.get("destination")
        if isinstance(destination, Mapping) and destination.get("host"):
            mirrors.append(
                Mirror(cluster_for(destination), _fraction(entry.get("percentage"), 1.0))
            )
    mirrors = [m for m in mirrors if m.fraction > 0.0]
    if retry is None and fault is None and not mirrors:
        return None
    return RouteTraffic(retry=retry, fault=fault, mirrors=tuple(mirrors))


# --------------------------------------------------------------------------- clusters


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    """``kind``: ROUND_ROBIN | LEAST_REQUEST | RANDOM | PASSTHROUGH | HASH."""

    kind: str = "ROUND_ROBIN"
    hash_header: str | None = None  # lower-case
    hash_cookie: str | None = None
    hash_cookie_path: str | None = None
    hash_cookie_ttl_s: float | None = None  # None: session cookie
    hash_source_ip: bool = False
    hash_query: str | None = None
    maglev: bool = False  # ring hash otherwise (Istio's default)
    ring_size: int = 1024


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """``connectionPool``; None figures mean Istio's "unlimited" default."""

    max_connections: int | None = None
    connect_timeout_s: float | None = None
    max_pending: int | None = None  # http1MaxPendingRequests
    max_requests: int | None = None  # http2MaxRequests: active requests in the cluster
    max_requests_per_connection: int | None = None
    idle_timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_5xx: int = 5
    consecutive_gateway: int = 0  # 0: off (Istio's default)
    interval_s: float = 10.0
    base_ejection_s: float = 30.0
    max_ejection_percent: int = 10
    # Envoy's max_ejection_time, which Istio leaves at its default: 300 s, or the base
    # ejection time when that is longer.
    max_ejection_s: float = 300.0
    # Istio's minHealthPercent, Envoy's healthy_panic_threshold: below this share of
    # healthy endpoints the balancer uses all of them. 0 (Istio's default): never.
    min_health_percent: int = 0


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    mode: str  # SIMPLE | MUTUAL (DISABLE compiles to no UpstreamTLS)
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    credential_name: str | None = None
    sni: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class ClusterTraffic:
    lb: LoadBalancer = LoadBalancer()
    limits: ConnectionLimits | None = None
    outlier: OutlierPolicy | None = None
    tls: UpstreamTLS | None = None
    http2: bool = False  # speak HTTP/2 to the endpoints
    # Endpoint weights differ: the lean path's plain rotation would ignore them.
    weighted: bool = False


_H2_PROTOCOLS = frozenset({"HTTP2", "GRPC", "GRPC-WEB"})


def _load_balancer(spec: Mapping[str, Any]) -> LoadBalancer:
    ch = spec.get("consistentHash")
    if isinstance(ch, Mapping):
        cookie = ch.get("httpCookie") if isinstance(ch.get("httpCookie"), Mapping) else None
        header = ch.get("httpHeaderName")
        ring = ch.get("ringHash") if isinstance(ch.get("ringHash"), Mapping) else {}
        maglev = ch.get("maglev") if isinstance(ch.get("maglev"), Mapping) else None
        size = ring.get("minimumRingSize") or ch.get("minimumRingSize") or 1024
        if maglev is not None:
            size = maglev.get("tableSize") or 65537
        return LoadBalancer(
            kind="HASH",
            hash_header=header.lower() if isinstance(header, str) else None,
            hash_cookie=cookie.get("name") if cookie else None,
            hash_cookie_path=cookie.get("path") if cookie else None,
            hash_cookie_ttl_s=_seconds(cookie.get("ttl")) if cookie else None,
            hash_source_ip=bool(ch.get("useSourceIp")),
            hash_query=ch.get("httpQueryParameterName"),
            maglev=maglev is not None,
            ring_size=int(size),
        )
    simple = spec.get("simple")
    if simple in ("RANDOM", "PASSTHROUGH", "ROUND_ROBIN"):
        return LoadBalancer(kind=simple)
    if simple in ("LEAST_REQUEST", "LEAST_CONN"):
        return LoadBalancer(kind="LEAST_REQUEST")
    # UNSPECIFIED: Istio picks LEAST_REQUEST as its default algorithm.
    return LoadBalancer(kind="LEAST_REQUEST" if simple == "UNSPECIFIED" else "ROUND_ROBIN")


def _limits(spec: Mapping[str, Any]) -> ConnectionLimits | None:
    tcp = spec.get("tcp") if isinstance(spec.get("tcp"), Mapping) else {}
    http = spec.get("http") if isinstance(spec.get("http"), Mapping) else {}

    def positive(value: Any) -> int | None:
        return value if isinstance(value, int) and value > 0 else None

    limits = ConnectionLimits(
        max_connections=positive(tcp.get("maxConnections")),
        connect_timeout_s=_seconds(tcp.get("connectTimeout")) or None,
        max_pending=positive(http.get("http1MaxPendingRequests")),
        max_requests=positive(http.get("http2MaxRequests")),
        max_requests_per_connection=positive(http.get("maxRequestsPerConnection")),
        idle_timeout_s=_seconds(http.get("idleTimeout") or tcp.get("idleTimeout")) or None,
    )
    return None if limits == ConnectionLimits() else limits


def _outlier(spec: Mapping[str, Any]) -> OutlierPolicy | None:
    # The deprecated consecutiveErrors counts gateway errors only: Istio turns it into
    # Envoy's consecutive_gateway_failure and stops enforcing consecutive_5xx ("Only
    # listen to gateway errors", istio/api#617); consecutive5xxErrors and
    # consecutiveGatewayErrors, when given, override it.
    legacy = spec.get("consecutiveErrors")
    if isinstance(legacy, int) and legacy > 0:
        default_five, default_gateway = 0, legacy
    else:
        default_five, default_gateway = 5, 0
    five = spec.get("consecutive5xxErrors", default_five)
    gateway = spec.get("consecutiveGatewayErrors", default_gateway)
    base_s = _seconds(spec.get("baseEjectionTime")) or 30.0
    min_health = spec.get("minHealthPercent", 0)
    policy = OutlierPolicy(
        consecutive_5xx=five if isinstance(five, int) else default_five,
        consecutive_gateway=gateway if isinstance(gateway, int) else default_gateway,
        interval_s=_seconds(spec.get("interval")) or 10.0,
        base_ejection_s=base_s,
        max_ejection_percent=int(spec.get("maxEjectionPercent", 10)),
        max_ejection_s=max(300.0, base_s),
        min_health_percent=min_health if isinstance(min_health, int) else 0,
    )
    if policy.consecutive_5xx <= 0 and policy.consecutive_gateway <= 0:
        return None
    return policy


def _tls(spec: Mapping[str, Any]) -> UpstreamTLS | None:
    mode = str(spec.get("mode") or "DISABLE").upper()
    if mode == "DISABLE":
        return None
    return UpstreamTLS(
        # ISTIO_MUTUAL needs the mesh's workload identity, which a gateway run from
        # files does not have; it is treated as MUTUAL with the configured files.
        mode="MUTUAL" if mode in ("MUTUAL", "ISTIO_MUTUAL") else "SIMPLE",
        client_certificate=spec.get("clientCertificate"),
        private_key=spec.get("privateKey"),
        ca_certificates=spec.get("caCertificates"),
        credential_name=spec.get("credentialName"),
        sni=spec.get("sni"),
        subject_alt_names=tuple(spec.get("subjectAltNames") or ()),
        insecure_skip_verify=bool(spec.get("insecureSkipVerify")),
    )


def compile_cluster_traffic(
    policy: Mapping[str, Any], protocol: str, *, weighted: bool = False
) -> ClusterTraffic | None:
    """The typed policy of one cluster from its merged ``policy`` mapping, its port
    protocol and whether its endpoints' weights differ. None when everything is at
    its default (the fast path)."""
    lb_spec = policy.get("loadBalancer")
    pool_spec = policy.get("connectionPool")
    outlier_spec = policy.get("outlierDetection")
    tls_spec = policy.get("tls")
    http = pool_spec.get("http") if isinstance(pool_spec, Mapping) else None
    upgrade = http.get("h2UpgradePolicy") if isinstance(http, Mapping) else None
    http2 = protocol.upper() in _H2_PROTOCOLS or upgrade == "UPGRADE"
    if upgrade == "DO_NOT_UPGRADE" and protocol.upper() not in _H2_PROTOCOLS:
        http2 = False
    traffic = ClusterTraffic(
        lb=_load_balancer(lb_spec) if isinstance(lb_spec, Mapping) else LoadBalancer(),
        limits=_limits(pool_spec) if isinstance(pool_spec, Mapping) else None,
        outlier=_outlier(outlier_spec) if isinstance(outlier_spec, Mapping) else None,
        tls=_tls(tls_spec) if isinstance(tls_spec, Mapping) else None,
        http2=http2,
        weighted=weighted,
    )
    return None if traffic == ClusterTraffic() else traffic
