"""``gateway.server.h2fields`` decides as h2's own inbound checks do.

h2 (``h2.utilities.validate_headers``) is the oracle: over generated header blocks,
meshgate's one-pass check accepts exactly the blocks h2 accepts, for requests and for
trailers. Examples pin the reasons for the common malformations.
"""

from __future__ import annotations

import pytest
from h2.exceptions import ProtocolError
from h2.utilities import HeaderValidationFlags, validate_headers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.server.h2fields import request_problem, target_problem, trailers_problem

Fields = list[tuple[bytes, bytes]]


def h2_accepts(fields: Fields, trailer: bool) -> bool:
    flags = HeaderValidationFlags(
        is_client=False, is_trailer=trailer, is_response_header=False, is_push_promise=False
    )
    try:
        list(validate_headers(fields, flags))
    except ProtocolError:
        return False
    return True


NAMES = [
    b":method", b":scheme", b":path", b":authority", b":protocol", b":status", b":foo",
    b"host", b"te", b"connection", b"keep-alive", b"transfer-encoding", b"upgrade",
    b"proxy-connection", b"content-length", b"accept", b"x-a", b"X-Upper", b"sp ace",
    b"co:lon", b"", b"\x7f", b"caf\xc3\xa9", b"tab\t", b"!#$%&'*+-.^_`|~09",
]  # fmt: skip
VALUES = [
    b"", b"GET", b"CONNECT", b"https", b"/", b"/p?q", b"app.test", b"other.test",
    b"trailers", b"TraiLers", b"gzip", b" lead", b"trail ", b"\ttab", b"in side",
    b"a\rb", b"a\nb", b"nul\x00", b"\x80\xff", b"websocket",
]  # fmt: skip

field = st.tuples(
    st.one_of(st.sampled_from(NAMES), st.binary(max_size=6)),
    st.one_of(st.sampled_from(VALUES), st.binary(max_size=6)),
)


@st.composite
def nearly_valid_requests(draw: st.DrawFn) -> Fields:
    """A well-formed request block, then a few edits: most blocks sit near the line."""
    method = draw(st.sampled_from([b"GET", b"CONNECT", b"POST"]))
    fields: Fields = [(b":method", method), (b":scheme", b"https"), (b":path", b"/")]
    fields.append((b":authority", b"app.test"))
    fields += draw(st.lists(field, max_size=3))
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.integers(0, 2))
        if edit == 0 and fields:
            del fields[draw(st.integers(0, len(fields) - 1))]
        elif edit == 1:
            fields.insert(draw(st.integers(0, len(fields))), draw(field))
        elif fields:
            i, j = draw(st.integers(0, len(fields) - 1)), draw(st.integers(0, len(fields) - 1))
            fields[i], fields[j] = fields[j], fields[i]
    return fields


blocks = st.one_of(nearly_valid_requests(), st.lists(field, max_size=8))


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow])
@given(blocks)
def test_requests_are_judged_as_h2_judges_them(fields: Fields) -> None:
    assert (request_problem(fields) is None) == h2_accepts(fields, trailer=False), fields


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(field, max_size=6))
def test_trailers_are_judged_as_h2_judges_them(fields: Fields) -> None:
    assert (trailers_problem(fields) is None) == h2_accepts(fields, trailer=True), fields


BASE: Fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ([*BASE, (b":authority", b"a")], None),
        ([*BASE, (b"host", b"a")], None),
        ([(b":method", b"CONNECT"), (b":authority", b"a:443")], None),
        ([*BASE], "neither :authority nor host"),
        ([*BASE, (b":authority", b"a"), (b"host", b"b")], ":authority and host differ"),
        ([*BASE, (b"host", b"a"), (b"host", b"a")], "more than one host field"),
        ([*BASE, (b":authority", b"a"), (b"Accept", b"x")], "invalid field name b'Accept'"),
        ([*BASE, (b":authority", b"a"), (b"x", b"a\r\nb: c")], "invalid value of field b'x'"),
        ([*BASE, (b":authority", b"a"), (b"x", b" a")], "invalid value of field b'x'"),
        ([*BASE, (b":authority", b"a"), (b"connection", b"close")], "connection-specific"),
        ([*BASE, (b":authority", b"a"), (b"te", b"gzip")], "te other than trailers"),
        ([(b"x", b"1"), *BASE, (b":authority", b"a")], "pseudo-header b':method' after"),
        ([*BASE, (b":path", b"/"), (b":authority", b"a")], "duplicate pseudo-header"),
        ([*BASE, (b":status", b"200"), (b":authority", b"a")], "pseudo-header b':status' not"),
        ([(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a")], "no :scheme"),
        ([(b":method", b"GET"), (b":scheme", b"h"), (b":path", b""), (b"host", b"a")], "empty"),
    ],
)
def test_reasons(fields: Fields, reason: str | None) -> None:
    problem = request_problem(fields)
    if reason is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(reason), problem


def test_trailers_refuse_pseudo_headers_and_bad_values() -> None:
    assert trailers_problem([(b"grpc-status", b"0")]) is None
    assert trailers_problem([(b":path", b"/")]) == "pseudo-header b':path' in trailers"
    assert trailers_problem([(b"x", b"a\nb")]) == "invalid value of field b'x'"


@pytest.mark.parametrize(
    ("method", "path", "authority", "reason"),
    [
        (b"GET", b"/a?b=c&d=%20", b"example.com:443", None),
        (b"M-SEARCH", b"/caf\xc3\xa9", b"[::1]:8443", None),  # raw UTF-8 passes
        (b"CONNECT", None, b"db.example.com:5432", None),
        (b"GET /x", b"/", b"a", "invalid :method"),
        (b"", b"/", b"a", "invalid :method"),
        (b"GET", b"/a b", b"a", "invalid :path"),
        (b"GET", b"/a\x7f", b"a", "invalid :path"),
        (b"GET", b"/a\tb", b"a", "invalid :path"),
        (b"GET", b"/admin#x", b"a", "invalid :path"),  # a fragment is no part of it
        (b"GET", b"/?q=1#x", b"a", "invalid :path"),
        (b"GET", b"/", b"a b", "invalid :authority"),
        (b"GET", b"/", b"a\x01", "invalid :authority"),
    ],
)
def test_request_line_parts_are_what_an_http11_request_line_can_carry(
    method: bytes, path: bytes | None, authority: bytes, reason: str | None
) -> None:
    assert target_problem(method, path, authority) == reason


def test_field_verdicts_are_remembered_for_good_fields_only_and_the_memory_is_bounded() -> None:
    from gateway.server import h2fields

    base = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test")]
    h2fields._CHECKED.clear()
    assert request_problem([*base, (b":path", b"/"), (b"x-ok", b"1")]) is None
    assert (b"x-ok", b"1") in h2fields._CHECKED
    bad = (b"x-bad", b" padded")
    for _ in range(2):  # refused every time: a bad field is never remembered
        assert request_problem([*base, (b":path", b"/"), bad]) is not None
    assert bad not in h2fields._CHECKED
    for i in range(h2fields._CHECKED_MAX + 100):
        assert request_problem([*base, (b":path", b"/%d" % i)]) is None
    assert len(h2fields._CHECKED) == h2fields._CHECKED_MAX
    # Past the bound, fields are still checked, one by one.
    assert request_problem([*base, (b":path", b"/late"), (b"x-late", b"a\rb")]) is not None
