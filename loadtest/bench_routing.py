"""Micro-benchmark of the routing engine: compile time and per-request lookup cost.

For 10, 1 000 and 10 000 VirtualServices (distinct hosts, five match rules each:
prefix, exact, regex, header, query) it times ``compile_snapshot`` and then
``find_virtual_host`` + ``match_route`` for random hosts and paths that hit the 1st
to 5th rule, and prints a markdown table. Lookup cost must not grow with the number
of hosts; the run fails (exit 1) if compiling 10 000 takes more than 5 s or if the
lookup p99 at 10 000 is more than twice the p99 at 10.

    python loadtest/bench_routing.py [--lookups 100000] [--seed 1]

Pin it to one core for steadier numbers: ``taskset -c 0 python loadtest/bench_routing.py``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

from routing_model import LABELS, PORT, build_model  # the model the micro-benchmarks use too

from gateway.routing import compile_snapshot, find_virtual_host, match_route

SIZES = (10, 1_000, 10_000)
COMPILE_LIMIT_S = 5.0
P99_GROWTH_LIMIT = 2.0


@dataclass(slots=True)
class Request:
    path: str
    authority: str
    query: str = ""
    method: str = "GET"
    scheme: str = "http"
    port: int = PORT
    headers: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def make_requests(count: int, lookups: int, rnd: random.Random) -> list[tuple[Request, str]]:
    out = []
    for _ in range(lookups):
        i = rnd.randrange(count)
        rule = rnd.randrange(1, 6)
        host = f"svc{i}.example.com"
        if rule == 1:
            request = Request(f"/api/{i}/users/{rnd.randrange(1000)}", host)
        elif rule == 2:
            request = Request(f"/exact/{i}", host)
        elif rule == 3:
            request = Request(f"/re/{rnd.randrange(10_000)}/item", host)
        elif rule == 4:
            request = Request("/h", host, headers={"x-tenant": f"t{i}"})
        else:
            request = Request("/q", host, query="a=1&mode=fast")
        out.append((request, f"r{rule}"))
    return out


def _percentile(sorted_ns: list[int], q: float) -> float:
    index = min(len(sorted_ns) - 1, int(q * len(sorted_ns)))
    return sorted_ns[index] / 1000.0


def prepare(count: int, lookups: int, seed: int, hot_hosts: int | None = None) -> dict:
    """Compile ``count`` VirtualServices and the requests to time against them.

    With ``hot_hosts``, requests only go to that many hosts of the big table: the
    same code path over a working set that fits in the CPU caches, which tells
    algorithmic growth (there is none) apart from cache misses.
    """
    model = build_model(count)
    gc.collect()
    started = time.perf_counter()
    snapshot = compile_snapshot(model, LABELS)
    compile_s = time.perf_counter() - started
    listener = snapshot.listeners[PORT]
    requests = make_requests(hot_hosts or count, lookups, random.Random(seed))
    # Check every answer once (this also warms up) before anything is timed.
    for request, expected in requests:
        vhost = find_virtual_host(listener, request.authority)
        route = match_route(vhost, request) if vhost is not None else None
        if route is None or route.name != expected:
            raise SystemExit(f"wrong route for {request}: {route and route.name}, want {expected}")
    label = f"{count:,}" if hot_hosts is None else f"{count:,} (requests to {hot_hosts} hosts)"
    return {
        "label": label,
        "count": count,
        "compile_s": compile_s,
        "listener": listener,
        "requests": requests,
    }


def time_lookups(listener, requests, samples: list[int]) -> None:
    clock = time.perf_counter_ns
    append = samples.append
    for request, _ in requests:
        t0 = clock()
        vhost = find_virtual_host(listener, request.authority)
        match_route(vhost, request)
        append(clock() - t0)


def run(lookups: int, seed: int, rounds: int) -> list[dict[str, float]]:
    prepared = [prepare(count, lookups, seed) for count in SIZES]
    prepared.append(prepare(SIZES[-1], lookups, seed, hot_hosts=SIZES[0]))
    samples: dict[str, list[int]] = {p["label"]: [] for p in prepared}
    # Interleave the sizes in rounds so that noise from the rest of the machine lands
    # on all of them alike instead of on whichever size ran during a busy second.
    chunk = max(1, lookups // rounds)
    gc.disable()
    try:
        for start in range(0, lookups, chunk):
            for p in prepared:
                time_lookups(
                    p["listener"], p["requests"][start : start + chunk], samples[p["label"]]
                )
    finally:
        gc.enable()
    results = []
    for p in prepared:
        ns = sorted(samples[p["label"]])
        results.append(
            {
                "label": p["label"],
                "count": p["count"],
                "routes": p["count"] * 5,
                "compile_s": p["compile_s"],
                "p50_us": _percentile(ns, 0.50),
                "p99_us": _percentile(ns, 0.99),
                "mean_us": statistics.fmean(ns) / 1000.0,
            }
        )
    return results


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lookups", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (20)")
    args = parser.parse_args(argv)

    results = run(args.lookups, args.seed, args.rounds)
    print(
        f"machine: {os.cpu_count()} CPUs ({_cpu_model()}), Python {platform.python_version()}, "
        f"affinity {sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}"
    )
    print(f"lookups per size: {args.lookups}, in {args.rounds} interleaved rounds\n")
    print(
        "| VirtualServices | routes | compile (s) | lookup p50 (µs) | lookup p99 (µs) | mean (µs) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['label']} | {r['routes']:,} | {r['compile_s']:.3f} | {r['p50_us']:.2f} "
            f"| {r['p99_us']:.2f} | {r['mean_us']:.2f} |"
        )
    failures = []
    smallest, largest = results[0], results[len(SIZES) - 1]
    if largest["compile_s"] > COMPILE_LIMIT_S:
        failures.append(
            f"compiling {largest['count']:,} VirtualServices took {largest['compile_s']:.2f} s "
            f"(limit {COMPILE_LIMIT_S} s)"
        )
    if largest["p99_us"] > P99_GROWTH_LIMIT * smallest["p99_us"]:
        failures.append(
            f"lookup p99 at {largest['count']:,} is {largest['p99_us']:.2f} µs, more than "
            f"{P99_GROWTH_LIMIT}x the {smallest['p99_us']:.2f} µs at {smallest['count']:,}"
        )
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
