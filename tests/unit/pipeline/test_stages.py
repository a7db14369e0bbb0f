"""Request stages on hand-built requests and routes (no sockets)."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest

from gateway.routing.table import (
    CorsPolicy,
    Forward,
    HeaderOps,
    Origin,
    Redirect,
    Route,
    StringMatcher,
    WeightedCluster,
)
from gateway.server.events import RequestHead
from gateway.stages import (
    CorsStage,
    EdgeHeadersStage,
    ForwardedHeadersStage,
    HopByHopStage,
    RequestContext,
    RequestIdStage,
    apply_header_ops,
    redirect_location,
)


class _Stream:
    def __init__(self, head: RequestHead) -> None:
        self.head = head


def _head(**kw: Any) -> RequestHead:
    base: dict[str, Any] = dict(
        method="GET",
        path="/p",
        query="",
        authority="shop.example",
        scheme="http",
        headers=[],
        port=8080,
        peer="10.0.0.9",
    )
    base.update(kw)
    return RequestHead(**base)


def _ctx(head: RequestHead) -> RequestContext:
    return RequestContext(_Stream(head), None, 0.0, 0.0)  # type: ignore[arg-type]


def _route(**kw: Any) -> Route:
    forward = Forward((WeightedCluster("c", 100),), 100, (100,))
    return Route(
        name="r", origin=Origin("VirtualService", "ns", "vs"), matches=(), action=forward, **kw
    )


def test_client_request_id_is_kept() -> None:
    ctx = _ctx(_head(headers=[("x-request-id", "abc")]))
    RequestIdStage().on_request(ctx)
    assert ctx.request_id == "abc"
    assert ctx.head.headers == [("x-request-id", "abc")]


def test_missing_request_id_is_generated_as_128_bit_hex() -> None:
    for stage in (RequestIdStage(), EdgeHeadersStage()):
        ctx = _ctx(_head())
        stage.on_request(ctx)
        assert re.fullmatch("[0-9a-f]{32}", ctx.request_id)
        assert ctx.head.header("x-request-id") == ctx.request_id


def test_generated_request_id_keeps_its_leading_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "getrandbits", lambda bits: 0xABC)
    for stage in (RequestIdStage(), EdgeHeadersStage()):
        ctx = _ctx(_head())
        stage.on_request(ctx)
        assert ctx.request_id == "0" * 29 + "abc"


def test_forwarded_for_appends_peer_and_proto_is_overwritten() -> None:
    head = _head(
        headers=[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-proto", "https"), ("a", "b")]
    )
    ctx = _ctx(head)
    ForwardedHeadersStage().on_request(ctx)
    assert head.header("x-forwarded-for") == "1.1.1.1, 10.0.0.9"
    assert head.header("x-forwarded-proto") == "http"
    assert head.header("x-forwarded-host") == "shop.example"
    assert ("a", "b") in head.headers


def test_hop_by_hop_headers_and_those_named_in_connection_are_dropped() -> None:
    head = _head(
        headers=[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "5"),
            ("x-private", "1"),
            ("te", "trailers, deflate"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]
    )
    HopByHopStage().on_request(_ctx(head))
    assert head.headers == [("x-kept", "yes"), ("te", "trailers")]


def test_redirect_keeps_query_and_drops_default_port() -> None:
    head = _head(path="/old", query="a=1", authority="shop.example:8080")
    location = redirect_location(
        Redirect(uri="/new", scheme="https", derive_port="FROM_PROTOCOL_DEFAULT"), head
    )
    assert location == "https://shop.example/new?a=1"


def test_redirect_with_explicit_port_and_authority() -> None:
    head = _head(path="/x")
    assert redirect_location(Redirect(authority="other.example", port=9443), head) == (
        "http://other.example:9443/x"
    )
    assert redirect_location(Redirect(derive_port="FROM_REQUEST_PORT"), head) == (
        "http://shop.example:8080/x"
    )


def test_cors_preflight_from_allowed_origin_is_answered_at_the_gateway() -> None:
    policy = CorsPolicy(
        allow_origins=(StringMatcher("exact", "https://app.example"),),
        allow_methods="GET,POST",
        allow_headers="x-token",
        max_age="600",
        allow_credentials=True,
    )
    head = _head(
        method="OPTIONS",
        headers=[("origin", "https://app.example"), ("access-control-request-method", "POST")],
    )
    ctx = _ctx(head)
    ctx.route = _route(cors=policy)
    reply = CorsStage().on_request(ctx)
    assert reply is not None and reply.status == 200
    headers = dict(reply.headers)
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert headers["access-control-allow-methods"] == "GET,POST"
    assert headers["access-control-max-age"] == "600"
    assert headers["access-control-allow-credentials"] == "true"


def test_cors_preflight_from_other_origin_is_forwarded_by_default() -> None:
    policy = CorsPolicy(allow_origins=(StringMatcher("exact", "https://app.example"),))
    head = _head(
        method="OPTIONS",
        headers=[("origin", "https://evil.example"), ("access-control-request-method", "GET")],
    )
    ctx = _ctx(head)
    ctx.route = _route(cors=policy)
    assert CorsStage().on_request(ctx) is None
    assert ctx.cors_headers is None


def test_cors_simple_request_from_allowed_origin_gets_allow_origin() -> None:
    policy = CorsPolicy(
        allow_origins=(StringMatcher("prefix", "https://app"),), expose_headers="x-a"
    )
    ctx = _ctx(_head(headers=[("origin", "https://app.example")]))
    ctx.route = _route(cors=policy)
    assert CorsStage().on_request(ctx) is None
    assert ctx.cors_headers == [
        ("access-control-allow-origin", "https://app.example"),
        ("access-control-expose-headers", "x-a"),
    ]


def test_header_ops_remove_then_set_then_add() -> None:
    ops = HeaderOps(set=(("x-a", "new"),), add=(("x-b", "2"),), remove=("x-c",))
    out = apply_header_ops([("x-a", "old"), ("x-b", "1"), ("x-c", "gone")], ops)
    assert out == [("x-b", "1"), ("x-a", "new"), ("x-b", "2")]
