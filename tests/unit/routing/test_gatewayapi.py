"""Gateway API semantics on the compiled table: precedence, hostnames, path prefixes,
rewrites and redirects, each case from the HTTPRoute specification.

Resources go through the real loader and compiler; requests are matched with the
same functions the data plane calls (``find_virtual_host``, ``match_route``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from routing_builders import Req

from gateway.config.gatewayapi_status import _intersect, bind_gateway_api, route_age_key
from gateway.config.load import load_config
from gateway.routing.compile import compile_snapshot
from gateway.routing.match import find_virtual_host, match_route, replace_path_prefix
from gateway.routing.table import INVALID_BACKEND_PREFIX, Redirect, Route, Snapshot, StringMatcher
from gateway.server.events import RequestHead
from gateway.stages import redirect_location

GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: default}
spec:
  gatewayClassName: meshgate
  listeners:
  - {name: web, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: backends, namespace: default}
spec:
  hosts: [a.default.svc.cluster.local, b.default.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
"""


def _route_doc(name: str, rules: str, extra_meta: str = "", hostnames: str = "") -> str:
    return f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: default{extra_meta}}}
spec:
  parentRefs: [{{name: edge}}]
  {hostnames}
  rules:
{rules}
"""


def _compile(tmp_path: Path, *docs: str) -> Snapshot:
    path = tmp_path / "config.yaml"
    path.write_text(GATEWAY + "".join(docs), encoding="utf-8")
    return compile_snapshot(load_config([str(path)]), {})


def _winner(snapshot: Snapshot, request: Req) -> Route | None:
    vhost = find_virtual_host(snapshot.listeners[8080], request.authority)
    assert vhost is not None
    return match_route(vhost, request)


# --------------------------------------------------------------------------- matchers


@pytest.mark.parametrize(
    ("prefix", "path", "matches"),
    [
        ("/foo", "/foo", True),
        ("/foo", "/foo/", True),
        ("/foo", "/foo/bar", True),
        ("/foo", "/foobar", False),
        ("/foo", "/fo", False),
        ("", "/", True),  # PathPrefix "/" is stored as ""
        ("", "/anything/at/all", True),
    ],
)
def test_path_prefix_matches_whole_segments_only(prefix: str, path: str, matches: bool) -> None:
    assert StringMatcher("path_prefix", prefix).matches(path) is matches


@pytest.mark.parametrize(
    ("path", "prefix", "replacement", "expected"),
    [
        # The HTTPPathModifier table of the Gateway API specification.
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        ("/anything", "", "/api", "/api/anything"),
    ],
)
def test_replace_prefix_match_never_produces_a_double_slash(
    path: str, prefix: str, replacement: str, expected: str
) -> None:
    assert replace_path_prefix(path, prefix, replacement) == expected


# --------------------------------------------------------------------------- hostnames


@pytest.mark.parametrize(
    ("listener", "route", "expected"),
    [
        (None, [], ("*",)),
        (None, ["a.example.com"], ("a.example.com",)),
        ("*.example.com", [], ("*.example.com",)),
        ("*.example.com", ["a.example.com"], ("a.example.com",)),
        ("*.example.com", ["a.b.example.com"], ("a.b.example.com",)),  # any depth
        ("*.example.com", ["example.com"], ()),  # never the bare domain
        ("*.example.com", ["*.b.example.com"], ("*.b.example.com",)),
        ("a.example.com", ["*.example.com"], ("a.example.com",)),
        ("a.example.com", ["b.example.com"], ()),
        ("*.example.com", ["a.example.org", "b.example.com"], ("b.example.com",)),
    ],
)
def test_listener_and_route_hostnames_intersect_as_the_spec_describes(
    listener: str | None, route: list[str], expected: tuple[str, ...]
) -> None:
    assert _intersect(listener, route) == expected


def test_host_port_is_ignored_when_choosing_the_virtual_host(tmp_path: Path) -> None:
    route = _route_doc(
        "r",
        "  - backendRefs: [{name: a, port: 80}]",
        hostnames="hostnames: [shop.example.com]",
    )
    snapshot = _compile(tmp_path, route)
    assert _winner(snapshot, Req("/", authority="shop.example.com:8080")) is not None


# --------------------------------------------------------------------------- precedence


def test_exact_path_beats_any_prefix_then_longest_prefix_wins(tmp_path: Path) -> None:
    rules = """  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /shop}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: Exact, value: /shop/cart}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /shop/cart/items}}]
    backendRefs: [{name: a, port: 80}]"""
    snapshot = _compile(tmp_path, _route_doc("r", rules))
    assert _winner(snapshot, Req("/shop/cart")).name == "default.r.2.0"
    assert _winner(snapshot, Req("/shop/cart/items/1")).name == "default.r.3.0"
    assert _winner(snapshot, Req("/shop/x")).name == "default.r.1.0"
    assert _winner(snapshot, Req("/shopping")).name == "default.r.0.0"


def test_method_then_header_count_then_query_count_break_ties(tmp_path: Path) -> None:
    queries = '[{name: q, value: "1"}, {name: r, value: "2"}]'
    rules = f"""  - matches: [{{path: {{value: /p}}, queryParams: {queries}}}]
    backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{value: /p}}, headers: [{{name: h, value: "1"}}]}}]
    backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{value: /p}}, method: GET}}]
    backendRefs: [{{name: a, port: 80}}]"""
    snapshot = _compile(tmp_path, _route_doc("r", rules))
    full = Req("/p", query="q=1&r=2", headers={"h": "1"})
    assert _winner(snapshot, full).name == "default.r.2.0"  # method first
    full.method = "POST"
    assert _winner(snapshot, full).name == "default.r.1.0"  # then headers
    assert _winner(snapshot, Req("/p", method="POST", query="q=1&r=2")).name == "default.r.0.0"


def test_oldest_route_wins_a_tie_and_unstamped_routes_order_by_file_position(
    tmp_path: Path,
) -> None:
    rule = "  - matches: [{path: {value: /same}}]\n    backendRefs: [{name: a, port: 80}]"
    docs = [
        _route_doc("first-in-file", rule),
        _route_doc("second-in-file", rule),
        _route_doc("stamped-new", rule, ', creationTimestamp: "2025-01-01T00:00:00Z"'),
        _route_doc("stamped-old", rule, ', creationTimestamp: "2020-01-01T00:00:00Z"'),
    ]
    vhost = find_virtual_host(_compile(tmp_path, *docs).listeners[8080], "x")
    assert vhost is not None
    order = [route.origin.name for route in vhost.routes]
    assert order == ["stamped-old", "stamped-new", "first-in-file", "second-in-file"]


def test_names_break_ties_between_routes_of_the_same_age(tmp_path: Path) -> None:
    rule = "  - matches: [{path: {value: /same}}]\n    backendRefs: [{name: a, port: 80}]"
    stamp = ', creationTimestamp: "2024-01-01T00:00:00Z"'
    docs = [_route_doc("zeta", rule, stamp), _route_doc("alpha", rule, stamp)]
    vhost = find_virtual_host(_compile(tmp_path, *docs).listeners[8080], "x")
    assert vhost is not None
    assert [r.origin.name for r in vhost.routes] == ["alpha", "zeta"]


def test_query_names_are_case_sensitive_and_header_names_are_not(tmp_path: Path) -> None:
    rules = """  - matches: [{path: {value: /q}, queryParams: [{name: Page, value: "2"}]}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /h}, headers: [{name: X-Mode, value: fast}]}]
    backendRefs: [{name: a, port: 80}]"""
    snapshot = _compile(tmp_path, _route_doc("r", rules))
    assert _winner(snapshot, Req("/q", query="Page=2")) is not None
    assert _winner(snapshot, Req("/q", query="page=2")) is None
    # Request header names arrive lower-cased from every protocol adapter.
    assert _winner(snapshot, Req("/h", headers={"x-mode": "fast"})) is not None
    assert _winner(snapshot, Req("/h", headers={"x-mode": "FAST"})) is None


# --------------------------------------------------------------------------- redirects


def _head(path: str = "/old/page", authority: str = "shop.example.com:8080") -> RequestHead:
    return RequestHead("GET", path, "a=1", authority, "http", [], port=8080)


@pytest.mark.parametrize(
    ("redirect", "location"),
    [
        # No port, no scheme: the listener's port is kept.
        (
            Redirect(code=302, derive_port="FROM_REQUEST_PORT"),
            "http://shop.example.com:8080/old/page?a=1",
        ),
        # A new scheme brings its well-known port, which Location leaves out.
        (
            Redirect(code=302, scheme="https", derive_port="FROM_PROTOCOL_DEFAULT"),
            "https://shop.example.com/old/page?a=1",
        ),
        # An explicit well-known port for the scheme is left out too.
        (Redirect(code=302, port=80), "http://shop.example.com/old/page?a=1"),
        (
            Redirect(code=302, port=8081, authority="www.example.com"),
            "http://www.example.com:8081/old/page?a=1",
        ),
        (
            Redirect(
                code=302, derive_port="FROM_REQUEST_PORT", replace_prefix="/new", prefix="/old"
            ),
            "http://shop.example.com:8080/new/page?a=1",
        ),
        (
            Redirect(code=302, derive_port="FROM_REQUEST_PORT", replace_prefix="/", prefix="/old"),
            "http://shop.example.com:8080/page?a=1",
        ),
    ],
)
def test_redirect_location_follows_the_gateway_api_port_rules(
    redirect: Redirect, location: str
) -> None:
    assert redirect_location(redirect, _head()) == location


def test_unstamped_route_is_younger_than_any_stamped_one(tmp_path: Path) -> None:
    rule = "  - backendRefs: [{name: a, port: 80}]"
    docs = [
        _route_doc("plain", rule),
        _route_doc("old", rule, ', creationTimestamp: "1999-01-01T00:00:00Z"'),
    ]
    path = tmp_path / "c.yaml"
    path.write_text(GATEWAY + "".join(docs), encoding="utf-8")
    model = load_config([str(path)])
    binding = bind_gateway_api(model)
    keys = {
        rb.resource.metadata.name: route_age_key(rb.resource, binding.positions[id(rb.resource)])
        for rb in binding.routes
    }
    assert keys["old"] < keys["plain"]


def test_route_without_rules_matches_everything_and_names_no_backend(tmp_path: Path) -> None:
    doc = _route_doc("empty", "  []").replace("  rules:\n  []", "  rules: []")
    route = _winner(_compile(tmp_path, doc), Req("/any/path"))
    assert route is not None
    assert route.action.destinations[0].cluster.startswith(INVALID_BACKEND_PREFIX)


ISOLATION = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: default}
spec:
  gatewayClassName: meshgate
  listeners:
  - {name: wild, port: 8080, protocol: HTTP, hostname: "*.example.com"}
  - {name: exact, port: 8080, protocol: HTTP, hostname: a.example.com}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: backends, namespace: default}
spec:
  hosts: [a.default.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: through-wildcard, namespace: default}
spec:
  parentRefs: [{name: edge, sectionName: wild}]
  hostnames: [a.example.com, b.example.com]
  rules:
  - matches: [{path: {type: Exact, value: /only-here}}]
    backendRefs: [{name: a, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: through-exact, namespace: default}
spec:
  parentRefs: [{name: edge, sectionName: exact}]
  rules:
  - backendRefs: [{name: a, port: 80}]
"""


def test_requests_go_to_the_most_specific_listener_of_the_port(tmp_path: Path) -> None:
    path = tmp_path / "isolation.yaml"
    path.write_text(ISOLATION, encoding="utf-8")
    snapshot = compile_snapshot(load_config([str(path)]), {})
    exact = _winner(snapshot, Req("/only-here", authority="a.example.com"))
    assert exact is not None and exact.origin.name == "through-exact"
    wild = _winner(snapshot, Req("/only-here", authority="b.example.com"))
    assert wild is not None and wild.origin.name == "through-wildcard"
    binding = bind_gateway_api(load_config([str(path)]))
    counts = {lb.spec.name: lb.attached_routes for lb in binding.gateways[0].listeners}
    assert counts == {"wild": 1, "exact": 1}  # attached either way; isolation is routing
