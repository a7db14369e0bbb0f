"""AuthorizationPolicy: compiled matchers and Istio's evaluation order.

    compile_authorization(resources) -> AuthzPolicies | None      (control half)
    AuthzPolicies.evaluate(request)   -> AuthzDecision             (per request)
    check_external(...)                                            (CUSTOM, async)

Istio's order, quoted from its documentation's description of the evaluation:
CUSTOM policies first (a matching CUSTOM policy sends the request to its external
authorizer, which may deny it), then DENY (any match denies), then ALLOW: when no
ALLOW policy applies the request is allowed; when some do, one of them must match.
An ALLOW policy with no rules matches nothing, so on its own it denies everything;
a rule that is ``{}`` matches everything. AUDIT policies never change the decision;
a match is only recorded.

Within a rule: every ``from`` entry is OR-ed, every ``to`` entry is OR-ed, every
``when`` condition is AND-ed, and the three parts are AND-ed. Within a source or an
operation every field set is AND-ed, each field's values are OR-ed, and a ``not*``
field matches when none of its values does.

String values use Istio's forms: exact, ``prefix*``, ``*suffix`` and ``*`` (present,
non-empty). IP values are addresses or CIDR blocks. What the gateway cannot know
(a peer's mTLS principal or namespace at the edge) is absent, so ``principals:
["*"]`` does not match a plain-TLS client, as in Istio.

No I/O here except ``check_external``, which the CUSTOM stage awaits.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.config.resources import AuthorizationPolicySpec, AuthzCondition, Resource

__all__ = [
    "CONDITION_KEYS",
    "OPERATION_FIELDS",
    "SOURCE_FIELDS",
    "AuthzDecision",
    "AuthzPolicies",
    "AuthzPolicy",
    "AuthzRequest",
    "ExternalVerdict",
    "PathRejected",
    "ValueMatcher",
    "check_external",
    "compile_authorization",
    "normalize_path",
    "peer_source",
]

# Condition keys Istio documents for HTTP, and the ones meshgate evaluates. Keys with
# a bracketed argument are listed by their prefix.
CONDITION_KEYS = (
    "request.headers",
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims",
    "destination.port",
    "connection.sni",
)


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class ValueMatcher:
    """One Istio string value: ``exact``, ``prefix``, ``suffix`` or ``present``."""

    kind: str
    value: str = ""

    @classmethod
    def parse(cls, text: str, *, lower: bool = False) -> ValueMatcher:
        if lower:
            text = text.lower()
        if text == "*":
            return cls("present")
        if text.endswith("*"):
            return cls("prefix", text[:-1])
        if text.startswith("*"):
            return cls("suffix", text[1:])
        return cls("exact", text)

    def matches(self, text: str) -> bool:
        kind = self.kind
        if kind == "exact":
            return text == self.value
        if kind == "prefix":
            return text.startswith(self.value)
        if kind == "suffix":
            return text.endswith(self.value)
        return text != ""


def _any_value(matchers: Sequence[ValueMatcher], values: Iterable[str]) -> bool:
    return any(m.matches(v) for v in values for m in matchers)


def _strings(values: Sequence[str], *, lower: bool = False) -> tuple[ValueMatcher, ...]:
    return tuple(ValueMatcher.parse(v, lower=lower) for v in values)


def _networks(values: Sequence[str]) -> tuple[Any, ...]:
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            continue  # the validator reported it; an unusable block never matches
    return tuple(out)


def _in_networks(networks: Sequence[Any], ip: str) -> bool:
    if not ip or not networks:
        return False
    try:
        address: Any = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        # A dual-stack socket reports an IPv4 client as ::ffff:a.b.c.d; Envoy reports
        # it as the IPv4 address, so an IPv4 block matches it.
        address = address.ipv4_mapped
    return any(address in net for net in networks)


class PathRejected(ValueError):
    """A path Istio refuses outright (400) instead of normalising: ``%00``."""


# RFC 3986 2.3: the unreserved characters. A percent-encoding of one of them is the
# character itself, and Istio's BASE normalisation decodes it (its table: %2d, %2e,
# %30-%39, %41-%5a, %5f, %61-%7a, %7e). %2f and %5c stay encoded, as with BASE.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    if char in _UNRESERVED:
        return char
    if char == "\x00":
        raise PathRejected("%00 in the path")
    return match.group(0)


def normalize_path(path: str) -> str:
    """Istio's default path normalisation (meshConfig ``pathNormalization: BASE``),
    applied before AuthorizationPolicy paths are matched; the result also goes
    upstream, as in Istio ("the normalized request will be used for both the
    evaluation of authorization policies and the request that is ultimately sent to
    the backend server").

    In Istio's order: percent-encoded unreserved characters are decoded, once
    (``/%61dmin`` is ``/admin``; ``%252e`` stays), ``%00`` is refused
    (``PathRejected``, a 400), a backslash becomes ``/``, then RFC 3986 dot-segment
    removal (``/public/../admin`` is ``/admin``). Like BASE, and unlike Istio's
    MERGE_SLASHES and DECODE_AND_MERGE_SLASHES, slashes are not merged and ``%2f``
    and ``%5c`` are not decoded: ``//admin`` and ``/admin%2f`` keep their shape.
    """
    if "%" in path:
        path = _ESCAPE.sub(_decode_unreserved, path)
    if "\\" in path:
        path = path.replace("\\", "/")
    if "/." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        if seg == ".":
            if i == len(segments) - 1:
                out.append("")
            continue
        if seg == "..":
            if len(out) > 1:
                out.pop()
            if i == len(segments) - 1:
                out.append("")
            continue
        out.append(seg)
    result = "/".join(out)
    return result if result.startswith("/") else "/" + result


# --------------------------------------------------------------------------- request


@dataclass(slots=True)
class AuthzRequest:
    """What a policy can look at: built once per request by the authz stage."""

    method: str
    path: str  # without the query string, normalised
    host: str  # authority, lower-case
    port: int
    source_ip: str
    remote_ip: str
    header: Callable[[str], str | None]
    auth: Any = None  # jwt.VerifiedToken | None
    sni: str = ""
    # From a client certificate a MUTUAL TLS server verified (``peer_source``): the
    # SPIFFE ID without ``spiffe://`` and its namespace, "" when there is none.
    source_principal: str = ""
    source_namespace: str = ""
    # A verified client certificate was presented, SPIFFE or not: Istio's
    # ``principals: ["*"]`` matches any authenticated peer.
    peer_certified: bool = False


_SPIFFE = "spiffe://"


def peer_source(uris: Sequence[str]) -> tuple[str, str]:
    """The (principal, namespace) Istio reads from a verified client certificate's
    URI SANs: the first SPIFFE ID without its scheme (``cluster.local/ns/test/sa/
    curl``) and the segment after ``ns``. Istio writes ``principals: [X]`` as an
    Envoy match on ``spiffe://X``, and ``namespaces: [N]`` as one on ``*/ns/N/*``."""
    for uri in uris:
        if uri.startswith(_SPIFFE):
            principal = uri[len(_SPIFFE) :]
            parts = principal.split("/")
            namespace = parts[2] if len(parts) > 2 and parts[1] == "ns" else ""
            return principal, namespace
    return "", ""


def _service_account(principal: str) -> str:
    """``<namespace>/<name>`` of a SPIFFE principal ``<td>/ns/<ns>/sa/<name>``."""
    parts = principal.split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
        return f"{parts[2]}/{parts[4]}"
    return ""


# Istio treats these two claims as space-delimited lists ("read write" holds
# "write"); every other string claim is one exact value. Istio's pair is "scope" and
# "permission" (singular), the defaults of its JWT filter configuration.
_SPACE_DELIMITED = frozenset({"scope", "permission"})


def _claim(claims: Any, path: Sequence[str]) -> list[str]:
    value = claims
    for part in path:
        if not isinstance(value, dict):
            return []
        value = value.get(part)
    if isinstance(value, str):
        if len(path) == 1 and path[0] in _SPACE_DELIMITED:
            return value.split()
        return [value]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, int | float):
        return [str(value)]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


