"""The limiter's shortest path (one plain local limit, bucket known by a memoised
hash) decides exactly as the general path that builds and hashes the key string."""

from __future__ import annotations

from typing import Any

import pytest

from ratelimit import policy
from ratelimit.limiter import Limiter, Verdict
from ratelimit.local import LocalBuckets
from ratelimit.policy import MISSING, Limit, Override, Rate, RouteRateLimit, compile_key_part


class _Head:
    def __init__(self, peer: str, headers: dict[str, str] | None = None) -> None:
        self.peer = peer
        self.path = "/"
        self.method = "GET"
        self.authority = "api.example.com"
        self._headers = headers or {}

    def header(self, name: str) -> str | None:
        return self._headers.get(name)


class _Ctx:
    def __init__(self, peer: str, xff: str = "", headers: dict[str, str] | None = None) -> None:
        self.head = _Head(peer, headers)
        self.xff = xff or peer
        self.route = None
        self.auth = None


def _route(key: str, rate: Rate, trusted: int = 0, **extra: Any) -> RouteRateLimit:
    limit = Limit(
        id="ns/p/l",
        key=(compile_key_part(key, trusted),),
        rate=rate,
        backend="local",
        fail_open=True,
        **extra,
    )
    return RouteRateLimit((limit,))


def _fixed_clock() -> int:
    return 5_000_000


@pytest.mark.parametrize(
    ("key", "trusted", "by_peer"),
    [
        ("remote.ip", 0, True),
        ("source.ip", 0, True),
        ("remote.ip", 1, False),
        ("request.headers[x-user]", 0, False),
    ],
)
def test_plain_limit_takes_the_short_path_with_the_same_decisions_as_the_key_string(
    key: str, trusted: int, by_peer: bool
) -> None:
    rate = Rate.of(3, "minute")
    route = _route(key, rate, trusted)
    limit = route.limits[0]
    assert route.single is limit and limit.by_peer is by_peer
    fast = Limiter(LocalBuckets(1024, clock=_fixed_clock))
    slow = LocalBuckets(1024, clock=_fixed_clock)
    ctx = _Ctx("10.0.0.9", xff="203.0.113.7, 10.0.0.9", headers={"x-user": "ann"})
    for _ in range(5):
        verdict = fast.check(route, ctx)
        bucket, _rate = limit.bucket(ctx)  # type: ignore[misc]
        expected = slow.take(bucket, rate.interval_us, rate.burst)
        assert isinstance(verdict, Verdict)
        assert (verdict.allowed, verdict.remaining) == (expected.allowed, expected.remaining)
    assert [fast.check(route, ctx).allowed for _ in range(2)] == [False, False]  # type: ignore[union-attr]


def test_short_path_uses_the_slot_the_key_string_hashes_to() -> None:
    # A bucket filled through check() is the one take(bucket string) sees, so both
    # kinds of caller (and every worker, which shares the hash seed) agree.
    rate = Rate.of(2, "minute")
    route = _route("remote.ip", rate)
    buckets = LocalBuckets(1024, clock=_fixed_clock)
    limiter = Limiter(buckets)
    ctx = _Ctx("192.0.2.1")
    assert limiter.check(route, ctx).allowed  # type: ignore[union-attr]
    assert buckets.take("ns/p/l\x1f192.0.2.1", rate.interval_us, rate.burst).allowed
    assert not limiter.check(route, ctx).allowed  # type: ignore[union-attr]


def test_requests_without_the_key_share_the_missing_bucket_on_the_short_path() -> None:
    rate = Rate.of(1, "minute")
    route = _route("request.headers[x-user]", rate)
    buckets = LocalBuckets(1024, clock=_fixed_clock)
    limiter = Limiter(buckets)
    assert limiter.check(route, _Ctx("10.0.0.1")).allowed  # type: ignore[union-attr]
    assert not limiter.check(route, _Ctx("10.0.0.2")).allowed  # type: ignore[union-attr]
    assert not buckets.take("ns/p/l" + MISSING, rate.interval_us, rate.burst).allowed


def test_limits_with_overrides_or_hosts_keep_the_general_path() -> None:
    rate = Rate.of(5, "second")
    override = Override(((compile_key_part("request.method"), "POST"),), Rate.of(1, "second"), "#0")
    with_override = _route("remote.ip", rate, overrides=(override,))
    with_hosts = _route("remote.ip", rate, hosts=("api.example.com",))
    assert with_override.single is None and with_hosts.single is None
    limiter = Limiter(LocalBuckets(1024, clock=_fixed_clock))
    ctx = _Ctx("10.0.0.3")
    ctx.head.method = "POST"
    assert limiter.check(with_override, ctx).allowed  # type: ignore[union-attr]
    assert not limiter.check(with_override, ctx).allowed  # type: ignore[union-attr]


def test_hash_memo_stays_bounded_under_a_flood_of_distinct_keys() -> None:
    route = _route("remote.ip", Rate.of(1000, "second"))
    limit = route.limits[0]
    limiter = Limiter(LocalBuckets(1024, clock=_fixed_clock))
    for i in range(policy.HASH_MEMO_SIZE * 2 + 10):
        limiter.check(route, _Ctx(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"))
    assert 0 < len(limit.hashes) <= policy.HASH_MEMO_SIZE
    # Entries are exactly what the key string hashes to.
    for value, h in list(limit.hashes.items())[:50]:
        assert h == (hash(f"ns/p/l\x1f{value}") or 1)


def test_take_hash_and_take_share_one_bucket_in_a_shared_table() -> None:
    buckets = LocalBuckets(1024, shared=True, clock=_fixed_clock)
    h = hash("k") or 1
    assert buckets.take_hash(h, 1_000_000, 2).allowed
    assert buckets.take("k", 1_000_000, 2).allowed
    assert not buckets.take_hash(h, 1_000_000, 2).allowed
    assert buckets.decisions == 3
