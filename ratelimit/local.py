"""In-process token buckets: GCRA over a fixed-size table in shared memory.

    gcra(tat_us, now_us, interval_us, burst) -> Outcome      the arithmetic, pure
    LocalBuckets(slots, shared=...)                           the table and its lock
      .take(key, interval_us, burst, now_us=None) -> Outcome
      .take_hash(hash(key) or 1, interval_us, burst) -> Outcome   the same, key pre-hashed

**Algorithm.** GCRA (the "generic cell rate algorithm"), which is a token bucket
written as one number per key: the *theoretical arrival time* (TAT), the moment the
bucket would be full again. A request at ``now`` is allowed when, after adding one
emission interval ``T = period / requests``, the TAT is at most ``burst * T`` ahead
of ``now``. So a fresh key may send ``burst`` requests back to back, then one every
``T``. All times are integer microseconds, so the boundary is exact (no float
rounding decides whether request N+1 passes) and the same arithmetic runs in the
Redis script.

**Memory.** The table has a fixed number of slots chosen at start-up (default
65 536, 16 bytes each: 1 MiB). A slot whose TAT is in the past describes a full
bucket, which is exactly the state of a key never seen, so it is free to reuse:
idle keys expire by themselves, with no sweeper. A key is looked for in a short
probe window (``PROBE`` slots from its hash); when every slot there holds a live
bucket, the one nearest to full (smallest TAT) is evicted and ``evictions`` counts
it. A flood of distinct keys (one per client IP) therefore never grows memory; its
cost is that an evicted key starts again from a full bucket, i.e. the limiter errs
on the side of letting a request through, never of refusing one it should allow.

**Workers.** The table lives in an anonymous ``MAP_SHARED`` mapping created before
the gateway forks its workers, so every worker reads and writes the same buckets and
the limit is the gateway's, not N times it. A process-shared lock (a POSIX
semaphore) guards the few array reads and writes of one decision; with one worker
the lock is skipped altogether. Keys are hashed with Python's ``hash`` (keyed
SipHash, so a client cannot aim collisions at a slot); forked workers share the hash
seed, which is what makes their slot numbers agree.

This module knows nothing of HTTP or of configuration: it is handed a key string and
a rate.
"""

from __future__ import annotations

import mmap
import multiprocessing
import time
from collections.abc import Callable
from time import monotonic_ns as _monotonic_ns
from typing import NamedTuple

__all__ = ["PROBE", "LocalBuckets", "Outcome", "gcra", "monotonic_us"]

PROBE = 8  # slots searched per key: bounds the work of one decision
_new = tuple.__new__  # builds an Outcome without NamedTuple's Python-level __new__


class Outcome(NamedTuple):
    """One decision. Times are microseconds from now."""

    allowed: bool
    remaining: int  # requests still allowed right now, after this one
    reset_us: int  # until the bucket is full again
    retry_after_us: int  # until the next request would pass (0 when allowed)


def monotonic_us() -> int:
    """The local clock: CLOCK_MONOTONIC, the same in every process of the machine."""
    return time.monotonic_ns() // 1000