# --------------------------------------------------------------------------- compiled


@dataclass(frozen=True, slots=True)
class _Field:
    """One source/operation field: positive values OR-ed, or a ``not*`` field."""

    name: str
    negate: bool
    strings: tuple[ValueMatcher, ...] = ()
    networks: tuple[Any, ...] = ()
    ports: frozenset[int] = frozenset()

    def holds(self, request: AuthzRequest) -> bool:
        hit = self._hit(request)
        return not hit if self.negate else hit

    def _hit(self, request: AuthzRequest) -> bool:
        name = self.name
        if name == "paths":
            return _any_value(self.strings, (request.path,))
        if name == "methods":
            return _any_value(self.strings, (request.method,))
        if name == "hosts":
            host = request.host
            bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
            return _any_value(self.strings, {host, bare})
        if name == "ports":
            return request.port in self.ports
        if name == "requestPrincipals":
            auth = request.auth
            return auth is not None and _any_value(self.strings, (auth.principal,))
        if name == "principals":
            p = request.source_principal
            if not p:
                return request.peer_certified and any(m.kind == "present" for m in self.strings)
            return _any_value(self.strings, (p,))
        if name == "namespaces":
            ns = request.source_namespace
            return bool(ns) and _any_value(self.strings, (ns,))
        if name == "serviceAccounts":
            sa = _service_account(request.source_principal)
            return bool(sa) and _any_value(self.strings, (sa,))
        if name == "ipBlocks":
            return _in_networks(self.networks, request.source_ip)
        if name == "remoteIpBlocks":
            return _in_networks(self.networks, request.remote_ip)
        return False


