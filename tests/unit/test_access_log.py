"""The JSON access-log line: valid JSON whatever the request carried, every field
from the request's own context, and route fields never taken from another route."""

from __future__ import annotations

import json
import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.routing.table import Forward, Origin, Route, WeightedCluster
from gateway.server.events import RequestHead
from gateway.stages import RequestContext
from gateway.telemetry import format_json, rfc3339


class _Stream:
    def __init__(self, head: RequestHead) -> None:
        self.head = head


def _route(name: str, vs: str = "vs") -> Route:
    forward = Forward((WeightedCluster("c", 100),), 100, (100,))
    return Route(name=name, origin=Origin("VirtualService", "ns", vs), matches=(), action=forward)


def _ctx(**kw: Any) -> RequestContext:
    head = RequestHead(
        method=kw.pop("method", "GET"),
        path=kw.pop("path", "/p"),
        query="",
        authority=kw.pop("authority", "shop.example"),
        scheme="http",
        headers=[],
        port=8080,
        peer="10.0.0.9",
    )
    ctx = RequestContext(_Stream(head), None, 100.0, 1_700_000_000.25)  # type: ignore[arg-type]
    for name, value in kw.items():
        setattr(ctx, name, value)
    return ctx


def test_a_proxied_request_is_one_json_object_with_every_field() -> None:
    ctx = _ctx(
        route=_route("all"),
        status=200,
        upstream_cluster="outbound|80||b.local",
        upstream_host="127.0.0.1:9000",
        bytes_sent=100,
        upstream_ms=1.23456,
        request_id="abc",
        user_agent="wrk",
    )
    line = format_json(ctx, 100.0125)
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record == {
        "start_time": "2023-11-14T22:13:20.250Z",
        "method": "GET",
        "authority": "shop.example",
        "path": "/p",
        "protocol": "HTTP/1.1",
        "status": 200,
        "response_flags": "-",
        "route": "VirtualService/ns/vs:all",
        "upstream_cluster": "outbound|80||b.local",
        "upstream_host": "127.0.0.1:9000",
        "bytes_received": 0,
        "bytes_sent": 100,
        "duration_ms": 12.5,
        "upstream_service_time_ms": 1.235,
        "request_id": "abc",
        "x_forwarded_for": "10.0.0.9",
        "user_agent": "wrk",
    }


def test_a_refused_request_has_dashes_and_null_upstream_time() -> None:
    record = json.loads(format_json(_ctx(status=404, flags="NR"), 100.001))
    assert (record["route"], record["upstream_cluster"], record["upstream_host"]) == ("-",) * 3
    assert record["upstream_service_time_ms"] is None
    assert record["response_flags"] == "NR"


def test_client_controlled_strings_cannot_break_the_line() -> None:
    hostile = 'a"b\\c\nd\te\x00\u2028'
    ctx = _ctx(path="/" + hostile, authority=hostile, user_agent=hostile, request_id=hostile)
    line = format_json(ctx, 100.0)
    assert line.count("\n") == 1
    record = json.loads(line)
    assert record["path"] == "/" + hostile
    assert record["authority"] == record["user_agent"] == record["request_id"] == hostile


def test_each_route_gets_its_own_fields_even_for_the_same_cluster_and_host() -> None:
    first, second = _route("one"), _route("two", vs="other")
    for route, label in (
        (first, "VirtualService/ns/vs:one"),
        (second, "VirtualService/ns/other:two"),
    ):
        for _ in range(2):  # the second line comes from the cache
            ctx = _ctx(route=route, upstream_cluster="c", upstream_host="h:1")
            assert json.loads(format_json(ctx, 100.0))["route"] == label


def _stamp(wall: float) -> str:
    milli = int(wall * 1000.0)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(milli // 1000)) + f".{milli % 1000:03d}Z"


@given(
    st.lists(
        st.one_of(
            st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False),
            # Walls a few microseconds apart: the same millisecond, the next, the
            # next second.
            st.integers(min_value=0, max_value=3_000_000).map(lambda us: 1_700_000_000 + us / 1e6),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_start_time_stamps_match_the_wall_clock_whatever_came_before(walls: list[float]) -> None:
    # The stamp is remembered per millisecond and its prefix per second; a sequence of
    # walls in any order must still give each one its own stamp.
    for wall in walls:
        assert rfc3339(wall) == _stamp(wall)
