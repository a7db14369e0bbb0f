"""Micro-benchmarks of three per-request pieces, so a regression shows as a number:
the router (host index + first matching route, 10 and 10 000 VirtualServices), the
JWT stage with a token already in the verified-token cache, and the local limiter.

``make microbench`` times them with pytest-benchmark. Under ``make test`` they run
with timing disabled (tests/conftest.py disables pytest-benchmark unless
``--benchmark-enable`` is given), so each body runs once as an ordinary test: the
assertions check that what is timed is the intended path (the right route, a
principal set from the cache, an allowed verdict), and nothing asserts a duration.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

# A virtualenv made before pytest-benchmark joined the test extras lacks it; say so
# rather than fail on a missing ``benchmark`` fixture.
pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed: make setup")

from jwt_fixtures import jwks_json, mint, rsa_key

# The VirtualService model lives beside the benchmark scripts, which use it too.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))
from routing_model import LABELS, PORT, build_model, make_requests

from gateway.config import load_config
from gateway.routing import compile_snapshot, find_virtual_host, match_route
from gateway.server.events import RequestHead
from gateway.stages import RequestContext
from ratelimit.limiter import Limiter, Verdict
from ratelimit.local import LocalBuckets
from ratelimit.policy import Limit, Rate, RouteRateLimit, compile_key_part

LOOKUPS = 1000


class _Stream:
    """The one attribute of a downstream stream that RequestContext reads."""

    def __init__(self, head: RequestHead) -> None:
        self.head = head


class _Snapshot:
    def __init__(self, security: Any) -> None:
        self.security = security


# --------------------------------------------------------------------------- router


@pytest.fixture(scope="module", params=[10, 10_000], ids=lambda n: f"{n}-virtualservices")
def routing_case(request: pytest.FixtureRequest) -> tuple[Any, list[tuple[RequestHead, str]]]:
    count = request.param
    snapshot = compile_snapshot(build_model(count), LABELS)
    return snapshot.listeners[PORT], make_requests(count, LOOKUPS)


def test_router_lookup_finds_the_expected_route(benchmark: Any, routing_case: Any) -> None:
    """One call times LOOKUPS lookups over random hosts and rules (divide by 1000
    for the cost of one lookup: the mean in ms reads as µs per lookup)."""
    listener, requests = routing_case

    def lookups() -> list[str | None]:
        names = []
        for head, _expected in requests:
            vhost = find_virtual_host(listener, head.authority)
            route = match_route(vhost, head) if vhost is not None else None
            names.append(route.name if route is not None else None)
        return names

    names = benchmark(lookups)
    assert names == [expected for _head, expected in requests]


# --------------------------------------------------------------------------- JWT


JWT_KEY = rsa_key("bench")


@pytest.fixture(scope="module")
def jwt_stage(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, _Snapshot]:
    # Imported here, not at the top: a test module importing ``authn`` while pytest
    # collects would shadow the tests/unit/authn package collected after it.
    from authn.policy import compile_security
    from authn.runtime import SecurityRuntime
    from authn.stages import JwtAuthnStage

    directory = tmp_path_factory.mktemp("jwt")
    jwks = jwks_json(JWT_KEY).replace("'", "''")
    (directory / "ra.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {name: ra, namespace: istio-system}\nspec:\n  jwtRules:\n"
        f"  - issuer: https://issuer.bench\n    audiences: [bench]\n    jwks: '{jwks}'\n"
    )
    policy = compile_security(load_config([str(Path(directory))]), {})
    return JwtAuthnStage(SecurityRuntime()), _Snapshot(policy)


def test_jwt_stage_with_a_cached_token_sets_the_principal(
    benchmark: Any, jwt_stage: tuple[Any, _Snapshot]
) -> None:
    """The stage as the pipeline calls it, on a fresh request head each time (the
    stage strips the token from the head); building the head and context is part
    of what is timed, as it is part of every request."""
    stage, snapshot = jwt_stage
    now = int(time.time())
    token = mint(
        JWT_KEY,
        {"iss": "https://issuer.bench", "sub": "u1", "aud": "bench", "iat": now, "exp": now + 3600},
    )
    authorization = f"Bearer {token}"

    def one_request() -> RequestContext:
        head = RequestHead(
            "GET",
            "/api/items",
            "",
            "api",
            "http",
            [("user-agent", "bench"), ("authorization", authorization)],
            port=PORT,
        )
        ctx = RequestContext(_Stream(head), snapshot, 0.0, 0.0)  # type: ignore[arg-type]
        if stage.on_request(ctx) is not None:
            raise AssertionError("a cached token must not need a coroutine")
        return ctx

    one_request()  # the first sight of the token verifies it and fills the cache
    assert list(stage.authenticator.cache) == [token]
    ctx = benchmark(one_request)
    assert ctx.auth is not None and ctx.auth.principal == "https://issuer.bench/u1"
    assert ctx.head.headers == [("user-agent", "bench")]  # the token was stripped
    assert list(stage.authenticator.cache) == [token]  # still one entry: every call hit it


# --------------------------------------------------------------------------- limiter


def test_local_limiter_allows_under_a_high_limit(benchmark: Any) -> None:
    """``Limiter.check`` for a route with one local limit keyed by client address,
    set high enough that every call is allowed (each pays for a whole decision)."""
    limit = Limit(
        id="bench/bench/per-client",
        key=(compile_key_part("remote.ip"),),
        rate=Rate.of(1_000_000_000, "second", 1_000_000_000),
        backend="local",
        fail_open=True,
    )
    route_limits = RouteRateLimit((limit,))
    limiter = Limiter(LocalBuckets())
    head = RequestHead("GET", "/", "", "api", "http", [], port=PORT, peer="10.1.2.3")
    ctx = RequestContext(_Stream(head), None, 0.0, 0.0)  # type: ignore[arg-type]
    ctx.xff = "10.1.2.3"

    verdict = benchmark(limiter.check, route_limits, ctx)
    assert isinstance(verdict, Verdict)
    assert verdict.allowed
    assert verdict.limit == 1_000_000_000
