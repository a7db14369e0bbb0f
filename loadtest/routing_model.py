"""A model of N VirtualServices, and requests that hit each of their five match rules:
what the router micro-benchmarks (``make microbench``) and ``bench_routing.py`` measure.

Every VirtualService has its own host and five rules (prefix, exact, regex, header,
query), so a lookup exercises the host index and each kind of match. The model is
built from the typed resources directly: parsing 10 000 VirtualServices of YAML
would cost seconds and measure the loader, not the router.
"""

from __future__ import annotations

import random

from gateway.config.errors import Model
from gateway.config.resources import (
    Destination,
    GatewayServer,
    GatewaySpec,
    HTTPMatchRequest,
    HTTPRoute,
    HTTPRouteDestination,
    Metadata,
    Port,
    PortSelector,
    Resource,
    StringMatch,
    VirtualServiceSpec,
)
from gateway.server.events import RequestHead

PORT = 8080
LABELS = {"istio": "ingressgateway"}


def _resource(kind: str, name: str, spec: object) -> Resource:
    return Resource(
        api_version="networking.istio.io/v1",
        kind=kind,
        metadata=Metadata(name=name, namespace="bench"),
        spec=spec,
        source=f"bench:{name}",
        file="bench",
    )


def _route(i: int, rule: int, match: HTTPMatchRequest) -> HTTPRoute:
    dest = Destination(host=f"svc{i}-r{rule}.bench.internal", port=PortSelector(80))
    return HTTPRoute(name=f"r{rule}", match=[match], route=[HTTPRouteDestination(dest)])


def build_model(count: int) -> Model:
    """One Gateway on PORT and ``count`` VirtualServices, ``svc{i}.example.com``."""
    gateway = _resource(
        "Gateway",
        "gw",
        GatewaySpec(
            selector=dict(LABELS),
            servers=[GatewayServer(port=Port(PORT, "HTTP", "http"), hosts=["*"])],
        ),
    )
    resources = [gateway]
    for i in range(count):
        http = [
            _route(i, 1, HTTPMatchRequest(uri=StringMatch(prefix=f"/api/{i}/"))),
            _route(i, 2, HTTPMatchRequest(uri=StringMatch(exact=f"/exact/{i}"))),
            _route(i, 3, HTTPMatchRequest(uri=StringMatch(regex=r"/re/[0-9]+/item"))),
            _route(i, 4, HTTPMatchRequest(headers={"x-tenant": StringMatch(exact=f"t{i}")})),
            _route(i, 5, HTTPMatchRequest(query_params={"mode": StringMatch(exact="fast")})),
        ]
        spec = VirtualServiceSpec(hosts=[f"svc{i}.example.com"], gateways=["gw"], http=http)
        resources.append(_resource("VirtualService", f"vs{i}", spec))
    return Model(tuple(resources))


def make_requests(count: int, lookups: int, seed: int = 1) -> list[tuple[RequestHead, str]]:
    """``lookups`` requests spread over the ``count`` hosts and the five rules, each
    with the name of the route it must match."""
    rnd = random.Random(seed)
    out = []
    for _ in range(lookups):
        i = rnd.randrange(count)
        rule = rnd.randrange(1, 6)
        host = f"svc{i}.example.com"
        path, query, headers = "/h", "", []
        if rule == 1:
            path = f"/api/{i}/users/{rnd.randrange(1000)}"
        elif rule == 2:
            path = f"/exact/{i}"
        elif rule == 3:
            path = f"/re/{rnd.randrange(10_000)}/item"
        elif rule == 4:
            headers = [("x-tenant", f"t{i}")]
        else:
            path, query = "/q", "a=1&mode=fast"
        head = RequestHead("GET", path, query, host, "http", headers, port=PORT)
        out.append((head, f"r{rule}"))
    return out