def gcra(tat_us: int, now_us: int, interval_us: int, burst: int) -> tuple[int, Outcome]:
    """The new TAT and the outcome of one request at ``now_us``.

    ``tat_us`` below ``now_us`` (including 0 for a key never seen) means a full
    bucket. A refused request leaves the TAT unchanged: it spends nothing.
    """
    tat = tat_us if tat_us > now_us else now_us
    new_tat = tat + interval_us
    ahead = new_tat - now_us
    capacity = interval_us * burst
    if ahead <= capacity:
        return new_tat, Outcome(True, (capacity - ahead) // interval_us, ahead, 0)
    return tat, Outcome(False, 0, tat - now_us, ahead - capacity)


class LocalBuckets:
    """A bounded GCRA table, optionally shared by forked worker processes."""

    def __init__(
        self,
        slots: int = 65536,
        *,
        shared: bool = False,
        clock: Callable[[], int] = monotonic_us,
        lock_timeout_s: float = 0.05,
    ) -> None:
        if slots < PROBE or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two >= {PROBE}, not {slots}")
        self.slots = slots
        self.clock = clock
        self.shared = shared
        self.lock_timeout_s = lock_timeout_s
        # Anonymous mmap is MAP_SHARED on Linux: forked children see one table.
        self._map = mmap.mmap(-1, slots * 16)
        self._view = memoryview(self._map)
        self._keys = self._view[: slots * 8].cast("q")
        self._tats = self._view[slots * 8 :].cast("q")
        self._mask = slots - 1
        # One process: decisions are synchronous, so within one event loop nothing can
        # interleave them and no lock is taken at all (None).
        self._lock = multiprocessing.get_context("fork").Lock() if shared else None
        # The default clock is read inline (one C call) rather than through a wrapper.
        self._native_clock = clock is monotonic_us
        decide = self._decide_locked if shared else self._decide
        self.take = self.take_hash = decide  # type: ignore[method-assign]
        # Per-process counters, read by the metrics endpoint and tests.
        self.decisions = 0
        self.evictions = 0
        self.lock_timeouts = 0

    @property
    def memory_bytes(self) -> int:
        """Fixed at construction: the table never grows."""
        return self.slots * 16

    def take(self, key: str, interval_us: int, burst: int, now_us: int | None = None) -> Outcome:
        """Spend one token of ``key``'s bucket if it has one."""
        decide = self._decide if self._lock is None else self._decide_locked
        return decide(key, interval_us, burst, now_us)

    def take_hash(self, h: int, interval_us: int, burst: int, now_us: int | None = None) -> Outcome:
        """``take`` for a key already hashed: ``h`` is ``hash(key) or 1``.

        Callers that see the same key again and again (one client, one route) keep
        that number instead of building and hashing the key string per request.
        """
        decide = self._decide if self._lock is None else self._decide_locked
        return decide(h, interval_us, burst, now_us)

    # Both public names are rebound per instance in __init__ to the function that
    # does the work (``_decide``, or ``_decide_locked`` for a shared table): the
    # decision is then one Python call, which is most of its cost.

    def _decide_locked(
        self, key: str | int, interval_us: int, burst: int, now_us: int | None = None
    ) -> Outcome:
        if now_us is None:
            # Read before waiting for the lock: the request arrived now, not after.
            now_us = _monotonic_ns() // 1000 if self._native_clock else self.clock()
        lock = self._lock
        if not lock.acquire(True, self.lock_timeout_s):
            # A worker died inside the critical section (SIGKILL): rather than stall
            # every request behind a lock nobody will release, let this one through.
            self.decisions += 1
            self.lock_timeouts += 1
            return Outcome(True, 0, 0, 0)
        try:
            return self._decide(key, interval_us, burst, now_us)
        finally:
            lock.release()

    def _decide(
        self, key: str | int, interval_us: int, burst: int, now_us: int | None = None
    ) -> Outcome:
        # ``gcra`` inlined: this is the hot path of every limited request. An int key
        # is already ``hash(bucket) or 1`` (take_hash); a string is hashed here.
        h = key if key.__class__ is int else (hash(key) or 1)  # 0 marks an empty slot
        if now_us is None:
            now_us = _monotonic_ns() // 1000 if self._native_clock else self.clock()
        self.decisions += 1
        keys = self._keys
        tats = self._tats
        mask = self._mask
        slot = h & mask
        if keys[slot] == h:
            tat = tats[slot]  # the common case: the key sits in its home slot
            fresh = False  # so the slot's key need not be written again
        else:
            fresh = True
            found = -1
            free = -1
            oldest = -1
            oldest_tat = 0
            for i in range(PROBE):
                j = (slot + i) & mask
                k = keys[j]
                if k == h:
                    found = j
                    break
                t = tats[j]
                if k == 0 or t <= now_us:
                    if free < 0:
                        free = j
                elif oldest < 0 or t < oldest_tat:
                    oldest = j
                    oldest_tat = t
            if found >= 0:
                slot = found
                tat = tats[slot]
                fresh = False
            elif free >= 0:
                slot = free
                tat = 0
            else:
                slot = oldest
                tat = 0
                self.evictions += 1
        if tat < now_us:
            tat = now_us
        new_tat = tat + interval_us
        ahead = new_tat - now_us
        capacity = interval_us * burst
        if ahead <= capacity:
            if fresh:
                keys[slot] = h
            tats[slot] = new_tat
            return _new(Outcome, (True, (capacity - ahead) // interval_us, ahead, 0))
        return _new(Outcome, (False, 0, tat - now_us, ahead - capacity))

    def live_keys(self, now_us: int | None = None) -> int:
        """How many slots hold a bucket that is not yet full (a scan; for tests/metrics)."""
        if now_us is None:
            now_us = self.clock()
        keys, tats = self._keys, self._tats
        return sum(1 for j in range(self.slots) if keys[j] and tats[j] > now_us)

    def close(self) -> None:
        self._keys.release()
        self._tats.release()
        self._view.release()
        self._map.close()
