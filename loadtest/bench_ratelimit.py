#!/usr/bin/env python3
"""Rate-limit figures for docs/benchmarks.md: the limiter alone, then the gateway.

1. Decisions in one process, no HTTP: the local table (``LocalBuckets.take`` and the
   whole ``Limiter.check`` with a key extracted from a request), and the Redis
   backend against a real redis-server: one decision at a time (latency of a round
   trip) and 50 concurrent callers (batched per event-loop tick; decisions/s).
2. The gateway, in one run with interleaved rounds, the same way ``bench.py``
   measures (taskset: gateway on PROXY_CORE, wrk + nginx backend + redis-server on
   LOAD_CORE; wrk ``-t1 -c50`` for throughput, ``-t1 -c1`` for latency):
   ``none`` (no RateLimitPolicy), ``local`` (a local limit keyed by client IP on every
   request) and ``redis`` (the same limit on Redis). Limits are set high enough that
   every request is allowed, so each request pays for a full decision.

Prints a markdown section; ``--doc`` appends it to docs/benchmarks.md. Environment:
DUR (10), ROUNDS (3), PROXY_CORE (0), LOAD_CORE (1), as bench.py. Every process is
stopped by PID at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench  # noqa: E402  (loadtest/bench.py: processes, wrk, machine facts)

from ratelimit.limiter import Limiter  # noqa: E402
from ratelimit.local import LocalBuckets  # noqa: E402
from ratelimit.policy import Limit, Rate, RouteRateLimit, compile_key_part  # noqa: E402
from ratelimit.redis_backend import RedisBackend  # noqa: E402

SCENARIOS = ("none", "local", "redis")
POLICY = """
---
apiVersion: meshgate.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: bench}}
spec:
  limits:
  - name: per-client
    key: ["remote.ip"]
    rate: {{requests: 1000000, per: second, burst: 1000000}}
    backend: {backend}
