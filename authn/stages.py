"""The request stages for JWT authentication and authorization: thin adapters
between the gateway's pipeline (``RequestContext``, ``LocalReply``, ``GatewayError``)
and the logic of ``runtime.Authenticator`` and ``authz.AuthzPolicies``.

Both follow the pipeline's contract: ``on_request(ctx)`` returns None to go on, a
``LocalReply`` to answer, or raises a ``GatewayError``. When a stage has to wait (a
JWKS refetch for an unknown ``kid``, an external authorizer) it returns a coroutine
instead, which the pipeline awaits (``is_async = True`` marks such stages). The
usual paths (no policy bound, a cached token, a local authz decision) return
without creating one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from gateway.errors import AccessDenied, BadRequest, Unauthenticated
from gateway.stages import LocalReply, RequestContext

from .authz import (
    AuthzDecision,
    AuthzRequest,
    PathRejected,
    check_external,
    normalize_path,
    peer_source,
)
from .jwt import TokenRejected, VerifiedToken
from .policy import JwtRule, SecurityPolicy, TokenLocation
from .runtime import FoundToken, NeedsKeys, SecurityRuntime, find_tokens

__all__ = ["AuthzStage", "JwtAuthnStage"]

_GENERAL: Any = object()  # "take the general path" from the single-header fast path


def _realm(ctx: RequestContext) -> str:
    head = ctx.head
    return f"{head.scheme}://{head.authority}{head.path}"


def _claim_text(claims: Any, path: str) -> str | None:
    value = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


class JwtAuthnStage:
    """RequestAuthentication: verify every token the rules find; no token is fine.

    A token that fails is answered 401 with ``www-authenticate``; the request never
    reaches routing or the upstream. A verified token becomes ``ctx.auth`` (the first
    one, when several locations held tokens), which authorization, claim routing
    and rate-limit keys read. The token is then removed from the request unless
    the rule says ``forwardOriginalToken``, and the payload/claims are written to the
    headers the rule names."""

    is_async = True

    def __init__(self, runtime: SecurityRuntime) -> None:
        self.runtime = runtime
        self.authenticator = runtime.authenticator
        self.stats = runtime.stats

    def on_request(self, ctx: RequestContext) -> Coroutine[Any, Any, None] | None:
        snapshot = ctx.snapshot
        policy: SecurityPolicy | None = snapshot.security if snapshot is not None else None
        if policy is None or not policy.jwt_rules:
            return None
        authenticator = self.authenticator
        if authenticator.policy is not policy:
            authenticator.use_policy(policy)
            # A reload may bring new JWKS URIs: start fetching them now.
            with contextlib.suppress(RuntimeError):
                self.runtime.sync(policy)
        head = ctx.head
        if policy.output_headers:
            self._drop_output_headers(ctx, policy)
        single = policy.single_header
        if single is not None and (not head.query or not policy.param_locations):
            fast = self._single_header(ctx, policy, single)
            if fast is not _GENERAL:
                return fast
        found = find_tokens(policy, head)
        if not found:
            self.stats.missing += 1
            return None
        accepted: list[tuple[FoundToken, VerifiedToken, JwtRule]] = []
        for index, item in enumerate(found):
            try:
                verified, rule = authenticator.verify(item)
            except NeedsKeys as need:
                return self._after_refetch(ctx, found[index:], accepted, need)
            except TokenRejected as exc:
                self._reject(ctx, exc)
            accepted.append((item, verified, rule))
        self._accept(ctx, accepted)
        return None

    def _single_header(
        self, ctx: RequestContext, policy: SecurityPolicy, loc: TokenLocation
    ) -> Any:
        """The hot path: one header holds the token (``Authorization: Bearer``).

        One scan of the header list, no token-list objects; a cached token then costs
        a dict lookup. Anything unusual (the header repeated, a rule that writes
        headers or forwards the token, a refetch) takes the general path."""
        name = loc.name
        headers = ctx.head.headers
        index = -1
        for i, item in enumerate(headers):
            if item[0] == name:
                if index != -1:
                    return _GENERAL  # repeated: the general path strips every copy
                index = i
        if index == -1:
            self.stats.missing += 1
            return None
        value = headers[index][1]
        prefix = loc.prefix
        if prefix:
            if not value.startswith(prefix) and value[: len(prefix)].lower() != prefix.lower():
                self.stats.missing += 1
                return None
            value = value[len(prefix) :]
        token = value.strip()
        if not token:
            self.stats.missing += 1
            return None
        try:
            verified, rule = self.authenticator.verify_at(loc, token)
        except NeedsKeys:
            return _GENERAL
        except TokenRejected as exc:
            self._reject(ctx, exc)
        if rule.forward_original_token or rule.output_payload_to_header or rule.claim_to_headers:
            return _GENERAL  # verified and cached: the general path finds it at once
        del headers[index]
        ctx.head.invalidate()
        ctx.auth = verified
        self.stats.accepted += 1
        return None

    async def _after_refetch(
        self,
        ctx: RequestContext,
        rest: list[FoundToken],
        accepted: list[tuple[FoundToken, VerifiedToken, JwtRule]],
        need: NeedsKeys,
    ) -> None:
        """The slow path: an unknown kid; wait for the one refetch, then retry once."""
        try:
            async with asyncio.timeout(self.runtime.settings.jwks.startup_wait_s):
                # Shielded: the fetch is shared; one request giving up must not
                # cancel it for the others.
                await asyncio.shield(need.wait)
        except TimeoutError:
            self._reject(ctx, need.rejected)
        for item in rest:
            try:
                verified, rule = self.authenticator.verify(item, allow_refetch=False)
            except TokenRejected as exc:
                self._reject(ctx, exc)
            accepted.append((item, verified, rule))
        self._accept(ctx, accepted)

    def _reject(self, ctx: RequestContext, exc: TokenRejected) -> None:
        self.stats.jwt_result("rejected", exc.reason)
        raise Unauthenticated(exc.reason, realm=_realm(ctx)) from exc

    def _drop_output_headers(self, ctx: RequestContext, policy: SecurityPolicy) -> None:
        head = ctx.head
        names = policy.output_headers
        if any(name in names for name, _ in head.headers):
            head.headers = [(n, v) for n, v in head.headers if n not in names]
            head.invalidate()

    def _accept(
        self, ctx: RequestContext, accepted: list[tuple[FoundToken, VerifiedToken, JwtRule]]
    ) -> None:
        self.stats.accepted += 1
        ctx.auth = accepted[0][1]
        head = ctx.head
        strip_headers: set[str] = set()
        strip_params: set[str] = set()
        add: list[tuple[str, str]] = []
        for item, verified, rule in accepted:
            loc = item.location
            if not rule.forward_original_token:
                if loc.source == "header":
                    strip_headers.add(loc.name)
                elif loc.source == "param":
                    strip_params.add(loc.name)
            if rule.output_payload_to_header:
                add.append((rule.output_payload_to_header, verified.raw_payload))
            for header, claim in rule.claim_to_headers:
                text = _claim_text(verified.claims, claim)
                if text is not None:
                    add.append((header, text))
        if strip_headers or add:
            headers = [(n, v) for n, v in head.headers if n not in strip_headers]
            headers.extend(add)
            head.headers = headers
            head.invalidate()
        if strip_params and head.query:
            head.query = "&".join(
                part for part in head.query.split("&") if part.partition("=")[0] not in strip_params
            )


class AuthzStage:
    """AuthorizationPolicy: Istio's CUSTOM -> DENY -> ALLOW, decided before routing.

    The path is normalised as Istio's default (BASE) does before matching
    (``authz.normalize_path``), and the normalised path is what goes upstream, so a
    rule on ``/admin`` cannot be walked around with ``/public/../admin`` or
    ``/%61dmin``. A peer's mTLS identity, when a MUTUAL TLS server verified one, is
    the source principal and namespace."""

    is_async = True

    def __init__(self, runtime: SecurityRuntime) -> None:
        self.runtime = runtime
        self.stats = runtime.stats

    def on_request(self, ctx: RequestContext) -> Coroutine[Any, Any, LocalReply | None] | None:
        snapshot = ctx.snapshot
        policy: SecurityPolicy | None = snapshot.security if snapshot is not None else None
        if policy is None:
            return None
        policies = policy.authz
        if policies is None:
            return None
        head = ctx.head
        method = head.method
        if not method.isupper():
            # Istio's normalisation: "If the verb in the HTTP request is not in upper
            # case, Istio will reject the request with HTTP code 400" -- "delete"
            # must not slip past a rule on DELETE. (HTTP/1.1 refuses it earlier.)
            raise BadRequest(f"method {method[:32]!r} is not upper case")
        try:
            path = normalize_path(head.path)
        except PathRejected as exc:
            raise BadRequest(str(exc)) from exc
        if path != head.path:
            head.path = path
        identity = head.peer_identity
        principal = namespace = ""
        if identity is not None:
            principal, namespace = peer_source(identity.uris)
        request = AuthzRequest(
            method=head.method,
            path=path,
            host=head.authority.lower(),
            port=head.port,
            # With no trusted proxies (Istio's default numTrustedProxies: 0) the
            # remote address is the peer's, as Envoy computes it.
            source_ip=head.peer,
            remote_ip=head.peer,
            header=head.header,
            auth=ctx.auth,
            sni=getattr(head, "sni", "") or "",
            source_principal=principal,
            source_namespace=namespace,
            peer_certified=identity is not None,
        )
        decision = policies.evaluate(request)
        for name in decision.audited:
            self.stats.authz_decision("audit", "AUDIT", name)
        if decision.custom:
            return self._custom(ctx, decision)
        self._finish(ctx, decision)
        return None

    def _finish(self, ctx: RequestContext, decision: AuthzDecision) -> None:
        if decision.allowed:
            self.stats.authz_decision("allow", "ALLOW", decision.policy or "-")
            ctx.authz = f"allow:{decision.policy}" if decision.policy else "allow"
            return
        action = "DENY" if decision.policy else "ALLOW"
        self.stats.authz_decision("deny", action, decision.policy or "-")
        ctx.authz = f"deny:{decision.policy}" if decision.policy else "deny:no-allow-match"
        raise AccessDenied(ctx.authz)

    async def _custom(self, ctx: RequestContext, decision: AuthzDecision) -> LocalReply | None:
        settings = self.runtime.settings
        head = ctx.head
        for provider, policy_name in decision.custom:
            url = settings.authz_providers.get(provider)
            if url is None:
                # A CUSTOM policy naming a provider meshgate was not given: fail closed.
                self.stats.authz_decision("deny", "CUSTOM", policy_name)
                ctx.authz = f"deny:{policy_name}"
                ctx.add_flag("UAEX")
                raise AccessDenied(f"no URL for provider {provider!r}")
            verdict = await check_external(
                self.runtime.http_client(),
                url,
                method=head.method,
                path=head.path,
                query=head.query,
                headers=head.headers,
                authority=head.authority,
                timeout_s=settings.ext_authz_timeout_s,
            )
            if not verdict.allowed:
                self.stats.authz_decision("deny", "CUSTOM", policy_name)
                ctx.authz = f"deny:{policy_name}"
                ctx.add_flag("UAEX")
                if not verdict.body and not verdict.headers:
                    raise AccessDenied(verdict.reason)
                headers = [h for h in verdict.headers if h[0] != "content-length"]
                headers.append(("content-length", str(len(verdict.body))))
                return LocalReply(verdict.status, headers, verdict.body)
            self.stats.authz_decision("allow", "CUSTOM", policy_name)
        self._finish(ctx, decision)
        return None
