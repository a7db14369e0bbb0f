"""Compiled rate-limit policy: what a limited route carries in the Snapshot.

    compile_policies(resources, gateway_labels) -> tuple[Policy, ...]
    limits_for_route(policies, domain, route_name) -> RouteRateLimit | None
    RouteRateLimit.limits: tuple[Limit, ...]      each with its key extractors and rate

Everything a request needs is settled here, before any request arrives: which
RateLimitPolicies select this gateway, which virtual hosts and routes each applies
to, the key parts parsed into small extractor objects, rates turned into integer
emission intervals. A route no policy touches gets ``None`` and pays nothing.

A request with no value for some key part (no token, no header) is counted in one
shared "missing" bucket of that limit, so leaving the header out is never a way
around the limit.

This module does no I/O and knows HTTP only through the ``RequestFacts`` attributes
it reads (the pipeline's request context provides them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from gateway.config import hosts as hostrules
from gateway.config.ratelimit import UNITS, KeyPartSpec, parse_key_part

__all__ = [
    "MISSING",
    "KeyPart",
    "Limit",
    "Override",
    "Policy",
    "Rate",
    "RequestFacts",
    "RouteRateLimit",
    "attach_rate_limits",
    "compile_key_part",
    "compile_policies",
    "limits_for_route",
]

MISSING = "\x00missing"  # the bucket of requests lacking a key part's value
_SEP = "\x1f"  # between key parts: a byte no header value or claim can hold
# Distinct key values whose bucket hash one limit remembers (per process); a flood of
# new values empties the memo rather than growing it.
HASH_MEMO_SIZE = 4096


class RequestFacts(Protocol):
    """What the extractors read: the pipeline's ``RequestContext`` has all of it.

    ``head`` has ``peer``, ``path``, ``method``, ``authority`` and ``header(name)``;
    ``xff`` is the ``x-forwarded-for`` the gateway sends upstream (the client's
    chain plus the peer); ``route`` has ``name``; ``auth`` is the verified token
    (with a ``claims`` mapping) or None.
    """

    head: Any
    xff: str
    route: Any
    auth: Any


# --------------------------------------------------------------------------- key parts


class KeyPart:
    """Pulls one value out of a request; None when the request has none."""

    __slots__ = ()
    text = ""

    def value(self, ctx: RequestFacts) -> str | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.text == self.text  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.text)


class _SourceIp(KeyPart):
    """The address of the peer that opened the connection (Istio's ``source.ip``)."""

    __slots__ = ()
    text = "source.ip"

    def value(self, ctx: RequestFacts) -> str | None:
        return ctx.head.peer or None


class _RemoteIp(KeyPart):
    """The original client (Istio's ``remote.ip``): with N trusted proxies in front,
    the (N+1)-th address from the right of ``x-forwarded-for`` (the peer included),
    as Envoy's ``xff_num_trusted_hops`` picks it. With fewer addresses than that the
    chain is not the configured one, and the peer is used: it cannot be forged."""

    __slots__ = ("trusted",)
    text = "remote.ip"

    def __init__(self, trusted: int) -> None:
        self.trusted = trusted

    def value(self, ctx: RequestFacts) -> str | None:
        peer = ctx.head.peer
        if not self.trusted:
            return peer or None
        chain = ctx.xff.split(",")
        if len(chain) <= self.trusted:
            return peer or None
        return chain[-1 - self.trusted].strip() or None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RemoteIp) and other.trusted == self.trusted

    def __hash__(self) -> int:
        return hash((self.text, self.trusted))


class _Header(KeyPart):
    __slots__ = ("name", "text")

    def __init__(self, name: str) -> None:
        self.name = name
        self.text = f"request.headers[{name}]"

    def value(self, ctx: RequestFacts) -> str | None:
        return ctx.head.header(self.name) or None


def _claims(ctx: RequestFacts) -> Mapping[str, Any] | None:
    auth = getattr(ctx, "auth", None)
    if auth is None:
        return None
    claims = getattr(auth, "claims", None)
    if claims is None and isinstance(auth, Mapping):
        claims = auth
    return claims


