"""Compiling resources into a Snapshot: listeners, hosts, merge order, actions, clusters."""

from __future__ import annotations

import base64

import pytest
from routing_builders import (
    Req,
    compile_resources,
    fwd,
    gateway,
    resource,
    route_for,
    virtual_service,
)

from gateway.config.errors import Model
from gateway.routing import compile_snapshot, find_virtual_host, pick_destination, rewrite_path
from gateway.routing.table import DirectResponse, Forward, Redirect


def _dest(snapshot, request: Req) -> str:
    route = route_for(snapshot, request)
    assert route is not None, f"no route for {request}"
    assert isinstance(route.action, Forward)
    return route.action.destinations[0].cluster


# --------------------------------------------------------------------------- gateways


def test_gateway_applies_when_selector_is_subset_of_labels() -> None:
    gw = gateway(selector={"istio": "ingressgateway"})
    vs = virtual_service("vs", [fwd("a")])
    labels = {"istio": "ingressgateway", "app": "edge"}
    assert 8080 in compile_resources(gw, vs, labels=labels).listeners
    assert compile_resources(gw, vs, labels={"istio": "egressgateway"}).listeners == {}


def test_empty_selector_applies_to_every_gateway() -> None:
    snapshot = compile_resources(gateway(selector={}), virtual_service("vs", [fwd("a")]), labels={})
    assert 8080 in snapshot.listeners


def test_one_listener_per_port_with_envoy_name_and_protocol() -> None:
    gw = gateway(
        servers=[
            {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["a.com"]},
            {"port": {"number": 80, "name": "http-b", "protocol": "HTTP"}, "hosts": ["b.com"]},
            {
                "port": {"number": 443, "name": "https", "protocol": "HTTPS"},
                "hosts": ["a.com"],
                "tls": {"mode": "SIMPLE", "credentialName": "cert"},
            },
            {"port": {"number": 9443, "name": "tls", "protocol": "TLS"}, "hosts": ["a.com"]},
        ]
    )
    vs = virtual_service("vs", [fwd("a")], hosts=["a.com", "b.com"])
    snapshot = compile_resources(gw, vs)
    assert sorted(snapshot.listeners) == [80, 443, 9443]
    assert snapshot.listeners[80].name == "0.0.0.0_80"
    assert sorted(snapshot.listeners[80].virtual_hosts) == ["a.com", "b.com"]
    assert len(snapshot.listeners[80].origins) == 2
    assert snapshot.listeners[443].protocol == "HTTPS"
    assert list(snapshot.listeners[443].virtual_hosts) == ["a.com"]
    # A TLS server is routed by SNI, not by http[]: listener, but no HTTP hosts.
    assert snapshot.listeners[9443].protocol == "TLS"
    assert snapshot.listeners[9443].virtual_hosts == {}


def test_https_passthrough_server_gets_no_http_routes() -> None:
    gw = gateway(
        servers=[
            {
                "port": {"number": 443, "name": "https", "protocol": "HTTPS"},
                "hosts": ["a.com"],
                "tls": {"mode": "PASSTHROUGH"},
            }
        ]
    )
    snapshot = compile_resources(gw, virtual_service("vs", [fwd("a")], hosts=["a.com"]))
    assert snapshot.listeners[443].virtual_hosts == {}


def test_virtual_service_without_gateways_binds_only_to_mesh() -> None:
    vs = virtual_service("vs", [fwd("a")], gateways=[])
    assert compile_resources(gateway(), vs).listeners[8080].virtual_hosts == {}


def test_gateway_reference_resolves_in_the_virtual_service_namespace() -> None:
    gw = gateway(namespace="edge")
    here = virtual_service("here", [fwd("a")], hosts=["a.com"], gateways=["gw"], namespace="shop")
    qualified = virtual_service(
        "there", [fwd("b")], hosts=["b.com"], gateways=["edge/gw"], namespace="shop"
    )
    listener = compile_resources(gw, here, qualified).listeners[8080]
    assert list(listener.virtual_hosts) == ["b.com"]


