"""Upstream response headers passed through as bytes give exactly the head the
general path (decode, filter, encode) gives."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.server.events import RequestHead
from gateway.stages import RequestContext, UpstreamStage, _passthrough_lines

NAMES = [
    b"Content-Type",
    b"content-type",
    b"Content-Length",
    b"Connection",
    b"connection",
    b"Keep-Alive",
    b"Transfer-Encoding",
    b"Upgrade",
    b"TE",
    b"Trailer",
    b"Proxy-Connection",
    b"Set-Cookie",
    b"X-Custom",
    b"Date",
    b"Server",
]
VALUES = [b"keep-alive", b"close", b"Keep-Alive", b"x-custom", b"x-custom, date", b"v", b"1"]


class _Stream:
    def __init__(self, head: RequestHead) -> None:
        self.head = head


def _general_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """What the general path makes of an upstream head (decode, filter)."""
    head = RequestHead(
        method="GET", path="/", query="", authority="a", scheme="http", headers=[], port=80
    )
    ctx = RequestContext(_Stream(head), None, 0.0, 0.0)  # type: ignore[arg-type]
    return UpstreamStage._response_headers(None, ctx, raw)  # type: ignore[arg-type]


def _general(raw: list[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    headers = _general_headers(raw)
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers).encode("latin-1")
    return lines, any(name == "content-length" for name, _ in headers)


@given(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=10))
def test_passthrough_matches_the_general_path(raw: list[tuple[bytes, bytes]]) -> None:
    fast = _passthrough_lines(raw)
    if fast is not None:
        assert fast == _general(raw)


def test_a_connection_header_naming_other_headers_takes_the_general_path() -> None:
    raw = [(b"Connection", b"x-custom"), (b"X-Custom", b"1"), (b"Date", b"d")]
    assert _passthrough_lines(raw) is None
    assert _general(raw) == (b"date: d\r\n", False)


def test_the_usual_nginx_head_passes_through() -> None:
    raw = [
        (b"Server", b"nginx"),
        (b"Content-Type", b"text/plain"),
        (b"Content-Length", b"100"),
        (b"Connection", b"keep-alive"),
    ]
    assert _passthrough_lines(raw) == (
        b"server: nginx\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n",
        True,
    )


def test_appended_headers_follow_in_the_general_paths_order() -> None:
    from gateway.server import altsvc
    from gateway.server.events import ResponseHead
    from gateway.stages import _appended_lines

    head = RequestHead(
        method="GET", path="/", query="", authority="a", scheme="https", headers=[], port=8443
    )
    ctx = RequestContext(_Stream(head), None, 0.0, 0.0)  # type: ignore[arg-type]
    ctx.cors_headers = [("access-control-allow-origin", "https://x.test")]
    ctx.ratelimit_headers = [("ratelimit-limit", "10"), ("ratelimit-remaining", "9")]
    raw = [(b"Content-Length", b"2"), (b"Connection", b"keep-alive")]
    altsvc.advertise(8443)
    try:
        general = UpstreamStage._response_headers(None, ctx, raw)  # type: ignore[arg-type]
        response = ResponseHead(200, general)
        altsvc.add_alt_svc(head, response)
        expected = "".join(f"{n}: {v}\r\n" for n, v in response.headers).encode("latin-1")
        lines, has_length = _passthrough_lines(raw)  # type: ignore[misc]
        assert lines + _appended_lines(ctx, 200) == expected
        assert has_length
        assert b"alt-svc: " in expected  # the case is not vacuous
    finally:
        altsvc.withdraw(8443)


def _general_h2(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    from gateway.server.events import ResponseHead
    from gateway.server.http2 import _response_headers

    return _response_headers(ResponseHead(200, _general_headers(raw)))[1:]  # less :status


@given(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=10))
def test_http2_passthrough_matches_the_general_path(raw: list[tuple[bytes, bytes]]) -> None:
    from gateway.stages import _passthrough_fields

    fast = _passthrough_fields(raw)
    if fast is not None:
        assert fast == _general_h2(raw)


def test_http2_passthrough_leaves_odd_names_to_the_general_path() -> None:
    from gateway.stages import _passthrough_fields

    assert _passthrough_fields([(b":status", b"500"), (b"Date", b"d")]) is None
    assert _general_h2([(b":status", b"500"), (b"Date", b"d")]) == [(b"date", b"d")]
    assert _passthrough_fields([(b"Server", b"nginx"), (b"Connection", b"close")]) == [
        (b"server", b"nginx")
    ]
