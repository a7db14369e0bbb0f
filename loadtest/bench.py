#!/usr/bin/env python3
"""meshgate beside nginx: the benchmark behind ``make bench`` and docs/benchmarks.md.

Starts, all on 127.0.0.1, on free ports, each pinned with taskset:

    backend   nginx, 1 worker, fixed 100-byte 200 response      core LOAD_CORE (1)
    nginx     nginx as reverse proxy, 1 worker, upstream keepalive  core PROXY_CORE (0)
    meshgate  ``meshgate run`` on a generated config (Gateway, ServiceEntry,
              VirtualService pointing at the backend), 1 worker, access log on,
              written to /dev/null                                core PROXY_CORE (0)

then ROUNDS interleaved rounds; in each, for each target, a short discarded warm-up and
wrk ``-t1 -c50`` and ``-t1 -c1`` runs of DUR seconds (wrk pinned to LOAD_CORE). Per run
it records requests/s, p50/p99 latency, the target's CPU time per request (utime+stime
of its whole process tree from /proc, read before and after) and its RSS. The report
takes medians across rounds; the ratio to nginx is computed within each round (both
measured minutes apart on the same machine), then the median of those ratios is taken.

Then it runs ``loadtest/bench_routing.py`` when present and includes its output.
The markdown report is printed and appended to docs/benchmarks.md; raw JSON lines go to
loadtest/results/. Every process started here is stopped by PID at the end, on error
and on Ctrl-C or SIGTERM.

Environment: DUR (10), ROUNDS (3), ONLY (comma list of nginx,meshgate),
PROXY_CORE (0), LOAD_CORE (1), NO_DOC=1 (do not append to docs/benchmarks.md),
TARGET_CMD (run this instead of ``meshgate run``, to measure another build; ``{port}``,
``{backend_port}``, ``{config_dir}`` and ``{python}`` are filled in).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = HERE / "results"
ROUTING_BENCH = HERE / "bench_routing.py"

DUR = int(os.environ.get("DUR", "10"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
ONLY = [t for t in os.environ.get("ONLY", "").split(",") if t]
PROXY_CORE = os.environ.get("PROXY_CORE", "0")
LOAD_CORE = os.environ.get("LOAD_CORE", "1" if (os.cpu_count() or 1) > 1 else "0")
TARGET_CMD = os.environ.get("TARGET_CMD", "")
WARMUP_S = 2
CONNECTIONS = (50, 1)
START_TIMEOUT_S = 30.0
TICKS_PER_S = os.sysconf("SC_CLK_TCK")

# The targets meshgate is held to (see docs/benchmarks.md).
TARGET_RPS_RATIO = 0.5  # of nginx's requests/s at 50 connections
TARGET_CPU_MS_PER_REQ = 0.05  # gateway CPU time per request at 50 connections


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc


def _parents() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant (a gateway's workers, nginx's worker)."""
    children = _parents()
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, ()))
    return tree


def cpu_ticks(pid: int) -> int:
    """utime + stime of all the process's threads, in clock ticks; 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------- processes


class Processes:
    """Everything this run started, each stopped by its own PID."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.log = (scratch / "servers.log").open("ab")

    def start(
        self, name: str, argv: list[str], core: str, *, stdout: int | None = None
    ) -> subprocess.Popen[bytes]:
        # A session of its own, so a Ctrl-C in the terminal reaches only this script,
        # which then stops everything in order (rather than racing the children).
        process = subprocess.Popen(
            ["taskset", "-c", core, *argv],
            stdout=self.log if stdout is None else stdout,
            stderr=self.log,
            cwd=ROOT,
            start_new_session=True,
        )
        self.started[name] = process
        return process

    def pid(self, name: str) -> int:
        return self.started[name].pid

    def stop_all(self) -> None:
        for name, process in list(self.started.items()):
            tree = process_tree(process.pid) if process.poll() is None else []
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    log(f"{name} (pid {process.pid}) ignored SIGTERM for 10 s; killing it")
            for pid in reversed(tree):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {process.pid}) still running after SIGKILL")
        self.started.clear()
        self.log.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http_ok(port: int, process: subprocess.Popen[bytes], name: str) -> None:
    """Bounded wait until GET / on ``port`` answers 200 (proving the route works)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                reply = sock.recv(65536)
            status = reply.split(b"\r\n", 1)[0].decode("latin-1", "replace")
            if re.match(r"HTTP/1\.[01] 200 ", status):
                return
            last = status or "empty reply"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)  # polling a port: there is nothing to block on
    raise RuntimeError(f"{name} on port {port} did not answer 200 in time (last: {last})")


def render(template: str, scratch: Path, values: dict[str, str]) -> Path:
    text = (HERE / "nginx" / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    path = scratch / template
    path.write_text(text)
    return path


def write_meshgate_config(config_dir: Path, port: int, backend_port: int) -> None:
    """The smallest Istio configuration that proxies every request to the backend."""
    config_dir.mkdir()
    (config_dir / "bench.yaml").write_text(
        f"""\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: bench
