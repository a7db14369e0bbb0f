"""Match semantics, table-driven: one (match entry, request, matches?) case per row.

Each case compiles a VirtualService whose only route carries the match entry, then
asks whether the request reaches that route. The expectations follow Istio's
VirtualService reference and Envoy's route matching, cited per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from routing_builders import Req, compile_resources, fwd, gateway, route_for, virtual_service


@dataclass(frozen=True)
class Case:
    name: str
    match: dict[str, Any]
    request: Req
    matches: bool


CASES = [
    # uri: exact is the whole path; prefix is a plain string prefix (Envoy's
    # prefix match, "/pre" covers "/prefix"); regex must match the whole path.
    Case("uri exact equal", {"uri": {"exact": "/a"}}, Req("/a"), True),
    Case("uri exact longer path", {"uri": {"exact": "/a"}}, Req("/a/"), False),
    Case("uri exact is case sensitive", {"uri": {"exact": "/a"}}, Req("/A"), False),
    Case("uri exact ignores query", {"uri": {"exact": "/a"}}, Req("/a", query="x=1"), True),
    Case("uri prefix plain string", {"uri": {"prefix": "/pre"}}, Req("/prefix"), True),
    Case("uri prefix shorter path", {"uri": {"prefix": "/api"}}, Req("/ap"), False),
    Case("uri regex full match", {"uri": {"regex": "/v[0-9]+/.*"}}, Req("/v1/x"), True),
    Case("uri regex not a search", {"uri": {"regex": "/v[0-9]+"}}, Req("/v1/x"), False),
    # ignoreUriCase: "The case will be ignored only in the case of exact and prefix".
    Case(
        "ignore case exact",
        {"uri": {"exact": "/Hello"}, "ignoreUriCase": True},
        Req("/hELLo"),
        True,
    ),
    Case(
        "ignore case prefix",
        {"uri": {"prefix": "/API"}, "ignoreUriCase": True},
        Req("/api/x"),
        True,
    ),
    Case(
        "ignore case not regex",
        {"uri": {"regex": "/abc"}, "ignoreUriCase": True},
        Req("/ABC"),
        False,
    ),
    # method / scheme
    Case("method exact", {"method": {"exact": "GET"}}, Req(method="GET"), True),
    Case("method other", {"method": {"exact": "GET"}}, Req(method="POST"), False),
    Case("method regex", {"method": {"regex": "GET|HEAD"}}, Req(method="HEAD"), True),
    Case("scheme exact", {"scheme": {"exact": "https"}}, Req(scheme="https"), True),
    Case("scheme other", {"scheme": {"exact": "https"}}, Req(scheme="http"), False),
    # authority: Envoy compares :authority as received, port included.
    Case(
        "authority with port",
        {"authority": {"exact": "example.com:8080"}},
        Req(authority="example.com:8080"),
        True,
    ),
    Case(
        "authority exact misses port",
        {"authority": {"exact": "example.com"}},
        Req(authority="example.com:8080"),
        False,
    ),
    Case(
        "authority prefix",
        {"authority": {"prefix": "example.com"}},
        Req(authority="example.com:8080"),
        True,
    ),
    # headers: names case-insensitive, values case-sensitive; {} means present.
    Case(
        "header exact",
        {"headers": {"X-User": {"exact": "bob"}}},
        Req(headers={"x-user": "bob"}),
        True,
    ),
    Case(
        "header value case",
        {"headers": {"x-user": {"exact": "bob"}}},
        Req(headers={"x-user": "Bob"}),
        False,
    ),
    Case("header absent", {"headers": {"x-user": {"exact": "bob"}}}, Req(), False),
    Case(
        "header prefix", {"headers": {"x-v": {"prefix": "1."}}}, Req(headers={"x-v": "1.2"}), True
    ),
    Case(
        "header regex full",
        {"headers": {"x-v": {"regex": "[0-9]+"}}},
        Req(headers={"x-v": "12a"}),
        False,
    ),
    Case(
        "header empty means present",
        {"headers": {"x-debug": {}}},
        Req(headers={"x-debug": ""}),
        True,
    ),
    Case("header empty needs header", {"headers": {"x-debug": {}}}, Req(), False),
    Case("header empty prefix is presence", {"headers": {"x-a": {"prefix": ""}}}, Req(), False),
    Case(
        "header key method ignored",
        {"headers": {"method": {"exact": "PUT"}}},
        Req(method="GET"),
        True,
    ),
    # withoutHeaders: the inverse; Istio treats a missing header as "" there.
    Case(
        "without present header",
        {"withoutHeaders": {"x-debug": {}}},
        Req(headers={"x-debug": "1"}),
        False,
    ),
    Case("without absent header", {"withoutHeaders": {"x-debug": {}}}, Req(), True),
    Case(
        "without value matches",
        {"withoutHeaders": {"x-env": {"exact": "prod"}}},
        Req(headers={"x-env": "prod"}),
        False,
    ),
    Case(
        "without other value",
        {"withoutHeaders": {"x-env": {"exact": "prod"}}},
        Req(headers={"x-env": "dev"}),
        True,
    ),
    Case("without value, absent", {"withoutHeaders": {"x-env": {"exact": "prod"}}}, Req(), True),
    Case("without empty value, absent", {"withoutHeaders": {"x-env": {"exact": ""}}}, Req(), False),
    # queryParams: exact and regex on the raw value; "?key" has the value "".
    Case("query exact", {"queryParams": {"key": {"exact": "true"}}}, Req(query="key=true"), True),
    Case("query bare key", {"queryParams": {"key": {"exact": ""}}}, Req(query="a=1&key"), True),
    Case("query regex", {"queryParams": {"id": {"regex": "\\d+"}}}, Req(query="id=123"), True),
    Case(
        "query regex full", {"queryParams": {"id": {"regex": "\\d+"}}}, Req(query="id=a123"), False
    ),
    Case("query absent", {"queryParams": {"id": {"exact": "1"}}}, Req(query="other=1"), False),
    Case(
        "query first value wins",
        {"queryParams": {"a": {"exact": "2"}}},
        Req(query="a=1&a=2"),
        False,
    ),
    Case(
        "query not percent-decoded",
        {"queryParams": {"q": {"exact": "a b"}}},
        Req(query="q=a%20b"),
        False,
    ),
    # port, sourceLabels, gateways, sourceNamespace: decided at compile time.
    Case("port of the listener", {"port": 8080}, Req(port=8080), True),
    Case("port of another listener", {"port": 9090}, Req(port=8080), False),
    Case("source labels subset", {"sourceLabels": {"istio": "ingressgateway"}}, Req(), True),
    Case("source labels mismatch", {"sourceLabels": {"app": "other"}}, Req(), False),
    Case("match gateways this one", {"gateways": ["gw"]}, Req(), True),
    Case("match gateways qualified", {"gateways": ["default/gw"]}, Req(), True),
    Case("match gateways other", {"gateways": ["mesh"]}, Req(), False),
    Case("source namespace never at a gateway", {"sourceNamespace": "default"}, Req(), False),
    # inside one entry, every condition must hold.
    Case(
        "and: both",
        {"uri": {"prefix": "/a"}, "method": {"exact": "GET"}},
        Req("/a", method="GET"),
        True,
    ),
    Case(
        "and: one fails",
        {"uri": {"prefix": "/a"}, "method": {"exact": "GET"}},
        Req("/a", method="PUT"),
        False,
    ),
    Case(
        "and: headers all",
        {"headers": {"a": {"exact": "1"}, "b": {"exact": "2"}}},
        Req(headers={"a": "1"}),
        False,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_match_entry_follows_istio_semantics(case: Case) -> None:
    vs = virtual_service("vs", [{"name": "hit", "match": [case.match], **fwd("backend")}])
    snapshot = compile_resources(gateway(), vs)
    route = route_for(snapshot, case.request)
    assert (route is not None and route.name == "hit") is case.matches


def test_match_entries_are_ored_and_first_route_wins() -> None:
    vs = virtual_service(
        "vs",
        [
            {
                "name": "first",
                "match": [{"uri": {"exact": "/x"}}, {"headers": {"x-canary": {}}}],
                **fwd("a"),
            },
            {"name": "second", "match": [{"uri": {"prefix": "/"}}], **fwd("b")},
        ],
    )
    snapshot = compile_resources(gateway(), vs)
    assert route_for(snapshot, Req("/x")).name == "first"
    assert route_for(snapshot, Req("/y", headers={"x-canary": "1"})).name == "first"
    assert route_for(snapshot, Req("/y")).name == "second"


def test_route_without_match_accepts_everything() -> None:
    snapshot = compile_resources(gateway(), virtual_service("vs", [{"name": "all", **fwd("a")}]))
    assert route_for(snapshot, Req("/anything", method="DELETE")).name == "all"


def test_no_route_matches_gives_none() -> None:
    vs = virtual_service("vs", [{"match": [{"uri": {"exact": "/only"}}], **fwd("a")}])
    snapshot = compile_resources(gateway(), vs)
    assert route_for(snapshot, Req("/other")) is None


def test_all_match_entries_filtered_drops_the_route() -> None:
    vs = virtual_service(
        "vs",
        [
            {"name": "mesh-only", "match": [{"gateways": ["mesh"]}], **fwd("a")},
            {"name": "rest", **fwd("b")},
        ],
    )
    snapshot = compile_resources(gateway(), vs)
    routes = snapshot.listeners[8080].virtual_hosts["example.com"].routes
    assert [r.name for r in routes] == ["rest"]


def test_matching_compiles_no_regex_at_request_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    vs = virtual_service(
        "vs",
        [
            {
                "match": [{"uri": {"regex": "/v[0-9]+"}, "headers": {"x": {"regex": "a.*"}}}],
                "rewrite": {"uriRegexRewrite": {"match": "^/v([0-9]+)", "rewrite": "/version/\\1"}},
                **fwd("a"),
            }
        ],
    )
    snapshot = compile_resources(gateway(), vs)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("regex compiled while matching")

    monkeypatch.setattr(re, "compile", refuse)
    monkeypatch.setattr(re, "_compile", refuse)
    from gateway.routing.match import rewrite_path

    route = route_for(snapshot, Req("/v2", headers={"x": "abc"}))
    assert route is not None
    assert rewrite_path(route, "/v2") == "/version/2"
