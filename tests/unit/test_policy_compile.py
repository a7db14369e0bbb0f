"""Compiling route and cluster traffic policy from the YAML-spelled mappings."""

from __future__ import annotations

from pathlib import Path

from gateway.config.load import load_resources
from gateway.config.validate import validate
from gateway.policy import (
    ClusterTraffic,
    LoadBalancer,
    compile_cluster_traffic,
    compile_route_traffic,
)
from gateway.routing.compile import compile_snapshot


def clusters(dest: object) -> str:
    assert isinstance(dest, dict)
    return f"outbound|80|{dest.get('subset', '')}|{dest['host']}"


def test_route_without_policy_compiles_to_none() -> None:
    assert compile_route_traffic({}, clusters) is None
    assert compile_route_traffic({"retries": {"attempts": 0}}, clusters) is None


def test_retry_conditions_and_status_codes() -> None:
    traffic = compile_route_traffic(
        {
            "retries": {
                "attempts": 3,
                "perTryTimeout": "250ms",
                "retryOn": "gateway-error,retriable-4xx,reset,418,retriable-status-codes",
            }
        },
        clusters,
    )
    assert traffic is not None and traffic.retry is not None
    retry = traffic.retry
    assert retry.attempts == 3 and retry.per_try_timeout_s == 0.25
    assert retry.retry_on_status(503) and retry.retry_on_status(409) and retry.retry_on_status(418)
    assert not retry.retry_on_status(500) and not retry.retry_on_status(404)
    assert retry.retry_on_error("UR") and retry.retry_on_error("UF")


def test_retry_without_retry_on_gets_istios_default_conditions() -> None:
    traffic = compile_route_traffic({"retries": {"attempts": 2}}, clusters)
    assert traffic is not None and traffic.retry is not None
    assert traffic.retry.retry_on_status(503) and not traffic.retry.retry_on_status(500)
    assert traffic.retry.retry_on_error("UF") and not traffic.retry.retry_on_error("UR")


def test_fault_percentages_and_grpc_abort() -> None:
    traffic = compile_route_traffic(
        {
            "fault": {
                "delay": {"fixedDelay": "1s", "percentage": {"value": 25}},
                "abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 100}},
            }
        },
        clusters,
    )
    assert traffic is not None and traffic.fault is not None
    fault = traffic.fault
    assert (fault.delay_s, fault.delay_fraction) == (1.0, 0.25)
    assert (fault.abort_status, fault.abort_grpc_status, fault.abort_fraction) == (200, 14, 1.0)


def test_fault_without_percentage_injects_nothing() -> None:
    assert compile_route_traffic({"fault": {"abort": {"httpStatus": 500}}}, clusters) is None


def test_mirror_and_mirrors_resolve_clusters_with_their_fractions() -> None:
    traffic = compile_route_traffic(
        {
            "mirror": {"host": "a.local"},
            "mirrorPercentage": {"value": 50},
            "mirrors": [{"destination": {"host": "b.local", "subset": "v2"}}],
        },
        clusters,
    )
    assert traffic is not None
    assert [(m.cluster, m.fraction) for m in traffic.mirrors] == [
        ("outbound|80||a.local", 0.5),
        ("outbound|80|v2|b.local", 1.0),
    ]


def test_default_cluster_policy_compiles_to_none() -> None:
    assert compile_cluster_traffic({}, "HTTP") is None
    assert compile_cluster_traffic({"loadBalancer": {"simple": "ROUND_ROBIN"}}, "HTTP") is None


def test_cluster_policy_fields() -> None:
    traffic = compile_cluster_traffic(
        {
            "loadBalancer": {
                "consistentHash": {
                    "httpCookie": {"name": "u", "ttl": "0s"},
                    "maglev": {"tableSize": 1021},
                }
            },
            "connectionPool": {
                "tcp": {"maxConnections": 1, "connectTimeout": "2s"},
                "http": {"http1MaxPendingRequests": 1, "idleTimeout": "5s"},
            },
            "outlierDetection": {"consecutive5xxErrors": 2, "baseEjectionTime": "1m"},
            "tls": {"mode": "SIMPLE", "sni": "api.internal"},
        },
        "GRPC",
    )
    assert isinstance(traffic, ClusterTraffic)
    assert traffic.lb == LoadBalancer(
        kind="HASH", hash_cookie="u", hash_cookie_ttl_s=0.0, maglev=True, ring_size=1021
    )
    assert traffic.limits is not None and traffic.limits.max_connections == 1
    assert traffic.limits.connect_timeout_s == 2.0 and traffic.limits.idle_timeout_s == 5.0
    assert traffic.outlier is not None and traffic.outlier.base_ejection_s == 60.0
    assert traffic.tls is not None and traffic.tls.sni == "api.internal"
    assert traffic.http2


def test_h2_upgrade_policy_turns_http2_on() -> None:
    traffic = compile_cluster_traffic(
        {"connectionPool": {"http": {"h2UpgradePolicy": "UPGRADE"}}}, "HTTP"
    )
    assert traffic is not None and traffic.http2


SUBSETS_AND_PORTS = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: app, namespace: default}
spec:
  hosts: [app.local]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 9090, name: grpc, protocol: GRPC}]
  endpoints: [{address: 10.0.0.1, labels: {v: "1"}}, {address: 10.0.0.2, labels: {v: "2"}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: app, namespace: default}
spec:
  host: app.local
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    outlierDetection: {consecutive5xxErrors: 3}
    portLevelSettings:
      - port: {number: 9090}
        loadBalancer: {simple: LEAST_REQUEST}
  subsets:
    - name: v2
      labels: {v: "2"}
      trafficPolicy: {connectionPool: {tcp: {maxConnections: 7}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: app, namespace: default}
spec:
  hosts: [app.local]
  gateways: [gw]
  http:
    - match: [{uri: {prefix: /grpc}}]
      route: [{destination: {host: app.local, port: {number: 9090}}}]
    - match: [{uri: {prefix: /v2}}]
      route: [{destination: {host: app.local, port: {number: 80}, subset: v2}}]
      retries: {attempts: 1}
    - route: [{destination: {host: app.local, port: {number: 80}}}]
"""


def test_subset_and_port_level_policies_compile_onto_their_clusters(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(SUBSETS_AND_PORTS)
    snapshot = compile_snapshot(
        validate(load_resources([str(tmp_path)])), {"istio": "ingressgateway"}
    )
    clusters = snapshot.clusters
    plain = clusters["outbound|80||app.local"].traffic
    assert plain.lb.kind == "RANDOM" and plain.outlier.consecutive_5xx == 3
    assert plain.limits is None and not plain.http2
    # A subset sets what it names and inherits the rest.
    v2 = clusters["outbound|80|v2|app.local"].traffic
    assert v2.lb.kind == "RANDOM" and v2.limits.max_connections == 7 and v2.outlier is not None
    # A port-level entry replaces its fields whole: no outlier detection is inherited.
    grpc = clusters["outbound|9090||app.local"].traffic
    assert grpc.lb.kind == "LEAST_REQUEST" and grpc.outlier is None and grpc.http2
    routes = [r for vh in snapshot.listeners[80].virtual_hosts.values() for r in vh.routes]
    assert [r.traffic is not None for r in routes] == [False, True, False]
