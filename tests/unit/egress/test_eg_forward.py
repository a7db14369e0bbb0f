"""egress.forward decisions, on a compiled Snapshot (no sockets)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from egress import ALLOW_ANY, EgressSettings, attach_egress
from egress.forward import BLACKHOLE_CLUSTER, Egress, EgressRefused, EgressRouteStage
from gateway.config.load import load_config
from gateway.errors import BadRequest
from gateway.routing.compile import compile_snapshot
from gateway.server.events import RequestHead
from gateway.stages import RequestContext
from gateway.upstream.pool import UpstreamPools

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: block, namespace: egress}
spec:
  hosts: [db.example.test]
  addresses: [10.9.0.0/16]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
"""


class _Stream:
    def __init__(self, head: RequestHead, tunnel: Any) -> None:
        self.head = head
        self.tunnel = tunnel


def _ctx(snapshot: Any, method: str, authority: str, *, version: str = "1.1") -> RequestContext:
    head = RequestHead(
        method=method,
        path="" if method == "CONNECT" else "/",
        query="",
        authority=authority,
        scheme="http",
        headers=[],
        http_version=version,
        port=8080,
        peer="127.0.0.1",
    )
    tunnel = bytearray() if method == "CONNECT" and version == "1.1" else None
    return RequestContext(_Stream(head, tunnel), snapshot, time.perf_counter(), time.time())


def _snapshot(tmp: Path, policy: str = "REGISTRY_ONLY") -> Any:
    (tmp / "config.yaml").write_text(CONFIG)
    model = load_config([str(tmp)])
    snapshot = compile_snapshot(model, {"istio": "egressgateway"})
    settings = EgressSettings(outbound_traffic_policy=policy)
    return attach_egress(snapshot, model, settings, "istio-system")


def test_connect_over_http2_is_a_bad_request(tmp_path: Path) -> None:
    stage = EgressRouteStage(Egress(EgressSettings(), UpstreamPools()))
    ctx = _ctx(_snapshot(tmp_path), "CONNECT", "10.9.0.1:5432", version="2")
    with pytest.raises(BadRequest):
        stage.on_request(ctx)


def test_each_address_of_a_block_is_its_own_destination(tmp_path: Path) -> None:
    egress = Egress(EgressSettings(), UpstreamPools())
    snapshot = _snapshot(tmp_path)
    first = egress.registry_route(_ctx(snapshot, "CONNECT", "10.9.0.1:5432"), connect=True)
    second = egress.registry_route(_ctx(snapshot, "CONNECT", "10.9.0.2:5432"), connect=True)
    names = [r.action.destinations[0].cluster for r in (first, second)]  # type: ignore[union-attr]
    assert names == ["outbound|5432||10.9.0.1", "outbound|5432||10.9.0.2"]
    assert first.origin.ref == "ServiceEntry/egress/block"


def test_refusal_goes_to_the_black_hole(tmp_path: Path) -> None:
    egress = Egress(EgressSettings(), UpstreamPools())
    ctx = _ctx(_snapshot(tmp_path), "GET", "10.10.0.1")
    with pytest.raises(EgressRefused) as refused:
        egress.registry_route(ctx, connect=False)
    assert refused.value.status == 502 and refused.value.flag == "NR"
    assert ctx.upstream_cluster == BLACKHOLE_CLUSTER and egress.refused == 1


def test_allow_any_takes_an_undeclared_port_to_the_host_asked_for(tmp_path: Path) -> None:
    egress = Egress(EgressSettings(outbound_traffic_policy=ALLOW_ANY), UpstreamPools())
    route = egress.registry_route(
        _ctx(_snapshot(tmp_path, ALLOW_ANY), "GET", "db.example.test:8080"), connect=False
    )
    assert route.origin.ref == "OutboundTrafficPolicy/-/ALLOW_ANY"
    assert route.action.destinations[0].cluster == "outbound|8080||db.example.test"  # type: ignore[union-attr]


def test_redis_limit_for_registry_routes_needs_a_redis_url(tmp_path: Path) -> None:
    from ratelimit.limiter import LimiterSettings, snapshot_problem

    (tmp_path / "limit.yaml").write_text(
        "apiVersion: meshgate.io/v1alpha1\n"
        "kind: RateLimitPolicy\n"
        "metadata: {name: exits, namespace: istio-system}\n"
        "spec:\n"
        "  hosts: [db.example.test]\n"
        "  limits:\n"
        "  - {name: shared, rate: {requests: 5, per: second}, backend: redis}\n"
    )
    snapshot = _snapshot(tmp_path)
    problem = snapshot_problem(snapshot, LimiterSettings())
    assert problem is not None and "istio-system/exits/shared" in problem
    assert snapshot_problem(snapshot, LimiterSettings("redis://127.0.0.1:6379/0")) is None
