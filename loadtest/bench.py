#!/usr/bin/env python3
"""meshgate beside nginx: the benchmark behind ``make bench`` and docs/benchmarks.md.

One driver for every scenario. It starts, all on 127.0.0.1 on free ports, pinned with
taskset (``PROXY_CORE`` for the proxies under test, ``LOAD_CORE`` for the load
generators and the backend):

    backend    nginx, 1 worker, the same 100-byte 200 answer to every request
    nginx-*    nginx as the peer of each scenario where it has an equivalent
               (loadtest/nginx/*.conf: plain proxy, TLS + HTTP/2, limit_req, 2 workers)
    mg-*       ``meshgate run`` on a generated configuration per kind of gateway
               (loadtest/bench_configs.py), 1 worker unless the scenario says 2,
               access log on (to /dev/null), metrics and tracing as by default
    redis      redis-server, when a scenario uses the Redis limiter

then ROUNDS interleaved rounds: in each, every selected run once (the order reversed
every other round, so no target always runs on a warmer machine), each a short
discarded warm-up and DUR seconds of load. Per run: requests/s, p50/p99 latency, the
target's CPU time per request (utime+stime of its whole process tree from /proc,
read before and after) and its peak RSS while the load runs (sampled every 100 ms).
The report takes medians across rounds; every ratio is computed within a round (both
sides measured seconds apart), then the median of those ratios is taken. It prints a
markdown report (machine facts, the table, the targets with pass/fail) and appends
it to docs/benchmarks.md; raw JSON lines go to loadtest/results/. Every process
started here is stopped by PID at the end, on error and on Ctrl-C or SIGTERM.

Environment (``make bench`` passes its variables on): DUR (6), ROUNDS (3), SCENARIOS
(comma list; default: every scenario marked default below), NO_DOC=1 (print only),
PROXY_CORE (0), LOAD_CORE (1), TARGET_CMD (run this instead of ``meshgate run``, to
measure another build; ``{python}``, ``{config_dir}``, ``{admin_port}``,
``{workers}``, ``{redis_url}``, ``{port}`` and ``{backend_port}`` are filled in).
``--list`` prints the scenarios.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_configs import (  # noqa: E402  (scripts beside this one, run as files)
    KID,
    hosts_script,
    mint_tokens,
    tokens_script,
    write_config,
)
from harness import (  # noqa: E402
    RESULTS,
    ROOT,
    TICKS_PER_S,
    Processes,
    cpu_ticks,
    free_port,
    free_tcp_udp_port,
    load_average,
    log,
    machine_facts,
    mint_certificate,
    process_tree,
    render,
    rss_kb,
    signing_key,
    start_redis,
    wait_http_ok,
)

DOC = ROOT / "docs" / "benchmarks.md"
DUR = int(os.environ.get("DUR") or 6)
ROUNDS = int(os.environ.get("ROUNDS") or 3)
WANTED = [s.strip() for s in (os.environ.get("SCENARIOS") or "").split(",") if s.strip()]
PROXY_CORE = os.environ.get("PROXY_CORE") or "0"
LOAD_CORE = os.environ.get("LOAD_CORE") or ("1" if (os.cpu_count() or 1) > 1 else "0")
BOTH_CORES = PROXY_CORE if PROXY_CORE == LOAD_CORE else f"{PROXY_CORE},{LOAD_CORE}"
TARGET_CMD = os.environ.get("TARGET_CMD") or ""
WARMUP_S = 1
VHOSTS = (10, 10_000)
COLD_TOKENS = 12_000  # more than the gateway's 10 000-entry verified-token cache
H2_CLIENTS, H2_STREAMS = 50, 10


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class Server:
    """One process a run sends load to."""

    name: str
    software: str  # "meshgate" | "nginx"
    kind: str  # meshgate: a bench_configs kind; nginx: a loadtest/nginx template name
    tls: bool = False
    workers: int = 1
    limiter: str = "local"
    vhosts: int = 0
    ready_host: str = "bench"


SERVERS = {
    s.name: s
    for s in (
        Server("backend", "nginx", "backend"),
        Server("nginx", "nginx", "proxy"),
        Server("nginx-tls", "nginx", "proxy-tls", tls=True),
        Server("nginx-limit", "nginx", "proxy-limit"),
        Server("nginx-w2", "nginx", "proxy", workers=2),
        Server("mg-plain", "meshgate", "plain"),
        Server("mg-tls", "meshgate", "tls", tls=True),
        # The same gateway for the HTTP/3 run alone: a worker loads its HTTP/3 stack
        # with the first QUIC datagram, and mg-tls's memory figures are for a worker
        # whose clients speak TCP only.
        Server("mg-h3", "meshgate", "tls", tls=True),
        Server("mg-edge", "meshgate", "edge"),
        Server("mg-edge-redis", "meshgate", "edge", limiter="redis"),
        Server("mg-rl-local", "meshgate", "ratelimit"),
        Server("mg-rl-redis", "meshgate", "ratelimit", limiter="redis"),
        Server("mg-vs10", "meshgate", "vhosts", vhosts=VHOSTS[0], ready_host="svc0.bench.local"),
        Server("mg-vs10k", "meshgate", "vhosts", vhosts=VHOSTS[1], ready_host="svc0.bench.local"),
        Server("mg-w2", "meshgate", "plain", workers=2),
    )
}


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Run:
    """One measurement, repeated in every round."""

    key: str  # "<scenario>/<label>"
    target: str  # what the table calls it: meshgate, nginx, direct
    server: str
    load: str = "wrk"  # wrk | h2load | h3load
    conns: int = 50
    header: str = ""  # a request header (wrk -H): "token" stands for the hot JWT
    script: str = ""  # a wrk Lua script prepared at start-up: hosts10, hosts10000, tokens
    close: bool = False  # "Connection: close": a new connection (and handshake) per request
    ref: str = ""  # the run this one's ratio of requests/s is taken to
    ref_label: str = ""  # how the table names that reference
    needs: tuple[str, ...] = ()  # other runs a target compares this one with


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    runs: tuple[Run, ...]
    nginx_note: str = ""  # why nginx has no row, when it has none
    default: bool = True


def _pair(name: str, nginx: str, meshgate: str, **load: Any) -> tuple[Run, ...]:
    return (
        Run(f"{name}/nginx", "nginx", nginx, **load),
        Run(
            f"{name}/meshgate", "meshgate", meshgate, ref=f"{name}/nginx", ref_label="nginx", **load
        ),
    )


SCENARIOS = (
    Scenario("plain", "HTTP/1.1 proxy, wrk -c50", _pair("plain", "nginx", "mg-plain")),
    Scenario(
        "latency",
        "one connection (wrk -c1): the backend directly, then through each proxy",
        (
            # No ratio here: at one connection the figure is the latency itself, and
            # the target takes the p50 over the direct path's in the same round.
            Run("latency/direct", "direct", "backend", conns=1),
            Run("latency/nginx", "nginx", "nginx", conns=1),
            Run("latency/meshgate", "meshgate", "mg-plain", conns=1, needs=("latency/direct",)),
        ),
    ),
    Scenario("https", "HTTPS, HTTP/1.1, wrk -c50", _pair("https", "nginx-tls", "mg-tls")),
    Scenario(
        "handshakes",
        "TLS handshakes: wrk -c50 with `Connection: close`, a full handshake per request",
        _pair("handshakes", "nginx-tls", "mg-tls", close=True),
    ),
    Scenario(
        "h2tls",
        f"HTTP/2 over TLS, h2load -c{H2_CLIENTS} -m{H2_STREAMS}",
        _pair("h2tls", "nginx-tls", "mg-tls", load="h2load"),
    ),
    Scenario(
        "h3",
        f"HTTP/3, loadtest/h3load.py {H2_CLIENTS} connections x {H2_STREAMS} streams",
        (
            Run(
                "h3/meshgate",
                "meshgate",
                "mg-h3",
                load="h3load",
                ref="h2tls/meshgate",
                ref_label="meshgate HTTP/2",
            ),
        ),
        nginx_note="n/a: Debian's nginx has no HTTP/3; compared with meshgate's own HTTP/2",
    ),
    Scenario(
        "edge",
        "full edge pipeline: JWT RS256 (hot token cache) + AuthorizationPolicy + local "
        "rate limit + access log + metrics",
        (
            Run(
                "edge/meshgate",
                "meshgate",
                "mg-edge",
                header="token",
                ref="plain/nginx",
                ref_label="nginx plain",
            ),
        ),
        nginx_note="n/a: stock nginx does not validate JWTs; compared with nginx's plain proxy",
    ),
    Scenario(
        "edge-redis",
        "the edge pipeline with the Redis limiter",
        (
            Run(
                "edge-redis/meshgate",
                "meshgate",
                "mg-edge-redis",
                header="token",
                ref="plain/nginx",
                ref_label="nginx plain",
            ),
        ),
        nginx_note="n/a: no JWT, no shared limiter in stock nginx; compared with nginx plain",
    ),
    Scenario(
        "ratelimit-local",
        "a local rate limit on every request (nginx: a limit_req zone)",
        (
            Run(
                "ratelimit-local/nginx",
                "nginx",
                "nginx-limit",
                ref="plain/nginx",
                ref_label="nginx plain",
            ),
            Run(
                "ratelimit-local/meshgate",
                "meshgate",
                "mg-rl-local",
                ref="plain/meshgate",
                ref_label="meshgate plain",
            ),
        ),
    ),
    Scenario(
        "ratelimit-redis",
        "a Redis rate limit on every request, at 50 connections and at 1",
        (
            Run(
                "ratelimit-redis/meshgate",
                "meshgate",
                "mg-rl-redis",
                ref="plain/meshgate",
                ref_label="meshgate plain",
            ),
            Run(
                "ratelimit-redis/meshgate-c1",
                "meshgate",
                "mg-rl-redis",
                conns=1,
                needs=("latency/meshgate",),
            ),
        ),
        nginx_note="n/a: stock nginx has no shared (Redis) limiter",
    ),
    Scenario(
        "routes",
        f"{VHOSTS[0]:,} vs {VHOSTS[1]:,} VirtualServices (one host each, wrk cycles the hosts)",
        (
            Run("routes/meshgate-10", "meshgate", "mg-vs10", script=f"hosts{VHOSTS[0]}"),
            Run(
                "routes/meshgate-10000",
                "meshgate",
                "mg-vs10k",
                script=f"hosts{VHOSTS[1]}",
                ref="routes/meshgate-10",
                ref_label=f"{VHOSTS[0]} VirtualServices",
            ),
        ),
        nginx_note="n/a: not measured for nginx",
    ),
    Scenario(
        "workers2",
        f"2 workers on cores {BOTH_CORES} (the load generator and backend share them)",
        (
            Run(
                "workers2/nginx", "nginx", "nginx-w2", ref="plain/nginx", ref_label="nginx 1 worker"
            ),
            Run(
                "workers2/meshgate",
                "meshgate",
                "mg-w2",
                ref="plain/meshgate",
                ref_label="meshgate 1 worker",
            ),
        ),
    ),
    Scenario(
        "jwt-cold",
        f"the edge pipeline with {COLD_TOKENS:,} tokens cycled: a signature check per request",
        (
            Run(
                "jwt-cold/meshgate",
                "meshgate",
                "mg-edge",
                script="tokens",
                ref="edge/meshgate",
                ref_label="meshgate edge (hot)",
            ),
        ),
        nginx_note="n/a",
        default=False,
    ),
)
BY_NAME = {s.name: s for s in SCENARIOS}
ALL_RUNS = {run.key: run for s in SCENARIOS for run in s.runs}


def select(wanted: list[str]) -> tuple[list[Scenario], list[Run]]:
    """The scenarios asked for, and every run they need (their references included)."""
    unknown = [w for w in wanted if w not in BY_NAME]
    if unknown:
        raise SystemExit(
            f"bench: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}"
        )
    scenarios = [s for s in SCENARIOS if (s.name in wanted if wanted else s.default)]
    keys: list[str] = []
    for run in (run for s in scenarios for run in s.runs):
        # A reference is measured for the comparison alone: its own reference is not
        # brought in (h3 needs meshgate's HTTP/2, not nginx's).
        for key in (run.key, *([run.ref] if run.ref else []), *run.needs):
            if key not in keys:
                keys.append(key)
    order = list(ALL_RUNS)
    return scenarios, [ALL_RUNS[k] for k in sorted(keys, key=order.index)]


# --------------------------------------------------------------------------- start-up


@dataclass
class Setup:
    procs: Processes
    ports: dict[str, int] = field(default_factory=dict)
    scripts: dict[str, Path] = field(default_factory=dict)
    token: str = ""
    idle_rss_mb: dict[str, float] = field(default_factory=dict)


def _nginx_argv(scratch: Path, server: Server, values: dict[str, str]) -> list[str]:
    config = scratch / f"{server.name}.conf"
    config.write_text(render(HERE / "nginx" / f"{server.kind}.conf", values))
    # -e: nginx opens its default error log before reading the config; point it at
    # the scratch directory so nothing is written outside it.
    error_log = str(scratch / f"{server.name}.err")
    return ["nginx", "-p", str(scratch), "-e", error_log, "-c", str(config), "-g", "daemon off;"]


def _meshgate_argv(
    config_dir: Path, server: Server, redis_url: str, port: int, backend_port: int
) -> list[str]:
    admin_port = str(free_port())
    if TARGET_CMD:
        return shlex.split(
            TARGET_CMD.format(
                python=sys.executable,
                config_dir=config_dir,
                admin_port=admin_port,
                workers=server.workers,
                redis_url=redis_url,
                port=port,
                backend_port=backend_port,
            )
        )
    argv = [sys.executable, "-m", "gateway.cli", "run", str(config_dir)]
    argv += ["--workers", str(server.workers), "--admin-port", admin_port]
    if redis_url:
        argv += ["--redis-url", redis_url]
    return argv


def start(procs: Processes, runs: list[Run]) -> Setup:
    scratch = procs.scratch
    setup = Setup(procs)
    names = ["backend", *dict.fromkeys(run.server for run in runs if run.server != "backend")]
    servers = [SERVERS[name] for name in names]
    certs = scratch / "certs"
    certs.mkdir()
    mint_certificate(certs)
    jwks = signing_key(scratch, "jwt", "RS256", KID)
    key_pem = (scratch / "jwt.pem").read_bytes()
    setup.token = mint_tokens(key_pem, 1)[0]
    redis_url = ""
    if any(s.limiter == "redis" for s in servers):
        redis_url = start_redis(procs, LOAD_CORE)
    for script in {run.script for run in runs if run.script}:
        if script.startswith("hosts"):
            count = int(script[len("hosts") :])
            setup.scripts[script] = hosts_script(scratch / f"{script}.lua", count)
        elif script == "tokens":
            log(f"bench: minting {COLD_TOKENS:,} RS256 tokens for jwt-cold")
            tokens = scratch / "tokens.txt"
            tokens.write_text("\n".join(mint_tokens(key_pem, COLD_TOKENS)) + "\n")
            setup.scripts[script] = tokens_script(scratch / "tokens.lua", tokens)
    for server in servers:
        port = free_tcp_udp_port() if server.tls else free_port()
        setup.ports[server.name] = port
        core = PROXY_CORE if server.name != "backend" else LOAD_CORE
        if server.workers > 1:
            core = BOTH_CORES
        if server.software == "nginx":
            values = {
                "DIR": str(scratch),
                "NAME": server.name,
                "WORKERS": str(server.workers),
                "BACKEND_PORT": str(setup.ports["backend"]),
                "PROXY_PORT": str(port),
                "CERT_DIR": str(certs),
            }
            process = procs.start(server.name, _nginx_argv(scratch, server, values), core)
        else:
            config_dir = scratch / server.name
            write_config(
                config_dir,
                server.kind,
                port,
                setup.ports["backend"],
                certs=certs,
                jwks=jwks,
                limiter=server.limiter,
                vhosts=server.vhosts,
            )
            redis = redis_url if server.limiter == "redis" else ""
            argv = _meshgate_argv(config_dir, server, redis, port, setup.ports["backend"])
            # The access log stays on, as in production, but goes to /dev/null: a
            # terminal or file would measure the disk instead.
            process = procs.start(server.name, argv, core, stdout=subprocess.DEVNULL)
        log(f"bench: starting {server.name} on port {port} (cores {core})")
        if server.kind == "edge":
            # The edge gateways refuse requests without a token (AuthorizationPolicy).
            _wait_with_token(port, process, server.name, setup.token)
        else:
            # 10 000 VirtualServices take a while to load (≈ 16 s of CPU for the YAML).
            timeout_s = 60 + server.vhosts / 100
            wait_http_ok(
                port,
                process,
                server.name,
                host=server.ready_host,
                tls=server.tls,
                timeout_s=timeout_s,
            )
        if server.software == "meshgate":
            setup.idle_rss_mb[server.name] = _largest_rss_mb(process.pid)
    return setup


def _wait_with_token(port: int, process: subprocess.Popen[bytes], name: str, token: str) -> None:
    import socket

    deadline = time.monotonic() + 60
    request = (
        f"GET / HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(request)
                last = sock.recv(65536).split(b"\r\n", 1)[0].decode("latin-1")
            if re.match(r"HTTP/1\.[01] 200 ", last):
                return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)  # polling a port: there is nothing to block on
    raise RuntimeError(f"{name} on port {port} did not answer 200 with a token (last: {last})")


# --------------------------------------------------------------------------- load


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _to_ms(token: str) -> float | None:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", token)
    return float(match.group(1)) * _UNIT_MS[match.group(2)] if match else None


def _communicate(argv: list[str], timeout_s: float) -> tuple[int, str, str]:
    # Its own process group, so that an interrupted run takes the load generator
    # down with it instead of leaving it running as an orphan.
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=timeout_s)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return process.returncode, out, err


def run_wrk(run: Run, setup: Setup, port: int, duration_s: int) -> dict[str, Any]:
    server = SERVERS[run.server]
    argv = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{run.conns}", f"-d{duration_s}s"]
    argv += ["--latency", "--timeout", "5s"]
    if run.header == "token":
        argv += ["-H", f"Authorization: Bearer {setup.token}"]
    if run.close:
        argv += ["-H", "Connection: close"]
    if run.script:
        argv += ["-s", str(setup.scripts[run.script])]
    argv.append(f"{'https' if server.tls else 'http'}://127.0.0.1:{port}/")
    code, out, err = _communicate(argv, duration_s + 30)
    result: dict[str, Any] = {"load_exit": code}
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result["rps"] = float(match.group(1)) if match else 0.0
    match = re.search(r"(\d+) requests in", out)
    result["requests"] = int(match.group(1)) if match else 0
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}(?:\.0+)?%\s+(\S+)", out, re.M)
        result[f"p{pct}_ms"] = _to_ms(match.group(1)) if match else None
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = int(match.group(1)) if match else 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if match:
        counts = [int(g) for g in match.groups()]
        # With "Connection: close" the server closing after each answer is the point,
        # and wrk counts such a close as a read error: only the others count then.
        result["socket_errors"] = sum(counts) - (counts[1] if run.close else 0)
        result["errors"] += result["socket_errors"]
    if code != 0:
        result["errors"] += 1
        result["stderr"] = err[-500:]
    return result


def run_h2load(run: Run, setup: Setup, port: int, duration_s: int) -> dict[str, Any]:
    request_log = setup.procs.scratch / "h2load.log"
    argv = ["taskset", "-c", LOAD_CORE, "h2load", "-t1", f"-c{H2_CLIENTS}", f"-m{H2_STREAMS}"]
    argv += [f"-D{duration_s}", "--warm-up-time=1", f"--log-file={request_log}"]
    argv.append(f"https://127.0.0.1:{port}/")
    code, out, err = _communicate(argv, duration_s + 60)
    match = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    failed = re.search(
        r"requests: \d+ total, \d+ started, \d+ done, \d+ succeeded, (\d+) failed", out
    )
    durations = []
    if request_log.exists():
        for line in request_log.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                durations.append(int(parts[2]) / 1000.0)  # microseconds -> ms
        request_log.unlink()
    durations.sort()
    ok = int(status.group(1)) if status else 0
    errors = sum(int(g) for g in status.groups()[1:]) if status else 1
    errors += int(failed.group(1)) if failed else 0
    return {
        "rps": float(match.group(1)) if match else 0.0,
        "requests": ok,
        "p50_ms": durations[len(durations) // 2] if durations else None,
        "p99_ms": durations[int(len(durations) * 0.99)] if durations else None,
        "errors": errors + (1 if code != 0 else 0),
        "load_exit": code,
        **({"stderr": err[-500:]} if code != 0 else {}),
    }


def run_h3load(run: Run, setup: Setup, port: int, duration_s: int) -> dict[str, Any]:
    argv = ["taskset", "-c", LOAD_CORE, sys.executable, str(HERE / "h3load.py")]
    argv += ["--port", str(port), "--host", "localhost", "--duration-s", str(duration_s)]
    argv += ["--connections", str(H2_CLIENTS), "--streams", str(H2_STREAMS)]
    argv += ["--requests", "100000000", "--timeout-s", str(duration_s + 30)]
    code, out, _err = _communicate(argv, duration_s + 60)
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"rps": 0.0, "requests": 0, "p50_ms": None, "p99_ms": None, "errors": 1}
    return {
        "rps": result["rps"],
        "requests": result["requests"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "errors": result["errors"],
        "load_exit": code,
        "client_cpu_s": result.get("client_cpu_s"),
    }


LOADS: dict[str, Callable[[Run, Setup, int, int], dict[str, Any]]] = {
    "wrk": run_wrk,
    "h2load": run_h2load,
    "h3load": run_h3load,
}


def _largest_rss_mb(root: int) -> float:
    return max((rss_kb(pid) for pid in process_tree(root)), default=0) / 1024.0


class _PeakRss:
    """The peak RSS of a process tree while a load runs, sampled every 100 ms on a
    thread: "under load" means during the run, not after it, when the connections
    have closed and the gateway may already have given memory back."""

    INTERVAL_S = 0.1

    def __init__(self, root: int) -> None:
        self.root = root
        self.tree_kb = 0  # the whole tree (workers and their parent)
        self.worker_kb = 0  # the largest single process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> _PeakRss:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        sizes = [rss_kb(pid) for pid in process_tree(self.root)]
        self.tree_kb = max(self.tree_kb, sum(sizes))
        self.worker_kb = max(self.worker_kb, max(sizes, default=0))


def measure(run: Run, setup: Setup, duration_s: int) -> dict[str, Any]:
    """One run of ``run``'s load, with the CPU time its target's tree spent on it and
    the tree's peak RSS during the run."""
    port = setup.ports[run.server]
    root = setup.procs.pid(run.server)
    load = LOADS[run.load]
    if run.load == "wrk":
        load(run, setup, port, WARMUP_S)  # discarded: connections and pools warm up
    pids = process_tree(root)
    before = {pid: cpu_ticks(pid) for pid in pids}
    started = time.monotonic()
    with _PeakRss(root) as peak:
        result = load(run, setup, port, duration_s)
    result["wall_s"] = round(time.monotonic() - started, 3)
    ticks = sum(cpu_ticks(pid) - before[pid] for pid in pids)
    requests = result.get("requests") or 0
    result["cpu_ms_per_req"] = ticks / TICKS_PER_S * 1000 / requests if requests else None
    result["rss_mb"] = round(peak.tree_kb / 1024, 1)
    result["rss_worker_mb"] = round(peak.worker_kb / 1024, 1)
    return result