def test_server_host_namespace_filter() -> None:
    gw = gateway(hosts=["shop/a.com", "./b.com"], namespace="edge")
    in_shop = virtual_service(
        "a", [fwd("a")], hosts=["a.com", "b.com"], gateways=["edge/gw"], namespace="shop"
    )
    in_edge = virtual_service("b", [fwd("b")], hosts=["a.com", "b.com"], namespace="edge")
    listener = compile_resources(gw, in_shop, in_edge).listeners[8080]
    assert listener.virtual_hosts["a.com"].routes[0].origin.namespace == "shop"
    assert listener.virtual_hosts["b.com"].routes[0].origin.namespace == "edge"
    assert len(listener.virtual_hosts["a.com"].routes) == 1
    assert len(listener.virtual_hosts["b.com"].routes) == 1


def test_virtual_host_domain_is_the_intersection_of_hosts() -> None:
    gw = gateway(hosts=["*.example.com", "api.other.com"])
    vs = virtual_service("vs", [fwd("a")], hosts=["shop.example.com", "*"])
    listener = compile_resources(gw, vs).listeners[8080]
    # *.example.com ∩ shop.example.com, *.example.com ∩ *, api.other.com ∩ *
    assert sorted(listener.virtual_hosts) == ["api.other.com", "shop.example.com"]
    assert list(listener.wildcard_hosts) == [".example.com"]
    assert listener.catch_all is None
    assert listener.virtual_hosts["shop.example.com"].name == "shop.example.com:8080"


def test_server_host_without_virtual_service_gets_nothing() -> None:
    gw = gateway(hosts=["a.com", "b.com"])
    listener = compile_resources(gw, virtual_service("vs", [fwd("a")], hosts=["a.com"])).listeners[
        8080
    ]
    assert find_virtual_host(listener, "b.com") is None


def test_https_redirect_server_answers_301_to_https() -> None:
    gw = gateway(
        servers=[
            {
                "port": {"number": 8080, "name": "http", "protocol": "HTTP"},
                "hosts": ["a.com", "bare.com"],
                "tls": {"httpsRedirect": True},
            }
        ]
    )
    snapshot = compile_resources(gw, virtual_service("vs", [fwd("a")], hosts=["a.com"]))
    for host in ("a.com", "bare.com"):
        route = route_for(snapshot, Req("/x", authority=host))
        assert route is not None
        assert route.action == Redirect(code=301, scheme="https")


# --------------------------------------------------------------------------- host lookup


@pytest.fixture(scope="module")
def lookup_listener():
    gw = gateway(hosts=["*"])
    services = [
        virtual_service("exact", [fwd("exact")], hosts=["api.example.com"]),
        virtual_service("wild", [fwd("wild")], hosts=["*.example.com"]),
        virtual_service("deeper", [fwd("deeper")], hosts=["*.eu.example.com"]),
        virtual_service("all", [fwd("all")], hosts=["*"]),
    ]
    return compile_resources(gw, *services).listeners[8080]


@pytest.mark.parametrize(
    ("authority", "origin"),
    [
        ("api.example.com", "exact"),
        ("API.Example.COM:8080", "exact"),
        ("x.example.com", "wild"),
        ("a.b.example.com", "wild"),
        ("x.eu.example.com", "deeper"),
        ("a.b.eu.example.com", "deeper"),
        ("eu.example.com", "wild"),
        ("example.com", "all"),
        ("other.org", "all"),
        ("[::1]:8080", "all"),
    ],
)
def test_host_lookup_exact_then_longest_wildcard_then_catch_all(
    lookup_listener, authority: str, origin: str
) -> None:
    vhost = find_virtual_host(lookup_listener, authority)
    assert vhost is not None
    assert vhost.routes[0].origin.name == origin


def test_host_lookup_strips_ipv6_port() -> None:
    gw = gateway(hosts=["*"])
    listener = compile_resources(gw, virtual_service("v6", [fwd("a")], hosts=["::1"])).listeners[
        8080
    ]
    assert find_virtual_host(listener, "[::1]:8080") is not None
    assert find_virtual_host(listener, "[::2]:8080") is None


# --------------------------------------------------------------------------- merging