def _claim_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        # Istio matches a list claim if any element matches; as a key, the whole list
        # (in its order) is the value.
        return ",".join(str(v) for v in value) or None
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class _Claim(KeyPart):
    __slots__ = ("path", "text")

    def __init__(self, path: tuple[str, ...]) -> None:
        self.path = path
        self.text = "request.auth.claims" + "".join(f"[{p}]" for p in path)

    def value(self, ctx: RequestFacts) -> str | None:
        node: Any = _claims(ctx)
        for name in self.path:
            if not isinstance(node, Mapping):
                return None
            node = node.get(name)
        return _claim_text(node)


class _Principal(KeyPart):
    """``iss/sub`` of the verified token, as Istio's ``request.auth.principal``."""

    __slots__ = ()
    text = "request.auth.principal"

    def value(self, ctx: RequestFacts) -> str | None:
        claims = _claims(ctx)
        if not claims or not claims.get("iss") or not claims.get("sub"):
            return None
        return f"{claims['iss']}/{claims['sub']}"


class _Path(KeyPart):
    __slots__ = ()
    text = "request.path"

    def value(self, ctx: RequestFacts) -> str | None:
        return ctx.head.path or None


class _Method(KeyPart):
    __slots__ = ()
    text = "request.method"

    def value(self, ctx: RequestFacts) -> str | None:
        return ctx.head.method or None


def _host_only(authority: str) -> str:
    if authority.startswith("["):
        return authority[: authority.find("]") + 1].lower()
    return authority.partition(":")[0].lower()


class _Host(KeyPart):
    """The authority without its port, lower-cased: ``API.example.com:443`` and
    ``api.example.com`` share a bucket."""

    __slots__ = ()
    text = "request.host"

    def value(self, ctx: RequestFacts) -> str | None:
        return _host_only(ctx.head.authority) or None


class _RouteName(KeyPart):
    __slots__ = ()
    text = "route.name"

    def value(self, ctx: RequestFacts) -> str | None:
        route = ctx.route
        return (route.name if route is not None else "") or None


class _Constant(KeyPart):
    __slots__ = ("constant", "text")

    def __init__(self, constant: str) -> None:
        self.constant = constant
        self.text = f"constant[{constant}]"

    def value(self, ctx: RequestFacts) -> str | None:
        return self.constant