# --------------------------------------------------------------------------- report


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


class Results:
    """Every run's raw figures, and the medians and ratios the report shows."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def of(self, key: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["key"] == key]

    def median(self, key: str, field_name: str) -> float | None:
        return _median(r.get(field_name) for r in self.of(key))

    def per_round(
        self, key: str, ref: str, combine: Callable[[dict[str, Any], dict[str, Any]], float | None]
    ) -> float | None:
        """Median over rounds of ``combine(this round's run, its reference's)``."""
        refs = {r["round"]: r for r in self.of(ref)}
        values = []
        for record in self.of(key):
            peer = refs.get(record["round"])
            if peer is not None:
                values.append(combine(record, peer))
        return _median(values)

    def ratio(self, key: str, ref: str) -> float | None:
        def rps_ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
            return a["rps"] / b["rps"] if a.get("rps") and b.get("rps") else None

        return self.per_round(key, ref, rps_ratio)

    def cpu_ratio(self, key: str, ref: str) -> float | None:
        """Requests per CPU second of ``key`` over ``ref``'s: what the two could
        serve with their core saturated, when a load generator, not the gateway,
        limits the measured rps (the Python HTTP/3 client does)."""

        def per_cpu(a: dict[str, Any], b: dict[str, Any]) -> float | None:
            mine, theirs = a.get("cpu_ms_per_req"), b.get("cpu_ms_per_req")
            return theirs / mine if mine and theirs else None

        return self.per_round(key, ref, per_cpu)

    def added_ms(self, key: str, ref: str, field_name: str) -> float | None:
        def difference(a: dict[str, Any], b: dict[str, Any]) -> float | None:
            if a.get(field_name) is None or b.get(field_name) is None:
                return None
            return a[field_name] - b[field_name]

        return self.per_round(key, ref, difference)

    def errors(self, key: str) -> int:
        return sum(int(r.get("errors") or 0) for r in self.of(key))


@dataclass(frozen=True)
class Target:
    """One line of the issue's targets: what is measured, the goal, pass or fail."""

    name: str
    needs: tuple[str, ...]  # run keys
    measure: Callable[[Results], float | None]
    goal: str
    ok: Callable[[float], bool]
    unit: str = "x"
    digits: int = 2


