#!/usr/bin/env python3
"""meshgate's HTTP/3 beside its own HTTP/2 over TLS, in the same run.

Starts on 127.0.0.1, on free ports, each pinned with taskset (helpers from bench.py):

    backend   nginx, 1 worker, fixed 100-byte 200 response          core LOAD_CORE (1)
    meshgate  ``meshgate run``: one HTTPS Gateway server (a certificate minted
              here) routing everything to the backend; 1 worker; access log on,
              to /dev/null; HTTP/3 on the same port over UDP           core PROXY_CORE (0)

then ROUNDS rounds, alternating the order, of

    HTTP/2   h2load -n REQUESTS -c 50 -m 10 over TLS (ALPN h2)
    HTTP/3   loadtest/h3load.py --connections 50 --streams 10 --requests REQUESTS

both pinned to LOAD_CORE. Per run: requests/s, p50/p99 (h2load's per-request log;
h3load's own figures), meshgate's CPU ms per request (utime+stime from /proc) and RSS;
meshgate's idle RSS once at the start. The report takes medians over rounds and the
HTTP/3 / HTTP/2 ratio within each round. The HTTP/3 load generator is Python (aioquic)
and may saturate before the gateway does: its CPU time is reported too, and the CPU
per request on the gateway side is the figure that does not depend on the client.

Environment: ROUNDS (3), REQUESTS (20000), PROXY_CORE (0), LOAD_CORE (1).
Every process started here is stopped by PID at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import ssl
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

from bench import (  # noqa: E402  (a script beside bench.py, run as a file)
    Processes,
    _nginx_argv,
    cpu_ticks,
    free_port,
    load_average,
    machine_facts,
    process_tree,
    rss_kb,
    wait_http_ok,
)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
REQUESTS = int(os.environ.get("REQUESTS", "20000"))
PROXY_CORE = os.environ.get("PROXY_CORE", "0")
LOAD_CORE = os.environ.get("LOAD_CORE", "1")
START_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 300
RESULTS = HERE / "results"
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"bench_h3: {message}", file=sys.stderr, flush=True)


def mint_certificate(directory: Path) -> None:
    """A self-signed certificate for localhost / 127.0.0.1 (the clients do not verify)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def write_config(config_dir: Path, port: int, backend_port: int, certs: Path) -> None:
    config_dir.mkdir()
    (config_dir / "bench.yaml").write_text(
        f"""\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: bench}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
    - port: {{number: {port}, name: https, protocol: HTTPS}}
      hosts: ["*"]
      tls: {{mode: SIMPLE, serverCertificate: {certs}/tls.crt, privateKey: {certs}/tls.key}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend}}
spec:
  hosts: [backend.bench.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {backend_port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bench}}
spec:
  hosts: ["*"]
  gateways: [bench]
  http:
    - name: all
      route: [{{destination: {{host: backend.bench.local, port: {{number: 80}}}}}}]
"""
    )


def free_tcp_udp_port() -> int:
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for both TCP and UDP")


