"""EdgeHeadersStage: the three header stages in one pass give the same request."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.server.events import RequestHead
from gateway.stages import (
    EdgeHeadersStage,
    ForwardedHeadersStage,
    HopByHopStage,
    RequestContext,
    RequestIdStage,
)


class _Stream:
    def __init__(self, head: RequestHead) -> None:
        self.head = head


def _ctx(headers: list[tuple[str, str]], authority: str = "shop.example") -> RequestContext:
    head = RequestHead(
        method="GET",
        path="/",
        query="",
        authority=authority,
        scheme="http",
        headers=headers,
        port=8080,
        peer="10.0.0.9",
    )
    return RequestContext(_Stream(head), None, 0.0, 0.0)  # type: ignore[arg-type]


# Names that exercise every branch; Connection only ever names ordinary headers here
# (naming a header the gateway sets is where the two deliberately differ).
_NAMES = st.sampled_from(
    [
        "x-request-id",
        "user-agent",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-other",
        "accept",
        "keep-alive",
        "te",
        "upgrade",
        "expect",
        "proxy-connection",
    ]
)
_VALUES = st.sampled_from(["", "a", "1.2.3.4", "trailers", "gzip, trailers", "100-continue"])
_CONNECTION = st.lists(st.sampled_from(["close", "keep-alive", "x-other", "accept"]), max_size=3)


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.tuples(_NAMES, _VALUES), max_size=8),
    connection=st.one_of(st.none(), _CONNECTION),
    authority=st.sampled_from(["shop.example", ""]),
    seed=st.integers(0, 2**32),
)
def test_one_pass_matches_the_three_stages_in_sequence(
    headers: list[tuple[str, str]], connection: list[str] | None, authority: str, seed: int
) -> None:
    if connection is not None:
        headers = [*headers, ("connection", ", ".join(connection))]
    sequential = _ctx(list(headers), authority)
    merged = _ctx(list(headers), authority)
    # Both draw the same generated request id.
    random.seed(seed)
    for stage in (RequestIdStage(), ForwardedHeadersStage(), HopByHopStage()):
        stage.on_request(sequential)
    random.seed(seed)
    EdgeHeadersStage().on_request(merged)
    assert merged.head.headers == sequential.head.headers
    assert (merged.request_id, merged.xff, merged.user_agent) == (
        sequential.request_id,
        sequential.xff,
        sequential.user_agent,
    )
    assert merged.head.header("x-forwarded-for") == sequential.head.header("x-forwarded-for")


def test_connection_cannot_remove_the_forwarded_for_the_gateway_sets() -> None:
    ctx = _ctx([("connection", "x-forwarded-for, x-request-id"), ("x-request-id", "abc")])
    EdgeHeadersStage().on_request(ctx)
    assert ctx.head.header("x-forwarded-for") == "10.0.0.9"
    # The client's id was hop-by-hop, so it is neither kept nor logged: a new one is.
    assert ctx.request_id != "abc" and ctx.head.header("x-request-id") == ctx.request_id
    assert ctx.head.header("connection") is None