spec:
  selector:
    istio: ingressgateway
  servers:
    - port: {{number: {port}, name: http, protocol: HTTP}}
      hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: backend
spec:
  hosts: [backend.bench.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
    - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
    - address: 127.0.0.1
      ports: {{http: {backend_port}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bench
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
    )


def _nginx_argv(scratch: Path, role: str, values: dict[str, str]) -> list[str]:
    # -e: nginx opens its default error log before reading the config; point it at
    # the scratch directory so nothing is written outside it.
    config = render(f"{role}.conf", scratch, values)
    error_log = str(scratch / f"{role}.err")
    return ["nginx", "-p", str(scratch), "-e", error_log, "-c", str(config), "-g", "daemon off;"]


def start_servers(procs: Processes, targets: list[str]) -> dict[str, int]:
    scratch = procs.scratch
    ports = {"backend": free_port(), "nginx": free_port(), "meshgate": free_port()}
    values = {
        "DIR": str(scratch),
        "BACKEND_PORT": str(ports["backend"]),
        "PROXY_PORT": str(ports["nginx"]),
    }
    backend = procs.start("backend", _nginx_argv(scratch, "backend", values), LOAD_CORE)
    wait_http_ok(ports["backend"], backend, "backend")
    if "nginx" in targets:
        proxy = procs.start("nginx", _nginx_argv(scratch, "proxy", values), PROXY_CORE)
        wait_http_ok(ports["nginx"], proxy, "nginx")
    if "meshgate" in targets:
        config_dir = scratch / "meshgate-config"
        write_meshgate_config(config_dir, ports["meshgate"], ports["backend"])
        if TARGET_CMD:
            argv = shlex.split(
                TARGET_CMD.format(
                    port=ports["meshgate"],
                    backend_port=ports["backend"],
                    config_dir=config_dir,
                    python=sys.executable,
                )
            )
        else:
            argv = [sys.executable, "-m", "gateway.cli", "run", str(config_dir)]
            argv += ["--workers", "1", "--admin-port", str(free_port())]
        # The access log stays on, as in production, but goes to /dev/null: meshgate
        # writes it to stdout, and a terminal or file would measure the disk instead.
        gateway = procs.start("meshgate", argv, PROXY_CORE, stdout=subprocess.DEVNULL)
        wait_http_ok(ports["meshgate"], gateway, "meshgate")
    return ports


# --------------------------------------------------------------------------- load


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _to_ms(token: str) -> float | None:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", token)
    return float(match.group(1)) * _UNIT_MS[match.group(2)] if match else None


def run_wrk(port: int, connections: int, duration_s: int) -> dict[str, Any]:
    argv = ["taskset", "-c", LOAD_CORE, "timeout", str(duration_s + 30), "wrk", "-t1"]
    argv += [f"-c{connections}", f"-d{duration_s}s", "--latency", f"http://127.0.0.1:{port}/"]
    # Its own process group, so that an interrupted run takes wrk down with `timeout`
    # instead of leaving it running as an orphan.
    wrk = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = wrk.communicate()
    except BaseException:
        os.killpg(wrk.pid, signal.SIGKILL)
        wrk.wait()
        raise
    result: dict[str, Any] = {"conns": connections, "wrk_exit": wrk.returncode}
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result["rps"] = float(match.group(1)) if match else 0.0
    match = re.search(r"(\d+) requests in", out)
    result["requests"] = int(match.group(1)) if match else 0
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}(?:\.0+)?%\s+(\S+)", out, re.M)
        result[f"p{pct}_ms"] = _to_ms(match.group(1)) if match else None
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non2xx"] = int(match.group(1)) if match else 0
    match = re.search(r"Socket errors: (.*)", out)
    result["socket_errors"] = match.group(1).strip() if match else ""
    if wrk.returncode != 0:
        result["wrk_stderr"] = err[-500:]
    return result


def measure(root_pid: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``run()`` and charge the CPU time the target's process tree spent to it."""
    pids = process_tree(root_pid)
    before = {pid: cpu_ticks(pid) for pid in pids}
    started = time.monotonic()
    result = run()
    result["wall_s"] = round(time.monotonic() - started, 3)
    ticks = sum(cpu_ticks(pid) - before[pid] for pid in pids)
    result["cpu_s"] = ticks / TICKS_PER_S
    requests = result.get("requests") or 0
    result["cpu_ms_per_req"] = ticks / TICKS_PER_S * 1000 / requests if requests else None
    result["rss_mb"] = round(sum(rss_kb(pid) for pid in process_tree(root_pid)) / 1024, 1)
    return result


# --------------------------------------------------------------------------- report


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def summarize(results: list[dict[str, Any]], targets: list[str]) -> list[str]:
    """The markdown table: medians per target and connection count."""
    lines = [
        "| target | conns | rps | vs nginx | p50 ms | p99 ms | CPU ms/req | RSS MB "
        "| errors | target met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for target in targets:
        for conns in CONNECTIONS:
            runs = [r for r in results if r["target"] == target and r["conns"] == conns]
            if not runs:
                continue
            rps = _median(r["rps"] for r in runs)
            ratio = None
            nginx_runs = [r for r in results if r["target"] == "nginx" and r["conns"] == conns]
            if target != "nginx":
                per_round = []
                for run in runs:
                    peer = [r for r in nginx_runs if r["round"] == run["round"]]
                    if peer and peer[0]["rps"]:
                        per_round.append(run["rps"] / peer[0]["rps"])
                ratio = _median(per_round)
            cpu = _median(r["cpu_ms_per_req"] for r in runs)
            errors = sum(r["non2xx"] for r in runs) + sum(
                1 for r in runs if r["socket_errors"] or r["wrk_exit"] != 0
            )
            verdict = "—"
            if target == "meshgate" and conns == 50:
                ok_rps = ratio is not None and ratio >= TARGET_RPS_RATIO
                ok_cpu = cpu is not None and cpu <= TARGET_CPU_MS_PER_REQ
                verdict = f"rps {'pass' if ok_rps else 'FAIL'}, CPU {'pass' if ok_cpu else 'FAIL'}"
                if errors:
                    verdict += " (errors: not valid)"
            lines.append(
                f"| {target} | {conns} | {_fmt(rps, 0)} | {_fmt(ratio, 2)} "
                f"| {_fmt(_median(r['p50_ms'] for r in runs), 3)} "
                f"| {_fmt(_median(r['p99_ms'] for r in runs), 3)} | {_fmt(cpu, 4)} "
                f"| {_fmt(_median(r['rss_mb'] for r in runs), 1)} | {errors} | {verdict} |"
            )
    return lines


def _version(argv: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    match = re.search(pattern, done.stdout + done.stderr)
    return match.group(1) if match else "unknown"


def machine_facts() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "not installed"
    commit = _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], r"(\w+)")
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uvloop_version,
        "nginx": _version(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": _version(["wrk", "-v"], r"wrk (\S+)"),
        "commit": commit,
    }


def command_line() -> str:
    settings = [f"{k}={os.environ[k]}" for k in ("DUR", "ROUNDS", "ONLY") if k in os.environ]
    if TARGET_CMD:
        settings.append(f"TARGET_CMD={shlex.quote(TARGET_CMD)}")
    return " ".join([*settings, "make bench"])


def run_routing_bench() -> list[str]:
    if not ROUTING_BENCH.exists():
        reason = "skipped: loadtest/bench_routing.py is not in this checkout"
        log(f"routing benchmark {reason}")
        return [f"Routing benchmark {reason}."]
    log("== routing benchmark (loadtest/bench_routing.py)")
    argv = ["taskset", "-c", PROXY_CORE, "timeout", "600", sys.executable, str(ROUTING_BENCH)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
    lines = ["Routing benchmark (`loadtest/bench_routing.py`):", "", done.stdout.rstrip()]
    if done.returncode != 0:
        # It exits 1 when its own limits are missed; its table is still worth keeping.
        tail = done.stderr.strip().splitlines()[-8:]
        lines += ["", f"It exited with {done.returncode}:", "", "```", *tail, "```"]
    return lines


def load_average() -> str:
    """The 1-minute load average: anything well above 0 means neighbours shared the cores."""
    return Path("/proc/loadavg").read_text().split()[0]


def report(
    results: list[dict[str, Any]], targets: list[str], routing: list[str], load_before: str
) -> str:
    facts = machine_facts()
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### Run of {now}",
        "",
        f"- command: `{command_line()}` (DUR={DUR} s per run, ROUNDS={ROUNDS}, "
        f"wrk `-t1`, {WARMUP_S} s warm-up discarded)",
        f"- machine: {facts['nproc']} cores, {facts['cpu']}, Linux {facts['kernel']}; "
        f"1-minute load average {load_before} before the run",
        f"- software: Python {facts['python']}, uvloop {facts['uvloop']}, "
        f"nginx {facts['nginx']}, wrk {facts['wrk']}, meshgate commit {facts['commit']}",
        f"- pinning: nginx proxy and meshgate on core {PROXY_CORE}; wrk and the backend "
        f"on core {LOAD_CORE}",
        *(
            [f"- the `meshgate` rows measure `TARGET_CMD`, not `meshgate run`: `{TARGET_CMD}`"]
            if TARGET_CMD
            else []
        ),
        "",
        *summarize(results, targets),
        "",
        *routing,
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    if not shutil.which("nginx") or not shutil.which("wrk") or not shutil.which("taskset"):
        log("bench: nginx, wrk and taskset must be on PATH (loadtest/bench.sh installs them)")
        return 2
    targets = [t for t in ("nginx", "meshgate") if not ONLY or t in ONLY]
    if not targets:
        log(f"bench: ONLY={','.join(ONLY)} names no target; known: nginx, meshgate")
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    raw_path = RESULTS / f"bench-{stamp}.jsonl"
    scratch = Path(tempfile.mkdtemp(prefix="meshgate-bench-"))
    procs = Processes(scratch)
    results: list[dict[str, Any]] = []
    load_before = load_average()
    try:
        ports = start_servers(procs, targets)
        with raw_path.open("a") as raw:
            for rnd in range(1, ROUNDS + 1):
                log(f"== round {rnd}/{ROUNDS}")
                # Alternate the order so neither target always runs on a warmer machine.
                order = targets if rnd % 2 else list(reversed(targets))
                for target in order:
                    port = ports[target]
                    run_wrk(port, 50, WARMUP_S)
                    for conns in CONNECTIONS:
                        result = measure(
                            procs.pid(target), lambda p=port, c=conns: run_wrk(p, c, DUR)
                        )
                        result.update(target=target, round=rnd, dur_s=DUR)
                        raw.write(json.dumps(result) + "\n")
                        raw.flush()
                        results.append(result)
                        log(
                            f"  {target:<9} c{conns:<3} rps={result['rps']:>9.1f} "
                            f"p50={_fmt(result['p50_ms'], 3)} p99={_fmt(result['p99_ms'], 3)} "
                            f"cpu_ms/req={_fmt(result['cpu_ms_per_req'], 4)} "
                            f"rss={result['rss_mb']}MB non2xx={result['non2xx']} "
                            f"errors={result['socket_errors'] or '-'}"
                        )
    except KeyboardInterrupt:
        log("bench: interrupted; stopping every process it started")
        procs.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)
        return 130
    except RuntimeError as exc:
        log(f"bench: {exc}; server logs in {scratch / 'servers.log'}")
        return 1
    finally:
        procs.stop_all()
    shutil.rmtree(scratch, ignore_errors=True)
    routing = run_routing_bench()
    text = report(results, targets, routing, load_before)
    print(text)
    if os.environ.get("NO_DOC") != "1":
        with DOC.open("a") as doc:
            doc.write("\n" + text)
        log(f"appended to {DOC.relative_to(ROOT)}")
    log(f"raw results: {raw_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