def wait_https_ok(port: int, process: subprocess.Popen[bytes]) -> None:
    """Bounded wait until GET / over TLS answers 200."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"meshgate exited with {process.returncode} while starting")
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as sock,
            ):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                reply = sock.recv(65536)
            status = reply.split(b"\r\n", 1)[0].decode("latin-1", "replace")
            if re.match(r"HTTP/1\.1 200 ", status):
                return
            last = status or "empty reply"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)  # polling a port: there is nothing to block on
    raise RuntimeError(f"meshgate on port {port} did not answer 200 over TLS (last: {last})")


def run_h2load(port: int, scratch: Path) -> dict[str, Any]:
    request_log = scratch / "h2load.log"
    argv = ["taskset", "-c", LOAD_CORE, "timeout", str(RUN_TIMEOUT_S), "h2load"]
    argv += ["-n", str(REQUESTS), "-c", "50", "-m", "10", "--log-file", str(request_log)]
    argv += [f"https://127.0.0.1:{port}/"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    out = done.stdout
    rps_match = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    failed = re.search(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out
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
    errors = (REQUESTS - ok) + (int(failed.group(2)) if failed else 0)
    return {
        "rps": float(rps_match.group(1)) if rps_match else None,
        "p50_ms": durations[len(durations) // 2] if durations else None,
        "p99_ms": durations[int(len(durations) * 0.99)] if durations else None,
        "requests": ok,
        "errors": errors if done.returncode == 0 else errors + 1,
        "client_cpu_s": None,
    }


def run_h3load(port: int) -> dict[str, Any]:
    argv = ["taskset", "-c", LOAD_CORE, "timeout", str(RUN_TIMEOUT_S), sys.executable]
    argv += [str(HERE / "h3load.py"), "--port", str(port), "--host", "localhost"]
    argv += ["--connections", "50", "--streams", "10", "--requests", str(REQUESTS)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"rps": None, "p50_ms": None, "p99_ms": None, "requests": 0, "errors": 1}
    return result


def measure(pid: int, run: Any) -> dict[str, Any]:
    tree = process_tree(pid)
    before = sum(cpu_ticks(p) for p in tree)
    result = run()
    tree = process_tree(pid)
    after = sum(cpu_ticks(p) for p in tree)
    served = result.get("requests") or 0
    cpu_ms = (after - before) * 1000.0 / TICKS_PER_S
    result["cpu_ms_per_req"] = cpu_ms / served if served else None
    result["rss_mb"] = sum(rss_kb(p) for p in tree) / 1024.0
    return result


def wait_h3_ok(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        argv = [sys.executable, str(HERE / "h3load.py"), "--port", str(port)]
        argv += ["--connections", "1", "--streams", "1", "--requests", "1", "--timeout-s", "5"]
        if subprocess.run(argv, capture_output=True, check=False).returncode == 0:
            return
    raise RuntimeError(f"no HTTP/3 answer on UDP port {port}")


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report(results: list[dict[str, Any]], idle_rss_mb: float, load_before: str) -> list[str]:
    facts = machine_facts()
    lines = [
        f"### HTTP/3 beside HTTP/2, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `ROUNDS={ROUNDS} REQUESTS={REQUESTS} .venv/bin/python loadtest/bench_h3.py`; "
        f"machine: {facts['nproc']} cores ({facts['cpu']}), Linux {facts['kernel']}, "
        f"Python {facts['python']}, commit {facts['commit']}; "
        f"load average before the run {load_before}, after it {load_average()}.",
        "",
        "| protocol | load | rps | vs HTTP/2 | p50 ms | p99 ms | gateway CPU ms/req "
        "| client CPU s | RSS MB | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for round_no in range(ROUNDS):
        pair = {r["protocol"]: r for r in results if r["round"] == round_no}
        if pair.get("HTTP/2", {}).get("rps") and pair.get("HTTP/3", {}).get("rps"):
            ratios.append(pair["HTTP/3"]["rps"] / pair["HTTP/2"]["rps"])
    for protocol, load in (
        ("HTTP/2", "h2load -c 50 -m 10 (TLS)"),
        ("HTTP/3", "h3load 50 conns x 10 streams"),
    ):
        rows = [r for r in results if r["protocol"] == protocol]
        ratio = _fmt(_median(ratios), 2) if protocol == "HTTP/3" else ""
        lines.append(
            f"| {protocol} | {load} | {_fmt(_median([r['rps'] for r in rows]), 0)} | {ratio} "
            f"| {_fmt(_median([r['p50_ms'] for r in rows]), 2)} "
            f"| {_fmt(_median([r['p99_ms'] for r in rows]), 2)} "
            f"| {_fmt(_median([r['cpu_ms_per_req'] for r in rows]), 3)} "
            f"| {_fmt(_median([r.get('client_cpu_s') for r in rows]), 2)} "
            f"| {_fmt(_median([r['rss_mb'] for r in rows]), 1)} "
            f"| {sum(r['errors'] or 0 for r in rows)} |"
        )
    lines += ["", f"meshgate idle RSS (one worker, before the load): {idle_rss_mb:.1f} MB."]
    return lines


def main() -> int:
    for tool in ("nginx", "h2load", "taskset"):
        if not shutil.which(tool):
            log(f"{tool} must be on PATH (loadtest/bench.sh installs it)")
            return 2
    load_before = load_average()
    scratch = Path(tempfile.mkdtemp(prefix="meshgate-bench-h3-"))
    procs = Processes(scratch)
    try:
        mint_certificate(scratch)
        ports = {"backend": free_port(), "meshgate": free_tcp_udp_port()}
        values = {"DIR": str(scratch), "BACKEND_PORT": str(ports["backend"]), "PROXY_PORT": "0"}
        backend = procs.start("backend", _nginx_argv(scratch, "backend", values), LOAD_CORE)
        wait_http_ok(ports["backend"], backend, "backend")
        config_dir = scratch / "config"
        write_config(config_dir, ports["meshgate"], ports["backend"], scratch)
        argv = [sys.executable, "-m", "gateway.cli", "run", str(config_dir)]
        argv += ["--workers", "1", "--admin-port", str(free_port())]
        gateway = procs.start("meshgate", argv, PROXY_CORE, stdout=subprocess.DEVNULL)
        wait_https_ok(ports["meshgate"], gateway)
        wait_h3_ok(ports["meshgate"])
        idle_rss_mb = sum(rss_kb(p) for p in process_tree(gateway.pid)) / 1024.0
        results: list[dict[str, Any]] = []
        for round_no in range(ROUNDS):
            order = ["HTTP/2", "HTTP/3"] if round_no % 2 == 0 else ["HTTP/3", "HTTP/2"]
            for protocol in order:
                log(f"round {round_no + 1}/{ROUNDS}: {protocol}")
                if protocol == "HTTP/2":
                    result = measure(gateway.pid, lambda: run_h2load(ports["meshgate"], scratch))
                else:
                    result = measure(gateway.pid, lambda: run_h3load(ports["meshgate"]))
                result.update(protocol=protocol, round=round_no)
                log(json.dumps(result))
                results.append(result)
        RESULTS.mkdir(exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        with (RESULTS / f"bench-h3-{stamp}.jsonl").open("w") as out:
            for result in results:
                out.write(json.dumps(result) + "\n")
        print("\n".join(report(results, idle_rss_mb, load_before)))
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