@dataclass(frozen=True, slots=True)
class _Condition:
    key: str
    kind: str  # the key without its bracketed argument
    arg: tuple[str, ...]  # header name or claim path
    values: tuple[ValueMatcher, ...]
    not_values: tuple[ValueMatcher, ...]
    networks: tuple[Any, ...] = ()
    not_networks: tuple[Any, ...] = ()

    def _observed(self, request: AuthzRequest) -> list[str]:
        kind = self.kind
        auth = request.auth
        if kind == "request.headers":
            value = request.header(self.arg[0])
            return [] if value is None else [value]
        if kind == "request.auth.claims":
            return _claim(auth.claims, self.arg) if auth is not None else []
        if kind == "request.auth.principal":
            return [auth.principal] if auth is not None else []
        if kind == "request.auth.audiences":
            return list(auth.audiences) if auth is not None else []
        if kind == "request.auth.presenter":
            return [auth.presenter] if auth is not None and auth.presenter else []
        if kind == "destination.port":
            return [str(request.port)]
        if kind == "connection.sni":
            return [request.sni] if request.sni else []
        if kind == "source.principal":
            if request.source_principal:
                return [request.source_principal]
            # A certificate without a SPIFFE ID is still a present principal (Envoy
            # matches the URI SAN, DNS SAN or subject); no value but "*" matches it.
            return ["\x00"] if request.peer_certified else []
        if kind == "source.namespace":
            return [request.source_namespace] if request.source_namespace else []
        return []

    def holds(self, request: AuthzRequest) -> bool:
        if self.kind in ("source.ip", "remote.ip"):
            ip = request.source_ip if self.kind == "source.ip" else request.remote_ip
            if self.networks and not _in_networks(self.networks, ip):
                return False
            return not (self.not_networks and _in_networks(self.not_networks, ip))
        observed = self._observed(request)
        if self.values and not _any_value(self.values, observed):
            return False
        return not (self.not_values and _any_value(self.not_values, observed))


@dataclass(frozen=True, slots=True)
class _Rule:
    sources: tuple[tuple[_Field, ...], ...]  # OR of ANDs; empty: any source
    operations: tuple[tuple[_Field, ...], ...]
    conditions: tuple[_Condition, ...]

    def matches(self, request: AuthzRequest) -> bool:
        if self.sources and not any(
            all(f.holds(request) for f in source) for source in self.sources
        ):
            return False
        if self.operations and not any(all(f.holds(request) for f in op) for op in self.operations):
            return False
        return all(c.holds(request) for c in self.conditions)


