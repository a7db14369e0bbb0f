"""The in-process GCRA buckets: exact boundaries, shared workers, bounded memory."""

from __future__ import annotations

import multiprocessing
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.local import PROBE, LocalBuckets, gcra
from ratelimit.policy import Rate

UNITS = ["second", "minute", "hour", "day"]


@pytest.mark.parametrize("per", UNITS)
def test_burst_passes_back_to_back_and_the_next_request_is_refused(per: str) -> None:
    rate = Rate.of(7, per)
    buckets = LocalBuckets(1024, clock=lambda: 1_000_000)
    results = [buckets.take("k", rate.interval_us, rate.burst) for _ in range(8)]
    assert [r.allowed for r in results] == [True] * 7 + [False]
    assert [r.remaining for r in results[:7]] == [6, 5, 4, 3, 2, 1, 0]
    assert results[7].retry_after_us == rate.interval_us


@pytest.mark.parametrize("per", UNITS)
def test_one_request_more_passes_exactly_one_interval_later(per: str) -> None:
    rate = Rate.of(3, per)
    now = [5_000_000]
    buckets = LocalBuckets(1024, clock=lambda: now[0])
    for _ in range(3):
        assert buckets.take("k", rate.interval_us, rate.burst).allowed
    now[0] += rate.interval_us - 1
    assert not buckets.take("k", rate.interval_us, rate.burst).allowed
    now[0] += 1
    assert buckets.take("k", rate.interval_us, rate.burst).allowed
    assert not buckets.take("k", rate.interval_us, rate.burst).allowed


def test_burst_smaller_than_requests_caps_the_back_to_back_run() -> None:
    rate = Rate.of(100, "minute", burst=20)
    assert rate.interval_us == 600_000
    buckets = LocalBuckets(1024, clock=lambda: 0)
    allowed = sum(buckets.take("k", rate.interval_us, rate.burst).allowed for _ in range(50))
    assert allowed == 20


def test_keys_have_separate_buckets() -> None:
    buckets = LocalBuckets(1024, clock=lambda: 10)
    assert buckets.take("a", 1000, 1).allowed
    assert not buckets.take("a", 1000, 1).allowed
    assert buckets.take("b", 1000, 1).allowed


def test_a_refused_request_spends_nothing() -> None:
    now = [0]
    buckets = LocalBuckets(1024, clock=lambda: now[0])
    assert buckets.take("k", 1000, 1).allowed
    for _ in range(10):
        assert not buckets.take("k", 1000, 1).allowed
    now[0] = 1000
    assert buckets.take("k", 1000, 1).allowed


def test_idle_keys_free_their_slot_once_their_bucket_is_full_again() -> None:
    now = [0]
    buckets = LocalBuckets(1024, clock=lambda: now[0])
    for i in range(100):
        buckets.take(f"client-{i}", 1000, 5)
    assert buckets.live_keys() == 100
    now[0] = 999
    assert buckets.live_keys() == 100
    now[0] = 1000  # one interval: every bucket (1 token spent) is full again
    assert buckets.live_keys() == 0


def test_a_flood_of_distinct_keys_keeps_memory_fixed_and_counts_evictions() -> None:
    buckets = LocalBuckets(1024, clock=lambda: 0)
    size = buckets.memory_bytes
    for i in range(20_000):
        buckets.take(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 1_000_000, 10)
    assert buckets.memory_bytes == size == 1024 * 16
    assert buckets.live_keys() <= 1024
    assert buckets.evictions >= 20_000 - 1024
    # The limiter still works for a key under attack-level churn.
    results = [buckets.take("victim", 1_000_000, 3).allowed for _ in range(4)]
    assert results == [True, True, True, False]


def test_table_size_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        LocalBuckets(1000)
    with pytest.raises(ValueError):
        LocalBuckets(PROBE // 2)


def _hammer(buckets: LocalBuckets, count: int, conn: multiprocessing.connection.Connection) -> None:
    allowed = sum(buckets.take("shared", 1_000_000, 50, now_us=0).allowed for _ in range(count))
    conn.send(allowed)
    conn.close()


def test_forked_workers_share_one_limit_not_one_each() -> None:
    buckets = LocalBuckets(1024, shared=True)
    ctx = multiprocessing.get_context("fork")
    pipes = []
    procs = []
    for _ in range(4):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_hammer, args=(buckets, 200, child))
        proc.start()
        procs.append(proc)
        pipes.append(parent)
    totals = [p.recv() for p in pipes]
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0
    assert sum(totals) == 50  # 4 workers x 200 attempts, one bucket of 50


# --------------------------------------------------------------------------- properties


class _ReferenceBucket:
    """A textbook token bucket in exact rational arithmetic, to check GCRA against."""

    def __init__(self, interval_us: int, burst: int) -> None:
        self.interval = interval_us
        self.burst = burst
        self.tokens = Fraction(burst)
        self.last = 0

    def take(self, now: int) -> tuple[bool, int]:
        self.tokens = min(
            Fraction(self.burst), self.tokens + Fraction(now - self.last, self.interval)
        )
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True, int(self.tokens)
        return False, 0


@settings(max_examples=300, deadline=None)
@given(
    interval=st.integers(1, 10_000_000),
    burst=st.integers(1, 50),
    gaps=st.lists(st.integers(0, 3_000_000), min_size=1, max_size=120),
)
def test_gcra_decides_exactly_like_a_rational_token_bucket(
    interval: int, burst: int, gaps: list[int]
) -> None:
    reference = _ReferenceBucket(interval, burst)
    tat = 0
    now = 0
    for gap in gaps:
        now += gap
        tat, outcome = gcra(tat, now, interval, burst)
        allowed, remaining = reference.take(now)
        assert outcome.allowed == allowed
        if allowed:
            assert outcome.remaining == remaining


@settings(max_examples=300, deadline=None)
@given(
    interval=st.integers(1, 1_000_000),
    burst=st.integers(1, 30),
    gaps=st.lists(st.integers(0, 200_000), min_size=1, max_size=200),
)
def test_no_window_ever_lets_more_than_burst_plus_elapsed_intervals(
    interval: int, burst: int, gaps: list[int]
) -> None:
    tat = 0
    now = 0
    allowed_at: list[int] = []
    for gap in gaps:
        now += gap
        tat, outcome = gcra(tat, now, interval, burst)
        if outcome.allowed:
            allowed_at.append(now)
    for i, start in enumerate(allowed_at):
        for j in range(i, len(allowed_at)):
            span = allowed_at[j] - start
            assert j - i + 1 <= burst + span // interval


@settings(max_examples=300, deadline=None)
@given(
    interval=st.integers(1, 1_000_000),
    burst=st.integers(1, 20),
    spent=st.integers(0, 40),
    now=st.integers(0, 10**12),
)
def test_retry_after_is_exactly_when_the_next_request_passes(
    interval: int, burst: int, spent: int, now: int
) -> None:
    tat = 0
    for _ in range(spent):
        tat, _ = gcra(tat, now, interval, burst)
    tat, refused = gcra(tat, now, interval, burst)
    if refused.allowed:
        return
    wait = refused.retry_after_us
    assert wait > 0
    assert not gcra(tat, now + wait - 1, interval, burst)[1].allowed
    assert gcra(tat, now + wait, interval, burst)[1].allowed
    # reset: the bucket is full again, i.e. burst requests pass back to back.
    later = now + refused.reset_us
    t = tat
    for _ in range(burst):
        t, outcome = gcra(t, later, interval, burst)
        assert outcome.allowed
