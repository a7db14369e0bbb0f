"""Load balancers: weights honoured, least-request preference, consistent hashing
that stays put when endpoints come and go."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from gateway.policy import LoadBalancer
from gateway.routing.table import Endpoint
from gateway.upstream.lb import HashLB, LeastRequest, RandomLB, RoundRobin, hash_key, make_balancer
from gateway.upstream.outlier import EndpointState


def states(*weights: int) -> list[EndpointState]:
    return [EndpointState(Endpoint(f"10.0.0.{i}", 80, w)) for i, w in enumerate(weights, 1)]


def test_round_robin_rotates_through_equal_endpoints() -> None:
    eps = states(1, 1, 1)
    rr = RoundRobin()
    picks = [rr.pick(eps, None, 0).key for _ in range(6)]
    assert picks == [e.key for e in eps] * 2


def test_round_robin_follows_weights_and_interleaves() -> None:
    eps = states(3, 1)
    rr = RoundRobin()
    picks = [rr.pick(eps, None, 0) for _ in range(8)]
    counts = Counter(p.key for p in picks)
    assert counts == {eps[0].key: 6, eps[1].key: 2}
    # Smooth: the light endpoint is not served twice in a row, nor starved for 4 picks.
    assert picks[:4].count(eps[1]) == 1


def test_random_follows_weights() -> None:
    eps = states(9, 1)
    lb = RandomLB(random.Random(7))
    counts = Counter(lb.pick(eps, None, 0).key for _ in range(2000))
    assert 1650 < counts[eps[0].key] < 1950


def test_least_request_prefers_the_less_busy_endpoint() -> None:
    eps = states(1, 1)
    eps[0].active_requests = 10
    lb = LeastRequest(random.Random(1))
    counts = Counter(lb.pick(eps, None, 0).key for _ in range(400))
    # Two random draws: the busy one wins only when drawn twice (about a quarter).
    assert counts[eps[1].key] > 250


@pytest.mark.parametrize("maglev", [False, True])
def test_consistent_hash_is_sticky_for_a_key(maglev: bool) -> None:
    eps = states(1, 1, 1, 1)
    lb = HashLB(maglev=maglev, size=1021 if maglev else 512)
    for user in ("alice", "bob", "carol"):
        first = lb.pick(eps, hash_key(user), 0)
        assert all(lb.pick(eps, hash_key(user), 0) is first for _ in range(5))


@pytest.mark.parametrize("maglev", [False, True])
def test_consistent_hash_moves_few_keys_when_an_endpoint_leaves(maglev: bool) -> None:
    eps = states(1, 1, 1, 1, 1)
    lb = HashLB(maglev=maglev, size=2003 if maglev else 1024)
    keys = [hash_key(f"user-{i}") for i in range(2000)]
    before = {k: lb.pick(eps, k, 0).key for k in keys}
    gone = eps[2]
    after = {k: lb.pick([e for e in eps if e is not gone], k, 1).key for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    owned = [k for k in keys if before[k] == gone.key]
    # Every key of the endpoint that left moves; of the others, hardly any.
    assert set(owned) <= set(moved)
    assert len(moved) - len(owned) < 0.06 * len(keys)
    # And the keys spread over the endpoints that are left.
    spread = Counter(after.values())
    assert len(spread) == 4 and min(spread.values()) > 250


def test_consistent_hash_without_a_key_still_balances() -> None:
    eps = states(1, 1)
    lb = HashLB()
    assert {lb.pick(eps, None, 0).key for _ in range(4)} == {e.key for e in eps}


def test_hash_key_is_stable_across_processes() -> None:
    # blake2b, not hash(): the same in every worker whatever PYTHONHASHSEED says.
    code = "from gateway.upstream.lb import hash_key; print(hash_key('alice'))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outputs == {str(hash_key("alice"))}
    assert hash_key("alice") != hash_key("bob")


def test_make_balancer_maps_istio_names() -> None:
    assert isinstance(make_balancer(LoadBalancer("LEAST_REQUEST")), LeastRequest)
    assert isinstance(make_balancer(LoadBalancer("RANDOM")), RandomLB)
    assert isinstance(make_balancer(LoadBalancer("HASH", hash_header="x-user")), HashLB)
    assert isinstance(make_balancer(LoadBalancer()), RoundRobin)