def test_virtual_services_for_one_host_merge_in_load_order() -> None:
    first = virtual_service("first", [{"match": [{"uri": {"prefix": "/a"}}], **fwd("a")}])
    second = virtual_service("second", [{"match": [{"uri": {"prefix": "/b"}}], **fwd("b")}])
    routes = (
        compile_resources(gateway(), first, second)
        .listeners[8080]
        .virtual_hosts["example.com"]
        .routes
    )
    assert [r.origin.name for r in routes] == ["first", "second"]
    reversed_routes = (
        compile_resources(gateway(), second, first)
        .listeners[8080]
        .virtual_hosts["example.com"]
        .routes
    )
    assert [r.origin.name for r in reversed_routes] == ["second", "first"]


def test_merged_catch_all_routes_move_last() -> None:
    first = virtual_service(
        "first",
        [
            {"match": [{"uri": {"prefix": "/a"}}], **fwd("a")},
            {"name": "first-default", **fwd("fallback")},
            {"name": "unreachable", **fwd("never")},
        ],
    )
    second = virtual_service("second", [{"match": [{"uri": {"prefix": "/b"}}], **fwd("b")}])
    snapshot = compile_resources(gateway(), first, second)
    routes = snapshot.listeners[8080].virtual_hosts["example.com"].routes
    assert [(r.origin.name, r.origin.index) for r in routes] == [
        ("first", 0),
        ("second", 0),
        ("first", 1),
    ]
    assert _dest(snapshot, Req("/b")) == "outbound|8080||b.default.svc.cluster.local"


# --------------------------------------------------------------------------- actions


def test_single_destination_without_weight_gets_100() -> None:
    snapshot = compile_resources(gateway(), virtual_service("vs", [fwd("a")]))
    action = route_for(snapshot, Req()).action
    assert isinstance(action, Forward)
    assert (action.total_weight, action.cumulative) == (100, (100,))


def test_weighted_pick_by_cumulative_bisect() -> None:
    vs = virtual_service(
        "vs",
        [
            {
                "route": [
                    {"destination": {"host": "a"}, "weight": 70},
                    {"destination": {"host": "b"}, "weight": 0},
                    {"destination": {"host": "c"}, "weight": 30},
                ]
            }
        ],
    )
    action = route_for(compile_resources(gateway(), vs), Req()).action
    assert action.cumulative == (70, 70, 100)

    def host(rnd: float) -> str:
        return pick_destination(action, rnd).cluster.rsplit("|", 1)[1].split(".")[0]

    assert [host(r) for r in (0.0, 0.5, 0.699, 0.7, 0.99, 0.9999)] == ["a", "a", "a", "c", "c", "c"]
    picks = [host(i / 1000) for i in range(1000)]
    assert (picks.count("a"), picks.count("b"), picks.count("c")) == (700, 0, 300)


def test_redirect_defaults_to_301_and_keeps_fields() -> None:
    vs = virtual_service(
        "vs",
        [
            {"match": [{"uri": {"exact": "/old"}}], "redirect": {"uri": "/new"}},
            {
                "redirect": {
                    "authority": "b.com",
                    "redirectCode": 308,
                    "scheme": "https",
                    "port": 8443,
                }
            },
        ],
    )
    snapshot = compile_resources(gateway(), vs)
    assert route_for(snapshot, Req("/old")).action == Redirect(code=301, uri="/new")
    assert route_for(snapshot, Req("/x")).action == Redirect(
        code=308, authority="b.com", scheme="https", port=8443
    )


def test_direct_response_body_string_or_base64_bytes() -> None:
    raw = b"\x00\x01binary"
    vs = virtual_service(
        "vs",
        [
            {
                "match": [{"uri": {"exact": "/s"}}],
                "directResponse": {"status": 503, "body": {"string": "down"}},
            },
            {
                "match": [{"uri": {"exact": "/b"}}],
                "directResponse": {
                    "status": 200,
                    "body": {"bytes": base64.b64encode(raw).decode()},
                },
            },
            {"directResponse": {"status": 204}},
        ],
    )
    snapshot = compile_resources(gateway(), vs)
    assert route_for(snapshot, Req("/s")).action == DirectResponse(503, b"down")
    assert route_for(snapshot, Req("/b")).action == DirectResponse(200, raw)
    assert route_for(snapshot, Req("/x")).action == DirectResponse(204, b"")