"""


class _Head:
    peer = "10.1.2.3"
    path = "/"
    method = "GET"
    authority = "bench"

    def header(self, name: str) -> str | None:
        return None


class _Ctx:
    head = _Head()
    xff = "10.1.2.3"
    route = None
    auth = None


def _route_limits(backend: str) -> RouteRateLimit:
    limit = Limit(
        id="default/bench/per-client",
        key=(compile_key_part("remote.ip"),),
        rate=Rate.of(1_000_000, "second", 1_000_000),
        backend=backend,
        fail_open=True,
    )
    return RouteRateLimit((limit,), local_only=backend == "local")


def bench_local(n: int = 200_000) -> dict[str, float]:
    buckets = LocalBuckets()
    started = time.perf_counter()
    for i in range(n):
        buckets.take(f"k{i & 1023}", 1, 1_000_000)
    take_us = (time.perf_counter() - started) / n * 1e6
    shared = LocalBuckets(shared=True)
    started = time.perf_counter()
    for i in range(n):
        shared.take(f"k{i & 1023}", 1, 1_000_000)
    shared_us = (time.perf_counter() - started) / n * 1e6
    limiter = Limiter(LocalBuckets())
    limits = _route_limits("local")
    ctx = _Ctx()
    started = time.perf_counter()
    for _ in range(n):
        limiter.check(limits, ctx)
    check_us = (time.perf_counter() - started) / n * 1e6
    return {"take_us": take_us, "take_shared_us": shared_us, "check_us": check_us}


async def _bench_redis(url: str) -> dict[str, float]:
    backend = RedisBackend(url, timeout_s=1.0)
    await backend.start()
    latencies = []
    for i in range(3000):
        started = time.perf_counter()
        result = backend.take(f"lat{i & 255}", 1, 1_000_000)
        if isinstance(result, asyncio.Future):
            await result
        latencies.append((time.perf_counter() - started) * 1e6)
    latencies.sort()

    async def caller(count: int) -> None:
        for i in range(count):
            result = backend.take(f"c{i & 1023}", 1, 1_000_000)
            if isinstance(result, asyncio.Future):
                await result

    trips = backend.round_trips
    started = time.perf_counter()
    await asyncio.gather(*(caller(400) for _ in range(50)))
    elapsed = time.perf_counter() - started
    batches = backend.round_trips - trips
    await backend.close()
    return {
        "p50_us": latencies[len(latencies) // 2],
        "p99_us": latencies[int(len(latencies) * 0.99)],
        "sequential_per_s": 1e6 / statistics.mean(latencies),
        "concurrent_per_s": 50 * 400 / elapsed,
        "per_round_trip": 50 * 400 / batches if batches else 0.0,
    }


def bench_redis(url: str) -> dict[str, float]:
    import uvloop

    return uvloop.run(_bench_redis(url))


def start_redis(procs: bench.Processes) -> str:
    port = bench.free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no"]
    procs.start("redis", argv, bench.LOAD_CORE)
    deadline = time.monotonic() + 10
    while True:
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)  # polling a port: there is nothing to block on


def start_gateways(procs: bench.Processes, backend_port: int, redis_url: str) -> dict[str, int]:
    ports = {}
    for scenario in SCENARIOS:
        port = bench.free_port()
        config_dir = procs.scratch / f"config-{scenario}"
        bench.write_meshgate_config(config_dir, port, backend_port)
        if scenario != "none":
            with (config_dir / "bench.yaml").open("a") as f:
                f.write(POLICY.format(backend=scenario))
        argv = [sys.executable, "-m", "gateway.cli", "run", str(config_dir), "--workers", "1"]
        argv += ["--admin-port", str(bench.free_port()), "--redis-url", redis_url]
        gateway = procs.start(scenario, argv, bench.PROXY_CORE, stdout=subprocess.DEVNULL)
        bench.wait_http_ok(port, gateway, scenario)
        ports[scenario] = port
    return ports


def main() -> int:
    to_doc = "--doc" in sys.argv
    scratch = Path(tempfile.mkdtemp(prefix="meshgate-rl-bench-"))
    procs = bench.Processes(scratch)
    load_before = bench.load_average()
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SCENARIOS}
    try:
        redis_url = start_redis(procs)
        local = bench_local()
        bench.log(f"local: {local}")
        redis = bench_redis(redis_url)
        bench.log(f"redis: {redis}")
        backend_port = bench.free_port()
        values = {"DIR": str(scratch), "BACKEND_PORT": str(backend_port), "PROXY_PORT": "0"}
        backend = procs.start(
            "backend", bench._nginx_argv(scratch, "backend", values), bench.LOAD_CORE
        )
        bench.wait_http_ok(backend_port, backend, "backend")
        ports = start_gateways(procs, backend_port, redis_url)
        for rnd in range(bench.ROUNDS):
            for scenario in SCENARIOS:
                port, pid = ports[scenario], procs.pid(scenario)
                bench.run_wrk(port, 50, bench.WARMUP_S)
                many = bench.measure(pid, lambda p=port: bench.run_wrk(p, 50, bench.DUR))
                one = bench.measure(pid, lambda p=port: bench.run_wrk(p, 1, bench.DUR))
                rows[scenario].append({"c50": many, "c1": one})
                bench.log(
                    f"round {rnd + 1} {scenario}: {many.get('rps')} rps (c50), "
                    f"p50 {one.get('p50_ms')} ms / p99 {one.get('p99_ms')} ms (c1)"
                )
    finally:
        procs.stop_all()
        with contextlib.suppress(OSError):
            for path in sorted(scratch.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
            scratch.rmdir()
    lines = report(local, redis, rows, load_before)
    text = "\n".join(lines) + "\n"
    print(text)
    if to_doc:
        with bench.DOC.open("a") as f:
            f.write("\n" + text)
    return 0


def _med(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else float("nan")


def report(
    local: dict[str, float],
    redis: dict[str, float],
    rows: dict[str, list[dict[str, Any]]],
    load_before: str,
) -> list[str]:
    facts = bench.machine_facts()
    rps = {s: _med([r["c50"].get("rps") for r in rows[s]]) for s in SCENARIOS}
    # Ratios within each round (same minutes, same neighbours), then the median.
    ratio = {
        s: _med(
            [
                r["c50"]["rps"] / n["c50"]["rps"]
                for r, n in zip(rows[s], rows["none"], strict=True)
                if r["c50"].get("rps") and n["c50"].get("rps")
            ]
        )
        for s in SCENARIOS
    }
    lines = [
        "## Rate limiting (`loadtest/bench_ratelimit.py`)",
        "",
        f"Command: `DUR={bench.DUR} ROUNDS={bench.ROUNDS} .venv/bin/python "
        "loadtest/bench_ratelimit.py --doc`; commit "
        f"{facts['commit']}; {facts['nproc']} cores ({facts['cpu']}), Linux "
        f"{facts['kernel']}, Python {facts['python']}, uvloop {facts['uvloop']}, "
        f"wrk {facts['wrk']}; load average before the run {load_before}. Absolute figures "
        "move with whatever else runs on the machine; the ratios are taken within each "
        "round.",
        "",
        "Decisions in one process (no HTTP):",
        "",
        "| what | cost |",
        "|---|---|",
        f"| local `LocalBuckets.take`, one process | {local['take_us']:.2f} µs "
        f"({1e6 / local['take_us']:,.0f} decisions/s) |",
        f"| local `take`, table shared by workers (lock) | {local['take_shared_us']:.2f} µs |",
        f"| local `Limiter.check` (key from the request + take) | {local['check_us']:.2f} µs |",
        f"| Redis, one decision at a time (round trip) | p50 {redis['p50_us']:.0f} µs, "
        f"p99 {redis['p99_us']:.0f} µs ({redis['sequential_per_s']:,.0f} decisions/s) |",
        f"| Redis, 50 concurrent callers (batched per tick) | "
        f"{redis['concurrent_per_s']:,.0f} decisions/s, "
        f"{redis['per_round_trip']:.1f} decisions per round trip |",
        "",
        "The gateway, one worker, a limit on every request (every request allowed), "
        f"wrk `-t1`, {bench.DUR} s runs, median of {bench.ROUNDS} interleaved rounds:",
        "",
        "| limits | req/s (c50) | ratio to none | p50 ms (c1) | p99 ms (c1) | CPU ms/req (c50) |",
        "|---|---|---|---|---|---|",
    ]
    for s in SCENARIOS:
        p50 = _med([r["c1"].get("p50_ms") for r in rows[s]])
        p99 = _med([r["c1"].get("p99_ms") for r in rows[s]])
        cpu = _med([r["c50"].get("cpu_ms_per_req") for r in rows[s]])
        lines.append(
            f"| {s} | {rps[s]:,.0f} | {ratio[s]:.3f} | {p50:.3f} | {p99:.3f} | {cpu:.4f} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
