"""Istio's standard metrics, aggregated in process and rendered at scrape time.

What it owns: counting every request cheaply (``RequestMetrics.record``, called once
per request from the pipeline) and every connection proxied as TCP (``TcpMetrics``,
called when a TLS passthrough splice opens and closes), turning those aggregates into
plain data that can cross a process boundary (``export``/``merge_exports``/
``merge_tcp_exports``, for ``--workers`` > 1), and a prometheus-client collector that
expands them into Istio's metric names and labels when ``/metrics`` is scraped. What
it leaves to others: serving ``/metrics`` (``gateway.admin``), shipping worker figures
to the parent (``gateway.runtime``), and counting a splice's bytes (the splices).

Why not ``Counter.labels(...).inc()`` per request: with four metrics, eleven labels
and three histograms, prometheus-client's per-request path costs tens of µs, a large
slice of the ~50 µs a request may spend. Here a request costs one dict lookup on a
short key tuple, three ``bisect`` calls into fixed bucket arrays and a few integer
additions (measured in ``tests/unit/test_metrics.py``). The eleven Istio labels are
derived from the short key only when scraped.

    key    = (cluster name, response code, response flags)
    series = [count,
              duration bucket counts, duration sum (ms),
              request-bytes bucket counts, request-bytes sum,
              response-bytes bucket counts, response-bytes sum]

Bucket counts are per bucket (not cumulative) with a last ``+Inf`` slot; they are
made cumulative when rendered.

TCP connections are counted per connection, never per read: a splice keeps its own
byte counts and hands them over once, when it ends.

    tcp key    = (cluster name, response flags)
    tcp series = [connections opened, connections closed,
                  bytes received from the client, bytes sent to the client]
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

__all__ = [
    "BYTES_BUCKETS",
    "DURATION_BUCKETS_MS",
    "IstioCollector",
    "RequestMetrics",
    "TcpMetrics",
    "WorkloadLabels",
    "destination_labels",
    "merge_exports",
    "merge_tcp_exports",
    "render_text",
]

# Istio's default buckets for istio_request_duration_milliseconds.
DURATION_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
    60000, 300000, 600000, 1800000, 3600000,
)  # fmt: skip
# Powers of ten from 1 byte to 1 GB, as Istio's size distributions.
BYTES_BUCKETS: tuple[float, ...] = tuple(float(10**i) for i in range(10))

# What ``record`` bisects: the same bounds, typed as the values they are compared
# with (durations are floats, sizes ints), because a mixed int/float comparison takes
# CPython's slow path, several times per bisect.
_DUR_BOUNDS: tuple[float, ...] = tuple(float(bound) for bound in DURATION_BUCKETS_MS)
_BYTES_BOUNDS: tuple[int, ...] = tuple(10**i for i in range(10))

_COUNT, _DUR, _DUR_SUM, _REQ, _REQ_SUM, _RESP, _RESP_SUM = range(7)

Key = tuple[str, int, str]

# In process, one series is a single flat list, so that recording is one subscript
# per update rather than two (series -> bucket list -> bucket):
#   [count, duration sum, request-bytes sum, response-bytes sum,
#    duration buckets..., request-bytes buckets..., response-bytes buckets...]
_F_DUR_SUM, _F_REQ_SUM, _F_RESP_SUM = 1, 2, 3
_F_DUR = 4
_F_REQ = _F_DUR + len(DURATION_BUCKETS_MS) + 1
_F_RESP = _F_REQ + len(BYTES_BUCKETS) + 1
_F_END = _F_RESP + len(BYTES_BUCKETS) + 1


def _nested(flat: list[Any]) -> list[Any]:
    """The flat in-process layout as the exported one (module docstring)."""
    return [
        flat[0],
        flat[_F_DUR:_F_REQ],
        flat[_F_DUR_SUM],
        flat[_F_REQ:_F_RESP],
        flat[_F_REQ_SUM],
        flat[_F_RESP:_F_END],
        flat[_F_RESP_SUM],
    ]


class RequestMetrics:
    """One process's request aggregates. Not thread-safe: one event loop owns it."""

    __slots__ = ("_flat",)

    def __init__(self) -> None:
        self._flat: dict[Key, list[Any]] = {}

    @property
    def series(self) -> dict[Key, list[Any]]:
        """``key -> series`` in the exported layout (a copy, built when asked)."""
        return {key: _nested(flat) for key, flat in self._flat.items()}

    def record(
        self,
        cluster: str,
        status: int,
        flags: str,
        duration_ms: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        """Count one finished request (the pipeline calls this once per request).

        The usual request: one dict probe, two or three C ``bisect`` calls and a few
        in-place additions on one list."""
        flat = self._flat.get((cluster, status, flags))
        if flat is None:
            flat = self._flat[(cluster, status, flags)] = [0, 0.0, 0, 0] + [0] * (_F_END - 4)
        flat[0] += 1
        flat[_F_DUR + bisect_left(_DUR_BOUNDS, duration_ms)] += 1
        flat[1] += duration_ms
        if request_bytes:
            flat[_F_REQ + bisect_left(_BYTES_BOUNDS, request_bytes)] += 1
            flat[2] += request_bytes
        else:  # most requests have no body: the first bucket, nothing to add
            flat[_F_REQ] += 1
        flat[_F_RESP + bisect_left(_BYTES_BOUNDS, response_bytes)] += 1
        flat[3] += response_bytes

    def export(self) -> list[list[Any]]:
        """JSON-able ``[[cluster, status, flags], series]`` pairs (a copy)."""
        return [[list(key), _nested(flat)] for key, flat in self._flat.items()]


def merge_exports(exports: Iterable[list[list[Any]]]) -> dict[Key, list[Any]]:
    """Sum the exports of several processes into one ``key -> series`` mapping."""
    merged: dict[Key, list[Any]] = {}
    for export in exports:
        for raw_key, s in export:
            key = (str(raw_key[0]), int(raw_key[1]), str(raw_key[2]))
            into = merged.get(key)
            if into is None:
                merged[key] = [s[0], list(s[1]), s[2], list(s[3]), s[4], list(s[5]), s[6]]
                continue
            for index in (_COUNT, _DUR_SUM, _REQ_SUM, _RESP_SUM):
                into[index] += s[index]
            for index in (_DUR, _REQ, _RESP):
                into[index] = [a + b for a, b in zip(into[index], s[index], strict=True)]
    return merged


TcpKey = tuple[str, str]

_OPENED, _CLOSED, _RECEIVED, _SENT = range(4)


class TcpMetrics:
    """One process's TCP connection aggregates. Not thread-safe: one event loop owns it.

    A connection is ``opened`` when its splice to the upstream is established and
    ``closed`` when the splice ends, with the bytes it carried each way; those are
    added then, not while it runs (a long-lived connection's bytes show when it
    closes). A connection that never reached an upstream (no cluster, a failed
    connect, a refusal) is ``refused``: opened and closed at once, under its flags,
    which is how Istio reports a connection whose first report is its last."""

    __slots__ = ("_series",)

    def __init__(self) -> None:
        self._series: dict[TcpKey, list[int]] = {}

    @property
    def series(self) -> dict[TcpKey, list[int]]:
        """``key -> series`` (a copy)."""
        return {key: list(s) for key, s in self._series.items()}

    def _slot(self, cluster: str, flags: str) -> list[int]:
        s = self._series.get((cluster, flags))
        if s is None:
            s = self._series[(cluster, flags)] = [0, 0, 0, 0]
        return s

    def opened(self, cluster: str) -> None:
        """Count a connection whose splice to ``cluster`` is now established."""
        self._slot(cluster, "")[_OPENED] += 1

    def closed(self, cluster: str, flags: str, received_bytes: int, sent_bytes: int) -> None:
        """Count the end of an ``opened`` connection: ``received_bytes`` came from the
        client (and went upstream), ``sent_bytes`` went to the client."""
        s = self._slot(cluster, flags)
        s[_CLOSED] += 1
        s[_RECEIVED] += received_bytes
        s[_SENT] += sent_bytes

    def refused(self, cluster: str, flags: str) -> None:
        """Count a connection that ended before it reached an upstream."""
        s = self._slot(cluster, flags)
        s[_OPENED] += 1
        s[_CLOSED] += 1

    def export(self) -> list[list[Any]]:
        """JSON-able ``[[cluster, flags], series]`` pairs (a copy)."""
        return [[list(key), list(s)] for key, s in self._series.items()]


def merge_tcp_exports(exports: Iterable[list[list[Any]]]) -> dict[TcpKey, list[int]]:
    """Sum the ``TcpMetrics`` exports of several processes into ``key -> series``."""
    merged: dict[TcpKey, list[int]] = {}
    for export in exports:
        for raw_key, s in export:
            key = (str(raw_key[0]), str(raw_key[1]))
            into = merged.get(key)
            if into is None:
                merged[key] = [int(v) for v in s]
            else:
                merged[key] = [a + int(b) for a, b in zip(into, s, strict=True)]
    return merged


class WorkloadLabels:
    """Who reports: the gateway's own workload name and namespace."""

    __slots__ = ("name", "namespace")

    def __init__(self, name: str, namespace: str) -> None:
        self.name = name
        self.namespace = namespace


_UNKNOWN = "unknown"


def destination_labels(cluster: str) -> tuple[str, str, str]:
    """(destination_service, destination_service_name, destination_service_namespace)
    from an Istio-style cluster name ``outbound|<port>|<subset>|<host>``.

    A Kubernetes service host ``name.namespace.svc[.cluster.local]`` gives its name and
    namespace, as Istio reports them. Any other host (a ServiceEntry's) is its own
    service name, with an unknown namespace. No cluster (a local reply, no route)
    is ``unknown`` throughout, as Envoy reports a request that never had a
    destination.
    """
    if not cluster:
        return _UNKNOWN, _UNKNOWN, _UNKNOWN
    host = cluster.rsplit("|", 1)[-1]
    labels = host.split(".")
    if len(labels) >= 3 and labels[2] == "svc":
        return host, labels[0], labels[1]
    return host, host, _UNKNOWN


class IstioCollector:
    """Renders merged aggregates as Istio's metrics at scrape time.

    ``source`` returns the merged ``key -> series`` mapping (this process's, or every
    worker's summed); ``protocol_of`` maps a cluster name to ``http`` or ``grpc``;
    ``tcp_source``, when given, returns the merged TCP ``key -> series`` mapping.

    A prometheus-client collector by shape (``collect``), not by base class:
    prometheus-client (about 2.7 MB of a worker's memory with what its package
    imports: an HTTP server, urllib, wsgiref) is imported at the first scrape, not
    by every worker at start."""

    def __init__(
        self,
        source: Callable[[], Mapping[Key, list[Any]]],
        workload: WorkloadLabels,
        protocol_of: Callable[[str], str] = lambda cluster: "http",
        tcp_source: Callable[[], Mapping[TcpKey, list[int]]] | None = None,
    ) -> None:
        self.source = source
        self.workload = workload
        self.protocol_of = protocol_of
        self.tcp_source = tcp_source

    def collect(self) -> Iterator[Any]:
        yield from render_families(self.source(), self.workload, self.protocol_of)
        tcp = self.tcp_source() if self.tcp_source is not None else {}
        yield from render_tcp_families(tcp, self.workload)


LABEL_NAMES = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
)

