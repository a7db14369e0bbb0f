#!/usr/bin/env python3
"""The HTTP/1.1 hot path in one process, without sockets: CPU time per request.

``make bench`` measures the whole gateway beside nginx; its figures move with
whatever else runs on the machine. This harness measures only the Python work of one
proxied request, deterministically enough to compare two versions of a hot-path
change a few percent apart: the real ``HTTP1Connection``, ``Pipeline``, stages,
``UpstreamPools`` and access log (formatted and written to /dev/null), with in-memory
transports in place of the two sockets. The upstream answers each request with the
same bytes the benchmark's nginx backend sends, one loop tick later, as a socket would.

Usage:
    .venv/bin/python loadtest/bench_hotpath.py                 # 5 rounds of 20,000
    N=50000 ROUNDS=3 CONNS=50 .venv/bin/python loadtest/bench_hotpath.py
    PROFILE=1 .venv/bin/python loadtest/bench_hotpath.py       # cProfile, top 30 (TOP=N)
    TELEMETRY=1 .venv/bin/python loadtest/bench_hotpath.py     # + tracing and metrics

For an exact A/B comparison on a noisy machine, count instructions instead of time:
run it under ``valgrind --tool=callgrind`` with ``ROUNDS=1 WARMUP=500`` at two
values of N (say 1000 and 3000); the difference of the two totals divided by the
difference of N is the instructions per request (start-up cancels out).

It prints microseconds of process CPU time per request for each round, the median
and the best round (the best is the steadier figure on a shared machine). It does
no I/O beyond /dev/null and is bounded by N.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gateway.config.load import load_config  # noqa: E402
from gateway.metrics import RequestMetrics  # noqa: E402
from gateway.pipeline import Pipeline  # noqa: E402
from gateway.routing.compile import compile_snapshot  # noqa: E402
from gateway.runtime import SnapshotRef  # noqa: E402
from gateway.server.http1 import HTTP1Connection  # noqa: E402
from gateway.server.settings import ServerSettings  # noqa: E402
from gateway.telemetry import AccessLog  # noqa: E402
from gateway.tracing import TraceStage  # noqa: E402
from gateway.upstream.pool import UpstreamConnection, UpstreamPools  # noqa: E402

N = int(os.environ.get("N", "20000"))
ROUNDS = int(os.environ.get("ROUNDS", "5"))
CONNS = int(os.environ.get("CONNS", "50"))
WARMUP = int(os.environ.get("WARMUP", "2000"))
PROFILE = os.environ.get("PROFILE", "") == "1"
# TELEMETRY=1: the pipeline as ``meshgate run`` builds it, with TraceStage (1 %
# sampling, no exporter) and RequestMetrics.
# TELEMETRY=trace or TELEMETRY=metrics: only the one.
TELEMETRY = os.environ.get("TELEMETRY", "")
PORT = 8080
BACKEND_PORT = 9

# What wrk sends, and what the benchmark's nginx backend answers (100-byte body).
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
BODY = (
    b"meshgate-benchmark-backend-0123456789-abcdefghijklmnopqrstuvwxyz"
    b"-0123456789-abcdefghijklmnopqrstuvw\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 13:05:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%b"
    % (len(BODY), BODY)
)

CONFIG = f"""\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: bench}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
    - port: {{number: {PORT}, name: http, protocol: HTTP}}
      hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend}}
spec:
  hosts: [backend.bench.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
    - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
    - address: 127.0.0.1
      ports: {{http: {BACKEND_PORT}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bench}}
spec:
  hosts: ["*"]
  gateways: [bench]
  http:
    - name: all
      route:
        - destination:
            host: backend.bench.local
            port: {{number: 80}}
"""


class UpstreamTransport:
    """Answers every request written to it with RESPONSE on the next loop tick."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        self.loop.call_soon(self.protocol.data_received, RESPONSE)

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        raise RuntimeError("the harness upstream connection was closed")

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Client:
    """One keep-alive client connection sending its next request once answered."""

    def __init__(self, run: Run, conn: HTTP1Connection) -> None:
        self.run = run
        self.conn = conn

    # The transport side, called by HTTP1Connection.
    def write(self, data: bytes) -> None:
        answered = data.count(b"HTTP/1.1 200 ")
        if not answered:
            raise RuntimeError(f"unexpected response: {data[:200]!r}")
        self.run.answered(self, answered)

    def writelines(self, pieces: list[bytes]) -> None:
        self.write(b"".join(pieces))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise RuntimeError("the gateway closed a client connection")

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Run:
    def __init__(self, loop: asyncio.AbstractEventLoop, total: int) -> None:
        self.loop = loop
        self.sent = 0
        self.done = 0
        self.total = total
        self.finished = loop.create_future()

    def send(self, client: Client) -> None:
        if self.sent < self.total:
            self.sent += 1
            self.loop.call_soon(client.conn.data_received, REQUEST)

    def answered(self, client: Client, count: int) -> None:
        self.done += count
        if self.done >= self.total:
            if not self.finished.done():
                self.finished.set_result(None)
            return
        self.send(client)


async def measure(pipeline: Pipeline, pools: UpstreamPools, snapshot: Any, n: int) -> float:
    loop = asyncio.get_running_loop()
    settings = ServerSettings()
    cluster = next(iter(snapshot.clusters.values()))
    pool = pools.pool_for(cluster.endpoints[0])
    while len(pool.idle) < CONNS:
        conn = UpstreamConnection(pool, settings.write_buffer_high_bytes)
        transport = UpstreamTransport(loop)
        transport.protocol = conn
        conn.connection_made(transport)  # type: ignore[arg-type]
        pool.put_idle(conn)
    run = Run(loop, n)
    clients = []
    for _ in range(CONNS):
        conn = HTTP1Connection(pipeline, settings, PORT, "http")
        client = Client(run, conn)
        conn.connection_made(client)  # type: ignore[arg-type]
        clients.append(client)
    started = time.process_time()
    for client in clients:
        run.send(client)
    await asyncio.wait_for(run.finished, 120)
    elapsed = time.process_time() - started
    for client in clients:
        timer = client.conn._idle_timer
        if timer is not None:
            timer.cancel()
    pipeline.access_log.flush()
    return elapsed / n * 1e6


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(CONFIG)
        snapshot = compile_snapshot(load_config([str(path)]), {"istio": "ingressgateway"})
    fd = os.open(os.devnull, os.O_WRONLY)
    pools = UpstreamPools()
    telemetry: dict[str, Any] = {}
    if TELEMETRY in ("1", "metrics"):
        telemetry["metrics"] = RequestMetrics()
    if TELEMETRY in ("1", "trace"):
        telemetry["tracing"] = TraceStage(0.01)
    pipeline = Pipeline(SnapshotRef(snapshot), pools, AccessLog("json", fd), **telemetry)
    await measure(pipeline, pools, snapshot, WARMUP)
    if PROFILE:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        await measure(pipeline, pools, snapshot, N)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(int(os.environ.get("TOP", "30")))
        return
    results = []
    for index in range(ROUNDS):
        us = await measure(pipeline, pools, snapshot, N)
        results.append(us)
        print(f"round {index + 1}: {us:.2f} us/request", flush=True)
    print(
        f"median: {statistics.median(results):.2f} us/request, "
        f"best: {min(results):.2f} (N={N}, conns={CONNS})"
    )


if __name__ == "__main__":
    uvloop.run(main())