def compile_key_part(spec: KeyPartSpec | str, trusted_proxies: int = 0) -> KeyPart:
    """The extractor for a parsed (or textual, already validated) key part."""
    if isinstance(spec, str):
        spec = parse_key_part(spec)
    kind = spec.kind
    if kind == "request.headers":
        return _Header(spec.args[0])
    if kind == "request.auth.claims":
        return _Claim(spec.args)
    if kind == "constant":
        return _Constant(spec.args[0])
    if kind == "remote.ip":
        return _RemoteIp(trusted_proxies)
    plain: dict[str, type[KeyPart]] = {
        "source.ip": _SourceIp,
        "request.auth.principal": _Principal,
        "request.path": _Path,
        "request.method": _Method,
        "request.host": _Host,
        "route.name": _RouteName,
    }
    return plain[kind]()


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True)
class Rate:
    """``requests`` per ``per``; ``burst`` back to back from a full bucket."""

    requests: int
    per: str  # second | minute | hour | day
    burst: int
    interval_us: int  # one request's worth of time, floor(period / requests)

    @classmethod
    def of(cls, requests: int, per: str, burst: int | None = None) -> Rate:
        period_us = UNITS[per] * 1_000_000
        return cls(requests, per, burst or requests, max(1, period_us // requests))

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "per": self.per, "burst": self.burst}


@dataclass(frozen=True, slots=True)
class Override:
    """A different rate for requests meeting every ``when`` condition."""

    when: tuple[tuple[KeyPart, str], ...]
    rate: Rate
    tag: str  # keeps an override's bucket apart from the default one

    def applies(self, ctx: RequestFacts) -> bool:
        return all(part.value(ctx) == wanted for part, wanted in self.when)


@dataclass(frozen=True, slots=True)
class Limit:
    """One ``limits[]`` entry of a policy, compiled."""

    id: str  # "namespace/policy/limit": the bucket namespace, also in metrics
    key: tuple[KeyPart, ...]
    rate: Rate
    backend: str  # local | redis
    fail_open: bool
    overrides: tuple[Override, ...] = ()
    # Set only when the policy's hosts cover part of the route's virtual host (a
    # policy for api.example.com on a "*" host): checked per request.
    hosts: tuple[str, ...] = ()

    # The request path of a limit with one key part, no overrides and no host check
    # (the usual shape), set in __post_init__: ``plain`` says it applies, ``extract``
    # is that part's ``value``, and ``hashes`` remembers ``hash(bucket) or 1`` per key
    # value, so a returning client costs one dict lookup instead of building and
    # hashing its bucket string. Not compared, hashed or dumped: derived state.
    plain: bool = field(default=False, init=False, repr=False, compare=False)
    extract: Any = field(default=None, init=False, repr=False, compare=False)
    hashes: dict[str | None, int] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # The key is the connection's peer address (source.ip, or remote.ip with no
    # trusted proxies): the commonest key, read by the limiter without a call.
    by_peer: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.key) == 1 and not self.overrides and not self.hosts:
            part = self.key[0]
            object.__setattr__(self, "plain", True)
            object.__setattr__(self, "extract", part.value)
            peer = type(part) is _SourceIp or (type(part) is _RemoteIp and not part.trusted)
            object.__setattr__(self, "by_peer", peer)

    def key_hash(self, value: str | None) -> int:
        """``hash(bucket) or 1`` of a plain limit's bucket for key ``value`` (None: the
        request lacks it), as ``LocalBuckets.take`` hashes the bucket string; memoised."""
        bucket = self.id + _SEP + value if value is not None else self.id + MISSING
        h = hash(bucket) or 1
        hashes = self.hashes
        if len(hashes) >= HASH_MEMO_SIZE:
            hashes.clear()
        hashes[value] = h
        return h

    def bucket(self, ctx: RequestFacts) -> tuple[str, Rate] | None:
        """The bucket key and rate for this request; None when the limit skips it."""
        if self.hosts:
            host = _host_only(ctx.head.authority)
            if not any(hostrules.host_matches(h, host) for h in self.hosts):
                return None
        rate = self.rate
        tag = ""
        for override in self.overrides:
            if override.applies(ctx):
                rate = override.rate
                tag = override.tag
                break
        key = self.key
        if not key:
            return self.id + tag, rate
        if len(key) == 1:
            value = key[0].value(ctx)
            return (self.id + tag + _SEP + value if value is not None else self.id + MISSING), rate
        values = []
        for part in key:
            value = part.value(ctx)
            if value is None:
                return self.id + MISSING, rate
            values.append(value)
        return self.id + tag + _SEP + _SEP.join(values), rate

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "key": [p.text for p in self.key],
            "rate": self.rate.to_dict(),
            "backend": self.backend,
        }
        if self.backend == "redis":
            out["failureMode"] = "open" if self.fail_open else "closed"
        if self.overrides:
            out["overrides"] = [
                {"when": {p.text: v for p, v in o.when}, "rate": o.rate.to_dict()}
                for o in self.overrides
            ]
        if self.hosts:
            out["hosts"] = list(self.hosts)
        return out


@dataclass(frozen=True, slots=True)
class RouteRateLimit:
    """Everything the rate-limit stage needs for one route."""

    limits: tuple[Limit, ...]
    headers: str = "ratelimit"  # ratelimit | x-ratelimit | none
    local_only: bool = True  # no Redis limit: the decision never awaits
    # The one limit of a route whose only limit is local and plain (see Limit.plain),
    # else None: the limiter's shortest path. Derived, so not compared or dumped.
    single: Limit | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        limits = self.limits
        if len(limits) == 1 and self.local_only and limits[0].plain:
            object.__setattr__(self, "single", limits[0])

    def to_dict(self) -> dict[str, Any]:
        return {"headers": self.headers, "limits": [lim.to_dict() for lim in self.limits]}


@dataclass(frozen=True, slots=True)
class Policy:
    """A RateLimitPolicy that selects this gateway."""

    ref: str  # "RateLimitPolicy/namespace/name"
    hosts: tuple[str, ...]  # expanded; empty: every host
    routes: tuple[str, ...]  # VirtualService http[].name; empty: every route
    limits: tuple[Limit, ...]
    headers: str


def _is_subset(wanted: Mapping[str, str], have: Mapping[str, str]) -> bool:
    return all(have.get(k) == v for k, v in wanted.items())


