"""Load balancers: pick one endpoint of a cluster for one request.

Each balancer takes the cluster's current healthy endpoints (``EndpointState``s, in
configuration order) and returns one, honouring endpoint ``weight``:

- ``RoundRobin``: smooth weighted round robin (equal weights: plain rotation);
- ``LeastRequest``: power of two choices on ``active_requests / weight`` (Envoy's
  default choice count of two);
- ``RandomLB``: weighted random;
- ``Passthrough``: the first healthy endpoint, without balancing;
- ``HashLB``: consistent hashing on a request key with a ring (Ketama-style, virtual
  nodes in proportion to weight) or a Maglev table. Both are built from endpoint
  *identities* (``address:port``), so when an endpoint comes or goes only the keys it
  owned move. The table is rebuilt only when the healthy set changes.

Nothing here does I/O or knows about requests: the caller computes the hash key.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence

from ..policy import LoadBalancer
from .outlier import EndpointState

__all__ = [
    "Balancer",
    "HashLB",
    "LeastRequest",
    "Passthrough",
    "RandomLB",
    "RoundRobin",
    "hash_key",
    "make_balancer",
]


def hash_key(text: str) -> int:
    """A stable 64-bit hash (the same in every worker and every run, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Balancer:
    """Base: ``pick(healthy, key, version)``; ``version`` changes with the healthy set."""

    needs_key = False

    def pick(
        self, healthy: Sequence[EndpointState], key: int | None, version: int
    ) -> EndpointState:
        raise NotImplementedError


class RoundRobin(Balancer):
    __slots__ = ("_current", "_next", "_version")

    def __init__(self) -> None:
        self._next = 0
        self._current: dict[str, int] = {}
        self._version = -1

    def pick(
        self, healthy: Sequence[EndpointState], key: int | None, version: int
    ) -> EndpointState:
        count = len(healthy)
        if count == 1:
            return healthy[0]
        first = healthy[0].weight
        if all(e.weight == first for e in healthy):
            index = self._next % count
            self._next = index + 1
            return healthy[index]
        # Smooth weighted round robin (nginx): each pick adds every weight to its
        # running score, takes the top score and subtracts the total from it; picks
        # interleave in proportion to weight instead of bunching.
        if version != self._version:
            self._version = version
            self._current = {}
        current = self._current
        total = 0
        best: EndpointState | None = None
        best_score = 0
        for e in healthy:
            score = current.get(e.key, 0) + e.weight
            current[e.key] = score
            total += e.weight
            if best is None or score > best_score:
                best, best_score = e, score
        assert best is not None
        current[best.key] = best_score - total
        return best


class LeastRequest(Balancer):
    __slots__ = ("rnd",)

    def __init__(self, rnd: random.Random | None = None) -> None:
        self.rnd = rnd or random.Random()

    def pick(
        self, healthy: Sequence[EndpointState], key: int | None, version: int
    ) -> EndpointState:
        count = len(healthy)
        if count == 1:
            return healthy[0]
        a = healthy[self.rnd.randrange(count)]
        b = healthy[self.rnd.randrange(count)]
        # Fewer active requests per unit of weight wins; a tie keeps the first draw.
        if b.active_requests * a.weight < a.active_requests * b.weight:
            return b
        return a


class RandomLB(Balancer):
    __slots__ = ("rnd",)

    def __init__(self, rnd: random.Random | None = None) -> None:
        self.rnd = rnd or random.Random()

    def pick(
        self, healthy: Sequence[EndpointState], key: int | None, version: int
    ) -> EndpointState:
        if len(healthy) == 1:
            return healthy[0]
        return self.rnd.choices(healthy, weights=[e.weight for e in healthy])[0]


class Passthrough(Balancer):
    def pick(
        self, healthy: Sequence[EndpointState], key: int | None, version: int
    ) -> EndpointState:
        return healthy[0]


class HashLB(Balancer):
    """Ring hash (default) or Maglev over the healthy endpoints."""

    needs_key = True
    __slots__ = ("_fallback", "_points", "_ring", "_table", "_version", "maglev", "size")

    def __init__(self, *, maglev: bool = False, size: int = 1024) -> None:
        self.maglev = maglev
        self.size = size
        self._version = -1
        self._points: list[int] = []
        self._ring: list[EndpointState] = []
        self._table: list[EndpointState] = []
        self._fallback = RoundRobin()

    def pick(
        self, healthy: Sequence[EndpointState], key: int | None, version: int
    ) -> EndpointState:
        if key is None:
            # No key in this request (header absent, no cookie yet): Envoy then
            # picks as if there were no hashing at all.
            return self._fallback.pick(healthy, None, version)
        if len(healthy) == 1:
            return healthy[0]
        if version != self._version or not (self._table or self._ring):
            self._build(healthy)
            self._version = version
        if self.maglev:
            return self._table[key % len(self._table)]
        index = bisect.bisect_left(self._points, key & 0xFFFFFFFFFFFFFFFF)
        if index == len(self._points):
            index = 0
        return self._ring[index]

    def _build(self, healthy: Sequence[EndpointState]) -> None:
        if self.maglev:
            self._table = _maglev_table(healthy, _prime_at_least(self.size))
            return
        # Virtual nodes per unit of weight are fixed, not shared out of a total:
        # an endpoint's points then never move when others come or go, so only the
        # keys of the endpoint that changed are remapped.
        per_weight = max(16, self.size // 16)
        points: list[tuple[int, EndpointState]] = []
        for e in healthy:
            for i in range(min(per_weight * e.weight, 65536)):
                points.append((hash_key(f"{e.key}_{i}"), e))
        points.sort(key=lambda p: p[0])
        self._points = [p[0] for p in points]
        self._ring = [p[1] for p in points]


def _prime_at_least(n: int) -> int:
    n = max(n, 7)
    while True:
        if all(n % d for d in range(2, int(n**0.5) + 1)):
            return n
        n += 1


def _maglev_table(healthy: Sequence[EndpointState], size: int) -> list[EndpointState]:
    """Maglev's lookup table (Eisenbud et al., 2016), weighted as Envoy does: an
    endpoint takes a turn each round in proportion to its weight."""
    offsets = []
    skips = []
    for e in healthy:
        h = hash_key(e.key)
        offsets.append(h % size)
        skips.append((h >> 32) % (size - 1) + 1)
    table: list[EndpointState | None] = [None] * size
    nexts = [0] * len(healthy)
    max_weight = max(e.weight for e in healthy)
    credit = [0.0] * len(healthy)
    filled = 0
    while True:
        for i, e in enumerate(healthy):
            credit[i] += e.weight / max_weight
            if credit[i] < 1.0:
                continue
            credit[i] -= 1.0
            while True:
                slot = (offsets[i] + nexts[i] * skips[i]) % size
                nexts[i] += 1
                if table[slot] is None:
                    table[slot] = e
                    filled += 1
                    break
            if filled == size:
                return table  # type: ignore[return-value]


def make_balancer(lb: LoadBalancer) -> Balancer:
    kind = lb.kind
    if kind == "HASH":
        return HashLB(maglev=lb.maglev, size=lb.ring_size)
    if kind == "LEAST_REQUEST":
        return LeastRequest()
    if kind == "RANDOM":
        return RandomLB()
    if kind == "PASSTHROUGH":
        return Passthrough()
    return RoundRobin()
