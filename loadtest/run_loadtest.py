#!/usr/bin/env python3
"""``make loadtest``: start a gateway with its backends and Redis, run the locust
scenarios of ``loadtest/locustfile.py`` headless for a bounded time, keep the reports.

What it starts, all on 127.0.0.1 on free ports:

    stable, canary   ``meshgate demo-backend --name stable|canary``: the API's tracks
    redis            ``redis-server`` for the orders route's global rate limit
    meshgate         ``meshgate run`` on ``loadtest/config/`` (the @NAME@ placeholders
                     filled in: ports, a TLS certificate minted here, the inline JWKS
                     of two signing keys minted here), one worker, access log on (to
                     loadtest/results/<prefix>-access.log)
    locust           ``locust --headless`` on locustfile.py, for DURATION seconds

Locust prints its statistics every few seconds while it runs. Reports go to
``loadtest/results/`` (or ``--results-dir``): ``<prefix>_stats.csv``,
``_stats_history.csv``, ``_failures.csv``, ``_exceptions.csv``, ``<prefix>.html`` and
``<prefix>-checks.json`` (every check of the scenario file with its figures). The exit
code is locust's: 0 when every check passed, 1 when a threshold was crossed, 2 when
something could not start. Every process is stopped by its PID at the end.

Settings (flags, or the environment variables ``make loadtest`` passes on):
LOADTEST_DURATION (60 s), LOADTEST_USERS (30), LOADTEST_CHECK_LATENCY=0 to skip the
p95 threshold.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402  (a script beside harness.py, run as a file)
    RESULTS,
    ROOT,
    Processes,
    free_port,
    free_tcp_udp_port,
    log,
    mint_certificate,
    render,
    signing_key,
    start_redis,
    wait_http_ok,
)

CONFIG = HERE / "config"
TRACKS = ("stable", "canary")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration-s",
        type=int,
        default=int(os.environ.get("LOADTEST_DURATION") or 60),
        help="how long locust runs (LOADTEST_DURATION, 60)",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=int(os.environ.get("LOADTEST_USERS") or 30),
        help="simulated users (LOADTEST_USERS, 30; 8 are fixed: writers, canary, HTTP/2)",
    )
    parser.add_argument("--spawn-rate", type=float, default=10.0, help="users started per second")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--prefix", default="", help="report file prefix (locust-<time>)")
    parser.add_argument(
        "--no-latency-check",
        action="store_true",
        default=os.environ.get("LOADTEST_CHECK_LATENCY") == "0",
        help="do not hold the run to the p95 threshold (LOADTEST_CHECK_LATENCY=0)",
    )
    parser.add_argument("--quiet", action="store_true", help="no periodic statistics")
    args = parser.parse_args(argv)
    if args.users < 8:
        parser.error("--users must be at least 8: the fixed users alone are 8")
    if args.duration_s < 1:
        parser.error("--duration-s must be at least 1")
    return args


def _write_config(scratch: Path, ports: dict[str, int]) -> Path:
    keys = scratch / "keys"
    keys.mkdir()
    mint_certificate(keys)
    values = {
        "HTTP_PORT": str(ports["http"]),
        "HTTPS_PORT": str(ports["https"]),
        "STABLE_PORT": str(ports["stable"]),
        "CANARY_PORT": str(ports["canary"]),
        "CERT_DIR": str(keys),
        # Inside a single-quoted YAML scalar: JSON has no single quotes to escape.
        "ACCOUNTS_JWKS": signing_key(keys, "accounts", "RS256", "accounts-1"),
        "PARTNERS_JWKS": signing_key(keys, "partners", "ES256", "partners-1"),
    }
    config = scratch / "config"
    config.mkdir()
    for template in sorted(CONFIG.glob("*.yaml")):
        (config / template.name).write_text(render(template, values))
    return config


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    for tool in ("redis-server",):
        if not shutil.which(tool):
            log(f"loadtest: {tool} is not on PATH (make loadtest installs it)")
            return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    results: Path = args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    prefix = args.prefix or "locust-" + dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    scratch = Path(tempfile.mkdtemp(prefix="meshgate-loadtest-"))
    procs = Processes(scratch)
    try:
        ports = {name: free_port() for name in ("stable", "canary", "http", "admin")}
        ports["https"] = free_tcp_udp_port()
        config = _write_config(scratch, ports)
        for track in TRACKS:
            argv = [sys.executable, "-m", "gateway.cli", "demo-backend"]
            argv += ["--port", str(ports[track]), "--name", track]
            backend = procs.start(track, argv)
            wait_http_ok(ports[track], backend, track, timeout_s=20)
        redis_url = start_redis(procs)
        access_log = results / f"{prefix}-access.log"
        argv = [sys.executable, "-m", "gateway.cli", "run", str(config), "--workers", "1"]
        argv += ["--admin-port", str(ports["admin"]), "--redis-url", redis_url]
        with access_log.open("wb") as out:
            gateway = procs.start("meshgate", argv, stdout=out.fileno())
        wait_http_ok(ports["http"], gateway, "meshgate", path="/healthz", timeout_s=30)
        wait_http_ok(ports["https"], gateway, "meshgate (TLS)", path="/healthz", tls=True)
        log(
            f"loadtest: gateway on :{ports['http']} (HTTP) and :{ports['https']} (HTTPS), "
            f"{args.users} users for {args.duration_s} s; reports: {results}/{prefix}*"
        )
        env = {
            **os.environ,
            "LOADTEST_CONFIG_DIR": str(config),
            "LOADTEST_KEYS_DIR": str(scratch / "keys"),
            "LOADTEST_HTTPS_URL": f"https://127.0.0.1:{ports['https']}",
            "LOADTEST_CA_FILE": str(scratch / "keys" / "tls.crt"),
            "LOADTEST_CHECKS": str(results / f"{prefix}-checks.json"),
            "LOADTEST_CHECK_LATENCY": "0" if args.no_latency_check else "1",
        }
        locust = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py")]
        locust += ["--headless", "--users", str(args.users), "--spawn-rate", str(args.spawn_rate)]
        locust += ["--run-time", f"{args.duration_s}s", "--stop-timeout", "5"]
        locust += ["--host", f"http://127.0.0.1:{ports['http']}"]
        locust += ["--csv", str(results / prefix), "--csv-full-history"]
        locust += ["--html", str(results / f"{prefix}.html")]
        locust += ["--loglevel", "WARNING"]
        if args.quiet:
            locust.append("--only-summary")
        # Bounded: locust stops itself after --run-time; the timeout is the backstop.
        done = subprocess.run(locust, cwd=ROOT, env=env, timeout=args.duration_s + 120, check=False)
        if gateway.poll() is not None:
            log(f"loadtest: the gateway exited with {gateway.returncode} during the run")
            return 1
        log(f"loadtest: locust exited with {done.returncode}; reports in {results}/{prefix}*")
        return done.returncode
    except KeyboardInterrupt:
        log("loadtest: interrupted; stopping every process it started")
        return 130
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        log(f"loadtest: {exc}\n--- server log (last lines) ---\n{procs.tail_log()}")
        return 2
    finally:
        procs.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
