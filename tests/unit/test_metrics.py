"""Request metrics: aggregation, merging across workers, Istio exposition, and cost."""

from __future__ import annotations

import json
import time

from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import (
    BYTES_BUCKETS,
    DURATION_BUCKETS_MS,
    RequestMetrics,
    TcpMetrics,
    WorkloadLabels,
    destination_labels,
    merge_exports,
    merge_tcp_exports,
    render_text,
)

CLUSTER = "outbound|9080||reviews.shop.svc.cluster.local"
WORKLOAD = WorkloadLabels("meshgate-ingressgateway", "edge")


def _samples(text: bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_requests_are_counted_per_cluster_code_and_flags() -> None:
    metrics = RequestMetrics()
    for _ in range(3):
        metrics.record(CLUSTER, 200, "", 2.0, 0, 100)
    metrics.record(CLUSTER, 503, "UF", 12.0, 10, 19)
    metrics.record("", 404, "NR", 0.3, 0, 0)
    samples = _samples(render_text(metrics.series, WORKLOAD))
    totals = {
        (s["response_code"], s["response_flags"], s["destination_service_name"]): v
        for s, v in samples["istio_requests_total"]
    }
    assert totals == {
        ("200", "-", "reviews"): 3.0,
        ("503", "UF", "reviews"): 1.0,
        ("404", "NR", "unknown"): 1.0,
    }


def test_every_istio_label_is_present_with_gateway_values() -> None:
    metrics = RequestMetrics()
    metrics.record(CLUSTER, 200, "", 2.0, 0, 100)
    samples = _samples(render_text(metrics.series, WORKLOAD))
    labels, _ = samples["istio_requests_total"][0]
    assert labels == {
        "reporter": "source",
        "source_workload": "meshgate-ingressgateway",
        "source_workload_namespace": "edge",
        "destination_workload": "unknown",
        "destination_workload_namespace": "unknown",
        "destination_service": "reviews.shop.svc.cluster.local",
        "destination_service_name": "reviews",
        "destination_service_namespace": "shop",
        "request_protocol": "http",
        "response_code": "200",
        "response_flags": "-",
        "connection_security_policy": "unknown",
    }


def test_histograms_are_cumulative_with_count_and_sum() -> None:
    metrics = RequestMetrics()
    metrics.record(CLUSTER, 200, "", 0.4, 5, 1)  # <=0.5 ms, <=10 B, <=1 B
    metrics.record(CLUSTER, 200, "", 7.0, 5000, 2000)  # <=10 ms, <=10 kB, <=10 kB
    samples = _samples(render_text(metrics.series, WORKLOAD))
    duration = {s["le"]: v for s, v in samples["istio_request_duration_milliseconds_bucket"]}
    assert duration["0.5"] == 1.0
    assert duration["5.0"] == 1.0
    assert duration["10.0"] == 2.0
    assert duration["+Inf"] == 2.0
    assert samples["istio_request_duration_milliseconds_count"][0][1] == 2.0
    assert samples["istio_request_duration_milliseconds_sum"][0][1] == 7.4
    request = {s["le"]: v for s, v in samples["istio_request_bytes_bucket"]}
    assert request["1.0"] == 0.0 and request["10.0"] == 1.0 and request["10000.0"] == 2.0
    assert samples["istio_response_bytes_sum"][0][1] == 2001.0
    assert len(request) == len(BYTES_BUCKETS) + 1
    assert len(duration) == len(DURATION_BUCKETS_MS) + 1


def test_values_over_the_last_bucket_land_in_inf_only() -> None:
    metrics = RequestMetrics()
    metrics.record(CLUSTER, 200, "", 5_000_000.0, 0, 5 * 10**9)
    samples = _samples(render_text(metrics.series, WORKLOAD))
    response = {s["le"]: v for s, v in samples["istio_response_bytes_bucket"]}
    assert response["1e+09"] == 0.0
    assert response["+Inf"] == 1.0


def test_worker_exports_merge_into_exact_sums() -> None:
    one, two = RequestMetrics(), RequestMetrics()
    for _ in range(7):
        one.record(CLUSTER, 200, "", 1.0, 0, 10)
    for _ in range(5):
        two.record(CLUSTER, 200, "", 30.0, 0, 10)
    two.record(CLUSTER, 504, "UT", 30.0, 0, 0)
    merged = merge_exports([one.export(), two.export()])
    assert merged[(CLUSTER, 200, "")][0] == 12
    assert merged[(CLUSTER, 504, "UT")][0] == 1
    samples = _samples(render_text(merged, WORKLOAD))
    duration = {
        s["le"]: v
        for s, v in samples["istio_request_duration_milliseconds_bucket"]
        if s["response_code"] == "200"
    }
    assert duration["1.0"] == 7.0 and duration["50.0"] == 12.0


def test_grpc_clusters_report_the_grpc_protocol() -> None:
    metrics = RequestMetrics()
    metrics.record(CLUSTER, 200, "", 1.0, 0, 0)
    text = render_text(metrics.series, WORKLOAD, lambda cluster: "grpc")
    labels, _ = _samples(text)["istio_requests_total"][0]
    assert labels["request_protocol"] == "grpc"


def test_service_entry_hosts_are_their_own_service_name() -> None:
    assert destination_labels("outbound|443||api.example.com") == (
        "api.example.com",
        "api.example.com",
        "unknown",
    )
    assert destination_labels("outbound|80|v1|ratings.prod.svc.cluster.local") == (
        "ratings.prod.svc.cluster.local",
        "ratings",
        "prod",
    )


def test_recording_a_request_costs_a_few_microseconds() -> None:
    metrics = RequestMetrics()
    keys = [(CLUSTER, 200, ""), (CLUSTER, 503, "UF"), ("", 404, "NR")]
    n = 6_000
    best = float("inf")
    for _ in range(5):  # best of several short rounds: the machine is shared
        start = time.perf_counter()
        for i in range(n):
            cluster, status, flags = keys[i % 3]
            metrics.record(cluster, status, flags, 3.7, 120, 4096)
        best = min(best, (time.perf_counter() - start) / n)
    print(f"RequestMetrics.record: {best * 1e6:.2f} us per request")
    assert best < 5e-6, f"{best * 1e6:.2f} us per record"
    assert metrics.series[(CLUSTER, 200, "")][0] == 5 * n // 3


def test_bodiless_requests_and_values_on_a_bound_land_in_the_right_bucket() -> None:
    # Bodiless requests take a shortcut in record(); values equal to a bound belong
    # to that bound's bucket (le is inclusive) whether given as int or float.
    metrics = RequestMetrics()
    metrics.record(CLUSTER, 200, "", 1.0, 0, 10)
    metrics.record(CLUSTER, 200, "", 5, 100, 1)
    samples = _samples(render_text(metrics.series, WORKLOAD))
    request = {s["le"]: v for s, v in samples["istio_request_bytes_bucket"]}
    assert request["1.0"] == 1.0 and request["10.0"] == 1.0 and request["100.0"] == 2.0
    assert samples["istio_request_bytes_sum"][0][1] == 100.0
    duration = {s["le"]: v for s, v in samples["istio_request_duration_milliseconds_bucket"]}
    assert duration["0.5"] == 0.0 and duration["1.0"] == 1.0 and duration["5.0"] == 2.0
    response = {s["le"]: v for s, v in samples["istio_response_bytes_bucket"]}
    assert response["1.0"] == 1.0 and response["10.0"] == 2.0
    exported = metrics.export()
    assert exported[0][0] == [CLUSTER, 200, ""]
    count, dur, dur_sum, req, req_sum, resp, resp_sum = exported[0][1]
    assert (count, dur_sum, req_sum, resp_sum) == (2, 6.0, 100, 11)
    assert sum(dur) == sum(req) == sum(resp) == 2


def test_the_data_plane_does_not_import_prometheus_client_until_a_scrape() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import gateway.pipeline, gateway.services, gateway.admin\n"
        "print('prometheus_client' in sys.modules)\n"
        "from gateway.metrics import RequestMetrics, WorkloadLabels, render_text\n"
        "m = RequestMetrics(); m.record('c', 200, '', 1.0, 0, 1)\n"
        "render_text(m.series, WorkloadLabels('w', 'n'))\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


# --------------------------------------------------------------------------- TCP

EXTERNAL = "outbound|443||api.example.com"
TCP_FAMILIES = (
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_sent_bytes_total",
)


def _tcp(text: bytes) -> dict[tuple[str, str], tuple[float, ...]]:
    """(destination_service, response_flags) -> (opened, closed, received, sent)."""
    samples = _samples(text)
    out: dict[tuple[str, str], list[float]] = {}
    for index, name in enumerate(TCP_FAMILIES):
        for labels, value in samples.get(name, []):
            key = (labels["destination_service"], labels["response_flags"])
            out.setdefault(key, [0.0] * 4)[index] = value
    return {key: tuple(values) for key, values in out.items()}


def test_tcp_connections_are_counted_opened_then_closed_with_their_bytes() -> None:
    tcp = TcpMetrics()
    tcp.opened(CLUSTER)
    tcp.opened(CLUSTER)
    text = render_text({}, WORKLOAD, tcp=tcp.series)
    assert _tcp(text) == {("reviews.shop.svc.cluster.local", "-"): (2.0, 0.0, 0.0, 0.0)}
    tcp.closed(CLUSTER, "", 517, 4000)
    tcp.closed(CLUSTER, "", 100, 20)
    text = render_text({}, WORKLOAD, tcp=tcp.series)
    assert _tcp(text) == {("reviews.shop.svc.cluster.local", "-"): (2.0, 2.0, 617.0, 4020.0)}


def test_a_connection_that_never_reached_an_upstream_is_opened_and_closed_with_its_flag() -> None:
    tcp = TcpMetrics()
    tcp.refused(EXTERNAL, "UF")
    tcp.refused("BlackHoleCluster", "NR")
    tcp.refused(EXTERNAL, "UF")
    assert _tcp(render_text({}, WORKLOAD, tcp=tcp.series)) == {
        ("api.example.com", "UF"): (2.0, 2.0, 0.0, 0.0),
        ("BlackHoleCluster", "NR"): (1.0, 1.0, 0.0, 0.0),
    }


def test_tcp_metrics_carry_istio_tcp_labels_and_no_response_code() -> None:
    tcp = TcpMetrics()
    tcp.opened(EXTERNAL)
    samples = _samples(render_text({}, WORKLOAD, tcp=tcp.series))
    for name in TCP_FAMILIES:
        (labels, _), *others = samples[name]
        assert not others
        assert labels == {
            "reporter": "source",
            "source_workload": "meshgate-ingressgateway",
            "source_workload_namespace": "edge",
            "destination_workload": "unknown",
            "destination_workload_namespace": "unknown",
            "destination_service": "api.example.com",
            "destination_service_name": "api.example.com",
            "destination_service_namespace": "unknown",
            "request_protocol": "tcp",
            "response_flags": "-",
            "connection_security_policy": "unknown",
        }, name


def test_tcp_exports_of_workers_merge_into_exact_sums() -> None:
    one, two = TcpMetrics(), TcpMetrics()
    for tcp, n, size in ((one, 3, 10), (two, 4, 1000)):
        for _ in range(n):
            tcp.opened(EXTERNAL)
            tcp.closed(EXTERNAL, "", size, 2 * size)
    two.refused(EXTERNAL, "UF")
    # What crosses the process boundary is JSON.
    exports = [json.loads(json.dumps(t.export())) for t in (one, two)]
    merged = merge_tcp_exports(exports)
    assert merged == {(EXTERNAL, ""): [7, 7, 4030, 8060], (EXTERNAL, "UF"): [1, 1, 0, 0]}
    assert _tcp(render_text({}, WORKLOAD, tcp=merged)) == {
        ("api.example.com", "-"): (7.0, 7.0, 4030.0, 8060.0),
        ("api.example.com", "UF"): (1.0, 1.0, 0.0, 0.0),
    }


def test_requests_and_tcp_connections_render_side_by_side() -> None:
    metrics, tcp = RequestMetrics(), TcpMetrics()
    metrics.record(CLUSTER, 200, "", 1.0, 0, 10)
    tcp.opened(EXTERNAL)
    samples = _samples(render_text(metrics.series, WORKLOAD, tcp=tcp.series))
    assert [v for _, v in samples["istio_requests_total"]] == [1.0]
    assert [v for _, v in samples["istio_tcp_connections_opened_total"]] == [1.0]
    # No TCP aggregates: the families are declared, with no series.
    text = render_text(metrics.series, WORKLOAD)
    for name in TCP_FAMILIES:
        assert f"# TYPE {name} counter".encode() in text
        assert name not in _samples(text)
