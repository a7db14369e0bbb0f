"""The Snapshot as data (for the admin config dump, goldens and ``--json``) and as a table.

This module owns the one serialised shape of a compiled Snapshot, with a stable
order (listeners by port; virtual hosts exact, then wildcard most specific first,
then ``*``; routes in match order; clusters by name), and the content hash that
becomes ``Snapshot.version``. It also renders ``meshgate routes``' text table in the
spirit of ``istioctl proxy-config routes``. It never builds or changes a Snapshot.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from .match import find_virtual_host
from .table import (
    Cluster,
    CorsPolicy,
    DirectResponse,
    Forward,
    HeaderMatch,
    HeaderOps,
    Listener,
    Origin,
    Redirect,
    Route,
    RouteMatch,
    Snapshot,
    SNIRoute,
    StringMatcher,
    TLSServer,
    VirtualHost,
)

__all__ = ["format_routes", "snapshot_content_hash", "snapshot_to_dict", "stable_hash"]


def snapshot_to_dict(snapshot: Snapshot, *, include_sources: bool = True) -> dict[str, Any]:
    """Plain, JSON/YAML-able data in a stable order.

    ``include_sources=False`` leaves out the ``file:line`` of every origin: the same
    configuration loaded from another path then dumps (and hashes) the same.
    """
    return {
        "version": snapshot.version,
        "gatewayLabels": dict(sorted(snapshot.gateway_labels.items())),
        "listeners": [
            _listener(snapshot.listeners[port], include_sources, None)
            for port in sorted(snapshot.listeners)
        ],
        "clusters": [_cluster(snapshot.clusters[name]) for name in sorted(snapshot.clusters)],
        # Bound RequestAuthentication/AuthorizationPolicy, only when there are some,
        # so configurations without them dump (and hash) as before.
        **({"security": snapshot.security.to_dict()} if snapshot.security is not None else {}),
        **({"egress": snapshot.egress.to_dict()} if snapshot.egress is not None else {}),
    }


def snapshot_content_hash(snapshot: Snapshot) -> str:
    """The version of a Snapshot: a hash of its dump without version and sources."""
    data = snapshot_to_dict(snapshot, include_sources=False)
    del data["version"]
    return stable_hash(data)


def stable_hash(data: Any) -> str:
    """A short content hash of JSON-able data, independent of dict ordering."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- to dict


def ordered_virtual_hosts(listener: Listener) -> list[VirtualHost]:
    """Exact hosts by name, wildcards most specific first, then the catch-all."""
    out: list[VirtualHost] = [listener.virtual_hosts[h] for h in sorted(listener.virtual_hosts)]
    for suffix in sorted(listener.wildcard_hosts, key=lambda s: (-s.count("."), s)):
        out.append(listener.wildcard_hosts[suffix])
    if listener.catch_all is not None:
        out.append(listener.catch_all)
    unique: list[VirtualHost] = []
    seen: set[int] = set()
    for vhost in out:
        if id(vhost) not in seen:
            seen.add(id(vhost))
            unique.append(vhost)
    return unique


def _listener(listener: Listener, sources: bool, only: list[VirtualHost] | None) -> dict[str, Any]:
    vhosts = ordered_virtual_hosts(listener) if only is None else only
    out: dict[str, Any] = {
        "name": listener.name,
        "port": listener.port,
        "protocol": listener.protocol,
        "origins": [_origin(o, sources) for o in listener.origins],
        "virtualHosts": [_vhost(v, sources) for v in vhosts],
    }
    # Only TLS ports carry these keys, so plain-HTTP dumps (and their hashes) are
    # what they were before TLS existed.
    if listener.tls_servers:
        out["tlsServers"] = [_tls_server(t, sources) for t in listener.tls_servers]
    if listener.sni_routes:
        out["sniRoutes"] = [_sni_route(r, sources) for r in listener.sni_routes]
    return out


def _tls_server(server: TLSServer, sources: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"hosts": list(server.hosts), "mode": server.mode}
    for key, value in (
        ("serverCertificate", server.server_certificate),
        ("privateKey", server.private_key),
        ("caCertificates", server.ca_certificates),
        ("credentialName", server.credential_name),
        ("minProtocolVersion", server.min_protocol_version),
        ("maxProtocolVersion", server.max_protocol_version),
    ):
        if value:
            out[key] = value
    if server.cipher_suites:
        out["cipherSuites"] = list(server.cipher_suites)
    if server.subject_alt_names:
        out["subjectAltNames"] = list(server.subject_alt_names)
    out["origin"] = _origin(server.origin, sources)
    return out


def _sni_route(route: SNIRoute, sources: bool) -> dict[str, Any]:
    return {
        "name": route.name,
        "origin": _origin(route.origin, sources),
        "sniHosts": list(route.sni_hosts),
        "destinations": [{"cluster": d.cluster, "weight": d.weight} for d in route.destinations],
    }