def compile_policies(
    resources: Iterable[Any], gateway_labels: Mapping[str, str]
) -> tuple[Policy, ...]:
    """The RateLimitPolicies (validated ``Resource``s) whose selector matches, in load order."""
    out: list[Policy] = []
    for resource in resources:
        spec = resource.spec
        selector = spec.selector.match_labels if spec.selector is not None else {}
        if not _is_subset(selector, gateway_labels):
            continue
        ns, name = resource.metadata.namespace, resource.metadata.name
        trusted = spec.num_trusted_proxies
        limits = []
        for limit in spec.limits:
            lid = f"{ns}/{name}/{limit.name}"
            overrides = tuple(
                Override(
                    when=tuple(
                        (compile_key_part(k, trusted), v) for k, v in sorted(o.when.items())
                    ),
                    rate=Rate.of(o.rate.requests, o.rate.per, o.rate.burst),
                    tag=f"#{i}",
                )
                for i, o in enumerate(limit.overrides)
            )
            limits.append(
                Limit(
                    id=lid,
                    key=tuple(compile_key_part(k, trusted) for k in limit.key),
                    rate=Rate.of(limit.rate.requests, limit.rate.per, limit.rate.burst),
                    backend=limit.backend or "local",
                    fail_open=(limit.failure_mode or "open") == "open",
                    overrides=overrides,
                )
            )
        out.append(
            Policy(
                ref=f"RateLimitPolicy/{ns}/{name}",
                hosts=tuple(hostrules.expand_host(h, ns) for h in spec.hosts),
                routes=tuple(spec.routes),
                limits=tuple(limits),
                headers=spec.response_headers or "ratelimit",
            )
        )
    return tuple(out)


def _route_selected(routes: Sequence[str], route_name: str) -> bool:
    if not routes:
        return True
    # A compiled route is named "http-name" or "http-name.match-name" (Istio's
    # naming); the policy names the VirtualService's http[].name.
    return any(route_name == r or route_name.startswith(r + ".") for r in routes)


def limits_for_route(
    policies: Sequence[Policy], domain: str, route_name: str
) -> RouteRateLimit | None:
    """The limits of a route served on virtual host ``domain``, or None."""
    limits: list[Limit] = []
    headers = ""
    for policy in policies:
        if not _route_selected(policy.routes, route_name):
            continue
        runtime_hosts: tuple[str, ...] = ()
        if policy.hosts and not any(hostrules.host_matches(h, domain) for h in policy.hosts):
            overlapping = tuple(
                h for h in policy.hosts if hostrules.hosts_intersection(h, domain) is not None
            )
            if not overlapping:
                continue
            runtime_hosts = overlapping
        headers = headers or policy.headers
        for limit in policy.limits:
            if runtime_hosts:
                limit = Limit(
                    limit.id,
                    limit.key,
                    limit.rate,
                    limit.backend,
                    limit.fail_open,
                    limit.overrides,
                    runtime_hosts,
                )
            limits.append(limit)
    if not limits:
        return None
    return RouteRateLimit(
        limits=tuple(limits),
        headers=headers,
        local_only=all(lim.backend == "local" for lim in limits),
    )


def attach_rate_limits(
    snapshot: Any, resources: Iterable[Any], gateway_labels: Mapping[str, str]
) -> Any:
    """The Snapshot with ``Route.ratelimit`` set on every route a policy limits.

    Run by the routing compiler after it built the listeners. Routes are shared
    between virtual hosts (one VirtualService serving several hosts), so a limited
    route is copied per virtual host: a policy for ``hosts: [api.example.com]`` must
    not follow the same route onto ``www.example.com``.
    """
    policies = compile_policies(resources, gateway_labels)
    if not policies:
        return snapshot
    cache: dict[tuple[str, str], RouteRateLimit | None] = {}

    def limit_vhost(vhost: Any) -> Any:
        domain = vhost.domains[0] if vhost.domains else "*"
        routes = []
        changed = False
        for route in vhost.routes:
            key = (domain, route.name)
            if key not in cache:
                cache[key] = limits_for_route(policies, domain, route.name)
            found = cache[key]
            if found is not None:
                route = replace(route, ratelimit=found)
                changed = True
            routes.append(route)
        return replace(vhost, routes=tuple(routes)) if changed else vhost

    listeners = {}
    for port, listener in snapshot.listeners.items():
        listeners[port] = replace(
            listener,
            virtual_hosts={d: limit_vhost(v) for d, v in listener.virtual_hosts.items()},
            wildcard_hosts={d: limit_vhost(v) for d, v in listener.wildcard_hosts.items()},
            catch_all=limit_vhost(listener.catch_all) if listener.catch_all is not None else None,
        )
    return replace(snapshot, listeners=listeners)
