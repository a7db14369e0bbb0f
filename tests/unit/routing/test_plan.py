"""The flattened lookup plan gives the same route as walking the routes, and the
regex literal-prefix shortcut never turns away a path the regex would accept.

``match_route`` walks ``VirtualHost.plan`` (gateway/routing/plan.py). The reference
below walks ``VirtualHost.routes`` the plain way, condition by condition, as Istio's
VirtualService reference describes it; hypothesis compares the two on random
routes and requests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from routing_builders import Req

from gateway.routing.match import match_route, parse_query
from gateway.routing.plan import regex_literal_prefix
from gateway.routing.table import (
    ClaimMatch,
    Forward,
    HeaderMatch,
    Origin,
    QueryMatch,
    Route,
    RouteMatch,
    StringMatcher,
    VirtualHost,
    WeightedCluster,
)

# --------------------------------------------------------------- literal prefix


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        (r"/re/[0-9]+/item", "/re/"),
        (r"/api/v1", "/api/v1"),
        (r"/ab*", "/a"),
        (r"/ab+c", "/a"),
        (r"/ab?", "/a"),
        (r"/ab{2}", "/a"),
        (r"^/api/.*", "/api/"),
        (r"/v\d+", "/v"),
        (r"/a.b", "/a"),
        (r"/a|/b", ""),
        (r"/(a|b)/c", ""),
        (r"(?i)/api", ""),
        (r"(/x)", ""),
        (r"[/]x", ""),
        (r"\/x", ""),
        (r"^", ""),
        (r"a*", ""),
        (r"", ""),
    ],
)
def test_regex_literal_prefix_of_a_pattern(pattern: str, prefix: str) -> None:
    assert regex_literal_prefix(re.compile(pattern)) == prefix


def test_regex_literal_prefix_is_empty_for_case_insensitive_and_verbose_patterns() -> None:
    assert regex_literal_prefix(re.compile("/api", re.IGNORECASE)) == ""
    assert regex_literal_prefix(re.compile("/a pi", re.VERBOSE)) == ""


# Pieces of regexes: literals (several of them special somewhere), classes,
# quantifiers, groups, alternation, anchors and escapes.
_REGEX_PIECES = st.sampled_from(
    [
        "/", "a", "b", "-", ".", "x", "^", "$", "*", "+", "?", "{2}", "{1,3}", "{", "}",
        "|", "(", ")", "(?:", "[ab]", "[^/]", "\\d", "\\.", "\\/", "\\|", ".*", "]",
        "(?i:a)", " ",
    ]
)  # fmt: skip


@st.composite
def _regexes(draw: st.DrawFn) -> re.Pattern[str]:
    source = "".join(draw(st.lists(_REGEX_PIECES, max_size=8)))
    if draw(st.booleans()):
        source = "(?i)" + source
    try:
        return re.compile(source)
    except re.error:
        return re.compile(re.escape(source))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=_regexes(), data=st.data())
def test_every_full_match_of_a_regex_starts_with_its_literal_prefix(
    pattern: re.Pattern[str], data: st.DataObject
) -> None:
    prefix = regex_literal_prefix(pattern)
    text = data.draw(st.from_regex(pattern, fullmatch=True), label="text")
    assert pattern.fullmatch(text) is not None
    assert text.startswith(prefix)


@settings(max_examples=200)
@given(pattern=_regexes(), text=st.text(alphabet="/ab-.x|{}()[]* \\dA", max_size=8))
def test_the_literal_prefix_never_skips_a_path_the_regex_accepts(
    pattern: re.Pattern[str], text: str
) -> None:
    prefix = regex_literal_prefix(pattern)
    if pattern.fullmatch(text) is not None:
        assert text.startswith(prefix)


# ---------------------------------------------------------- plan vs. reference


def _reference_route(
    vhost: VirtualHost, request: Req, claims: Mapping[str, Any] | None
) -> Route | None:
    """First route, in order, with an entry whose every condition holds."""

    def header_ok(h: HeaderMatch) -> bool:
        value = request.header(h.name)
        return value is not None and (h.matcher is None or h.matcher.matches(value))

    def without_ok(h: HeaderMatch) -> bool:
        value = request.header(h.name)
        if h.matcher is None:
            return value is None
        return not h.matcher.matches("" if value is None else value)

    def query_ok(q: QueryMatch) -> bool:
        value = parse_query(request.query).get(q.name)
        return value is not None and (q.matcher is None or q.matcher.matches(value))

    def claim_ok(c: ClaimMatch) -> bool:
        value: Any = claims
        for part in c.path:
            value = value.get(part) if isinstance(value, Mapping) else None
        if not isinstance(value, str):
            return False
        return c.matcher is None or c.matcher.matches(value)

    def accepts(m: RouteMatch) -> bool:
        return (
            (m.uri is None or m.uri.matches(request.path))
            and (m.method is None or m.method.matches(request.method))
            and (m.port is None or m.port == request.port)
            and (m.scheme is None or m.scheme.matches(request.scheme))
            and (m.authority is None or m.authority.matches(request.authority))
            and all(header_ok(h) for h in m.headers)
            and all(without_ok(h) for h in m.without_headers)
            and all(query_ok(q) for q in m.query_params)
            and (not m.claims or (claims is not None and all(claim_ok(c) for c in m.claims)))
        )

    for route in vhost.routes:
        if not route.matches or any(accepts(m) for m in route.matches):
            return route
    return None


_VALUES = ["", "/", "/a", "/a/", "/a/b", "/ab", "/A", "GET", "POST", "x", "X", "1"]


@st.composite
def _matchers(draw: st.DrawFn) -> StringMatcher:
    kind = draw(st.sampled_from(["exact", "prefix", "path_prefix", "regex"]))
    value = draw(st.sampled_from(_VALUES))
    if kind == "regex":
        source = draw(st.sampled_from(["/a.*", "/a/[a-z]+", "/a?", "[A-Z]+", "x|/a", ".*"]))
        return StringMatcher("regex", source, False, re.compile(source))
    if kind == "path_prefix":
        return StringMatcher("path_prefix", value.rstrip("/"))
    ignore_case = draw(st.booleans())
    return StringMatcher(kind, value.lower() if ignore_case else value, ignore_case)


_NAMES = st.sampled_from(["x-a", "x-b", "mode"])
_OPTIONAL_MATCHER = st.none() | _matchers()


@st.composite
def _route_matches(draw: st.DrawFn) -> RouteMatch:
    return RouteMatch(
        uri=draw(_OPTIONAL_MATCHER),
        method=draw(st.none() | _matchers()),
        scheme=draw(st.none() | st.just(StringMatcher("exact", "https"))),
        authority=draw(st.none() | st.just(StringMatcher("prefix", "a."))),
        port=draw(st.none() | st.sampled_from([80, 8080])),
        headers=tuple(HeaderMatch(n, draw(_OPTIONAL_MATCHER)) for n in draw(st.sets(_NAMES))),
        without_headers=tuple(
            HeaderMatch(n, draw(_OPTIONAL_MATCHER)) for n in draw(st.sets(_NAMES, max_size=1))
        ),
        query_params=tuple(
            QueryMatch(n, draw(_OPTIONAL_MATCHER)) for n in draw(st.sets(_NAMES, max_size=2))
        ),
        claims=tuple(
            ClaimMatch(("sub",), draw(_OPTIONAL_MATCHER)) for _ in range(draw(st.integers(0, 1)))
        ),
    )


_FORWARD = Forward((WeightedCluster("c", 100),), 100, (100,))


@st.composite
def _virtual_hosts(draw: st.DrawFn) -> VirtualHost:
    routes = tuple(
        Route(
            name=f"r{i}",
            origin=Origin("VirtualService", "ns", "vs", index=i),
            matches=tuple(draw(st.lists(_route_matches(), max_size=3))),
            action=_FORWARD,
        )
        for i in range(draw(st.integers(0, 5)))
    )
    return VirtualHost("h:80", ("h",), routes)


@st.composite
def _requests(draw: st.DrawFn) -> Req:
    headers = {n: draw(st.sampled_from(_VALUES)) for n in draw(st.sets(_NAMES))}
    query = "&".join(
        f"{n}={draw(st.sampled_from(_VALUES))}" for n in draw(st.lists(_NAMES, max_size=3))
    )
    return Req(
        path=draw(st.sampled_from(_VALUES[1:]) | st.text(alphabet="/aAbx", max_size=6)),
        method=draw(st.sampled_from(["GET", "POST", "get"])),
        authority=draw(st.sampled_from(["a.example", "b.example"])),
        scheme=draw(st.sampled_from(["http", "https"])),
        port=draw(st.sampled_from([80, 8080])),
        query=query,
        headers=headers,
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    vhost=_virtual_hosts(),
    request=_requests(),
    claims=st.none() | st.fixed_dictionaries({"sub": st.sampled_from(_VALUES)}),
)
def test_the_plan_picks_the_route_a_plain_walk_of_the_routes_picks(
    vhost: VirtualHost, request: Req, claims: Mapping[str, Any] | None
) -> None:
    assert match_route(vhost, request, claims) is _reference_route(vhost, request, claims)


def test_a_route_without_matches_accepts_every_request_and_stops_the_walk() -> None:
    only_post = RouteMatch(method=StringMatcher("exact", "POST"))
    post = Route("post", Origin("VirtualService", "ns", "vs"), (only_post,), _FORWARD)
    rest = Route("rest", Origin("VirtualService", "ns", "vs"), (), _FORWARD)
    never = Route("never", Origin("VirtualService", "ns", "vs"), (), _FORWARD)
    vhost = VirtualHost("h:80", ("h",), (post, rest, never))
    assert match_route(vhost, Req(method="POST")) is post
    assert match_route(vhost, Req(method="GET")) is rest
    assert match_route(VirtualHost("h:80", ("h",), ()), Req()) is None


def test_a_regex_route_is_found_past_its_literal_prefix_only() -> None:
    pattern = re.compile(r"/re/[0-9]+/item")
    regex = RouteMatch(uri=StringMatcher("regex", pattern.pattern, False, pattern))
    route = Route("re", Origin("VirtualService", "ns", "vs"), (regex,), _FORWARD)
    vhost = VirtualHost("h:80", ("h",), (route,))
    assert match_route(vhost, Req("/re/42/item")) is route
    assert match_route(vhost, Req("/re/x/item")) is None
    assert match_route(vhost, Req("/api/re/42/item")) is None
