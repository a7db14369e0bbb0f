"""The Redis backend against a real redis-server: exact counts, batching, NOSCRIPT,
expiry, failures and recovery."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from redis_server import RedisServer

from ratelimit.local import Outcome
from ratelimit.policy import Rate
from ratelimit.redis_backend import (
    RedisBackend,
    RedisURLError,
    parse_redis_url,
    redis_key,
)

UNITS = ["second", "minute", "hour", "day"]
# Where the timeout is not what a test is about, a generous one: the default 0.1 s is
# a production bound, and a loaded test machine can exceed it on a first connect.
PATIENT_S = 5.0


async def _take_all(backend: RedisBackend, bucket: str, rate: Rate, n: int) -> list[Outcome | None]:
    results = [backend.take(bucket, rate.interval_us, rate.burst) for _ in range(n)]
    return [await r if isinstance(r, asyncio.Future) else r for r in results]


@pytest.mark.parametrize("per", UNITS)
def test_exactly_the_burst_passes_per_unit_and_the_next_is_refused(
    redis_server: RedisServer, per: str
) -> None:
    rate = Rate.of(5, per)

    async def main() -> list[Outcome | None]:
        backend = RedisBackend(redis_server.url, timeout_s=PATIENT_S)
        try:
            return await _take_all(backend, f"unit-{per}", rate, 6)
        finally:
            await backend.close()

    results = asyncio.run(main())
    assert all(r is not None for r in results)
    assert [r.allowed for r in results if r] == [True] * 5 + [False]
    assert [r.remaining for r in results[:5] if r] == [4, 3, 2, 1, 0]
    refused = results[5]
    assert refused is not None
    # Microseconds pass between the calls (Redis' clock), so allow that much slack.
    assert rate.interval_us - 1_000_000 < refused.retry_after_us <= rate.interval_us


def test_decisions_of_one_tick_share_one_round_trip_and_stay_exact(
    redis_server: RedisServer,
) -> None:
    rate = Rate.of(10, "minute")

    async def main() -> tuple[list[Outcome | None], int]:
        backend = RedisBackend(redis_server.url, timeout_s=PATIENT_S)
        await backend.start()  # connected, script loaded: the batch is the only trip
        try:
            results = await _take_all(backend, "batched", rate, 40)
            return results, backend.round_trips
        finally:
            await backend.close()

    results, trips = asyncio.run(main())
    assert sum(1 for r in results if r and r.allowed) == 10
    assert sum(1 for r in results if r and not r.allowed) == 30
    assert trips == 1


def test_a_flushed_script_is_loaded_again_on_noscript(redis_server: RedisServer) -> None:
    rate = Rate.of(2, "minute")

    async def main() -> tuple[list[Outcome | None], int]:
        backend = RedisBackend(redis_server.url, timeout_s=PATIENT_S)
        try:
            first = await _take_all(backend, "noscript", rate, 1)
            redis_server.command("SCRIPT", "FLUSH")
            second = await _take_all(backend, "noscript", rate, 2)
            return first + second, backend.script_loads
        finally:
            await backend.close()

    results, loads = asyncio.run(main())
    assert [r.allowed for r in results if r] == [True, True, False]
    assert loads == 2  # once at first use, once after the flush


def test_keys_are_namespaced_hash_tagged_and_expire_when_the_bucket_is_full(
    redis_server: RedisServer,
) -> None:
    rate = Rate.of(60, "minute")  # 1 s per request

    async def main() -> None:
        backend = RedisBackend(redis_server.url, timeout_s=PATIENT_S)
        try:
            await _take_all(backend, "ns/p/l\x1fclient", rate, 3)
        finally:
            await backend.close()

    asyncio.run(main())
    key = redis_key("ns/p/l\x1fclient")
    assert key == "meshgate:rl:{ns/p/l\x1fclient}"
    pttl = int(redis_server.command("PTTL", key)[1:].split(b"\r\n")[0])
    assert 2000 < pttl <= 3000  # three seconds of tokens spent


def test_long_or_brace_keys_are_digested_but_keep_one_hash_tag() -> None:
    key = redis_key("ns/p/l\x1f" + "x" * 500)
    assert key.startswith("meshgate:rl:{ns/p/l#") and key.endswith("}")
    assert len(key) < 100
    braces = redis_key("ns/p/l\x1f}{evil")
    assert braces.count("{") == 1 and braces.count("}") == 1
    assert redis_key("ns/p/l\x1fa}") != redis_key("ns/p/l\x1fb}")


def test_refilling_the_bucket_by_editing_its_state_lets_exactly_one_more_through(
    redis_server: RedisServer,
) -> None:
    rate = Rate.of(3, "hour")

    async def main() -> list[bool]:
        backend = RedisBackend(redis_server.url, timeout_s=PATIENT_S, precheck_max_keys=0)
        try:
            seen = [r.allowed for r in await _take_all(backend, "refill", rate, 4) if r]
            # Move the stored TAT one interval back: one token's worth of time passed.
            key = redis_key("refill")
            tat = int(redis_server.command("GET", key).split(b"\r\n")[1])
            redis_server.command("SET", key, str(tat - rate.interval_us), "KEEPTTL")
            seen += [r.allowed for r in await _take_all(backend, "refill", rate, 2) if r]
            return seen
        finally:
            await backend.close()

    assert asyncio.run(main()) == [True, True, True, False, True, False]


def test_the_precheck_refuses_a_key_over_its_limit_without_a_round_trip(
    redis_server: RedisServer,
) -> None:
    rate = Rate.of(1, "hour")

    async def main() -> tuple[list[bool], int, int]:
        backend = RedisBackend(redis_server.url, timeout_s=PATIENT_S)
        await backend.start()
        try:
            first = await _take_all(backend, "pre", rate, 2)
            trips = backend.round_trips
            more = await _take_all(backend, "pre", rate, 5)
            return [r.allowed for r in first + more if r], trips, backend.round_trips
        finally:
            await backend.close()

    allowed, before, after = asyncio.run(main())
    assert allowed == [True] + [False] * 6
    assert before == after == 1


def test_a_dead_redis_answers_none_fast_and_limits_resume_after_restart(
    redis_server: RedisServer,
) -> None:
    rate = Rate.of(2, "minute")
    clock = [100.0]

    async def main() -> None:
        backend = RedisBackend(
            redis_server.url, timeout_s=0.2, retry_after_s=1.0, clock=lambda: clock[0]
        )
        try:
            assert [r.allowed for r in await _take_all(backend, "k", rate, 1) if r] == [True]
            redis_server.kill()
            started = time.monotonic()
            assert await _take_all(backend, "k", rate, 3) == [None, None, None]
            assert time.monotonic() - started < 0.5
            # The circuit is open: no network at all until retry_after_s has passed.
            trips = backend.round_trips
            assert backend.take("k", rate.interval_us, rate.burst) is None
            assert backend.round_trips == trips
            redis_server.start()
            clock[0] += 1.0
            # A restarted Redis is empty (no persistence): the bucket starts full.
            results = await _take_all(backend, "k", rate, 3)
            assert [r.allowed for r in results if r] == [True, True, False]
        finally:
            await backend.close()

    asyncio.run(main())


def test_a_hung_redis_is_bounded_by_the_timeout(redis_server: RedisServer) -> None:
    rate = Rate.of(2, "minute")

    async def main() -> float:
        backend = RedisBackend(redis_server.url, timeout_s=0.15)
        try:
            await _take_all(backend, "warm", rate, 1)  # a pooled connection exists
            assert redis_server.proc is not None
            redis_server.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                assert await _take_all(backend, "k", rate, 5) == [None] * 5
                return time.monotonic() - started
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
        finally:
            await backend.close()

    elapsed = asyncio.run(main())
    assert 0.1 < elapsed < 0.6


def test_redis_urls_of_each_deployment_are_understood() -> None:
    assert parse_redis_url("redis://127.0.0.1:6379/0") == (
        "single",
        {"url": "redis://127.0.0.1:6379/0"},
    )
    mode, details = parse_redis_url("redis+cluster://10.0.0.1:7000")
    assert (mode, details["url"]) == ("cluster", "redis://10.0.0.1:7000")
    mode, details = parse_redis_url("redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26379/main/2")
    assert mode == "sentinel"
    assert details["sentinels"] == [("10.0.0.1", 26379), ("10.0.0.2", 26379)]
    assert (details["service"], details["db"], details["password"]) == ("main", 2, "s3cret")
    for bad in (
        "127.0.0.1:6379",
        "http://x",
        "redis+sentinel://10.0.0.1:26379",
        "redis+sentinel://h/x/y",
    ):
        with pytest.raises(RedisURLError):
            parse_redis_url(bad)


_SKEWED_WORKER = """
import asyncio, json, sys, time
skew = float(sys.argv[2])
# This process's clocks run {skew} seconds off: every local clock the limiter could read.
real_time, real_mono = time.time, time.monotonic
time.time = lambda: real_time() + skew
time.monotonic = lambda: real_mono() + skew
from ratelimit.redis_backend import RedisBackend

async def main():
    backend = RedisBackend(sys.argv[1], clock=time.monotonic, precheck_max_keys=0, timeout_s=5.0)
    out = []
    for _ in range(int(sys.argv[3])):
        result = backend.take("skew", 60_000_000, 6)  # 1 per minute, burst 6
        outcome = await result if isinstance(result, asyncio.Future) else result
        out.append([outcome.allowed, outcome.reset_us])
    await backend.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_processes_with_skewed_clocks_agree_because_redis_keeps_time(
    redis_server: RedisServer,
) -> None:
    import json
    import subprocess
    import sys

    def run(skew_s: float, count: int) -> list[list[int]]:
        done = subprocess.run(
            [sys.executable, "-c", _SKEWED_WORKER, redis_server.url, str(skew_s), str(count)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return json.loads(done.stdout)

    ahead = run(+3600.0, 4)  # an hour fast
    behind = run(-3600.0, 4)  # an hour slow
    allowed = [a for a, _ in ahead + behind]
    assert allowed == [True] * 6 + [False] * 2
    # Both see the same bucket: after 4 + 2 spent, the reset is ~6 minutes for both.
    resets = [r for a, r in ahead + behind if not a]
    assert all(359_000_000 < r <= 360_000_000 for r in resets)
