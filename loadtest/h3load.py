#!/usr/bin/env python3
"""An HTTP/3 load generator on aioquic: CONNECTIONS connections, each keeping STREAMS
requests in flight, until REQUESTS requests have been answered (or a time limit).

    python loadtest/h3load.py --port 8443 --host localhost --cafile ca.crt \\
        --connections 50 --streams 10 --requests 20000 [--path /] [--timeout-s 120]
    python loadtest/h3load.py --port 8443 --duration-s 10     # as many as fit in 10 s

Prints one JSON line: requests, errors (non-2xx, resets, failed connections),
elapsed_s, rps, p50_ms, p99_ms, and the client's own CPU seconds (a Python QUIC
client can be the bottleneck; compare its CPU with the elapsed time). Bounded: every
connection stops when the shared count is reached, and the whole run stops at
``--timeout-s``. Pin it with taskset like the other load generators.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.server.h3client import client_configuration, connect_h3


class Counter:
    """The shared budget of requests (a count, and optionally a time) and what came back."""

    def __init__(self, total: int, duration_s: float = 0.0) -> None:
        self.remaining = total
        self.deadline = time.perf_counter() + duration_s if duration_s > 0 else None
        self.latencies: list[float] = []
        self.errors = 0

    def take(self) -> bool:
        if self.remaining <= 0:
            return False
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            self.remaining = 0
            return False
        self.remaining -= 1
        return True


async def _connection(args: argparse.Namespace, counter: Counter, cadata: bytes | None) -> None:
    config = client_configuration(args.host, cadata=cadata, verify=cadata is not None)
    try:
        async with connect_h3(args.address, args.port, config) as client:

            async def worker() -> None:
                while counter.take():
                    start = time.perf_counter()
                    try:
                        response = await client.request("GET", args.host, args.path)
                    except ConnectionError:
                        counter.errors += 1
                        return
                    if 200 <= response.status < 300 and response.reset_code is None:
                        counter.latencies.append(time.perf_counter() - start)
                    else:
                        counter.errors += 1

            await asyncio.gather(*(worker() for _ in range(args.streams)))
    except (ConnectionError, OSError):
        counter.errors += 1


def _percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index] * 1000.0


async def run(args: argparse.Namespace) -> dict[str, object]:
    cadata = Path(args.cafile).read_bytes() if args.cafile else None
    counter = Counter(args.requests, args.duration_s)
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    try:
        async with asyncio.timeout(args.timeout_s):
            await asyncio.gather(
                *(_connection(args, counter, cadata) for _ in range(args.connections))
            )
    except TimeoutError:
        counter.errors += 1
    elapsed = time.perf_counter() - start
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (usage_after.ru_utime - usage_before.ru_utime) + (
        usage_after.ru_stime - usage_before.ru_stime
    )
    done = sorted(counter.latencies)
    return {
        "requests": len(done),
        "errors": counter.errors,
        "elapsed_s": round(elapsed, 3),
        "rps": round(len(done) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": _percentile(done, 0.50),
        "p99_ms": _percentile(done, 0.99),
        "client_cpu_s": round(cpu_s, 3),
        "connections": args.connections,
        "streams": args.streams,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="localhost", help="SNI and :authority")
    parser.add_argument("--path", default="/")
    parser.add_argument("--cafile", help="PEM CA to verify the server; without it, no check")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument(
        "--duration-s",
        type=float,
        default=0.0,
        help="stop starting requests after this many seconds (0: only --requests bounds it)",
    )
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    if args.no_uvloop:
        result = asyncio.run(run(args))
    else:
        import uvloop

        result = uvloop.run(run(args))
    result["pid"] = os.getpid()
    print(json.dumps(result), flush=True)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