@pytest.mark.parametrize(
    ("match", "rewrite", "path", "expected"),
    [
        ({"uri": {"prefix": "/api/"}}, {"uri": "/"}, "/api/users", "/users"),
        ({"uri": {"prefix": "/api"}}, {"uri": "/v2"}, "/api/users", "/v2/users"),
        ({"uri": {"prefix": "/API"}, "ignoreUriCase": True}, {"uri": "/x"}, "/api/y", "/x/y"),
        ({"uri": {"exact": "/old"}}, {"uri": "/new"}, "/old", "/new"),
        ({"uri": {"regex": "/o.d"}}, {"uri": "/new"}, "/old", "/new"),
        ({"method": {"exact": "GET"}}, {"uri": "/base/"}, "/x", "/base/x"),
        (
            {"uri": {"prefix": "/"}},
            {
                "uriRegexRewrite": {
                    "match": "^/service/([^/]+)(/.*)$",
                    "rewrite": "\\2/instance/\\1",
                }
            },
            "/service/foo/v1/api",
            "/v1/api/instance/foo",
        ),
    ],
)
def test_uri_rewrite_replaces_prefix_or_whole_path(match, rewrite, path, expected) -> None:
    vs = virtual_service("vs", [{"match": [match], "rewrite": rewrite, **fwd("a")}])
    route = route_for(compile_resources(gateway(), vs), Req(path))
    assert route is not None
    assert rewrite_path(route, path) == expected


def test_headers_cors_timeout_and_extra_are_compiled() -> None:
    vs = virtual_service(
        "vs",
        [
            {
                "route": [
                    {
                        "destination": {"host": "a"},
                        "headers": {"request": {"set": {"X-Dest": "a"}}},
                    }
                ],
                "headers": {
                    "request": {
                        "set": {"X-Env": "prod"},
                        "add": {"X-Tag": "1"},
                        "remove": ["X-Drop"],
                    },
                    "response": {"remove": ["Server"]},
                },
                "corsPolicy": {
                    "allowOrigins": [{"exact": "https://a.com"}, {"regex": "https://.*\\.b\\.com"}],
                    "allowMethods": ["GET", "POST"],
                    "maxAge": "24h",
                    "allowCredentials": True,
                },
                "timeout": "1.5s",
                "retries": {"attempts": 3, "perTryTimeout": "2s"},
                "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 10}}},
            }
        ],
    )
    route = route_for(compile_resources(gateway(), vs), Req())
    assert route.request_headers.set == (("x-env", "prod"),)
    assert route.request_headers.add == (("x-tag", "1"),)
    assert route.request_headers.remove == ("x-drop",)
    assert route.response_headers.remove == ("server",)
    assert route.action.destinations[0].request_headers.set == (("x-dest", "a"),)
    assert route.action.timeout_s == 1.5
    cors = route.cors
    assert cors.allow_methods == "GET,POST" and cors.max_age == "86400" and cors.allow_credentials
    assert [m.matches("https://x.b.com") for m in cors.allow_origins] == [False, True]
    assert route.extra == {
        "retries": {"attempts": 3, "perTryTimeout": "2s"},
        "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 10}}},
    }


def test_zero_timeout_means_no_timeout() -> None:
    vs = virtual_service("vs", [{**fwd("a"), "timeout": "0s"}])
    assert route_for(compile_resources(gateway(), vs), Req()).action.timeout_s is None


# --------------------------------------------------------------------------- clusters


def _service_entry(**spec) -> object:
    return resource("ServiceEntry", spec.pop("name", "se"), spec)


def test_cluster_named_like_istio_with_expanded_host() -> None:
    vs = virtual_service(
        "vs",
        [
            {
                "route": [
                    {"destination": {"host": "reviews", "subset": "v2", "port": {"number": 9080}}}
                ]
            }
        ],
        namespace="shop",
        gateways=["default/gw"],
    )
    snapshot = compile_resources(gateway(), vs)
    assert list(snapshot.clusters) == ["outbound|9080|v2|reviews.shop.svc.cluster.local"]


