"""The JWKS registry against a real JWKS server on 127.0.0.1 (HTTP, and HTTPS with a
CA minted for the test): first fetch, rotation, outages, and the unknown-kid storm."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from jwt_fixtures import JwksServer, claims, jwks_json, jwks_server, make_tls, mint, rsa_key

from authn.jwks import JwksRegistry, JwksSettings, jwks_uri_problem
from authn.jwt import TokenRejected
from authn.policy import JwtRule, SecurityPolicy, TokenLocation
from authn.runtime import Authenticator, AuthnSettings, FoundToken, NeedsKeys

__all__ = ["jwks_server"]  # the fixture, re-exported for pytest

FAST = JwksSettings(retry_initial_s=0.02, retry_max_s=0.1, kid_cooldown_s=60.0, startup_wait_s=3)
BEARER = TokenLocation("header", "authorization", "Bearer ")


async def wait_attempts(registry: JwksRegistry, uri: str, count: int = 1) -> None:
    """Wait (bounded) until ``count`` more fetch attempts have finished."""
    entry = registry.entries[uri]
    async with asyncio.timeout(5):
        for _ in range(count):
            entry.attempted.clear()
            await entry.attempted.wait()


def rule_for(uri: str) -> JwtRule:
    return JwtRule(
        origin="RequestAuthentication test/jwt jwtRules[0]",
        issuers=frozenset({"https://issuer.example.com"}),
        audiences=(),
        locations=(BEARER,),
        jwks_uri=uri,
    )


def test_keys_are_fetched_once_and_shared_by_uri(jwks_server: JwksServer) -> None:
    key = rsa_key("k1")
    jwks_server.set(jwks_json(key))

    async def scenario() -> None:
        registry = JwksRegistry(FAST)
        await registry.prepare([(jwks_server.url, 2.0), (jwks_server.url, 2.0)])
        keys = registry.keys(jwks_server.url)
        assert keys is not None and [k.kid for k in keys.keys] == ["k1"]
        health = registry.health()
        assert len(health) == 1 and health[0]["keys"] == 1 and health[0]["lastSuccess"]
        await registry.close()

    asyncio.run(scenario())
    assert jwks_server.count() == 1


def test_rotation_new_key_appears_and_old_key_is_removed(jwks_server: JwksServer) -> None:
    old, new = rsa_key("old"), rsa_key("new")
    jwks_server.set(jwks_json(old))

    async def scenario() -> None:
        registry = JwksRegistry(FAST)
        settings = AuthnSettings(jwks=FAST)
        auth = Authenticator(settings, registry)
        rule = rule_for(jwks_server.url)
        auth.use_policy(SecurityPolicy((rule,), (BEARER,)))
        await registry.prepare([(jwks_server.url, 2.0)])
        old_token = mint(old, claims())
        assert auth.verify(FoundToken(BEARER, old_token))[0].subject == "alice"

        jwks_server.set(jwks_json(new))  # the provider rotates: new in, old out
        new_token = mint(new, claims())
        with pytest.raises(NeedsKeys) as need:
            auth.verify(FoundToken(BEARER, new_token))
        assert await need.value.wait
        assert auth.verify(FoundToken(BEARER, new_token))[0].subject == "alice"
        # The cached old token was checked with the previous key set: re-verified, refused.
        with pytest.raises(TokenRejected):
            auth.verify(FoundToken(BEARER, old_token), allow_refetch=False)
        await registry.close()

    asyncio.run(scenario())


def test_endpoint_down_at_start_retries_with_backoff_then_serves(
    jwks_server: JwksServer,
) -> None:
    key = rsa_key("k1")
    jwks_server.set(jwks_json(key), down=True)

    async def scenario() -> None:
        registry = JwksRegistry(FAST)
        await registry.prepare([(jwks_server.url, 2.0)])
        assert registry.keys(jwks_server.url) is None  # never an empty set cached
        auth = Authenticator(AuthnSettings(jwks=FAST), registry)
        auth.use_policy(SecurityPolicy((rule_for(jwks_server.url),), (BEARER,)))
        with pytest.raises(TokenRejected) as info:
            auth.verify(FoundToken(BEARER, mint(key, claims())))
        assert info.value.reason == "signing keys are not available"
        await wait_attempts(registry, jwks_server.url, 2)  # still retrying
        assert registry.entries[jwks_server.url].failures >= 3
        jwks_server.set(down=False)
        await wait_attempts(registry, jwks_server.url)
        assert registry.keys(jwks_server.url) is not None
        assert auth.verify(FoundToken(BEARER, mint(key, claims())))[0].subject == "alice"
        await registry.close()

    asyncio.run(scenario())


def test_endpoint_down_later_keeps_serving_the_last_good_keys(jwks_server: JwksServer) -> None:
    key = rsa_key("k1")
    jwks_server.set(jwks_json(key))
    settings = JwksSettings(refresh_s=0.05, retry_initial_s=0.02, retry_max_s=0.05)

    async def scenario() -> None:
        registry = JwksRegistry(settings)
        await registry.prepare([(jwks_server.url, 2.0)])
        jwks_server.set(down=True)
        await wait_attempts(registry, jwks_server.url, 2)
        entry = registry.entries[jwks_server.url]
        assert entry.failures >= 1 and "503" in entry.last_error
        assert registry.keys(jwks_server.url) is not None  # last good set still served
        assert registry.health()[0]["keys"] == 1
        await registry.close()

    asyncio.run(scenario())


def test_storm_of_unknown_kids_causes_at_most_one_refetch_per_cooldown(
    jwks_server: JwksServer,
) -> None:
    key = rsa_key("k1")
    jwks_server.set(jwks_json(key))

    async def scenario() -> None:
        registry = JwksRegistry(FAST)
        auth = Authenticator(AuthnSettings(jwks=FAST), registry)
        auth.use_policy(SecurityPolicy((rule_for(jwks_server.url),), (BEARER,)))
        await registry.prepare([(jwks_server.url, 2.0)])
        refetches = 0
        stranger = rsa_key("stranger")
        for i in range(300):
            garbage = mint(stranger, claims(), kid=f"garbage-{i}")
            try:
                auth.verify(FoundToken(BEARER, garbage))
            except NeedsKeys as need:
                refetches += 1
                await need.wait
            except TokenRejected:
                pass
        assert refetches == 1
        await registry.close()

    asyncio.run(scenario())
    assert jwks_server.count() == 2  # the first fetch and one refetch for 300 garbage kids


def test_request_during_the_first_fetch_waits_for_it_instead_of_failing(
    jwks_server: JwksServer,
) -> None:
    key = rsa_key("k1")
    jwks_server.set(jwks_json(key))

    async def scenario() -> None:
        registry = JwksRegistry(FAST)
        auth = Authenticator(AuthnSettings(jwks=FAST), registry)
        auth.use_policy(SecurityPolicy((rule_for(jwks_server.url),), (BEARER,)))
        registry.sync([(jwks_server.url, 2.0)])  # as a reload does: fetch just started
        tok = mint(key, claims())
        with pytest.raises(NeedsKeys) as need:
            auth.verify(FoundToken(BEARER, tok))
        await need.value.wait
        assert auth.verify(FoundToken(BEARER, tok), allow_refetch=False)[0].subject == "alice"
        await registry.close()

    asyncio.run(scenario())


def test_https_endpoint_with_a_private_ca(tmp_path: Path) -> None:
    context, ca_file = make_tls(tmp_path)
    server = JwksServer(document=jwks_json(rsa_key("tls")))
    server.start(tls=context)
    try:

        async def scenario() -> None:
            trusted = JwksRegistry(JwksSettings(ca_file=ca_file, startup_wait_s=3))
            await trusted.prepare([(server.url, 2.0)])
            assert trusted.keys(server.url) is not None
            await trusted.close()
            untrusted = JwksRegistry(JwksSettings(retry_initial_s=5, startup_wait_s=3))
            await untrusted.prepare([(server.url, 2.0)])
            assert untrusted.keys(server.url) is None
            assert "SSL" in untrusted.entries[server.url].last_error.upper()
            await untrusted.close()

        asyncio.run(scenario())
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("uri", "allow_http", "ok"),
    [
        ("https://idp.example.com/jwks", False, True),
        ("http://127.0.0.1:8080/jwks", False, True),
        ("http://[::1]:8080/jwks", False, True),
        ("http://idp.example.com/jwks", False, False),
        ("http://idp.example.com/jwks", True, True),
        ("file:///etc/passwd", True, False),
    ],
)
def test_plain_http_only_to_loopback_unless_allowed(uri: str, allow_http: bool, ok: bool) -> None:
    assert (jwks_uri_problem(uri, allow_http) is None) is ok


def test_refused_uri_is_never_fetched_and_reports_why() -> None:
    async def scenario() -> None:
        registry = JwksRegistry(JwksSettings(startup_wait_s=1))
        await registry.prepare([("http://idp.example.com/jwks", 1.0)])
        entry = registry.entries["http://idp.example.com/jwks"]
        assert entry.fetches == 0 and "plain HTTP" in entry.last_error
        await registry.close()

    asyncio.run(scenario())
