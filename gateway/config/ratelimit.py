"""The RateLimitPolicy kind (``meshgate.io/v1alpha1``): key grammar and validation.

    parse_key_part(text) -> KeyPartSpec        raises KeyPartError with the reason
    check_rate_limit_policy(report, spec)      every problem, reported on ``report``
    UNITS                                      seconds per ``rate.per`` unit

Key parts are spelled like AuthorizationPolicy ``when`` keys so that users learn one
vocabulary: ``source.ip``, ``remote.ip``, ``request.headers[x-api-key]``,
``request.auth.claims[sub]`` (nested: ``request.auth.claims[org][id]``),
``request.auth.principal``, ``request.path``, ``request.method``, ``request.host``,
plus ``route.name`` and ``constant[VALUE]``, which Istio has no use for.

The grammar lives here, not in ``ratelimit/``, because validation owns it: the
rate-limit compiler calls ``parse_key_part`` on keys that already passed these checks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .parse import child_path

__all__ = [
    "BACKENDS",
    "FAILURE_MODES",
    "KEY_PARTS",
    "MAX_REQUESTS_PER_SECOND",
    "RESPONSE_HEADERS",
    "UNITS",
    "KeyPartError",
    "KeyPartSpec",
    "check_rate_limit_policy",
    "parse_key_part",
]

UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
BACKENDS = ("local", "redis")
FAILURE_MODES = ("open", "closed")
RESPONSE_HEADERS = ("ratelimit", "x-ratelimit", "none")
# The buckets count in whole microseconds: one request per microsecond is the
# finest interval they can express.
MAX_REQUESTS_PER_SECOND = 1_000_000
_MAX_DEPTH_S = 366 * 86400
KEY_PARTS = (
    "source.ip",
    "remote.ip",
    "request.headers[NAME]",
    "request.auth.claims[NAME]",
    "request.auth.principal",
    "request.path",
    "request.method",
    "request.host",
    "route.name",
    "constant[VALUE]",
)

_PLAIN = {
    "source.ip",
    "remote.ip",
    "request.auth.principal",
    "request.path",
    "request.method",
    "request.host",
    "route.name",
}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_LIMIT_NAME = re.compile(r"[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?")


class KeyPartError(ValueError):
    """A key part that is not in the grammar; the message says why."""


@dataclass(frozen=True, slots=True)
class KeyPartSpec:
    """A parsed key part: ``kind`` is one of the plain names, ``request.headers``,
    ``request.auth.claims`` or ``constant``; ``args`` holds the bracketed names."""

    kind: str
    args: tuple[str, ...] = ()


def _brackets(text: str, prefix: str) -> tuple[str, ...]:
    rest = text[len(prefix) :]
    args: list[str] = []
    while rest:
        if not rest.startswith("["):
            raise KeyPartError(f'"{text}": expected "[" after {prefix}')
        end = rest.find("]")
        if end < 0:
            raise KeyPartError(f'"{text}": "[" without a closing "]"')
        arg = rest[1:end]
        if not arg:
            raise KeyPartError(f'"{text}": empty name inside []')
        args.append(arg)
        rest = rest[end + 1 :]
    if not args:
        raise KeyPartError(f'"{text}": {prefix} needs a name in [], e.g. {prefix}[name]')
    return tuple(args)


def parse_key_part(text: str) -> KeyPartSpec:
    """The key part ``text`` names, or ``KeyPartError``."""
    if text in _PLAIN:
        return KeyPartSpec(text)
    for prefix in ("request.headers", "request.auth.claims", "constant"):
        if text.startswith(prefix) and text[len(prefix) : len(prefix) + 1] in ("[", ""):
            args = _brackets(text, prefix)
            if prefix == "request.headers":
                if len(args) != 1:
                    raise KeyPartError(f'"{text}": a header key names one header')
                if not _TOKEN.fullmatch(args[0]):
                    raise KeyPartError(f'"{text}": "{args[0]}" is not a valid header name')
                return KeyPartSpec(prefix, (args[0].lower(),))
            if prefix == "constant" and len(args) != 1:
                raise KeyPartError(f'"{text}": a constant holds one value')
            return KeyPartSpec(prefix, args)
    raise KeyPartError(f'unknown key part "{text}"; valid key parts: {", ".join(KEY_PARTS)}')


class _Report(Protocol):
    def error(self, path: str, message: str) -> None: ...
    def warn(self, path: str, message: str) -> None: ...
    def host(self, path: str, host: str, *, allow_star: bool = True) -> None: ...


def _check_rate(r: _Report, path: str, rate: Any) -> None:
    if rate.per not in UNITS:
        r.error(f"{path}.per", f'unknown unit "{rate.per}"; valid units: {", ".join(UNITS)}')
    if rate.requests < 1:
        r.error(f"{path}.requests", f"{rate.requests} must be at least 1")
    elif rate.per in UNITS and rate.requests > MAX_REQUESTS_PER_SECOND * UNITS[rate.per]:
        r.error(
            f"{path}.requests",
            f"{rate.requests} per {rate.per} is more than {MAX_REQUESTS_PER_SECOND} "
            "per second, the finest rate meshgate counts",
        )
    if rate.burst is not None and rate.burst < 1:
        r.error(f"{path}.burst", f"{rate.burst} must be at least 1")
    elif rate.requests >= 1 and rate.per in UNITS:
        # Bucket arithmetic runs in microseconds, in Lua's doubles too: keep the
        # bucket's depth (burst x interval) well inside 2^53.
        depth_s = (rate.burst or rate.requests) * UNITS[rate.per] / rate.requests
        if depth_s > _MAX_DEPTH_S:
            r.error(
                f"{path}.burst",
                f"a burst of {rate.burst} at this rate takes {depth_s:.0f}s to refill; "
                f"at most {_MAX_DEPTH_S}s (a year) is supported",
            )


def check_rate_limit_policy(r: _Report, spec: Any, resources: Sequence[Any] = ()) -> None:
    """Report every problem of a ``RateLimitPolicySpec``; ``resources`` (all of the
    configuration) lets it warn about route names no VirtualService defines."""
    for i, host in enumerate(spec.hosts):
        r.host(f"spec.hosts[{i}]", host)
    known = {
        route.name
        for res in resources
        if res.kind == "VirtualService"
        for route in res.spec.http
        if route.name
    }
    for i, name in enumerate(spec.routes):
        if not name:
            r.error(f"spec.routes[{i}]", "a route name must not be empty")
        elif name not in known:
            r.warn(
                f"spec.routes[{i}]",
                f'no VirtualService has an http route named "{name}"; the limit applies nowhere',
            )
    if spec.num_trusted_proxies < 0:
        r.error("spec.numTrustedProxies", f"{spec.num_trusted_proxies} must not be negative")
    if spec.response_headers is not None and spec.response_headers not in RESPONSE_HEADERS:
        r.error(
            "spec.responseHeaders",
            f'unknown value "{spec.response_headers}"; valid values: {", ".join(RESPONSE_HEADERS)}',
        )
    if not spec.limits:
        r.error("spec.limits", "at least one limit is required")
    seen: dict[str, int] = {}
    for i, limit in enumerate(spec.limits):
        p = f"spec.limits[{i}]"
        if not _LIMIT_NAME.fullmatch(limit.name):
            r.error(
                f"{p}.name",
                f'"{limit.name}" is not a valid limit name (lower-case letters, digits, '
                "'-', '_' and '.', at most 63, starting and ending alphanumeric)",
            )
        elif limit.name in seen:
            first = seen[limit.name]
            r.error(f"{p}.name", f'duplicate limit name "{limit.name}" (first at limits[{first}])')
        else:
            seen[limit.name] = i
        for j, part in enumerate(limit.key):
            try:
                parse_key_part(part)
            except KeyPartError as exc:
                r.error(f"{p}.key[{j}]", str(exc))
        _check_rate(r, f"{p}.rate", limit.rate)
        if limit.backend is not None and limit.backend not in BACKENDS:
            r.error(
                f"{p}.backend", f'unknown backend "{limit.backend}"; valid values: local, redis'
            )
        if limit.failure_mode is not None:
            if limit.failure_mode not in FAILURE_MODES:
                r.error(
                    f"{p}.failureMode",
                    f'unknown failure mode "{limit.failure_mode}"; valid values: open, closed',
                )
            elif limit.backend != "redis":
                r.warn(f"{p}.failureMode", "has no effect on a local limit, which cannot fail")
        for k, override in enumerate(limit.overrides):
            op = f"{p}.overrides[{k}]"
            if not override.when:
                r.error(f"{op}.when", "at least one condition is required")
            for part in override.when:
                try:
                    parse_key_part(part)
                except KeyPartError as exc:
                    r.error(child_path(f"{op}.when", part), str(exc))
            _check_rate(r, f"{op}.rate", override.rate)