def test_destination_port_defaults_to_the_only_service_port_else_the_listener_port() -> None:
    one_port = _service_entry(
        name="one", hosts=["one.ext"], ports=[{"number": 8443, "name": "http", "protocol": "HTTP"}]
    )
    two_ports = _service_entry(
        name="two",
        hosts=["two.ext"],
        ports=[
            {"number": 80, "name": "http", "protocol": "HTTP"},
            {"number": 81, "name": "http-alt", "protocol": "HTTP"},
        ],
    )
    vs = virtual_service(
        "vs",
        [
            {"match": [{"uri": {"prefix": "/one"}}], **fwd("one.ext")},
            {"match": [{"uri": {"prefix": "/two"}}], **fwd("two.ext")},
            fwd("nowhere.ext"),
        ],
    )
    snapshot = compile_resources(gateway(port=8080), vs, one_port, two_ports)
    assert _dest(snapshot, Req("/one")) == "outbound|8443||one.ext"
    assert _dest(snapshot, Req("/two")) == "outbound|8080||two.ext"
    assert _dest(snapshot, Req("/x")) == "outbound|8080||nowhere.ext"


def test_dangling_destination_compiles_to_cluster_without_endpoints() -> None:
    snapshot = compile_resources(gateway(), virtual_service("vs", [fwd("ghost.example.org")]))
    cluster = snapshot.clusters["outbound|8080||ghost.example.org"]
    assert cluster.endpoints == ()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {
                "resolution": "STATIC",
                "endpoints": [
                    {"address": "10.0.0.1"},
                    {"address": "10.0.0.2", "ports": {"http": 9999}, "weight": 3},
                ],
            },
            [("10.0.0.1", 8000, 1), ("10.0.0.2", 9999, 3)],
        ),
        ({"resolution": "DNS"}, [("svc.ext", 8000, 1)]),
        (
            {
                "resolution": "DNS",
                "endpoints": [{"address": "a.svc.ext"}, {"address": "b.svc.ext"}],
            },
            [("a.svc.ext", 8000, 1), ("b.svc.ext", 8000, 1)],
        ),
        ({"resolution": "NONE"}, []),
        ({}, []),
    ],
    ids=["static", "dns-host", "dns-endpoints", "none", "default-none"],
)
def test_endpoints_per_resolution(spec, expected) -> None:
    se = _service_entry(
        hosts=["svc.ext"],
        ports=[{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8000}],
        **spec,
    )
    snapshot = compile_resources(gateway(), se, virtual_service("vs", [fwd("svc.ext")]))
    cluster = snapshot.clusters["outbound|80||svc.ext"]
    assert [(e.address, e.port, e.weight) for e in cluster.endpoints] == expected
    assert cluster.protocol == "HTTP"