@dataclass(frozen=True, slots=True)
class AuthzPolicy:
    name: str  # "ns/name", as Istio names policies in its RBAC logs
    action: str
    rules: tuple[_Rule, ...]
    provider: str | None = None

    def matches(self, request: AuthzRequest) -> bool:
        return any(rule.matches(request) for rule in self.rules)


@dataclass(frozen=True, slots=True)
class AuthzDecision:
    """``allowed`` False: deny with 403. ``custom``: providers still to consult."""

    allowed: bool
    policy: str = ""  # the policy that decided, "" for the default
    custom: tuple[tuple[str, str], ...] = ()  # (provider, policy) to consult first
    audited: tuple[str, ...] = ()


_ALLOW_DEFAULT = AuthzDecision(True)


@dataclass(frozen=True, slots=True)
class AuthzPolicies:
    custom: tuple[AuthzPolicy, ...] = ()
    deny: tuple[AuthzPolicy, ...] = ()
    allow: tuple[AuthzPolicy, ...] = ()
    audit: tuple[AuthzPolicy, ...] = ()
    names: tuple[str, ...] = field(default=(), compare=False)

    def evaluate(self, request: AuthzRequest) -> AuthzDecision:
        """Istio's order; CUSTOM matches are returned for the caller to consult."""
        audited = tuple(p.name for p in self.audit if p.matches(request))
        custom = tuple((p.provider or "", p.name) for p in self.custom if p.matches(request))
        for policy in self.deny:
            if policy.matches(request):
                return AuthzDecision(False, policy.name, custom, audited)
        if self.allow:
            for policy in self.allow:
                if policy.matches(request):
                    return AuthzDecision(True, policy.name, custom, audited)
            return AuthzDecision(False, "", custom, audited)
        if custom or audited:
            return AuthzDecision(True, "", custom, audited)
        return _ALLOW_DEFAULT

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for action, policies in (
            ("CUSTOM", self.custom),
            ("DENY", self.deny),
            ("ALLOW", self.allow),
            ("AUDIT", self.audit),
        ):
            if policies:
                data[action] = [
                    p.name + (f" (provider {p.provider})" if p.provider else "") for p in policies
                ]
        return data


# --------------------------------------------------------------------------- compile


SOURCE_FIELDS = (
    ("principals", "principals", False),
    ("not_principals", "principals", True),
    ("request_principals", "requestPrincipals", False),
    ("not_request_principals", "requestPrincipals", True),
    ("namespaces", "namespaces", False),
    ("not_namespaces", "namespaces", True),
    ("service_accounts", "serviceAccounts", False),
    ("not_service_accounts", "serviceAccounts", True),
    ("ip_blocks", "ipBlocks", False),
    ("not_ip_blocks", "ipBlocks", True),
    ("remote_ip_blocks", "remoteIpBlocks", False),
    ("not_remote_ip_blocks", "remoteIpBlocks", True),
)
OPERATION_FIELDS = (
    ("hosts", "hosts", False),
    ("not_hosts", "hosts", True),
    ("ports", "ports", False),
    ("not_ports", "ports", True),
    ("methods", "methods", False),
    ("not_methods", "methods", True),
    ("paths", "paths", False),
    ("not_paths", "paths", True),
)


def _field(name: str, negate: bool, values: Sequence[str]) -> _Field:
    if name in ("ipBlocks", "remoteIpBlocks"):
        return _Field(name, negate, networks=_networks(values))
    if name == "ports":
        return _Field(name, negate, ports=frozenset(int(v) for v in values if v.isdigit()))
    return _Field(name, negate, strings=_strings(values, lower=name == "hosts"))


def _fields(obj: Any, table: Sequence[tuple[str, str, bool]]) -> tuple[_Field, ...]:
    out = []
    for attr, name, negate in table:
        values = getattr(obj, attr)
        if values:
            out.append(_field(name, negate, values))
    return tuple(out)