def _origin(origin: Origin, sources: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": origin.kind, "namespace": origin.namespace, "name": origin.name}
    if origin.index is not None:
        out["index"] = origin.index
    if sources and origin.source:
        out["source"] = origin.source
    return out


def _vhost(vhost: VirtualHost, sources: bool) -> dict[str, Any]:
    return {
        "name": vhost.name,
        "domains": list(vhost.domains),
        "routes": [_route(r, sources) for r in vhost.routes],
    }


# Matcher kinds in YAML spelling; the Gateway API's segment-wise PathPrefix is
# "pathPrefix", shown with its value normalised (no trailing "/", "" for "/").
_MATCHER_KEYS = {"path_prefix": "pathPrefix"}


def _matcher(m: StringMatcher) -> dict[str, Any]:
    out: dict[str, Any] = {_MATCHER_KEYS.get(m.kind, m.kind): m.value}
    if m.ignore_case:
        out["ignoreCase"] = True
    return out


def _header_matches(items: tuple[HeaderMatch, ...]) -> dict[str, Any]:
    return {h.name: ({} if h.matcher is None else _matcher(h.matcher)) for h in items}


def _match(m: RouteMatch) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if m.name:
        out["name"] = m.name
    for field in ("uri", "scheme", "method", "authority"):
        matcher = getattr(m, field)
        if matcher is not None:
            out[field] = _matcher(matcher)
    if m.headers:
        out["headers"] = _header_matches(m.headers)
    if m.without_headers:
        out["withoutHeaders"] = _header_matches(m.without_headers)
    if m.query_params:
        out["queryParams"] = {
            q.name: ({} if q.matcher is None else _matcher(q.matcher)) for q in m.query_params
        }
    if m.port is not None:
        out["port"] = m.port
    if m.claims:
        out["claims"] = {
            ".".join(c.path): ({} if c.matcher is None else _matcher(c.matcher)) for c in m.claims
        }
    return out


def _ops(ops: HeaderOps) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ops.set:
        out["set"] = dict(ops.set)
    if ops.add:
        out["add"] = dict(ops.add)
    if ops.remove:
        out["remove"] = list(ops.remove)
    return out


def _body(body: bytes) -> dict[str, Any]:
    try:
        return {"string": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"bytes": base64.b64encode(body).decode("ascii")}


def _action(action: Forward | Redirect | DirectResponse) -> dict[str, Any]:
    if isinstance(action, Forward):
        destinations = []
        for d in action.destinations:
            item: dict[str, Any] = {"cluster": d.cluster, "weight": d.weight}
            if not d.request_headers.empty:
                item["requestHeaders"] = _ops(d.request_headers)
            if not d.response_headers.empty:
                item["responseHeaders"] = _ops(d.response_headers)
            destinations.append(item)
        forward: dict[str, Any] = {"destinations": destinations, "totalWeight": action.total_weight}
        if action.timeout_s is not None:
            forward["timeoutSeconds"] = action.timeout_s
        return {"forward": forward}
    if isinstance(action, Redirect):
        redirect: dict[str, Any] = {"code": action.code}
        for field in ("uri", "authority", "scheme", "port"):
            value = getattr(action, field)
            if value is not None:
                redirect[field] = value
        if action.derive_port is not None:
            redirect["derivePort"] = action.derive_port
        if action.replace_prefix is not None:
            redirect["replacePrefixMatch"] = {
                "prefix": action.prefix,
                "with": action.replace_prefix,
            }
        return {"redirect": redirect}
    direct: dict[str, Any] = {"status": action.status}
    if action.body:
        direct["body"] = _body(action.body)
    return {"directResponse": direct}


def _cors(cors: CorsPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {"allowOrigins": [_matcher(m) for m in cors.allow_origins]}
    for field, key in (
        ("allow_methods", "allowMethods"),
        ("allow_headers", "allowHeaders"),
        ("expose_headers", "exposeHeaders"),
        ("max_age", "maxAge"),
    ):
        value = getattr(cors, field)
        if value:
            out[key] = value
    out["allowCredentials"] = cors.allow_credentials
    out["unmatchedPreflights"] = "FORWARD" if cors.forward_unmatched_preflights else "IGNORE"
    return out


def _route(route: Route, sources: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if route.name:
        out["name"] = route.name
    out["origin"] = _origin(route.origin, sources)
    out["match"] = [_match(m) for m in route.matches]
    out.update(_action(route.action))
    if route.rewrite is not None:
        rewrite: dict[str, Any] = {}
        if route.rewrite.uri is not None:
            rewrite["uri"] = route.rewrite.uri
        if route.rewrite.authority is not None:
            rewrite["authority"] = route.rewrite.authority
        if route.rewrite.uri_regex is not None:
            pattern, substitution = route.rewrite.uri_regex
            rewrite["uriRegexRewrite"] = {"match": pattern.pattern, "rewrite": substitution}
        if route.rewrite.full_path is not None:
            rewrite["fullPath"] = route.rewrite.full_path
        out["rewrite"] = rewrite
    if not route.request_headers.empty:
        out["requestHeaders"] = _ops(route.request_headers)
    if not route.response_headers.empty:
        out["responseHeaders"] = _ops(route.response_headers)
    if route.cors is not None:
        out["cors"] = _cors(route.cors)
    if route.ratelimit is not None:
        out["rateLimit"] = route.ratelimit.to_dict()
    if route.extra:
        out["extra"] = dict(route.extra)
    return out


def _cluster(cluster: Cluster) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": cluster.name,
        "host": cluster.host,
        "port": cluster.port,
        "subset": cluster.subset,
        "protocol": cluster.protocol,
        "endpoints": [
            {
                "address": e.address,
                "port": e.port,
                "weight": e.weight,
                **({"labels": dict(sorted(e.labels.items()))} if e.labels else {}),
            }
            for e in cluster.endpoints
        ],
    }
    if cluster.policy:
        out["policy"] = dict(cluster.policy)
    return out


# --------------------------------------------------------------------------- filtering


def _select(snapshot: Snapshot, host: str | None) -> list[tuple[Listener, list[VirtualHost]]]:
    """Per listener, the virtual hosts to show: all, or the one that serves ``host``."""
    out = []
    for port in sorted(snapshot.listeners):
        listener = snapshot.listeners[port]
        if host is None:
            out.append((listener, ordered_virtual_hosts(listener)))
            continue
        vhost = find_virtual_host(listener, host)
        if vhost is not None:
            out.append((listener, [vhost]))
    return out


def _filtered_dict(snapshot: Snapshot, host: str) -> dict[str, Any]:
    selected = _select(snapshot, host)
    wanted: set[str] = set()
    for _, vhosts in selected:
        for vhost in vhosts:
            for route in vhost.routes:
                if isinstance(route.action, Forward):
                    wanted.update(d.cluster for d in route.action.destinations)
    return {
        "version": snapshot.version,
        "gatewayLabels": dict(sorted(snapshot.gateway_labels.items())),
        "listeners": [_listener(listener, True, vhosts) for listener, vhosts in selected],
        "clusters": [
            _cluster(snapshot.clusters[name])
            for name in sorted(wanted)
            if name in snapshot.clusters
        ],
    }


# --------------------------------------------------------------------------- text table


def _describe(m: StringMatcher, *, path: bool = False) -> str:
    if m.kind == "exact":
        text = m.value
    elif m.kind == "prefix":
        text = m.value + "*"
    elif m.kind == "path_prefix":
        text = m.value + "/**" if m.value else "/**"
    else:
        text = m.value if path else "~" + m.value
    return text + " (ignore case)" if m.ignore_case else text


def _describe_match(m: RouteMatch | None) -> str:
    if m is None:
        return "/*"
    parts = [_describe(m.uri, path=True) if m.uri is not None else "/*"]
    if m.method is not None:
        parts.append(f"method={_describe(m.method)}")
    if m.scheme is not None:
        parts.append(f"scheme={_describe(m.scheme)}")
    if m.authority is not None:
        parts.append(f"authority={_describe(m.authority)}")
    for h in m.headers:
        parts.append(f"{h.name}" + ("" if h.matcher is None else f"={_describe(h.matcher)}"))
    for h in m.without_headers:
        parts.append(f"!{h.name}" + ("" if h.matcher is None else f"={_describe(h.matcher)}"))
    for q in m.query_params:
        parts.append(f"?{q.name}" + ("" if q.matcher is None else f"={_describe(q.matcher)}"))
    if m.port is not None:
        parts.append(f"port={m.port}")
    for c in m.claims:
        name = "@claims." + ".".join(c.path)
        parts.append(name + ("" if c.matcher is None else f"={_describe(c.matcher)}"))
    return " ".join(parts)


def _source_name(origin: Origin) -> str:
    if origin.kind == "VirtualService":
        return f"{origin.name}.{origin.namespace}"
    return f"{origin.kind}:{origin.name}.{origin.namespace}"


def format_routes(snapshot: Snapshot, host: str | None = None, as_json: bool = False) -> str:
    """``meshgate routes``: one row per route match, like ``istioctl proxy-config routes``.

    With ``host``, only the virtual host that would serve it (per listener). With
    ``as_json``, the Snapshot dump limited the same way, plus the clusters it uses.
    """
    if as_json:
        data = snapshot_to_dict(snapshot) if host is None else _filtered_dict(snapshot, host)
        return json.dumps(data, indent=2, ensure_ascii=False)
    rows = [("NAME", "VHOST NAME", "DOMAINS", "MATCH", "VIRTUAL SERVICE")]
    for listener, vhosts in _select(snapshot, host):
        config = f"http.{listener.port}"
        for vhost in vhosts:
            domains = ",".join(vhost.domains)
            for route in vhost.routes:
                source = _source_name(route.origin)
                matches: tuple[RouteMatch | None, ...] = route.matches or (None,)
                for m in matches:
                    rows.append((config, vhost.name, domains, _describe_match(m), source))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("   ".join(cells).rstrip())
    return "\n".join(lines)
