"""Rate-limit figures for the admin API's ``/metrics``: per process, then summed.

limiter.status() -> dict         one process's counters (``Limiter.status``)
render_exports(statuses) -> bytes    Prometheus text for every process together
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["render_exports"]

_COUNTERS = (
    (
        "meshgate_ratelimit_local_evictions_total",
        "Live local buckets evicted to make room (a flood of distinct keys).",
        ("local", "evictions"),
    ),
    (
        "meshgate_ratelimit_redis_round_trips_total",
        "Pipelined round trips to Redis (each carries one or more decisions).",
        ("redis", "round_trips"),
    ),
    (
        "meshgate_ratelimit_redis_decisions_total",
        "Decisions sent to Redis.",
        ("redis", "decisions"),
    ),
    (
        "meshgate_ratelimit_redis_failures_total",
        "Decisions Redis did not answer (each limit's failureMode applied).",
        ("redis", "failures"),
    ),
    (
        "meshgate_ratelimit_redis_prechecked_total",
        "Requests refused from the local memory of a refusal, without a round trip.",
        ("redis", "prechecked"),
    ),
)


def render_exports(statuses: Iterable[dict[str, Any]]) -> bytes:
    statuses = [s for s in statuses if s]
    if not statuses:
        return b""
    lines = [
        "# HELP meshgate_ratelimit_requests_total Requests on limited routes, by result.",
        "# TYPE meshgate_ratelimit_requests_total counter",
    ]
    for result in ("allowed", "limited", "failed"):
        total = sum(s.get("requests", {}).get(result, 0) for s in statuses)
        lines.append(f'meshgate_ratelimit_requests_total{{result="{result}"}} {total}')
    for name, help_text, (group, key) in _COUNTERS:
        total = sum((s.get(group) or {}).get(key, 0) for s in statuses)
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {total}"]
    # The table is shared by the workers: its size is the gateway's, not a sum.
    slots = max((s.get("local") or {}).get("slots", 0) for s in statuses)
    lines += [
        "# HELP meshgate_ratelimit_local_slots Size of the local bucket table (fixed).",
        "# TYPE meshgate_ratelimit_local_slots gauge",
        f"meshgate_ratelimit_local_slots {slots}",
    ]
    redis = [s["redis"] for s in statuses if s.get("redis")]
    if redis:
        up = int(all(r.get("available") for r in redis))
        lines += [
            "# HELP meshgate_ratelimit_redis_up 1 when every process can reach Redis.",
            "# TYPE meshgate_ratelimit_redis_up gauge",
            f"meshgate_ratelimit_redis_up {up}",
        ]
    return ("\n".join(lines) + "\n").encode()