def _ratio(key: str, ref: str) -> Callable[[Results], float | None]:
    return lambda results: results.ratio(key, ref)


def _at_least(key: str, ref: str, name: str, floor: float, goal: str = "") -> Target:
    """A throughput ratio target: ``key``'s rps over ``ref``'s, at least ``floor``."""
    return Target(name, (key, ref), _ratio(key, ref), goal or f"≥ {floor:g}", lambda v: v >= floor)


TARGETS = (
    _at_least("plain/meshgate", "plain/nginx", "plain HTTP/1.1 vs nginx", 0.5),
    Target(
        "gateway CPU per plain request",
        ("plain/meshgate",),
        lambda r: r.median("plain/meshgate", "cpu_ms_per_req"),
        "≤ 0.05 ms",
        lambda v: v <= 0.05,
        " ms",
        4,
    ),
    Target(
        "added latency at 1 connection, p50 over the direct path",
        ("latency/meshgate", "latency/direct"),
        lambda r: r.added_ms("latency/meshgate", "latency/direct", "p50_ms"),
        "≤ 0.15 ms",
        lambda v: v <= 0.15,
        " ms",
        3,
    ),
    _at_least("https/meshgate", "https/nginx", "HTTPS HTTP/1.1 vs nginx", 0.5),
    _at_least("h2tls/meshgate", "h2tls/nginx", "HTTP/2 over TLS vs nginx", 0.3),
    _at_least("h3/meshgate", "h2tls/meshgate", "HTTP/3 vs meshgate's HTTP/2", 0.5),
    Target(
        "HTTP/3 vs meshgate's HTTP/2, requests per gateway CPU second",
        ("h3/meshgate", "h2tls/meshgate"),
        lambda r: r.cpu_ratio("h3/meshgate", "h2tls/meshgate"),
        "≥ 0.5",
        lambda v: v >= 0.5,
    ),
    _at_least("edge/meshgate", "plain/nginx", "edge pipeline vs nginx plain proxy", 0.35),
    _at_least(
        "edge-redis/meshgate",
        "plain/nginx",
        "edge pipeline with the Redis limiter vs nginx plain proxy",
        0.25,
    ),
    _at_least(
        "ratelimit-local/meshgate",
        "plain/meshgate",
        "local limiter: throughput kept vs no limit",
        0.97,
        "≥ 0.97 (< 3 % cost)",
    ),
    _at_least(
        "ratelimit-redis/meshgate",
        "plain/meshgate",
        "Redis limiter: throughput kept vs no limit",
        0.6,
    ),
    Target(
        "Redis limiter: added p99 at 1 connection",
        ("ratelimit-redis/meshgate-c1", "latency/meshgate"),
        lambda r: r.added_ms("ratelimit-redis/meshgate-c1", "latency/meshgate", "p99_ms"),
        "< 1 ms",
        lambda v: v < 1.0,
        " ms",
        3,
    ),
    _at_least(
        "routes/meshgate-10000",
        "routes/meshgate-10",
        f"{VHOSTS[1]:,} VirtualServices vs {VHOSTS[0]}",
        0.9,
    ),
    _at_least("workers2/meshgate", "plain/meshgate", "--workers 2 vs one worker", 1.7),
)


