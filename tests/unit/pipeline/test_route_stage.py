"""RouteStage's per-listener memo of authority -> virtual host."""

from __future__ import annotations

import pytest

from gateway.errors import RouteNotFound
from gateway.routing.table import Snapshot
from gateway.server.events import RequestHead
from gateway.stages import RequestContext, RouteStage
from tests.unit.routing.routing_builders import (
    compile_resources,
    fwd,
    gateway,
    virtual_service,
)


class _Stream:
    def __init__(self, head: RequestHead) -> None:
        self.head = head


def _route_name(stage: RouteStage, snapshot: Snapshot, authority: str) -> str:
    head = RequestHead("GET", "/", "", authority, "http", [], port=8080, peer="10.0.0.1")
    ctx = RequestContext(_Stream(head), snapshot, 0.0, 0.0)  # type: ignore[arg-type]
    stage.on_request(ctx)
    assert ctx.route is not None
    return ctx.route.name


def _snapshot(host: str, route_name: str) -> Snapshot:
    return compile_resources(
        gateway(hosts=["*"]),
        virtual_service("vs", [fwd("backend.svc", name=route_name)], hosts=[host]),
    )


def test_remembered_hosts_follow_a_reload_to_the_new_listener() -> None:
    stage = RouteStage()
    before = _snapshot("shop.example", "old")
    assert _route_name(stage, before, "shop.example") == "old"
    assert _route_name(stage, before, "SHOP.example:8080") == "old"
    after = _snapshot("shop.example", "new")
    # The same authority on the new snapshot's listener resolves afresh.
    assert _route_name(stage, after, "shop.example") == "new"
    assert _route_name(stage, before, "shop.example") == "old"


def test_an_unknown_authority_is_refused_every_time() -> None:
    stage = RouteStage()
    snapshot = _snapshot("shop.example", "r")
    for _ in range(2):  # the second time from the memo
        with pytest.raises(RouteNotFound):
            _route_name(stage, snapshot, "other.example")


def test_the_memo_stops_growing_at_its_bound() -> None:
    stage = RouteStage()
    snapshot = _snapshot("*.example", "r")
    for index in range(1500):
        assert _route_name(stage, snapshot, f"h{index}.example") == "r"
    ((_, hosts),) = stage._hosts.values()
    assert len(hosts) == 1024
