"""Per-process security state: settings, the JWKS registry, the verified-token cache,
the external-authorizer client and the decision counters.

The compiled policy lives in the Snapshot (immutable, swapped on reload); what lives
here changes while the process runs (keys, cache, counters) and outlives a reload.

``Authenticator`` is the JWT logic the stage adapter calls: find tokens where the
rules say, pick the rule by issuer, verify (or find the token in the cache), and
report what to strip and what to add. It knows request heads only through the
small ``TokenSource`` protocol.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote

from .jwks import JwksRegistry, JwksSettings
from .jwt import KeySet, TokenRejected, VerifiedToken, parse_jwks, unverified_payload, verify_token
from .policy import JwtRule, SecurityPolicy, TokenLocation
from .stats import SecurityStats

__all__ = [
    "Authenticator",
    "AuthnSettings",
    "FoundToken",
    "NeedsKeys",
    "SecurityRuntime",
    "TokenSource",
    "find_tokens",
]


@dataclass(frozen=True, slots=True)
class AuthnSettings:
    clock_skew_s: float = 60.0
    token_cache_size: int = 10_000
    jwks: JwksSettings = field(default_factory=JwksSettings)
    # CUSTOM providers: name -> URL of an HTTP authorizer (meshgate's own setting,
    # where Istio reads extensionProviders from its mesh config).
    authz_providers: Mapping[str, str] = field(default_factory=dict)
    ext_authz_timeout_s: float = 2.0


class TokenSource(Protocol):
    """What token extraction reads of a request (``RequestHead`` fits)."""

    query: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class FoundToken:
    location: TokenLocation
    token: str


class NeedsKeys(Exception):
    """Verification needs a JWKS refetch first (unknown kid): await ``wait``, retry."""

    def __init__(self, wait: Awaitable[Any], rejected: TokenRejected) -> None:
        super().__init__(rejected.reason)
        self.wait = wait
        self.rejected = rejected


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip('"')
    return None


def _param(query: str, name: str) -> str | None:
    prefix = name + "="
    for part in query.split("&"):
        if part.startswith(prefix):
            return unquote(part[len(prefix) :])
    return None


def _header_token(headers: list[tuple[str, str]], loc: TokenLocation) -> str | None:
    """The first header of that name carrying the prefix. Repeated headers are looked
    at one by one, never joined: "Basic ..." beside "Bearer ..." is not one value."""
    name = loc.name
    prefix = loc.prefix
    for key, value in headers:
        if key != name:
            continue
        if prefix:
            # The scheme in "Bearer <token>" is case-insensitive (RFC 9110 11.1).
            if value[: len(prefix)].lower() != prefix.lower():
                continue
            value = value[len(prefix) :]
        value = value.strip()
        if value:
            return value
    return None


def find_tokens(policy: SecurityPolicy, request: TokenSource) -> list[FoundToken]:
    """The first token in each location the rules name (Istio: first per location)."""
    found: list[FoundToken] = []
    for loc in policy.locations:
        source = loc.source
        if source == "header":
            token: str | None = _header_token(request.headers, loc)
        elif source == "param":
            token = _param(request.query, loc.name) if request.query else None
        else:
            cookies = request.header("cookie")
            token = _cookie(cookies, loc.name) if cookies else None
        if token:
            found.append(FoundToken(loc, token))
    return found


class Authenticator:
    """Verifies the tokens of a request against a ``SecurityPolicy``, with a cache.

    The cache maps a token string to its verified result, the location it was
    accepted from, the rule, and the key-set generation it was verified with. A hit
    costs a dict lookup and a few comparisons; an entry is dropped at the token's
    ``exp`` (plus the skew), when the JWKS it was checked with changes, or when the
    policy changes (a reload). It is bounded (LRU).
    """

    def __init__(self, settings: AuthnSettings, registry: JwksRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.cache: dict[str, tuple[VerifiedToken, TokenLocation, JwtRule, int, float]] = {}
        self.policy: SecurityPolicy | None = None
        self._inline: dict[str, KeySet | None] = {}

    def use_policy(self, policy: SecurityPolicy) -> None:
        """Called when a request carries a policy not seen before (start, reload)."""
        if policy is self.policy:
            return
        self.policy = policy
        self.cache.clear()
        self._inline = {}
        for rule in policy.jwt_rules:
            if rule.jwks_inline is not None and rule.jwks_inline not in self._inline:
                try:
                    self._inline[rule.jwks_inline] = parse_jwks(rule.jwks_inline)
                except ValueError:
                    self._inline[rule.jwks_inline] = None  # the validator reported it

    def _keys(self, rule: JwtRule) -> tuple[KeySet | None, int]:
        if rule.jwks_inline is not None:
            return self._inline.get(rule.jwks_inline), 0
        entry = self.registry.entry(rule.jwks_uri or "")
        if entry is None:
            return None, 0
        return entry.keys, entry.generation

    def verify(
        self, found: FoundToken, *, allow_refetch: bool = True
    ) -> tuple[VerifiedToken, JwtRule]:
        """The verified token and the rule that accepted it; raises ``TokenRejected``
        or ``NeedsKeys`` (only when ``allow_refetch``)."""
        return self.verify_at(found.location, found.token, allow_refetch=allow_refetch)

    def verify_at(
        self, location: TokenLocation, token: str, *, allow_refetch: bool = True
    ) -> tuple[VerifiedToken, JwtRule]:
        """``verify`` without building a ``FoundToken`` (the stage's hot path)."""
        cache = self.cache
        hit = cache.pop(token, None)
        if hit is not None:
            verified, loc, rule, generation, deadline = hit
            if (
                loc is location
                and time.time() < deadline
                and (rule.jwks_inline is not None or self._keys(rule)[1] == generation)
            ):
                cache[token] = hit  # re-inserted last: least recently used goes first
                return verified, rule
        policy = self.policy
        assert policy is not None
        try:
            iss = unverified_payload(token).get("iss")
        except TokenRejected:
            raise
        if not isinstance(iss, str):
            raise TokenRejected("issuer not accepted")
        rules = [r for r in policy.jwt_rules if location in r.locations and r.issuer_ok(iss)]
        if not rules:
            raise TokenRejected("issuer not configured")
        now = time.time()
        skew = self.settings.clock_skew_s
        first_error: TokenRejected | None = None
        for rule in rules:
            keys, generation = self._keys(rule)
            if keys is None and allow_refetch and rule.jwks_uri:
                entry = self.registry.entry(rule.jwks_uri)
                if entry is not None and not entry.first_attempt_done.is_set():
                    # Keys for this URI are being fetched for the first time (start-up,
                    # or a reload that just named it): wait for that, not a 401.
                    rejected = TokenRejected("signing keys are not available")
                    raise NeedsKeys(entry.first_attempt(), rejected)
            try:
                verified = verify_token(
                    token, keys, issuer_ok=rule.issuer_ok, audiences=rule.audiences,
                    now=now, skew_s=skew,
                )  # fmt: skip
            except TokenRejected as exc:
                if (
                    allow_refetch
                    and rule.jwks_uri
                    and keys is not None
                    and exc.reason == "no key matches the token's kid and alg"
                ):
                    wait = self.registry.refetch_for_unknown_kid(rule.jwks_uri)
                    if wait is not None:
                        raise NeedsKeys(wait, exc) from exc
                first_error = first_error or exc
                continue
            exp = verified.expires_at
            # Without exp a token stays cacheable for an hour; it is re-checked then.
            deadline = (exp + skew) if exp is not None else now + 3600.0
            if len(cache) >= self.settings.token_cache_size:
                cache.pop(next(iter(cache)))
            cache[token] = (verified, location, rule, generation, deadline)
            return verified, rule
        assert first_error is not None
        raise first_error


class SecurityRuntime:
    """Everything security needs at run time in one process."""

    def __init__(self, settings: AuthnSettings | None = None) -> None:
        self.settings = settings or AuthnSettings()
        self.registry = JwksRegistry(self.settings.jwks)
        self.authenticator = Authenticator(self.settings, self.registry)
        self.stats = SecurityStats()
        self._http: Any = None

    @staticmethod
    def _uris(policy: SecurityPolicy | None) -> list[tuple[str, float]]:
        if policy is None:
            return []
        timeouts: dict[str, float] = {}
        for rule in policy.jwt_rules:
            if rule.jwks_uri:
                timeouts[rule.jwks_uri] = max(timeouts.get(rule.jwks_uri, 0.0), rule.timeout_s)
        return sorted(timeouts.items())

    async def prepare(self, policy: SecurityPolicy | None) -> None:
        """Start JWKS fetching for ``policy`` and wait (bounded) for first results."""
        await self.registry.prepare(self._uris(policy))

    def sync(self, policy: SecurityPolicy | None) -> None:
        self.registry.sync(self._uris(policy))

    def http_client(self) -> Any:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(follow_redirects=False)
        return self._http

    def status(self) -> dict[str, Any]:
        """For ``/config_dump``: JWKS health and decision counters."""
        return {"jwks": self.registry.health(), "decisions": self.stats.export()}

    def metrics_text(self) -> str:
        return self.stats.collect_text(self.registry.health())

    async def close(self) -> None:
        await self.registry.close()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