# The runs the RSS target looks at: every protocol and the edge pipeline, not the
# 10 000-VirtualService gateway, whose memory is its configuration's size.
RSS_KEYS = (
    "plain/meshgate",
    "https/meshgate",
    "h2tls/meshgate",
    "h3/meshgate",
    "edge/meshgate",
    "edge-redis/meshgate",
    "workers2/meshgate",
)


def _rss_target(results: Results, runs: list[Run]) -> tuple[str, float | None]:
    """The run whose largest process had the most memory, and that figure (MB)."""
    keys = [run.key for run in runs if run.key in RSS_KEYS]
    present = [(results.median(key, "rss_worker_mb"), key) for key in keys]
    measured = [(value, key) for value, key in present if value is not None]
    if not measured:
        return "", None
    value, key = max(measured)
    return key, value


def table(results: Results, scenarios: list[Scenario], runs: list[Run]) -> list[str]:
    lines = [
        "| scenario | target | load | rps | p50 ms | p99 ms | CPU ms/req | RSS MB "
        "| ratio | to | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    selected = {run.key for run in runs}
    shown = [s for s in SCENARIOS if s in scenarios or any(r.key in selected for r in s.runs)]
    for scenario in shown:
        if scenario.nginx_note:
            cells = [scenario.name, "nginx", "—", scenario.nginx_note] + [""] * 7
            lines.append("| " + " | ".join(cells) + " |")
        for run in scenario.runs:
            if run.key not in selected:
                continue
            load = {"wrk": f"wrk -c{run.conns}", "h2load": "h2load", "h3load": "h3load"}[run.load]
            label = run.key.split("/", 1)[1]
            ratio = results.ratio(run.key, run.ref) if run.ref else None
            lines.append(
                f"| {scenario.name} | {label} | {load} "
                f"| {_fmt(results.median(run.key, 'rps'), 0)} "
                f"| {_fmt(results.median(run.key, 'p50_ms'), 3)} "
                f"| {_fmt(results.median(run.key, 'p99_ms'), 3)} "
                f"| {_fmt(results.median(run.key, 'cpu_ms_per_req'), 4)} "
                f"| {_fmt(results.median(run.key, 'rss_mb'), 1)} "
                f"| {_fmt(ratio, 2) if run.ref else ''} | {run.ref_label} "
                f"| {results.errors(run.key)} |"
            )
    return lines


def targets_table(results: Results, runs: list[Run], setup: Setup | None) -> list[str]:
    selected = {run.key for run in runs}
    lines = ["| target | measured | goal | met |", "|---|---:|---|---|"]
    for target in TARGETS:
        if not all(key in selected for key in target.needs):
            continue
        value = target.measure(results)
        errors = sum(results.errors(key) for key in target.needs)
        if value is None:
            verdict, shown = "no figure", "—"
        else:
            verdict = "pass" if target.ok(value) else "**FAIL**"
            shown = f"{value:.{target.digits}f}{target.unit}"
        if errors:
            verdict += f" (not valid: {errors} errors)"
        lines.append(f"| {target.name} | {shown} | {target.goal} | {verdict} |")
    key, worst = _rss_target(results, runs)
    if worst is not None:
        verdict = "pass" if worst <= 60 else "**FAIL**"
        lines.append(
            f"| RSS per worker under load (largest: {key}) | {worst:.1f} MB | ≤ 60 MB | {verdict} |"
        )
    if setup is not None and setup.idle_rss_mb:
        idle = ", ".join(f"{name} {mb:.1f}" for name, mb in setup.idle_rss_mb.items())
        lines += ["", f"RSS idle (MB, per worker, before any load): {idle}."]
    return lines


def command_line() -> str:
    settings = [f"{k}={os.environ[k]}" for k in ("SCENARIOS", "DUR", "ROUNDS") if os.environ.get(k)]
    if TARGET_CMD:
        settings.append(f"TARGET_CMD={shlex.quote(TARGET_CMD)}")
    return " ".join(["make bench", *settings])


def report(
    results: Results,
    scenarios: list[Scenario],
    runs: list[Run],
    setup: Setup | None,
    load_before: str,
) -> str:
    facts = machine_facts()
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### Run of {now}",
        "",
        f"- command: `{command_line()}` (DUR={DUR} s per run, ROUNDS={ROUNDS}, "
        f"{WARMUP_S} s warm-up discarded per run; scenarios: "
        f"{', '.join(s.name for s in scenarios)})",
        f"- machine: {facts['nproc']} cores, {facts['cpu']}, Linux {facts['kernel']}; "
        f"1-minute load average {load_before} before the run, {load_average()} after",
        f"- software: Python {facts['python']}, uvloop {facts['uvloop']}, aioquic "
        f"{facts['aioquic']}, nginx {facts['nginx']}, wrk {facts['wrk']}, h2load "
        f"{facts['h2load']}, meshgate commit {facts['commit']}",
        f"- pinning: the proxies on core {PROXY_CORE} (2-worker runs on {BOTH_CORES}); "
        f"load generators, backend and Redis on core {LOAD_CORE}",
        *(
            [f"- the `meshgate` rows measure `TARGET_CMD`, not `meshgate run`: `{TARGET_CMD}`"]
            if TARGET_CMD
            else []
        ),
        "",
        *table(results, scenarios, runs),
        "",
        "Targets:",
        "",
        *targets_table(results, runs, setup),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _list() -> None:
    for scenario in SCENARIOS:
        mark = "" if scenario.default else " (not in the default set)"
        print(f"{scenario.name:<16} {scenario.what}{mark}")


def main(argv: list[str]) -> int:
    if "--list" in argv:
        _list()
        return 0
    scenarios, runs = select(WANTED)
    tools = {"taskset", "nginx"} | {run.load for run in runs if run.load != "h3load"}
    if any(SERVERS[run.server].limiter == "redis" for run in runs):
        tools.add("redis-server")
    missing = sorted(tool for tool in tools if not shutil.which(tool))
    if missing:
        log(f"bench: {', '.join(missing)} must be on PATH (loadtest/bench.sh installs them)")
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    raw_path = RESULTS / f"bench-{stamp}.jsonl"
    scratch = Path(tempfile.mkdtemp(prefix="meshgate-bench-"))
    procs = Processes(scratch)
    records: list[dict[str, Any]] = []
    load_before = load_average()
    setup: Setup | None = None
    log(
        f"bench: {len(runs)} runs x {ROUNDS} rounds x ({DUR} s + warm-up): scenarios "
        f"{', '.join(s.name for s in scenarios)}"
    )
    try:
        setup = start(procs, runs)
        with raw_path.open("a") as raw:
            for rnd in range(1, ROUNDS + 1):
                log(f"== round {rnd}/{ROUNDS}")
                order = runs if rnd % 2 else list(reversed(runs))
                for index, run in enumerate(order, 1):
                    result = measure(run, setup, DUR)
                    result.update(key=run.key, round=rnd, dur_s=DUR)
                    raw.write(json.dumps(result) + "\n")
                    raw.flush()
                    records.append(result)
                    log(
                        f"  [{index}/{len(order)}] {run.key:<28} rps={result['rps']:>9.1f} "
                        f"p50={_fmt(result['p50_ms'], 3)} p99={_fmt(result['p99_ms'], 3)} "
                        f"cpu_ms/req={_fmt(result['cpu_ms_per_req'], 4)} "
                        f"rss={result['rss_mb']}MB errors={result['errors']}"
                    )
    except KeyboardInterrupt:
        log("bench: interrupted; stopping every process it started")
        procs.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)
        return 130
    except (RuntimeError, ValueError) as exc:
        log(f"bench: {exc}\n--- server log (last lines) ---\n{procs.tail_log()}")
        procs.stop_all()
        return 1
    finally:
        procs.stop_all()
    shutil.rmtree(scratch, ignore_errors=True)
    text = report(Results(records), scenarios, runs, setup, load_before)
    print(text)
    if os.environ.get("NO_DOC") != "1":
        with DOC.open("a") as doc:
            doc.write("\n" + text)
        log(f"appended to {DOC.relative_to(ROOT)}")
    log(f"raw results: {raw_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
