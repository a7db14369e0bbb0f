"""Istio's standard request metrics, aggregated in process and rendered at scrape time.

What it owns: counting every request cheaply (``RequestMetrics.record``, called once
per request from the pipeline), turning those aggregates into plain data that can
cross a process boundary (``export``/``merge_exports``, for ``--workers`` > 1), and a
prometheus-client collector that expands them into Istio's metric names and labels
when ``/metrics`` is scraped. What it leaves to others: serving ``/metrics``
(``gateway.admin``) and shipping worker figures to the parent (``gateway.runtime``).

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
    "WorkloadLabels",
    "destination_labels",
    "merge_exports",
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
    worker's summed); ``protocol_of`` maps a cluster name to ``http`` or ``grpc``.

    A prometheus-client collector by shape (``collect``), not by base class:
    prometheus-client (about 2.7 MB of a worker's memory with what its package
    imports: an HTTP server, urllib, wsgiref) is imported at the first scrape, not
    by every worker at start."""

    def __init__(
        self,
        source: Callable[[], Mapping[Key, list[Any]]],
        workload: WorkloadLabels,
        protocol_of: Callable[[str], str] = lambda cluster: "http",
    ) -> None:
        self.source = source
        self.workload = workload
        self.protocol_of = protocol_of

    def collect(self) -> Iterator[Any]:
        yield from render_families(self.source(), self.workload, self.protocol_of)


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
)


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
        ]
        requests.add_metric(values, s[_COUNT])
        duration.add_metric(values, _buckets(DURATION_BUCKETS_MS, s[_DUR]), s[_DUR_SUM])
        request_bytes.add_metric(values, _buckets(BYTES_BUCKETS, s[_REQ]), s[_REQ_SUM])
        response_bytes.add_metric(values, _buckets(BYTES_BUCKETS, s[_RESP]), s[_RESP_SUM])
    return [requests, duration, request_bytes, response_bytes]


def render_text(
    series: Mapping[Key, list[Any]],
    workload: WorkloadLabels,
    protocol_of: Callable[[str], str] = lambda cluster: "http",
) -> bytes:
    """The Prometheus text exposition of ``series`` (what ``/metrics`` returns)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(IstioCollector(lambda: series, workload, protocol_of))
    return generate_latest(registry)