def test_subset_keeps_endpoints_whose_labels_cover_the_subset_labels() -> None:
    se = _service_entry(
        hosts=["svc.ext"],
        ports=[{"number": 80, "name": "http", "protocol": "HTTP"}],
        resolution="STATIC",
        endpoints=[
            {"address": "10.0.0.1", "labels": {"version": "v1"}},
            {"address": "10.0.0.2", "labels": {"version": "v2", "zone": "a"}},
            {"address": "10.0.0.3", "labels": {"version": "v2", "zone": "b"}},
        ],
    )
    dr = resource(
        "DestinationRule",
        "dr",
        {
            "host": "svc.ext",
            "subsets": [
                {"name": "v2", "labels": {"version": "v2"}},
                {"name": "v2a", "labels": {"version": "v2", "zone": "a"}},
            ],
        },
    )
    vs = virtual_service(
        "vs",
        [
            {
                "route": [
                    {"destination": {"host": "svc.ext", "subset": s}, "weight": 25}
                    for s in ("v2", "v2a", "missing")
                ]
                + [{"destination": {"host": "svc.ext"}, "weight": 25}]
            }
        ],
    )
    clusters = compile_resources(gateway(), se, dr, vs).clusters

    def addresses(name: str) -> list[str]:
        return [e.address for e in clusters[name].endpoints]

    assert addresses("outbound|80|v2|svc.ext") == ["10.0.0.2", "10.0.0.3"]
    assert addresses("outbound|80|v2a|svc.ext") == ["10.0.0.2"]
    assert addresses("outbound|80|missing|svc.ext") == []
    assert addresses("outbound|80||svc.ext") == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def test_traffic_policy_subset_over_top_level_port_level_over_that() -> None:
    dr = resource(
        "DestinationRule",
        "dr",
        {
            "host": "svc.ext",
            "trafficPolicy": {
                "loadBalancer": {"simple": "ROUND_ROBIN"},
                "connectionPool": {"tcp": {"maxConnections": 10}},
                "portLevelSettings": [
                    {"port": {"number": 9000}, "loadBalancer": {"simple": "LEAST_REQUEST"}}
                ],
            },
            "subsets": [
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 3}},
                }
            ],
        },
    )
    vs = virtual_service(
        "vs",
        [
            {
                "route": [
                    {"destination": {"host": "svc.ext", "port": {"number": 80}}, "weight": 50},
                    {
                        "destination": {"host": "svc.ext", "subset": "v2", "port": {"number": 80}},
                        "weight": 25,
                    },
                    {"destination": {"host": "svc.ext", "port": {"number": 9000}}, "weight": 25},
                ]
            }
        ],
    )
    clusters = compile_resources(gateway(), dr, vs).clusters
    assert clusters["outbound|80||svc.ext"].policy == {
        "loadBalancer": {"simple": "ROUND_ROBIN"},
        "connectionPool": {"tcp": {"maxConnections": 10}},
    }
    assert clusters["outbound|80|v2|svc.ext"].policy == {
        "loadBalancer": {"simple": "ROUND_ROBIN"},
        "connectionPool": {"tcp": {"maxConnections": 10}},
        "outlierDetection": {"consecutive5xxErrors": 3},
    }
    # Port-level settings do not inherit: connectionPool falls back to defaults.
    assert clusters["outbound|9000||svc.ext"].policy == {
        "loadBalancer": {"simple": "LEAST_REQUEST"}
    }


def test_destination_rule_exact_host_beats_most_specific_wildcard() -> None:
    rules = [
        resource(
            "DestinationRule",
            "all",
            {"host": "*.com", "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}},
        ),
        resource(
            "DestinationRule",
            "ex",
            {"host": "*.ex.com", "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}}},
        ),
        resource(
            "DestinationRule",
            "api",
            {"host": "api.ex.com", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}},
        ),
    ]
    vs = virtual_service(
        "vs",
        [
            {"match": [{"uri": {"prefix": "/a"}}], **fwd("api.ex.com")},
            {"match": [{"uri": {"prefix": "/b"}}], **fwd("b.ex.com")},
            fwd("c.com"),
        ],
    )
    clusters = compile_resources(gateway(), *rules, vs).clusters

    def lb(host: str) -> str:
        return clusters[f"outbound|8080||{host}"].policy["loadBalancer"]["simple"]

    assert (lb("api.ex.com"), lb("b.ex.com"), lb("c.com")) == (
        "ROUND_ROBIN",
        "LEAST_REQUEST",
        "RANDOM",
    )


# --------------------------------------------------------------------------- version


def _bigger_config(reverse_dict_order: bool):
    headers = {"x-a": {"exact": "1"}, "x-b": {"prefix": "2"}}
    if reverse_dict_order:
        headers = dict(reversed(list(headers.items())))
    return Model(
        (
            gateway(),
            virtual_service("vs", [{"match": [{"headers": headers}], **fwd("a")}, fwd("b")]),
        )
    )


def test_version_is_stable_and_content_addressed() -> None:
    labels = {"istio": "ingressgateway"}
    one = compile_snapshot(_bigger_config(False), labels)
    again = compile_snapshot(_bigger_config(False), labels)
    assert one.version == again.version and len(one.version) == 16
    # Header conditions are AND-ed: their order in the YAML map does not matter.
    assert compile_snapshot(_bigger_config(True), labels).version == one.version
    changed = compile_snapshot(Model((gateway(), virtual_service("vs", [fwd("other")]))), labels)
    assert changed.version != one.version


def test_version_ignores_label_order_but_not_labels() -> None:
    model = Model((gateway(selector={}), virtual_service("vs", [fwd("a")])))
    a = compile_snapshot(model, {"x": "1", "y": "2"})
    b = compile_snapshot(model, {"y": "2", "x": "1"})
    c = compile_snapshot(model, {"x": "1"})
    assert a.version == b.version
    assert a.version != c.version