def split_condition_key(key: str) -> tuple[str, tuple[str, ...]]:
    """``request.auth.claims[groups][0]`` -> (``request.auth.claims``, (groups, 0))."""
    bracket = key.find("[")
    if bracket == -1:
        return key, ()
    kind = key[:bracket]
    rest = key[bracket:]
    args: list[str] = []
    while rest.startswith("["):
        end = rest.find("]")
        if end == -1:
            break
        args.append(rest[1:end])
        rest = rest[end + 1 :]
    return kind, tuple(args)


def _condition(cond: AuthzCondition) -> _Condition:
    kind, args = split_condition_key(cond.key)
    if kind == "request.headers":
        args = tuple(a.lower() for a in args)
    if kind in ("source.ip", "remote.ip"):
        return _Condition(
            cond.key, kind, args, (), (), _networks(cond.values), _networks(cond.not_values)
        )
    return _Condition(cond.key, kind, args, _strings(cond.values), _strings(cond.not_values))


def compile_policy(resource: Resource) -> AuthzPolicy:
    spec: AuthorizationPolicySpec = resource.spec
    rules = []
    for rule in spec.rules:
        sources = tuple(_fields(f.source, SOURCE_FIELDS) for f in rule.from_)
        operations = tuple(_fields(t.operation, OPERATION_FIELDS) for t in rule.to)
        conditions = tuple(_condition(c) for c in rule.when)
        rules.append(_Rule(sources, operations, conditions))
    name = f"{resource.metadata.namespace}/{resource.metadata.name}"
    provider = spec.provider.name if spec.provider is not None else None
    return AuthzPolicy(name, spec.action or "ALLOW", tuple(rules), provider)


def compile_authorization(resources: Sequence[Resource]) -> AuthzPolicies | None:
    """The bound policies by action, in (namespace, name) order; None when none bind."""
    if not resources:
        return None
    by_action: dict[str, list[AuthzPolicy]] = {"CUSTOM": [], "DENY": [], "ALLOW": [], "AUDIT": []}
    for resource in resources:
        policy = compile_policy(resource)
        by_action.setdefault(policy.action, []).append(policy)
    return AuthzPolicies(
        custom=tuple(by_action["CUSTOM"]),
        deny=tuple(by_action["DENY"]),
        allow=tuple(by_action["ALLOW"]),
        audit=tuple(by_action["AUDIT"]),
        names=tuple(f"{r.metadata.namespace}/{r.metadata.name}" for r in resources),
    )


# --------------------------------------------------------------------------- CUSTOM


@dataclass(frozen=True, slots=True)
class ExternalVerdict:
    """The external authorizer's answer: ``allowed``, or the response to return."""

    allowed: bool
    status: int = 403
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    reason: str = ""


_NOT_FORWARDED = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


async def check_external(
    client: Any,
    url: str,
    *,
    method: str,
    path: str,
    query: str,
    headers: Sequence[tuple[str, str]],
    authority: str,
    timeout_s: float,
) -> ExternalVerdict:
    """Ask an HTTP authorizer about a request, as Envoy's HTTP ext_authz does.

    The check request carries the original method, the original path (and query)
    appended to the provider URL's path, and the original headers without a body.
    A 2xx answer allows. Anything else is returned to the client as it came, minus
    hop-by-hop headers. A timeout or an unreachable authorizer denies (fail closed).
    """
    import asyncio

    target = url.rstrip("/") + path + (f"?{query}" if query else "")
    send = [(n, v) for n, v in headers if n not in _NOT_FORWARDED and n != "host"]
    send.append(("x-forwarded-host", authority))
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.request(method, target, headers=send, content=b"")
    except TimeoutError:
        return ExternalVerdict(False, 403, reason="authorizer timed out")
    except Exception as exc:  # an unreachable authorizer must never mean "allowed"
        return ExternalVerdict(False, 403, reason=f"authorizer unreachable: {type(exc).__name__}")
    if 200 <= response.status_code < 300:
        return ExternalVerdict(True, response.status_code)
    keep = tuple(
        (n.lower(), v)
        for n, v in response.headers.items()
        if n.lower() not in _NOT_FORWARDED and n.lower() != "content-encoding"
    )
    status = response.status_code
    return ExternalVerdict(False, status, keep, response.content, f"authorizer said {status}")
