"""Request matching against a compiled Snapshot: host lookup, then first matching route.

This module owns the per-request half of routing: which virtual host serves an
authority, which route accepts a request, which weighted destination takes it, and
how a route rewrites the path. Everything it reads was prepared by ``compile.py``
(regexes compiled, names and case-insensitive values lower-cased), so a lookup does
no work proportional to the configuration: host lookup is one dict probe per label
of the request's host, and route matching only walks the routes of that one host.

No I/O, no regex compilation, no lower-casing of configuration here.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from typing import Any, Protocol

from .plan import (
    OP_HEADER_EXACT,
    OP_HEADER_MATCH,
    OP_HEADER_PRESENT,
    OP_METHOD_EXACT,
    OP_METHOD_MATCH,
    OP_QUERY_EXACT,
    OP_QUERY_MATCH,
    OP_QUERY_PRESENT,
    OP_URI_EXACT,
    OP_URI_MATCH,
    OP_URI_PREFIX,
    OP_URI_REGEX,
    OP_URI_SEGMENTS,
)
from .table import (
    ClaimMatch,
    Forward,
    HeaderMatch,
    Listener,
    QueryMatch,
    Route,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)

__all__ = [
    "MatchableRequest",
    "find_virtual_host",
    "host_of_authority",
    "match_route",
    "parse_query",
    "pick_destination",
    "replace_path_prefix",
    "rewrite_path",
]


class MatchableRequest(Protocol):
    """What matching reads of a request (``gateway.server.events.RequestHead`` fits)."""

    method: str
    path: str
    query: str
    authority: str
    scheme: str
    port: int

    def header(self, name: str) -> str | None: ...


def host_of_authority(authority: str) -> str:
    """``Example.COM:8080`` -> ``example.com``; ``[::1]:8080`` -> ``::1``."""
    if authority.startswith("["):
        end = authority.find("]")
        host = authority[1:end] if end != -1 else authority[1:]
    else:
        colon = authority.rfind(":")
        # More than one colon without brackets is a bare IPv6 address, not host:port.
        host = authority[:colon] if colon != -1 and authority.find(":") == colon else authority
    return host.lower()


def find_virtual_host(listener: Listener, authority: str) -> VirtualHost | None:
    """Exact host, then the longest ``*.suffix``, then ``*``; the port is ignored.

    Wildcards are probed label by label from the most specific suffix
    (``a.b.example.com`` tries ``.b.example.com``, ``.example.com``, ``.com``), so
    the cost depends on the request's host, never on how many hosts are configured.
    """
    exact = listener.virtual_hosts
    # Most clients already send a lower-case host without a port: one probe, no copy.
    vhost = exact.get(authority)
    if vhost is not None:
        return vhost
    host = host_of_authority(authority)
    vhost = exact.get(host)
    if vhost is not None:
        return vhost
    wildcards = listener.wildcard_hosts
    if wildcards:
        # Start after the first character: "*.example.com" needs a non-empty label.
        dot = host.find(".", 1)
        while dot != -1:
            vhost = wildcards.get(host[dot:])
            if vhost is not None:
                return vhost
            dot = host.find(".", dot + 1)
    return listener.catch_all


def parse_query(query: str) -> dict[str, str]:
    """``a=1&b&a=2`` -> ``{"a": "1", "b": ""}``: the first value of a key wins.

    Values are compared as received (not percent-decoded), as Envoy's query
    parameter matcher does.
    """
    params: dict[str, str] = {}
    if not query:
        return params
    for part in query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        if key not in params:
            params[key] = value
    return params


def _headers_ok(request: MatchableRequest, headers: tuple[HeaderMatch, ...]) -> bool:
    for h in headers:
        value = request.header(h.name)
        if value is None:
            return False
        if h.matcher is not None and not h.matcher.matches(value):
            return False
    return True


def _without_headers_ok(request: MatchableRequest, headers: tuple[HeaderMatch, ...]) -> bool:
    # Istio inverts each matcher and treats a missing header as empty, so a request
    # without the header passes unless the matcher accepts "" (``{}`` means "absent").
    for h in headers:
        value = request.header(h.name)
        if h.matcher is None:
            if value is not None:
                return False
        elif h.matcher.matches("" if value is None else value):
            return False
    return True


def _query_ok(params: dict[str, str], query: tuple[QueryMatch, ...]) -> bool:
    for q in query:
        value = params.get(q.name)
        if value is None:
            return False
        if q.matcher is not None and not q.matcher.matches(value):
            return False
    return True


def _claim_values(claims: Mapping[str, Any], path: tuple[str, ...]) -> list[str] | None:
    value: Any = claims
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, int | float):
        return [str(value)]
    return None


def _claims_ok(claims: Mapping[str, Any] | None, wanted: tuple[ClaimMatch, ...]) -> bool:
    # No verified token: no claim condition can hold (Istio routes such requests on).
    if claims is None:
        return False
    for c in wanted:
        values = _claim_values(claims, c.path)
        if values is None:
            return False
        if c.matcher is not None and not any(c.matcher.matches(v) for v in values):
            return False
    return True


def _accepts(
    m: RouteMatch,
    request: MatchableRequest,
    params: list[dict[str, str]],
    claims: Mapping[str, Any] | None = None,
) -> bool:
    if m.uri is not None and not m.uri.matches(request.path):
        return False
    if m.method is not None and not m.method.matches(request.method):
        return False
    if m.port is not None and m.port != request.port:
        return False
    if m.scheme is not None and not m.scheme.matches(request.scheme):
        return False
    # Envoy matches :authority as received, port included.
    if m.authority is not None and not m.authority.matches(request.authority):
        return False
    if m.headers and not _headers_ok(request, m.headers):
        return False
    if m.without_headers and not _without_headers_ok(request, m.without_headers):
        return False
    if m.query_params:
        if not params:
            params.append(parse_query(request.query))
        if not _query_ok(params[0], m.query_params):
            return False
    return not (m.claims and not _claims_ok(claims, m.claims))


def match_route(
    vhost: VirtualHost, request: MatchableRequest, claims: Mapping[str, Any] | None = None
) -> Route | None:
    """The first route of ``vhost`` whose matches accept ``request``.

    A route with no match entries accepts everything; several entries are OR-ed and
    the conditions inside one entry are AND-ed. The query string is parsed at most
    once, and only if a route asks about it. ``claims`` are those of the verified
    JWT (None without one); only ``@request.auth.claims`` conditions read them.

    It walks ``vhost.plan``, the routes flattened at compile time (plan.py), so a
    lookup reads one tuple and the strings it compares instead of four objects per
    route: with many hosts, those objects are rarely in the CPU caches.
    """
    plan = vhost.plan
    size = len(plan)
    path = request.path
    params: dict[str, str] | None = None
    start = 0
    while start < size:
        end = plan[start]
        i = start + 2
        while i < end:
            op = plan[i]
            if op == OP_URI_PREFIX:
                if len(path) < plan[i + 1] or not path.startswith(plan[i + 2]):
                    break
                i += 3
            elif op == OP_URI_EXACT:
                if len(path) != plan[i + 1] or path != plan[i + 2]:
                    break
                i += 3
            elif op == OP_URI_REGEX:
                # The literal prefix turns most paths away without running the regex.
                if not path.startswith(plan[i + 1]) or plan[i + 2].fullmatch(path) is None:
                    break
                i += 3
            # A value is read only once the request has the header or parameter: it
            # is the one part of these ops that is not shared between hosts.
            elif op == OP_HEADER_EXACT:
                value = request.header(plan[i + 1])
                if value is None or value != plan[i + 2]:
                    break
                i += 3
            elif op == OP_QUERY_EXACT:
                if params is None:
                    params = parse_query(request.query)
                value = params.get(plan[i + 1])
                if value is None or value != plan[i + 2]:
                    break
                i += 3
            elif op == OP_METHOD_EXACT:
                if request.method != plan[i + 1]:
                    break
                i += 2
            elif op == OP_URI_SEGMENTS:
                value = plan[i + 1]
                size_v = len(value)
                if not path.startswith(value) or (len(path) != size_v and path[size_v] != "/"):
                    break
                i += 2
            elif op == OP_HEADER_PRESENT:
                if request.header(plan[i + 1]) is None:
                    break
                i += 2
            elif op == OP_QUERY_PRESENT:
                if params is None:
                    params = parse_query(request.query)
                if plan[i + 1] not in params:
                    break
                i += 2
            elif op == OP_URI_MATCH:
                if not plan[i + 1].matches(path):
                    break
                i += 2
            elif op == OP_METHOD_MATCH:
                if not plan[i + 1].matches(request.method):
                    break
                i += 2
            elif op == OP_HEADER_MATCH:
                value = request.header(plan[i + 1])
                if value is None or not plan[i + 2].matches(value):
                    break
                i += 3
            elif op == OP_QUERY_MATCH:
                if params is None:
                    params = parse_query(request.query)
                value = params.get(plan[i + 1])
                if value is None or not plan[i + 2].matches(value):
                    break
                i += 3
            else:  # OP_REST
                if not _accepts(plan[i + 1], request, [], claims):
                    break
                i += 2
        else:
            return plan[start + 1]
        start = end
    return None


def pick_destination(forward: Forward, rnd: float) -> WeightedCluster:
    """The destination a uniform ``rnd`` in [0, 1) falls on, by cumulative weight.

    Zero-weight destinations are never picked. Values outside [0, 1) are clamped.
    """
    destinations = forward.destinations
    if len(destinations) == 1:
        return destinations[0]
    index = bisect_right(forward.cumulative, rnd * forward.total_weight)
    return destinations[min(max(index, 0), len(destinations) - 1)]


def rewrite_path(route: Route, path: str) -> str:
    """The upstream path after the route's URI rewrite (``path`` has no query string).

    As Envoy does for what Istio generates: ``uriRegexRewrite`` substitutes every
    match; ``rewrite.uri`` replaces the matched prefix of a prefix match (a route
    without a URI match counts as prefix "/") and the whole path of an exact or
    regex match.
    """
    rewrite = route.rewrite
    if rewrite is None:
        return path
    if rewrite.full_path is not None:
        return rewrite.full_path
    if rewrite.uri_regex is not None:
        pattern, substitution = rewrite.uri_regex
        return pattern.sub(substitution, path)
    if rewrite.uri is None:
        return path
    uri = route.matches[0].uri if route.matches else None
    if uri is None:
        return rewrite.uri + path[1:] if path.startswith("/") else rewrite.uri + path
    if uri.kind == "prefix":
        return rewrite.uri + path[len(uri.value) :]
    if uri.kind == "path_prefix":
        return replace_path_prefix(path, uri.value, rewrite.uri)
    return rewrite.uri


def replace_path_prefix(path: str, prefix: str, replacement: str) -> str:
    """The Gateway API's ReplacePrefixMatch: ``prefix`` (a PathPrefix value without its
    trailing "/", matched on whole segments) becomes ``replacement``.

    Segments are kept apart by exactly one "/": the spec's table maps "/foo/bar" with
    prefix "/foo" to "/xyz/bar" for both "/xyz" and "/xyz/", to "/bar" for "", and
    "/foo" to "/" for "" or "/" -- never "//" and never an empty path.
    """
    rest = path[len(prefix) :]  # "" or starts with "/"
    result = replacement.rstrip("/") + rest
    if not result.startswith("/"):
        result = "/" + result
    return result