# Istio's TCP metrics carry no response code.
TCP_LABEL_NAMES = tuple(name for name in LABEL_NAMES if name != "response_code")


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out = []
    running = 0
    for bound, count in zip(bounds, counts, strict=False):
        running += count
        out.append((_bound_text(bound), running))
    out.append(("+Inf", running + counts[-1]))
    return out


def _bound_text(bound: float) -> str:
    # Go's float formatting, as every Prometheus client writes ``le``: 1.0, 1e+09.
    from prometheus_client.utils import floatToGoString

    return floatToGoString(bound)


def render_families(
    series: Mapping[Key, list[Any]],
    workload: WorkloadLabels,
    protocol_of: Callable[[str], str],
) -> list[Any]:
    """The four Istio metric families for ``series``."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    requests = CounterMetricFamily(
        "istio_requests_total", "Requests handled by this gateway.", labels=LABEL_NAMES
    )
    duration = HistogramMetricFamily(
        "istio_request_duration_milliseconds",
        "Request duration: request head received to last response byte written.",
        labels=LABEL_NAMES,
    )
    request_bytes = HistogramMetricFamily(
        "istio_request_bytes", "Request body sizes.", labels=LABEL_NAMES
    )
    response_bytes = HistogramMetricFamily(
        "istio_response_bytes", "Response body sizes.", labels=LABEL_NAMES
    )
    for (cluster, status, flags), s in sorted(series.items()):
        service, service_name, service_namespace = destination_labels(cluster)
        values = [
            # A gateway is the client side of the request it forwards, which Istio
            # reports as "source" (its gateways do the same).
            "source",
            workload.name,
            workload.namespace,
            _UNKNOWN,  # the workload behind an endpoint is not known to a gateway
            _UNKNOWN,
            service,
            service_name,
            service_namespace,
            protocol_of(cluster) if cluster else "http",
            str(status),
            flags or "-",
            # Istio: mutual_tls or none only in a destination report; a source
            # report cannot know the policy and says unknown.
            _UNKNOWN,
        ]
        requests.add_metric(values, s[_COUNT])
        duration.add_metric(values, _buckets(DURATION_BUCKETS_MS, s[_DUR]), s[_DUR_SUM])
        request_bytes.add_metric(values, _buckets(BYTES_BUCKETS, s[_REQ]), s[_REQ_SUM])
        response_bytes.add_metric(values, _buckets(BYTES_BUCKETS, s[_RESP]), s[_RESP_SUM])
    return [requests, duration, request_bytes, response_bytes]


def render_tcp_families(series: Mapping[TcpKey, list[int]], workload: WorkloadLabels) -> list[Any]:
    """The four Istio TCP metric families for ``series``.

    Sent and received are the reporter's view of the downstream connection, as Istio
    counts them: received is what the client sent (and the gateway forwarded
    upstream), sent is what the gateway wrote back to the client."""
    from prometheus_client.core import CounterMetricFamily

    def family(name: str, help_text: str) -> Any:
        return CounterMetricFamily(name, help_text, labels=TCP_LABEL_NAMES)

    opened = family("istio_tcp_connections_opened_total", "TCP connections spliced to an upstream.")
    closed = family("istio_tcp_connections_closed_total", "TCP connections ended.")
    received = family(
        "istio_tcp_received_bytes_total", "Bytes received from clients on TCP connections."
    )
    sent = family("istio_tcp_sent_bytes_total", "Bytes sent to clients on TCP connections.")
    for (cluster, flags), s in sorted(series.items()):
        service, service_name, service_namespace = destination_labels(cluster)
        values = [
            "source",  # as for requests: the gateway is the client side it forwards
            workload.name,
            workload.namespace,
            _UNKNOWN,
            _UNKNOWN,
            service,
            service_name,
            service_namespace,
            "tcp",
            flags or "-",
            _UNKNOWN,  # connection_security_policy, as on the request metrics
        ]
        opened.add_metric(values, s[_OPENED])
        closed.add_metric(values, s[_CLOSED])
        received.add_metric(values, s[_RECEIVED])
        sent.add_metric(values, s[_SENT])
    return [opened, closed, received, sent]


def render_text(
    series: Mapping[Key, list[Any]],
    workload: WorkloadLabels,
    protocol_of: Callable[[str], str] = lambda cluster: "http",
    tcp: Mapping[TcpKey, list[int]] | None = None,
) -> bytes:
    """The Prometheus text exposition of ``series`` and the TCP aggregates ``tcp``
    (what ``/metrics`` returns)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(IstioCollector(lambda: series, workload, protocol_of, lambda: tcp or {}))
    return generate_latest(registry)
